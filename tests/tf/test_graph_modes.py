"""Every path a step can take in TensorFlow: eagerly, in a ``tf.function`` and (legacy
classes) in a TF1 graph run by a ``tf.compat.v1.Session``, for every optimizer of the
table, on a scalar (0-d), a vector and a table (dense and sparse gradients) at once.

The reference is the core optimizer on NumPy copies of the same variables (itself
checked against Keras and tf_keras in ``tests/test_references_keras*.py``). Two defects
these tests pin: a 0-d variable was never updated in a graph (``numpy_function`` hands a
0-d tensor over as a copy), and in a TF1 graph the hand-over's claim ops ran in no fixed
order (nothing orders them but explicit control dependencies there), so kernels wrote
into buffers another tensor still shared.
"""

import pytest

tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")

import numpy as np  # noqa: E402

import sparseopt as so  # noqa: E402
from tests.tf.helpers import BRIDGED, bridge_class, rel_close  # noqa: E402

STEPS = 3
ROWS, WIDTH = 6, 2


def _problem(seed=0, dtype=np.float32, zeros=False):
    """Initial values of (scalar, vector, dense table, sparse table) and per step their
    gradients: dense arrays, and (values, indices) with a duplicate for the sparse table.

    ``zeros``: every variable starts at zero, as its zero-initialized slots do; in a TF1
    graph the initializers may then hand the variable and a slot one shared buffer.
    """
    rng = np.random.default_rng(seed)
    init = [np.asarray(rng.normal(), dtype), rng.normal(size=3).astype(dtype),
            rng.normal(size=(ROWS, WIDTH)).astype(dtype), rng.normal(size=(ROWS, WIDTH)).astype(dtype)]
    if zeros:
        init = [np.zeros_like(x) for x in init]
    steps = []
    for _ in range(STEPS):
        idx = np.array([1, 4, 1], np.int64)
        steps.append([np.asarray(rng.normal(), dtype), rng.normal(size=3).astype(dtype),
                      rng.normal(size=(ROWS, WIDTH)).astype(dtype),
                      (rng.normal(size=(3, WIDTH)).astype(dtype), idx)])
    return init, steps


def _core_reference(case, init, steps, legacy):
    make_legacy = legacy and getattr(case.cls, "_has_legacy_math", False)
    opt = case.make(_legacy=True) if make_legacy else case.make()
    arrays = [np.array(x, copy=True) for x in init]
    for grads in steps:
        pairs = [(g, v) for g, v in zip(grads[:3], arrays[:3])]
        values, idx = grads[3]
        pairs.append((so.IndexedSlices(values, idx, arrays[3].shape), arrays[3]))
        opt.apply_gradients(pairs)
    return arrays


def _tf_grads(grads):
    values, idx = grads[3]
    return [tf.constant(g) for g in grads[:3]] + [
        tf.IndexedSlices(tf.constant(values), tf.constant(idx), tf.constant([ROWS, WIDTH], tf.int64))]


def _check(case, got, expected):
    wrong = []
    for name, a, b in zip(("scalar", "vector", "dense table", "sparse table"), got, expected):
        assert np.shape(a) == np.shape(b), name
        try:
            rel_close(a, b, np.float32)
        except AssertionError as e:
            wrong.append(f"{name}: {e}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("legacy", [False, True], ids=["keras3", "legacy"])
@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("case", BRIDGED)
def test_scalar_vector_table_in_every_mode(case, mode, legacy):
    init, steps = _problem()
    variables = [tf.Variable(x) for x in init]
    opt = bridge_class(case, legacy=legacy)(**case.kwargs)

    def step(*grads):
        opt.apply_gradients(list(zip(grads, variables)))

    if mode == "function":
        step = tf.function(step)
    for grads in steps:
        step(*_tf_grads(grads))
    _check(case, [v.numpy() for v in variables], _core_reference(case, init, steps, legacy))
    assert int(opt.iterations.numpy()) == STEPS


@pytest.mark.parametrize("init", ["random", "zeros"])
@pytest.mark.parametrize("api", ["apply_gradients", "minimize", "get_updates"])
@pytest.mark.parametrize("case", BRIDGED)
def test_legacy_in_a_tf1_graph(case, api, init):
    """tf.compat.v1 Graph + Session: the update op built once and run STEPS times, after
    the initial values were read (as tf_keras' own tests do)."""
    init, steps = _problem(seed=1, zeros=init == "zeros")
    with tf.Graph().as_default():
        variables = [tf.compat.v1.Variable(x) for x in init]
        feeds = [tf.compat.v1.placeholder(tf.float32, np.shape(x)) for x in init[:3]]
        values = tf.compat.v1.placeholder(tf.float32, [3, WIDTH])
        indices = tf.compat.v1.placeholder(tf.int64, [3])
        grads = feeds + [tf.IndexedSlices(values, indices, tf.constant([ROWS, WIDTH], tf.int64))]
        opt = bridge_class(case, legacy=True)(**case.kwargs)
        def loss():
            # sum(g * v): its gradient is g; the gather gives the table an IndexedSlices one.
            return tf.add_n([tf.reduce_sum(f * v) for f, v in zip(feeds, variables[:3])]
                            + [tf.reduce_sum(tf.gather(variables[3], indices) * values)])

        if api == "apply_gradients":
            update = opt.apply_gradients(list(zip(grads, variables)))
        elif api == "get_updates":
            update = opt.get_updates(loss(), variables)
        else:
            update = opt.minimize(loss, variables)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            for got, x in zip(session.run(variables), init):
                np.testing.assert_array_equal(got, x)
            for g in steps:
                session.run(update, {feeds[0]: g[0], feeds[1]: g[1], feeds[2]: g[2],
                                     values: g[3][0], indices: g[3][1]})
            got = session.run(variables)
            iterations = session.run(opt.iterations)
    _check(case, got, _core_reference(case, init, steps, legacy=True))
    assert iterations == STEPS


def test_scalar_weight_trains_in_model_fit():
    """A model whose only weight is a scalar: ``model.fit`` (graph mode) must move it."""
    import keras

    class Scale(keras.layers.Layer):
        def build(self, input_shape):
            self.s = self.add_weight(shape=(), initializer="ones", name="s")

        def call(self, x):
            return x * self.s

    x = np.linspace(-1, 1, 32).astype(np.float32).reshape(-1, 1)
    y = 3 * x
    inputs = keras.Input((1,))
    model = keras.Model(inputs, Scale()(inputs))
    import sparseopt_tf
    model.compile(optimizer=sparseopt_tf.SGD(0.5), loss="mse")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    # One full-batch SGD step from s=1: grad of mean((s x - 3x)^2) = 2 (s - 3) mean(x^2).
    expected = 1.0 - 0.5 * 2 * (1.0 - 3.0) * np.mean(x.astype(np.float64) ** 2)
    np.testing.assert_allclose(float(model.layers[-1].s.numpy()), expected, rtol=1e-6)
