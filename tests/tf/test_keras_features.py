"""Keras 3's optimizer features with sparse gradients: gradient accumulation (row by row,
never densified), ``loss_scale_factor``, EMA in exact mode, ``LossScaleOptimizer`` and
``MultiOptimizer``.

The reference for exact mode is Keras' own optimizer on the densified gradients (dense
training); for lazy mode, our lazy step fed what Keras' accumulation would hand it.
"""

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402

import sparseopt_tf  # noqa: E402
from tests.conftest import rel_close  # noqa: E402

# These steps take gradients directly, with no lookup to catch rows up: exact mode's warning
# about that is expected here (the tables are read after flush()).
pytestmark = pytest.mark.filterwarnings("ignore:.*caught up before they are read")

N, W, K = 20, 3, 4
OPTIMIZERS = [("Adam", dict(learning_rate=0.01)), ("SGD", dict(learning_rate=0.1, momentum=0.9)),
              ("RMSprop", dict(learning_rate=0.01))]


def _batches(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(5, W)).astype(np.float32), rng.integers(0, N, 5)) for _ in range(steps)]


def _init(seed=1):
    return np.random.default_rng(seed).normal(size=(N, W)).astype(np.float32)


def _train(opt, batches, sparse=True, mode="function", init=None, var=None):
    var = var if var is not None else keras.Variable(_init() if init is None else init)

    def step(values, indices):
        g = tf.IndexedSlices(values, indices, tf.constant([N, W], tf.int64))
        opt.apply_gradients([(g if sparse else tf.convert_to_tensor(g), var)])

    if mode == "function":
        step = tf.function(step)
    for values, indices in batches:
        step(tf.constant(values), tf.constant(indices))
    inner = getattr(opt, "inner_optimizer", opt)
    if hasattr(inner, "flush"):
        inner.flush()
    return var


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_accumulation_exact_equals_keras_dense_accumulation(name, kwargs, mode):
    batches = _batches(3 * K + 2)          # three updates, then two accumulated micro-steps
    ours = getattr(sparseopt_tf, name)(**kwargs, gradient_accumulation_steps=K, sparse_mode="exact")
    theirs = getattr(keras.optimizers, name)(**kwargs, gradient_accumulation_steps=K)
    got = _train(ours, batches, mode=mode)
    expected = _train(theirs, batches, sparse=False, mode=mode)
    rel_close(got.numpy(), expected.numpy(), np.float32)
    assert int(ours.iterations.numpy()) == int(theirs.iterations.numpy()) == 3
    ours.get_weights()              # the saved state: Keras' accumulators hold the partial sums
    for a, b in zip(ours._accumulated_gradients, theirs._accumulated_gradients):
        rel_close(a.numpy(), b.numpy(), np.float32)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_accumulation_lazy_steps_on_the_accumulated_rows(mode):
    batches = _batches(3 * K)
    got = _train(sparseopt_tf.Adam(0.01, gradient_accumulation_steps=K), batches, mode=mode)
    # What Keras' accumulation hands the step: the mean over each cycle, here as rows.
    cycles = [(np.concatenate([b[0] for b in batches[c:c + K]]) / K,
               np.concatenate([b[1] for b in batches[c:c + K]])) for c in range(0, 3 * K, K)]
    expected = _train(sparseopt_tf.Adam(0.01), cycles, mode=mode)
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
    untouched = np.setdiff1d(np.arange(N), np.concatenate([b[1] for b in batches]))
    np.testing.assert_array_equal(got.numpy()[untouched], _init()[untouched])


def test_accumulation_never_writes_a_whole_accumulator():
    """Keras zeroes and adds whole accumulators (``assign``); here the micro-steps buffer
    rows and nothing writes the accumulator (until the state is saved)."""
    opt = sparseopt_tf.Adam(0.01, gradient_accumulation_steps=K)
    var = keras.Variable(_init())
    opt.build([var])

    def refuse(*args, **kwargs):
        raise AssertionError("a whole-table write of the gradient accumulator")

    acc = opt._accumulated_gradients[0]
    acc.assign = acc.value.assign = refuse
    _train(opt, _batches(2 * K), mode="eager", var=var)
    assert int(opt.iterations.numpy()) == 2


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_accumulation_checkpoint_in_the_middle_of_a_cycle(mode, tmp_path):
    """A checkpoint holds Keras' accumulators; after the restore the next update reads
    every row of them once (the record of rows is not saved)."""
    batches = _batches(3 * K, seed=3)
    whole = _train(sparseopt_tf.Adam(0.01, gradient_accumulation_steps=K, sparse_mode="exact"),
                   batches, mode=mode)
    opt = sparseopt_tf.Adam(0.01, gradient_accumulation_steps=K, sparse_mode="exact")
    var = _train(opt, batches[:K + 2], mode=mode)
    path = tf.train.Checkpoint(optimizer=opt, var=var.value).write(str(tmp_path / "ckpt"))
    opt2 = sparseopt_tf.Adam(0.01, gradient_accumulation_steps=K, sparse_mode="exact")
    var2 = keras.Variable(np.zeros((N, W), np.float32))
    opt2.build([var2])
    tf.train.Checkpoint(optimizer=opt2, var=var2.value).read(path).assert_consumed()
    _train(opt2, batches[K + 2:], mode=mode, var=var2)
    rel_close(var2.numpy(), whole.numpy(), np.float32)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_accumulation_reading_the_state_in_the_middle_of_a_cycle_changes_nothing(mode):
    """``get_weights`` moves the buffered rows into Keras' accumulators; the cycle then goes
    on from there (the held rows join the update step) with the same result."""
    batches = _batches(3 * K, seed=5)
    whole = _train(sparseopt_tf.Adam(0.01, gradient_accumulation_steps=K, sparse_mode="exact"),
                   batches, mode=mode)
    opt = sparseopt_tf.Adam(0.01, gradient_accumulation_steps=K, sparse_mode="exact")
    var = _train(opt, batches[:K + 1], mode=mode)
    opt.get_weights()
    var = _train(opt, batches[K + 1:K + 3], mode=mode, var=var)
    opt.get_weights()
    _train(opt, batches[K + 3:], mode=mode, var=var)
    rel_close(var.numpy(), whole.numpy(), np.float32)


def test_accumulation_drops_what_a_variable_without_gradient_accumulated_as_keras():
    """A variable with no gradient on the update step: Keras resets its accumulator with
    every other one (its partial sum is dropped); so do we, for its buffered rows too."""
    batches = _batches(2 * K, seed=7)
    results = []
    for make, sparse in ((lambda: sparseopt_tf.Adam(0.01, gradient_accumulation_steps=K,
                                                    sparse_mode="exact"), True),
                         (lambda: keras.optimizers.Adam(0.01, gradient_accumulation_steps=K), False)):
        opt = make()
        a, b = keras.Variable(_init(1)), keras.Variable(_init(2))
        for step, (values, indices) in enumerate(batches):
            g = tf.IndexedSlices(tf.constant(values), tf.constant(indices), tf.constant([N, W], tf.int64))
            g = g if sparse else tf.convert_to_tensor(g)
            gb = None if step in (K - 1, K) else g     # none on an update step and the next one
            opt.apply_gradients([(g, a), (gb, b)])
        if sparse:
            opt.flush()
        results.append((a.numpy(), b.numpy()))
    for ours, theirs in zip(*results):
        rel_close(ours, theirs, np.float32)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_loss_scale_factor_with_sparse_gradients(mode):
    batches = _batches(4)
    scaled = [(v * 8.0, i) for v, i in batches]
    got = _train(sparseopt_tf.Adam(0.01, loss_scale_factor=8.0), scaled, mode=mode)
    expected = _train(sparseopt_tf.Adam(0.01), batches, mode=mode)
    np.testing.assert_array_equal(got.numpy(), expected.numpy())


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("overwrite", [None, 5])
@pytest.mark.parametrize("name,hyper", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_ema_in_exact_mode_equals_keras(name, hyper, mode, overwrite):
    batches = _batches(12)
    kwargs = dict(use_ema=True, ema_overwrite_frequency=overwrite, **hyper)
    ours = getattr(sparseopt_tf, name)(sparse_mode="exact", **kwargs)
    theirs = getattr(keras.optimizers, name)(**kwargs)
    got = _train(ours, batches, mode=mode)
    expected = _train(theirs, batches, sparse=False, mode=mode)
    rel_close(got.numpy(), expected.numpy(), np.float32)
    rel_close(ours._model_variables_moving_average[0].numpy(),
              theirs._model_variables_moving_average[0].numpy(), np.float32)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("name,hyper", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_loss_scale_optimizer_in_exact_mode_equals_keras(name, hyper, mode):
    batches = _batches(6)
    ours = getattr(sparseopt_tf, name)(sparse_mode="exact", **hyper)
    got = _train(keras.optimizers.LossScaleOptimizer(ours), batches, mode=mode)
    theirs = getattr(keras.optimizers, name)(**hyper)
    expected = _train(keras.optimizers.LossScaleOptimizer(theirs), batches, sparse=False, mode=mode)
    rel_close(got.numpy(), expected.numpy(), np.float32)


class DenseAdam(keras.optimizers.Adam):
    """Keras' Adam on densified gradients: dense training. (Keras' own Adam given an
    ``IndexedSlices`` with duplicate rows does not quite match its dense step.)"""

    def apply(self, grads, trainable_variables=None):
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        return super().apply(grads, trainable_variables)


@pytest.mark.parametrize("sparse_mode", ["lazy", "exact"])
def test_multi_optimizer_embedding_table_next_to_keras(sparse_mode):
    """``keras.optimizers.MultiOptimizer``: ours for the embedding table, Keras' Adam for
    the rest, in ``model.fit``. Exact mode ends where dense Adam on everything does; lazy
    mode moves only the looked-up rows of the table and the same dense layer updates."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 40, size=(64, 2))
    x[:, :] %= 30                                     # rows 30..39 are never looked up
    y = rng.normal(size=(64, 1)).astype(np.float32)

    def model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((2,), dtype="int32")
        if sparse_mode == "exact":
            e = sparseopt_tf.Embedding(40, 4, name="emb")(inputs)
        else:
            e = keras.layers.Embedding(40, 4, name="emb")(inputs)
        return keras.Model(inputs, keras.layers.Dense(1, name="out")(keras.layers.Flatten()(e)))

    ours, theirs = model(), model()
    table = ours.get_layer("emb").embeddings
    multi = keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(
        default_optimizer=keras.optimizers.Adam(0.01),
        optimizer_map={table.path: sparseopt_tf.Adam(0.01, sparse_mode=sparse_mode)}))
    ours.compile(optimizer=multi, loss="mse", jit_compile=False)
    theirs.compile(optimizer=DenseAdam(0.01), loss="mse", jit_compile=False)
    init = table.numpy().copy()
    ours.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    theirs.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    got, expected = ours.get_weights(), theirs.get_weights()
    if sparse_mode == "exact":
        for a, b in zip(got, expected):
            rel_close(a, b, np.float32)
    else:
        np.testing.assert_array_equal(got[0][30:], init[30:])
        assert not np.array_equal(got[0][:30], init[:30])


@pytest.mark.parametrize("name,hyper", OPTIMIZERS[:1], ids=[o[0] for o in OPTIMIZERS[:1]])
def test_mixed_float16_embedding_in_exact_mode_equals_keras(name, hyper):
    """``sparseopt_tf.Embedding`` under the ``mixed_float16`` policy, ``LossScaleOptimizer``
    around ours in exact mode, ``model.fit``: the layer's catch-up finds the table itself (not
    the float16 copy that Keras' autocast shows inside the call), and training ends where
    Keras' optimizer given densified gradients does."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 30, size=(64, 2))
    y = rng.normal(size=(64, 1)).astype(np.float32)

    def fit(optimizer):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((2,), dtype="int32")
        e = sparseopt_tf.Embedding(40, 4, dtype="mixed_float16")(inputs)
        out = keras.layers.Dense(1, dtype="mixed_float16")(keras.layers.Flatten(dtype="mixed_float16")(e))
        model = keras.Model(inputs, out)
        model.compile(optimizer=keras.optimizers.LossScaleOptimizer(optimizer), loss="mse",
                      jit_compile=False)
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        return model.get_weights()

    class Dense(getattr(keras.optimizers, name)):
        def apply(self, grads, trainable_variables=None):
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
            return super().apply(grads, trainable_variables)

    got = fit(getattr(sparseopt_tf, name)(sparse_mode="exact", **hyper))
    expected = fit(Dense(**hyper))
    for a, b in zip(got, expected):
        rel_close(a, b, np.float32)
