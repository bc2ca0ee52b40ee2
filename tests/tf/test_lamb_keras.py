"""sparseopt_tf.Lamb (Keras 3) against keras.optimizers.Lamb (dense) and the core (sparse)."""

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402

import sparseopt as so  # noqa: E402
import sparseopt_tf  # noqa: E402
from sparseopt import errors  # noqa: E402
from tests.tf.helpers import rel_close, sparse_batches  # noqa: E402

pytestmark = pytest.mark.tf

STEPS = 20


@pytest.mark.parametrize("dtype, mode", [(np.float32, "function"), (np.float64, "eager")])
def test_dense_steps_match_keras_lamb(dtype, mode):
    rng = np.random.default_rng(0)
    init = rng.normal(size=(17, 5)).astype(dtype)
    grads = [tf.constant(rng.normal(size=init.shape).astype(dtype)) for _ in range(STEPS)]
    results = []
    for cls in (sparseopt_tf.Lamb, keras.optimizers.Lamb):
        var = tf.Variable(init)
        opt = cls(learning_rate=0.01, weight_decay=0.01, clipnorm=3.0)

        def step(g, opt=opt, var=var):
            opt.apply_gradients([(g, var)])
        if mode == "function":
            step = tf.function(step)
        for g in grads:
            step(g)
        results.append(var.numpy())
    rel_close(results[0], results[1], dtype)


def test_sparse_steps_are_the_cores_per_row_steps():
    """An ``IndexedSlices`` gradient runs the core's lazy kernel: per-row trust ratios, the
    same bits as ``sparseopt.Lamb`` on the same arrays."""
    rng = np.random.default_rng(1)
    init = rng.normal(size=(200, 4)).astype(np.float32)
    batches = sparse_batches(rng, 200, 4, 5, 40)
    var = tf.Variable(init)
    opt = sparseopt_tf.Lamb(learning_rate=0.05)

    @tf.function
    def step(values, indices):
        opt.apply_gradients([(tf.IndexedSlices(values, indices, tf.constant([200, 4], tf.int64)), var)])
    for values, indices in batches:
        step(tf.constant(values), tf.constant(indices))
    expected = init.copy()
    core = so.Lamb(learning_rate=0.05)
    for values, indices in batches:
        core.apply_gradients([(so.IndexedSlices(values, indices), expected)])
    np.testing.assert_array_equal(var.numpy(), expected)


def test_exact_mode_is_refused():
    with pytest.raises(errors.HyperparameterError, match="Lamb has no sparse_mode='exact'"):
        sparseopt_tf.Lamb(sparse_mode="exact")


def test_legacy_class_runs_the_cores_steps():
    """``sparseopt_tf.legacy.Lamb`` (tf_keras has no legacy Lamb): dense and sparse steps in a
    ``tf.function`` are the core's, bit for bit, with the betas in float32 (the legacy
    classes keep hyperparameters in float32 variables, as ``OptimizerV2._set_hyper``)."""
    rng = np.random.default_rng(2)
    init = rng.normal(size=(30, 4)).astype(np.float32)
    grads = [rng.normal(size=init.shape).astype(np.float32) for _ in range(3)]
    batches = sparse_batches(rng, 30, 4, 3, 12)
    var = tf.Variable(init)
    opt = sparseopt_tf.legacy.Lamb(learning_rate=0.05)

    @tf.function
    def dense(g):
        opt.apply_gradients([(g, var)])

    @tf.function
    def sparse(values, indices):
        opt.apply_gradients([(tf.IndexedSlices(values, indices, tf.constant([30, 4], tf.int64)), var)])
    expected = init.copy()
    core = so.Lamb(learning_rate=0.05, beta_1=float(np.float32(0.9)), beta_2=float(np.float32(0.999)))
    for g, (values, indices) in zip(grads, batches):
        dense(tf.constant(g))
        sparse(tf.constant(values), tf.constant(indices))
        core.apply_gradients([(g, expected)])
        core.apply_gradients([(so.IndexedSlices(values, indices), expected)])
    np.testing.assert_array_equal(var.numpy(), expected)
