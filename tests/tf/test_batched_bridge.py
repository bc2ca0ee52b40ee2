"""The bridge's host step runs a step's lazy sparse jobs table-batched, through the core
(``sparseopt.backends.cpu.plan_sparse`` and ``engine.run_lazy``): the same bits as the per-table path
(the core's ``_batch_tables = False``, one plan and one kernel call per table), for Keras 3
models, tf_keras models and custom loops; a bad step still raises before any write."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import sparseopt as so  # noqa: E402
import sparseopt_tf  # noqa: E402
from sparseopt import _config  # noqa: E402
from sparseopt import engine  # noqa: E402

#: (rows, width) of the model's tables: widths 2-16, a table of one row.
TABLES = [(50, 4), (7, 3), (300, 4), (20, 16), (1, 2), (64, 3), (90, 4)]

#: (class name, keyword arguments): elementwise rules with 1-3 slots, weight decay (on
#: every table but table0, excluded), a row-wise rule.
OPTIMIZERS = [
    ("Adam", {}),
    ("Adam", {"amsgrad": True}),
    ("SGD", {"momentum": 0.9, "nesterov": True}),
    ("Adagrad", {}),
    ("RMSprop", {"momentum": 0.5, "centered": True}),
    ("Ftrl", {}),
    ("RowwiseAdagrad", {}),
    ("AdamW", {"weight_decay": 0.05}),
]

#: Each step's table-batched regions and the tables in them: one region for the tables of
#: one kernel configuration (any rows and widths): all seven; with weight decay, table0
#: (excluded) has a configuration of its own and runs alone.
REGIONS = {"AdamW": (1, 6)}
DEFAULT_REGIONS = (1, 7)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    """Steps on 1 thread, or on 2 (each step big enough for several, not measured)."""
    monkeypatch.setattr(_config, "MIN_WORK_PER_THREAD", 1)
    monkeypatch.setattr(_config, "ADAPTIVE", False)
    so.set_num_threads(request.param)
    yield request.param
    so.set_num_threads(None)


@pytest.fixture
def regions(monkeypatch):
    """Counts the table-batched regions the core runs (``engine._run_tables`` calls)."""
    counts = {"regions": 0, "tables": 0}
    original = engine._run_tables

    def counted(rule, group, *args):
        counts["regions"] += 1
        counts["tables"] += len(group)
        return original(rule, group, *args)

    monkeypatch.setattr(engine, "_run_tables", counted)
    return counts


def _batches(steps=4, batch=48, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        # Zipf-like ids: many duplicates per table, and rows no batch touches.
        ids = np.stack([np.minimum(rng.zipf(1.4, batch) - 1, rows - 1) for rows, _ in TABLES], 1)
        out.append((ids.astype(np.int32), rng.normal(size=(batch, 1)).astype(np.float32)))
    return out


def _model(k):
    ids = k.Input(shape=(len(TABLES),), dtype="int32")
    embs = [k.layers.Flatten()(k.layers.Embedding(rows, width, name=f"table{t}")(ids[:, t:t + 1]))
            for t, (rows, width) in enumerate(TABLES)]
    x = k.layers.Dense(8, activation="relu")(k.layers.Concatenate()(embs))
    return k.Model(ids, k.layers.Dense(1)(x))


def _train(name, kwargs, batched, legacy=False, eager=False):
    """Weights and optimizer state after a few ``train_on_batch`` steps."""
    if legacy:
        import tf_keras as k
        module = sparseopt_tf.legacy
    else:
        k, module = keras, sparseopt_tf
    k.utils.set_random_seed(0)
    model = _model(k)
    opt = getattr(module, name)(learning_rate=0.05, **kwargs)
    opt._core._batch_tables = batched
    model.compile(optimizer=opt, loss="mse", run_eagerly=eager)
    if kwargs.get("weight_decay"):
        opt.exclude_from_weight_decay(var_list=[model.get_layer("table0").embeddings])
    initial = [w.copy() for w in model.get_weights()]
    for x, y in _batches():
        model.train_on_batch(x, y)
    state = opt.get_weights() if legacy else [np.asarray(v) for v in opt.variables]
    return initial, model.get_weights(), state


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=[f"{n}{'-' + '-'.join(k) if k else ''}"
                                                         for n, k in OPTIMIZERS])
def test_keras3_model_batched_equals_per_table(name, kwargs, threads, regions):
    initial, after_per_table, state_per_table = _train(name, kwargs, batched=False)
    assert regions["regions"] == 0
    _, after, state = _train(name, kwargs, batched=True)
    # The batched step ran (4 steps; REGIONS).
    per_step = REGIONS.get(name, DEFAULT_REGIONS)
    assert (regions["regions"], regions["tables"]) == (4 * per_step[0], 4 * per_step[1])
    for t in range(len(TABLES)):       # the tables moved (the test is not vacuous)
        assert not np.array_equal(after[t], initial[t])
    assert len(after) == len(after_per_table) and len(state) == len(state_per_table)
    for a, b in zip(after + state, after_per_table + state_per_table):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["Adam", "RowwiseAdagrad"])
@pytest.mark.parametrize("eager", [False, True], ids=["graph", "eager"])
def test_legacy_model_batched_equals_per_table(name, eager, regions):
    pytest.importorskip("tf_keras")
    initial, after_per_table, state_per_table = _train(name, {}, batched=False, legacy=True, eager=eager)
    assert regions["regions"] == 0
    _, after, state = _train(name, {}, batched=True, legacy=True, eager=eager)
    assert (regions["regions"], regions["tables"]) == (4 * DEFAULT_REGIONS[0], 4 * DEFAULT_REGIONS[1])
    for t in range(len(TABLES)):
        assert not np.array_equal(after[t], initial[t])
    for a, b in zip(after + state, after_per_table + state_per_table):
        np.testing.assert_array_equal(a, b)


#: Custom-loop tables: (rows, width, dtype, index dtype): float32 and float64 tables (two
#: configurations), int32 and int64 indices (two plans per step), two widths.
LOOP_TABLES = [(40, 4, np.float32, np.int64), (300, 4, np.float32, np.int32),
               (20, 4, np.float64, np.int64), (8, 4, np.float64, np.int32),
               (1000, 4, np.float32, np.int64), (12, 6, np.float32, np.int32)]


def _loop(name, batched, graph):
    rng = np.random.default_rng(5)
    init = [rng.normal(size=(rows, width)).astype(dtype) for rows, width, dtype, _ in LOOP_TABLES]
    dense_init = rng.normal(size=(6, 5)).astype(np.float32)
    variables = [tf.Variable(v) for v in init] + [tf.Variable(dense_init)]
    opt = getattr(sparseopt_tf, name)(learning_rate=0.05)
    opt._core._batch_tables = batched

    def step(grads):
        opt.apply_gradients(zip(grads, variables))
    step = tf.function(step) if graph else step
    for _ in range(3):
        grads = []
        for rows, width, dtype, idx_dtype in LOOP_TABLES:
            n = int(rng.integers(1, 3 * rows))
            idx = np.minimum(rng.zipf(1.3, n) - 1, rows - 1).astype(idx_dtype)
            grads.append(tf.IndexedSlices(tf.constant(rng.normal(size=(n, width)).astype(dtype)),
                                          tf.constant(idx), tf.constant([rows, width], tf.int64)))
        grads.append(tf.constant(rng.normal(size=(6, 5)).astype(np.float32)))
        step(grads)
    return init, [v.numpy() for v in variables] + [np.asarray(v) for v in opt.variables]


@pytest.mark.parametrize("name", ["Adam", "Adagrad", "RowwiseAdagrad"])
@pytest.mark.parametrize("graph", [True, False], ids=["tf.function", "eager"])
def test_custom_loop_dtypes_and_index_dtypes_batched_equals_per_table(name, graph, regions):
    init, per_table = _loop(name, batched=False, graph=graph)
    assert regions["regions"] == 0
    _, batched = _loop(name, batched=True, graph=graph)
    # Per step: one region for the four float32 tables, one for the two float64 ones.
    assert (regions["regions"], regions["tables"]) == (3 * 2, 3 * 6)
    for t in range(len(LOOP_TABLES)):
        assert not np.array_equal(batched[t], init[t])
    for a, b in zip(batched, per_table):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "per-table"])
def test_first_bad_table_in_order_raises_before_any_write(batched):
    """Tables 1 and 2 hold an index out of range: table 1's error, and nothing is written
    (the plans of all tables are made before the first kernel)."""
    variables = [tf.Variable(tf.fill((rows, 3), 1.0)) for rows in (10, 6, 4, 8)]
    opt = sparseopt_tf.Adam(0.1)
    opt.build(variables)
    opt._core._batch_tables = batched

    def grads(bad):
        out = []
        for t, v in enumerate(variables):
            rows = v.shape[0]
            idx = [0, rows - 1, rows if t in bad else 1]
            out.append(tf.IndexedSlices(tf.ones((3, 3)), tf.constant(idx, tf.int64), [rows, 3]))
        return out

    before = [v.numpy() for v in variables] + [np.asarray(v) for v in opt.variables]
    with pytest.raises(so.errors.IndexOutOfRangeError,
                       match=r"indices must lie in \[0, 6\); got 6 at position 2"):
        opt.apply_gradients(zip(grads({1, 2}), variables))
    with pytest.raises(so.errors.IndexOutOfRangeError,
                       match=r"indices must lie in \[0, 4\); got 4 at position 2"):
        opt.apply_gradients(zip(grads({2, 3}), variables))
    after = [v.numpy() for v in variables] + [np.asarray(v) for v in opt.variables]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    opt.apply_gradients(zip(grads(set()), variables))         # a good step still runs
    assert int(opt.iterations.numpy()) == 1
    assert not np.array_equal(variables[0].numpy(), before[0])
