"""sparseopt_tf.Adafactor (Keras 3) against keras.optimizers.Adafactor (dense) and the core
(sparse)."""

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402

import sparseopt as so  # noqa: E402
import sparseopt_tf  # noqa: E402
from sparseopt import errors  # noqa: E402
from tests.tf.helpers import rel_close, sparse_batches  # noqa: E402

pytestmark = pytest.mark.tf

STEPS = 10


@pytest.mark.parametrize("dtype, mode", [(np.float32, "function"), (np.float64, "eager")])
def test_dense_steps_match_keras_adafactor(dtype, mode):
    """Variables of rank 0, 1, 2 and 3 in one step (``v``; ``r`` and ``c``), with weight decay
    and clipnorm."""
    rng = np.random.default_rng(0)
    shapes = [(), (7,), (17, 5), (3, 4, 6)]
    inits = [rng.normal(size=s).astype(dtype) for s in shapes]
    grads = [[tf.constant(rng.normal(size=s).astype(dtype)) for s in shapes] for _ in range(STEPS)]
    results = []
    for cls in (sparseopt_tf.Adafactor, keras.optimizers.Adafactor):
        # Keras variables: keras.optimizers.Adafactor names a placeholder after each variable,
        # and a tf.Variable's name ("Variable:0") is no valid scope name
        variables = [keras.Variable(p) for p in inits]
        opt = cls(learning_rate=0.5, weight_decay=0.01, clipnorm=3.0, clip_threshold=0.9)

        step = _stepper(opt, variables)
        if mode == "function":
            step = tf.function(step)
        for gs in grads:
            step(gs)
        results.append([v.numpy() for v in variables])
        if cls is sparseopt_tf.Adafactor:
            assert [tuple(opt.get_slot(variables[2], n).shape) for n in ("r", "c")] == [(17,), (5,)]
            assert [tuple(opt.get_slot(variables[3], n).shape) for n in ("r", "c")] == [(3, 4), (3, 6)]
            assert tuple(opt.get_slot(variables[1], "v").shape) == (7,)
    for ours, theirs in zip(*results):
        rel_close(ours, theirs, dtype)


def _stepper(opt, variables):
    """A step of ``opt`` on ``variables`` (a closure: tf.function would trace Keras variables
    given as default arguments as tensors)."""
    def step(gs):
        opt.apply_gradients(list(zip(gs, variables)))
    return step


def test_model_fit_matches_keras_adafactor():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.normal(size=(64, 1)).astype(np.float32)
    weights = []
    for cls in (sparseopt_tf.Adafactor, keras.optimizers.Adafactor):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                                  keras.layers.Dense(1)])
        model.compile(optimizer=cls(learning_rate=0.05), loss="mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for ours, theirs in zip(*weights):
        rel_close(ours, theirs, np.float32)


def test_sparse_steps_are_the_cores_steps():
    """An ``IndexedSlices`` gradient runs the core's lazy step (the touched rows as a table of
    their own): the same bits as ``sparseopt.Adafactor`` on the same arrays."""
    rng = np.random.default_rng(1)
    init = rng.normal(size=(200, 4)).astype(np.float32)
    batches = sparse_batches(rng, 200, 4, 5, 40)
    var = tf.Variable(init)
    opt = sparseopt_tf.Adafactor(learning_rate=0.05)

    @tf.function
    def step(values, indices):
        opt.apply_gradients([(tf.IndexedSlices(values, indices, tf.constant([200, 4], tf.int64)), var)])
    for values, indices in batches:
        step(tf.constant(values), tf.constant(indices))
    expected = init.copy()
    core = so.Adafactor(learning_rate=0.05)
    for values, indices in batches:
        core.apply_gradients([(so.IndexedSlices(values, indices), expected)])
    np.testing.assert_array_equal(var.numpy(), expected)
    np.testing.assert_array_equal(opt.get_slot(var, "c").numpy(), core.get_slot(expected, "c"))


def test_refusals():
    with pytest.raises(errors.HyperparameterError, match="Adafactor has no sparse_mode='exact'"):
        sparseopt_tf.Adafactor(sparse_mode="exact")
    with pytest.raises(NotImplementedError, match="tf_keras has no legacy Adafactor"):
        sparseopt_tf.legacy.Adafactor()
    with pytest.raises(errors.DtypeMismatchError, match="Adafactor runs on float32 and float64"):
        sparseopt_tf.Adafactor().build([tf.Variable(np.zeros(3, np.float16))])


def test_state_round_trips_continue_identically(tmp_path):
    """``model.save('.keras')`` and ``tf.train.Checkpoint`` keep ``r``, ``c`` and ``v`` (an
    embedding table stepped sparsely, a dense kernel and a bias): a restored run continues
    with the bits of the uninterrupted one."""
    def model(seed=0):
        keras.utils.set_random_seed(seed)
        ids = keras.Input(shape=(3,), dtype="int32")
        x = keras.layers.Embedding(30, 4, name="emb")(ids)
        out = keras.layers.Dense(1, name="head")(keras.layers.Flatten()(x))
        m = keras.Model(ids, out)
        m.compile(optimizer=sparseopt_tf.Adafactor(learning_rate=0.1), loss="mse")
        return m

    def fit(m, seed):
        rng = np.random.default_rng(seed)
        m.fit(rng.integers(0, 30, size=(32, 3)).astype(np.int32), rng.normal(size=(32, 1)).astype(np.float32),
              batch_size=8, epochs=1, shuffle=False, verbose=0)

    trained = model()
    fit(trained, 1)
    assert [tuple(v.shape) for v in trained.optimizer.variables[2:]] == [(30,), (4,), (12,), (1,), (1,)]
    trained.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    path = tf.train.Checkpoint(model=trained, optimizer=trained.optimizer).write(str(tmp_path / "ckpt"))
    restored = model(seed=7)
    restored.optimizer.build(restored.trainable_variables)
    tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).read(path).assert_consumed()
    for m in (trained, loaded, restored):
        fit(m, 2)
    for other in (loaded, restored):
        for a, b in zip(other.get_weights() + other.optimizer.get_weights(),
                        trained.get_weights() + trained.optimizer.get_weights()):
            np.testing.assert_array_equal(a, b)
