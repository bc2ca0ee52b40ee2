"""sparseopt_tf.<Name> (Keras 3) against keras.optimizers.<Name> and the core's lazy rule."""

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402

import sparseopt_tf  # noqa: E402
from tests.tf.helpers import BRIDGED, bridge_class, core_dense_run, rel_close, sparse_batches  # noqa: E402

STEPS = 20


def test_every_core_optimizer_has_a_bridge_class():
    import sparseopt.optimizers as core
    for name in core.__all__:
        cls = getattr(sparseopt_tf, name)
        assert issubclass(cls, keras.optimizers.Optimizer)
        assert cls._spec.core_class is getattr(core, name)


def _run(opt, var, grads, mode):
    def step(g):
        opt.apply_gradients([(g, var)])
    if mode == "function":
        step = tf.function(step)
    for g in grads:
        step(g)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("case", BRIDGED)
def test_dense_matches_keras(case, mode):
    rng = np.random.default_rng(0)
    init = rng.normal(size=(17, 5)).astype(np.float32)
    grads = [tf.constant(rng.normal(size=init.shape).astype(np.float32)) for _ in range(STEPS)]
    ours, theirs = tf.Variable(init), tf.Variable(init)
    _run(bridge_class(case)(**case.kwargs), ours, grads, mode)
    if case.keras is None:             # no Keras class (RowwiseAdagrad): the core is the reference
        np.testing.assert_array_equal(ours.numpy(), core_dense_run(case, init, grads))
        return
    _run(getattr(keras.optimizers, case.keras)(**case.kwargs), theirs, grads, mode)
    rel_close(ours.numpy(), theirs.numpy(), np.float32)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("case", BRIDGED)
def test_sparse_touching_every_row_matches_keras_dense(case, mode):
    """With every row touched (and duplicates), lazy equals the dense rule on the summed gradient."""
    rng = np.random.default_rng(1)
    init = rng.normal(size=(13, 6)).astype(np.float32)
    batches = sparse_batches(rng, 13, 6, STEPS, k=9, all_rows=True)
    slices = [tf.IndexedSlices(tf.constant(v), tf.constant(i), tf.constant(init.shape, tf.int64))
              for v, i in batches]
    ours, theirs = tf.Variable(init), tf.Variable(init)
    _run(bridge_class(case)(**case.kwargs), ours, slices, mode)
    dense = [tf.convert_to_tensor(s) for s in slices]
    if case.keras is None:
        rel_close(ours.numpy(), core_dense_run(case, init, dense), np.float32)
        return
    _run(getattr(keras.optimizers, case.keras)(**case.kwargs), theirs, dense, mode)
    rel_close(ours.numpy(), theirs.numpy(), np.float32)


@pytest.mark.parametrize("case", BRIDGED)
def test_sparse_is_lazy_and_matches_core(case):
    """Rows not touched stay bit-identical (variable and slots); touched rows follow the core."""
    rng = np.random.default_rng(2)
    init = rng.normal(size=(40, 3)).astype(np.float32)
    batches = sparse_batches(rng, 30, 3, STEPS, k=6)          # rows 30..39 never touched
    var = tf.Variable(init)
    opt = bridge_class(case)(**case.kwargs)
    step = tf.function(lambda v, i: opt.apply_gradients([(tf.IndexedSlices(v, i, [40, 3]), var)]))
    core_opt, core_var = case.make(), init.copy()
    import sparseopt as so
    for values, idx in batches:
        step(tf.constant(values), tf.constant(idx))
        core_opt.apply_gradients([(so.IndexedSlices(values, idx, (40, 3)), core_var)])
    np.testing.assert_array_equal(var.numpy()[30:], init[30:])
    rel_close(var.numpy(), core_var, np.float32)
    for name in core_opt.get_slot_names():
        rel_close(opt.get_slot(var, name).numpy(), core_opt.get_slot(core_var, name), np.float32)
    assert int(opt.iterations.numpy()) == STEPS


def test_sparse_float64_matches_core():
    import sparseopt as so
    rng = np.random.default_rng(3)
    init = rng.normal(size=(25, 4))
    var, core_var = tf.Variable(init), init.copy()
    opt, core_opt = sparseopt_tf.Adam(0.01, amsgrad=True), so.Adam(0.01, amsgrad=True)
    for values, idx in sparse_batches(rng, 25, 4, STEPS, k=7, dtype=np.float64):
        opt.apply_gradients([(tf.IndexedSlices(tf.constant(values), tf.constant(idx), [25, 4]), var)])
        core_opt.apply_gradients([(so.IndexedSlices(values, idx), core_var)])
    # The learning rate lives in a float32 variable in Keras 3: compare at float32 precision.
    rel_close(var.numpy(), core_var, np.float32)


def test_weight_decay_is_fused_and_lazy():
    rng = np.random.default_rng(4)
    init = rng.normal(size=(10, 2)).astype(np.float32)
    dense_ours, dense_keras = tf.Variable(init), tf.Variable(init)
    ours = sparseopt_tf.Adam(0.01, weight_decay=0.1)
    theirs = keras.optimizers.Adam(0.01, weight_decay=0.1)
    for _ in range(5):
        g = tf.constant(rng.normal(size=init.shape).astype(np.float32))
        ours.apply_gradients([(g, dense_ours)])
        theirs.apply_gradients([(g, dense_keras)])
    rel_close(dense_ours.numpy(), dense_keras.numpy(), np.float32)
    table = tf.Variable(init)
    opt = sparseopt_tf.SGD(0.1, weight_decay=0.5)
    opt.apply_gradients([(tf.IndexedSlices(tf.ones((1, 2)), tf.constant([3]), [10, 2]), table)])
    np.testing.assert_array_equal(np.delete(table.numpy(), 3, 0), np.delete(init, 3, 0))
    np.testing.assert_allclose(table.numpy()[3], init[3] - init[3] * 0.05 - 0.1, rtol=1e-6)


def _embedding_model(num_rows=50, dim=4, seed=0):
    keras.utils.set_random_seed(seed)
    ids = keras.Input(shape=(3,), dtype="int32")
    x = keras.layers.Embedding(num_rows, dim, name="emb")(ids)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(1, name="head")(x)
    return keras.Model(ids, out)


def _data(num_rows=50, n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, num_rows // 2, size=(n, 3)).astype(np.int32)   # upper half never used
    y = rng.normal(size=(n, 1)).astype(np.float32)
    return x, y


@pytest.mark.parametrize("case", BRIDGED)
def test_model_fit_graph_equals_eager_and_is_lazy(case):
    x, y = _data()
    results = []
    for run_eagerly in (False, True):
        model = _embedding_model()
        init = model.get_layer("emb").embeddings.numpy()
        model.compile(optimizer=bridge_class(case)(**case.kwargs), loss="mse", run_eagerly=run_eagerly)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        table = model.get_layer("emb").embeddings.numpy()
        np.testing.assert_array_equal(table[25:], init[25:])          # lazy: untouched rows
        assert not np.array_equal(table[:25], init[:25])
        results.append([w.numpy() for w in model.trainable_weights])
    for a, b in zip(*results):
        rel_close(a, b, np.float32)


def test_model_fit_matches_keras_for_plain_sgd():
    """Plain SGD: lazy equals dense, so model.fit must match keras.optimizers.SGD."""
    x, y = _data()
    weights = []
    for opt in (sparseopt_tf.SGD(0.05), keras.optimizers.SGD(0.05)):
        model = _embedding_model()
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        weights.append([w.numpy() for w in model.trainable_weights])
    for a, b in zip(*weights):
        rel_close(a, b, np.float32)


def test_embedding_gradient_reaches_the_row_kernel():
    from sparseopt_tf import _host
    seen = []
    original = _host.HostStep.__call__

    def spy(self, jobs, scalars, arrays):
        seen.extend((job.name, job.sparse) for job in jobs)
        return original(self, jobs, scalars, arrays)

    _host.HostStep.__call__ = spy
    try:
        x, y = _data()
        model = _embedding_model()
        model.compile(optimizer=sparseopt_tf.Adam(0.01), loss="mse")
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    finally:
        _host.HostStep.__call__ = original
    assert ("emb/embeddings:0", True) in seen
    assert ("head/kernel:0", False) in seen


def test_jit_compile_raises_a_clear_error():
    var = tf.Variable(tf.zeros((4, 2)))
    opt = sparseopt_tf.Adam()
    opt.build([var])

    @tf.function(jit_compile=True)
    def step(g):
        opt.apply_gradients([(g, var)])

    # Autograph may wrap the error in its StagingError; the message is ours either way.
    with pytest.raises(Exception, match="XLA cannot compile.*jit_compile=False"):
        step(tf.ones((4, 2)))


# ------------------------------------------------------------------ clipping (SPEC §3)

def _slices_with_duplicates(rng, num_rows, width, all_rows):
    idx = rng.integers(0, num_rows, 2 * num_rows)
    if all_rows:
        idx = np.concatenate([np.arange(num_rows), idx])
    values = rng.normal(size=(idx.size, width)).astype(np.float32)
    return tf.IndexedSlices(tf.constant(values), tf.constant(idx), tf.constant([num_rows, width], tf.int64))


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("clip", [dict(clipnorm=0.5), dict(clipvalue=0.3), dict(global_clipnorm=0.4)])
@pytest.mark.parametrize("name, all_rows", [("Adam", True), ("SGD", False)])
def test_sparse_clipping_sees_the_deduplicated_rows(name, all_rows, clip, mode):
    """Clipping a sparse gradient equals clipping its dense equivalent (duplicates summed).

    Adam touches every row (lazy equals dense there); plain SGD is lazy-equals-dense on
    any rows. Keras itself clips the raw duplicate rows, which differs (checked too).
    """
    rng = np.random.default_rng(7)
    init = rng.normal(size=(6, 3)).astype(np.float32)
    grads = [_slices_with_duplicates(rng, 6, 3, all_rows) for _ in range(4)]
    dense_grad = tf.constant([0.3, -0.4])              # a second, dense variable (global norm)
    results = []
    for opt, densify in ((getattr(sparseopt_tf, name)(0.1, **clip), False),
                         (getattr(keras.optimizers, name)(0.1, **clip), True),
                         (getattr(keras.optimizers, name)(0.1, **clip), False)):
        table, bias = tf.Variable(init), tf.Variable(tf.ones(2))

        def step(g, opt=opt, table=table, bias=bias, densify=densify):
            opt.apply_gradients([(tf.convert_to_tensor(g) if densify else g, table), (dense_grad, bias)])
        step = tf.function(step) if mode == "function" else step
        for g in grads:
            step(g)
        results.append((table.numpy(), bias.numpy()))
    (ours, ours_bias), (dense, dense_bias), (keras_sparse, _) = results
    rel_close(ours, dense, np.float32)
    rel_close(ours_bias, dense_bias, np.float32)
    assert np.max(np.abs(keras_sparse - dense)) > 1e-3   # the difference this fixes


# -------------------------------------------------------------- constraints (SPEC §3)

@pytest.mark.parametrize("mode", ["eager", "function"])
def test_constraint_of_a_sparse_update_applies_to_touched_rows_only(mode):
    init = np.linspace(0.0, 2.0, 16, dtype=np.float32).reshape(8, 2)   # most rows violate [0.45, 1]
    var = tf.Variable(init, constraint=lambda w: tf.clip_by_value(w, 0.45, 1.0))
    opt = sparseopt_tf.SGD(0.1)
    grad = tf.IndexedSlices(tf.ones((3, 2)), tf.constant([1, 6, 1]), tf.constant([8, 2], tf.int64))

    def step(g):
        opt.apply_gradients([(g, var)])
    step = tf.function(step) if mode == "function" else step
    step(grad)
    after = var.numpy()
    np.testing.assert_array_equal(np.delete(after, [1, 6], 0), np.delete(init, [1, 6], 0))
    lo, hi = np.float32(0.45), np.float32(1.0)
    np.testing.assert_array_equal(after[[1, 6]], np.clip(init[[1, 6]] - np.float32([[0.2], [0.1]]), lo, hi))
    assert var.constraint is not None                  # lent for the step only, then given back
    opt.apply_gradients([(tf.zeros((8, 2)), var)])    # a dense gradient: the whole variable, as Keras
    np.testing.assert_array_equal(var.numpy(), np.clip(after, lo, hi))


def test_constraint_under_model_fit_matches_keras_for_plain_sgd():
    """An Embedding with a row-wise constraint (MaxNorm over each row): every touched row is
    constrained as Keras does, and untouched rows are not (lazy)."""
    x, y = _data()
    weights = []
    for opt in (sparseopt_tf.SGD(0.5), keras.optimizers.SGD(0.5)):
        keras.utils.set_random_seed(0)
        ids = keras.Input(shape=(3,), dtype="int32")
        e = keras.layers.Embedding(50, 4, name="emb",
                                   embeddings_initializer=keras.initializers.RandomUniform(0, 0.05),
                                   embeddings_constraint=keras.constraints.MaxNorm(0.12, axis=1))(ids)
        model = keras.Model(ids, keras.layers.Dense(1)(keras.layers.Flatten()(e)))
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        weights.append([w.numpy() for w in model.trainable_weights])
    for a, b in zip(*weights):
        rel_close(a, b, np.float32)
    norms = np.linalg.norm(weights[0][0], axis=1)
    assert np.max(norms) <= 0.12 + 1e-6 and np.sum(norms > 0.1199) > 0   # the constraint was active


# ---------------------------------------------------- a rejected step writes nothing (SPEC §5)

@pytest.mark.parametrize("legacy", [False, True])
def test_rejected_graph_step_leaves_iterations_and_host_state(legacy):
    import sparseopt_tf.legacy  # noqa: F401
    var = tf.Variable(tf.ones((5, 2)))
    opt = (sparseopt_tf.legacy if legacy else sparseopt_tf).Nadam(0.1)

    @tf.function
    def step(indices):
        opt.apply_gradients([(tf.IndexedSlices(tf.ones((2, 2)), indices, [5, 2]), var)])

    step(tf.constant([1, 2]))
    before = opt.get_weights() + [var.numpy()]
    with pytest.raises(Exception, match=r"indices must lie in \[0, 5\); got 9 at position 1"):
        step(tf.constant([1, 9]))
    for a, b in zip(before, opt.get_weights() + [var.numpy()]):
        np.testing.assert_array_equal(a, b)


def test_ftrl_learning_rate_power_reassigned_after_build_matches_keras():
    """The kernels' rule follows each step's coefficients (Ftrl's sqrt variant for a
    power of -0.5 only), also when the power is changed on a built optimizer."""
    results = []
    for make in (lambda: sparseopt_tf.Ftrl(0.1), lambda: keras.optimizers.Ftrl(0.1)):
        var = tf.Variable(np.linspace(-1, 1, 12).reshape(4, 3).astype(np.float32))
        opt = make()
        opt.build([var])
        rng = np.random.default_rng(3)
        for power in (-0.5, -0.7, -0.7, -0.5):
            opt.learning_rate_power = power
            opt.apply_gradients([(tf.constant(rng.normal(size=(4, 3)).astype(np.float32)), var)])
        results.append(var.numpy())
    rel_close(results[0], results[1], np.float32)
