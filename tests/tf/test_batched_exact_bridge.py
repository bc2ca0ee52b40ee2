"""The bridge's exact-mode step batches too: a Keras 3 model's exact sparse updates of one
kernel configuration run in one region (``sparseopt.backends.cpu.run_exact_tables``, reached
through ``sparseopt.engine.ExactBook.step``), with the same bits as the per-table path
(the core's ``_batch_tables = False``; ``tests/tf/test_exact_bridge.py`` checks that path
against Keras' dense training)."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import sparseopt_tf  # noqa: E402
from sparseopt.backends import cpu as cpu_backend  # noqa: E402

#: (rows, width) of the model's tables: widths 2-16, a table of one row.
TABLES = [(50, 4), (7, 3), (300, 4), (20, 16), (1, 2), (90, 4)]
STEPS = 5


def _model():
    keras.utils.set_random_seed(0)
    ids = keras.Input(shape=(len(TABLES),), dtype="int32")
    embs = [keras.layers.Flatten()(sparseopt_tf.Embedding(rows, width, name=f"table{t}")(ids[:, t:t + 1]))
            for t, (rows, width) in enumerate(TABLES)]
    return keras.Model(ids, keras.layers.Dense(1)(keras.layers.Concatenate()(embs)))


def _train(batched):
    rng = np.random.default_rng(0)
    model = _model()
    opt = sparseopt_tf.Adam(learning_rate=0.05, sparse_mode="exact")
    opt._core._batch_tables = batched
    model.compile(optimizer=opt, loss="mse")
    for _ in range(STEPS):
        # Zipf-like ids: duplicates, and rows idle for several steps before they come back
        x = np.stack([np.minimum(rng.zipf(1.4, 48) - 1, rows - 1) for rows, _ in TABLES], 1)
        model.train_on_batch(x.astype(np.int32), rng.normal(size=(48, 1)).astype(np.float32))
    before_flush = [w.copy() for w in model.get_weights()]
    opt.flush()
    return before_flush, model.get_weights(), [np.asarray(v) for v in opt.variables]


def test_keras3_exact_model_batched_equals_per_table(monkeypatch):
    regions = []
    original = cpu_backend.run_exact_tables

    def counted(rule, group, *args):
        regions.append(len(group))
        return original(rule, group, *args)
    monkeypatch.setattr(cpu_backend, "run_exact_tables", counted)
    reference = _train(batched=False)
    assert not regions
    got = _train(batched=True)
    assert regions == [len(TABLES)] * STEPS  # one region per step, every table in it
    for a, b in zip(sum(got, []), sum(reference, [])):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
