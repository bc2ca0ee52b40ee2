"""``model.fit`` paths a Keras user takes that the other suites do not: several steps per
``tf.function`` call (``compile(steps_per_execution=...)``), the ``mixed_bfloat16`` policy
(bfloat16 compute, float32 variables and gradients cast back by Keras), and one table read
by two lookups (its gradient, the sum of two ``IndexedSlices``, has every id twice).

The reference is the same model trained by Keras' own optimizer. Exact mode equals dense
training; Keras' own sparse step equals it where the batch has no duplicate ids (Adam: Keras 3
squares the slices before summing duplicates, see the README) and, for SGD with momentum,
with duplicates too: so Adam's batches hold distinct ids and SGD's repeat them.

The legacy classes take the same paths in tf_keras, where ``mixed_float16`` also wraps the
optimizer in tf_keras' ``LossScaleOptimizer`` (the loss scaled, the gradients unscaled, steps
with overflowing gradients skipped); their reference is tf_keras' own legacy optimizer, whose
sparse Adagrad and momentum SGD touch the batch's rows (our default, lazy mode).
"""

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402

import sparseopt_tf  # noqa: E402
from tests.conftest import rel_close  # noqa: E402

ROWS, WIDTH, IDS, BATCH, SAMPLES = 50, 8, 3, 16, 64


def _model(embedding, shared):
    ids = keras.Input((IDS,), dtype="int32")
    x = keras.Input((4,))
    table = embedding(ROWS, WIDTH, name="table")
    e = table(ids)
    if shared:  # the same table read twice: its gradient has every id of the batch twice
        e = keras.layers.Add()([e, table(ids[:, ::-1])])
    h = keras.layers.Concatenate()([keras.layers.Flatten()(e), keras.layers.Dense(8)(x)])
    return keras.Model([ids, x], keras.layers.Dense(1)(h))


def _data(distinct):
    rng = np.random.default_rng(0)
    if distinct:  # each batch of 16 x 3 ids holds 48 distinct rows
        ids = np.concatenate([rng.permutation(ROWS)[:BATCH * IDS] for _ in range(SAMPLES // BATCH)])
    else:
        ids = rng.integers(0, 30, SAMPLES * IDS)  # repeats within a batch, rows idle in some
    ids = ids.reshape(SAMPLES, IDS).astype(np.int32)
    return [ids, rng.standard_normal((SAMPLES, 4)).astype(np.float32)], rng.standard_normal(
        (SAMPLES, 1)).astype(np.float32)


def _fit(optimizer, embedding, policy, steps_per_execution, shared, distinct):
    x, y = _data(distinct)
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(1)
        model = _model(embedding, shared)
        model.compile(optimizer=optimizer, loss="mse", steps_per_execution=steps_per_execution)
        initial = model.get_weights()[0]
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return model.get_weights(), initial


CASES = [  # (optimizer, kwargs, policy, steps_per_execution, shared table)
    ("Adam", dict(learning_rate=0.01), "float32", 4, False),
    ("Adam", dict(learning_rate=0.01), "mixed_bfloat16", 1, False),
    ("SGD", dict(learning_rate=0.05, momentum=0.9), "mixed_bfloat16", 3, True),
]


@pytest.mark.parametrize("name,kwargs,policy,spe,shared", CASES,
                         ids=[f"{c[0]}-{c[2]}-spe{c[3]}{'-shared' if c[4] else ''}" for c in CASES])
def test_fit_equals_keras_own_optimizer(name, kwargs, policy, spe, shared):
    distinct = name == "Adam"
    ours, initial = _fit(getattr(sparseopt_tf, name)(**kwargs, sparse_mode="exact"), sparseopt_tf.Embedding,
                         policy, spe, shared, distinct)
    theirs, _ = _fit(getattr(keras.optimizers, name)(**kwargs), keras.layers.Embedding,
                     policy, spe, shared, distinct)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype == np.float32  # mixed policies keep float32 variables
        rel_close(a, b, np.float32)
    assert np.max(np.abs(ours[0] - initial)) > 1e-3  # the table moved


LEGACY_CASES = [("Adagrad", dict(learning_rate=0.05)), ("SGD", dict(learning_rate=0.05, momentum=0.9))]


def _legacy_fit(optimizer, policy, steps_per_execution):
    tf_keras = pytest.importorskip("tf_keras")
    x, y = _data(distinct=False)
    tf_keras.mixed_precision.set_global_policy(policy)
    try:
        tf_keras.utils.set_random_seed(1)
        ids, dense = tf_keras.Input((IDS,), dtype="int32"), tf_keras.Input((4,))
        e = tf_keras.layers.Flatten()(tf_keras.layers.Embedding(ROWS, WIDTH)(ids))
        h = tf_keras.layers.Concatenate()([e, tf_keras.layers.Dense(8)(dense)])
        model = tf_keras.Model([ids, dense], tf_keras.layers.Dense(1, dtype="float32")(h))
        model.compile(optimizer=optimizer, loss="mse", steps_per_execution=steps_per_execution)
        initial = model.get_weights()[0]
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
        wrapped = type(model.optimizer).__name__
    finally:
        tf_keras.mixed_precision.set_global_policy("float32")
    return model.get_weights(), wrapped, initial


@pytest.mark.parametrize("name,kwargs", LEGACY_CASES, ids=[c[0] for c in LEGACY_CASES])
def test_legacy_fit_mixed_float16_equals_tf_keras(name, kwargs):
    tf_keras = pytest.importorskip("tf_keras")
    ours, wrapped, initial = _legacy_fit(getattr(sparseopt_tf.legacy, name)(**kwargs), "mixed_float16", 3)
    theirs, _, _ = _legacy_fit(getattr(tf_keras.optimizers.legacy, name)(**kwargs), "mixed_float16", 3)
    assert wrapped == "LossScaleOptimizer"  # tf_keras wrapped ours, as it wraps its own
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        rel_close(a, b, np.float32)
    assert np.max(np.abs(ours[0] - initial)) > 1e-3  # the table moved


@pytest.mark.parametrize("framework", ["keras", "tf_keras"])
def test_learning_rate_callbacks_reach_the_step(framework):
    """``LearningRateScheduler`` and ``ReduceLROnPlateau`` set the optimizer's learning rate
    between epochs; the step must use the new value (plain SGD: Keras' own sparse step equals
    ours, duplicates or not)."""
    k = pytest.importorskip(framework)
    ours_cls = sparseopt_tf.SGD if framework == "keras" else sparseopt_tf.legacy.SGD
    theirs_cls = k.optimizers.SGD if framework == "keras" else k.optimizers.legacy.SGD
    (ids, _), y = _data(distinct=False)

    def fit(optimizer, callbacks):
        k.utils.set_random_seed(1)
        inputs = k.Input((IDS,), dtype="int32")
        out = k.layers.Dense(1)(k.layers.Flatten()(k.layers.Embedding(ROWS, WIDTH)(inputs)))
        model = k.Model(inputs, out)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(ids, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0, callbacks=callbacks)
        return model.get_weights(), float(np.asarray(model.optimizer.learning_rate))

    def callbacks():
        return [k.callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5 if epoch else lr),
                k.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.2, patience=0, min_delta=10.0)]

    ours, ours_lr = fit(ours_cls(0.1), callbacks())
    theirs, theirs_lr = fit(theirs_cls(0.1), callbacks())
    steady, _ = fit(theirs_cls(0.1), [])
    assert ours_lr == theirs_lr < 0.01  # both callbacks lowered it
    for a, b in zip(ours, theirs):
        rel_close(a, b, np.float32)
    assert np.max(np.abs(theirs[0] - steady[0])) > 1e-3  # the callbacks changed the training
