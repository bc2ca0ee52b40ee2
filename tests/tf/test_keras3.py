"""sparseopt_tf.<Name> (Keras 3) against keras.optimizers.<Name> and the core's lazy rule."""

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402

import sparseopt_tf  # noqa: E402
from sparseopt import errors  # noqa: E402
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


@pytest.mark.parametrize("case", [c for c in BRIDGED if c.values[0].keras is not None])
def test_config_written_by_keras_loads_into_ours(case):
    """``sparseopt_tf.<Name>.from_config(keras.optimizers.<Name>(...).get_config())``: the same
    optimizer (name, Keras' base settings, hyperparameters), training as Keras' does."""
    theirs = getattr(keras.optimizers, case.keras)(**case.kwargs, clipnorm=1.5, name=f"{case.id}_opt")
    ours = bridge_class(case).from_config(theirs.get_config())
    assert ours.name == theirs.name and ours.clipnorm == 1.5 and ours.sparse_mode == "lazy"
    mine = {k: v for k, v in ours.get_config().items() if k not in ("sparse_mode", "exact_history")}
    assert mine == theirs.get_config()
    rng = np.random.default_rng(4)
    init = rng.normal(size=(9, 3)).astype(np.float32)
    grads = [tf.constant(rng.normal(size=init.shape).astype(np.float32)) for _ in range(STEPS)]
    a, b = tf.Variable(init), tf.Variable(init)
    _run(ours, a, grads, "function")
    _run(theirs, b, grads, "function")
    rel_close(a.numpy(), b.numpy(), np.float32)


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


# ------------------------------------------- drop-in fidelity (issue 15, items 4, 8 and 10)

#: Our classes that Keras 3 has too.
KERAS_NAMED = [n for n in sparseopt_tf.optimizers.__all__ if hasattr(keras.optimizers, n) and n != "Optimizer"]


@pytest.mark.parametrize("name", KERAS_NAMED)
def test_automatic_names_are_keras_names(name):
    """Without a ``name``, Keras' unique automatic names (``adam``, ``adam_1``; ``adam_w``)."""
    keras.backend.clear_session()                       # restarts Keras' name counters
    theirs = [getattr(keras.optimizers, name)().name for _ in range(2)]
    keras.backend.clear_session()
    ours = [getattr(sparseopt_tf, name)() for _ in range(2)]
    assert [o.name for o in ours] == theirs
    assert [o._core.name for o in ours] == theirs       # the core's messages name it the same
    reloaded = type(ours[1]).from_config(ours[1].get_config())
    assert reloaded.name == theirs[1]
    assert getattr(sparseopt_tf, name)(name="mine").name == "mine"
    if name == "AdamW":
        assert theirs[0] == "adam_w"


# (class, arguments Keras rejects): the type and message must be Keras' own.
KERAS_ARGUMENT_ERRORS = [
    ("SGD", dict(momentum=-1.0)), ("SGD", dict(momentum=1.5)),
    ("Lion", dict(beta_1=-0.1)), ("Lion", dict(beta_1=1.1)), ("Lion", dict(beta_1=0.0)),
    ("Ftrl", dict(initial_accumulator_value=-0.1)), ("Ftrl", dict(learning_rate_power=0.1)),
    ("Ftrl", dict(l1_regularization_strength=-0.1)), ("Ftrl", dict(l2_regularization_strength=-0.1)),
    ("Ftrl", dict(l2_shrinkage_regularization_strength=-0.1)),
    ("AdamW", dict(weight_decay=None)),
]


@pytest.mark.parametrize("name, kwargs", KERAS_ARGUMENT_ERRORS)
def test_argument_errors_are_keras_errors(name, kwargs):
    with pytest.raises(ValueError) as theirs:
        getattr(keras.optimizers, name)(**kwargs)
    with pytest.raises(ValueError) as ours:
        getattr(sparseopt_tf, name)(**kwargs)
    assert str(ours.value).startswith(str(theirs.value))
    assert isinstance(ours.value, errors.HyperparameterError)


def test_adamw_weight_decay_is_the_same_on_both_sides():
    """The core always holds the Keras side's weight decay (constructed, defaulted, or set
    later), and training follows a reassignment as keras.optimizers.AdamW does."""
    assert sparseopt_tf.AdamW()._core.weight_decay == sparseopt_tf.AdamW().weight_decay == 0.004
    for opt in (sparseopt_tf.AdamW(weight_decay=0.1), sparseopt_tf.Adam(weight_decay=0.1)):
        assert opt.weight_decay == opt._core.weight_decay == 0.1
        opt.weight_decay = 0.25
        assert opt.weight_decay == opt._core.weight_decay == 0.25
    adam = sparseopt_tf.Adam()
    assert adam.weight_decay is None and adam._core.weight_decay is None
    adamw = sparseopt_tf.AdamW()
    with pytest.raises(ValueError, match=r"^Argument `weight_decay` must be a float. Received: weight_decay=None$"):
        adamw.weight_decay = None
    with pytest.raises(errors.HyperparameterError, match=r"weight_decay must be a finite float >= 0; got -1.0"):
        adamw.weight_decay = -1.0
    with pytest.raises(errors.HyperparameterError, match=r"weight_decay must be a float or None"):
        adamw.weight_decay = tf.constant(0.1)
    assert adamw.weight_decay == adamw._core.weight_decay == 0.004        # rejected: unchanged
    rng = np.random.default_rng(11)
    init = rng.normal(size=(4, 3)).astype(np.float32)
    results = []
    for opt in (sparseopt_tf.AdamW(0.1, weight_decay=0.01), keras.optimizers.AdamW(0.1, weight_decay=0.01)):
        var = tf.Variable(init)
        grads = np.random.default_rng(12).normal(size=(4, 4, 3)).astype(np.float32)
        for i, g in enumerate(grads):
            if i == 2:
                opt.weight_decay = 0.5
            opt.apply_gradients([(tf.constant(g), var)])
        results.append(var.numpy())
    rel_close(results[0], results[1], np.float32)


def test_nadam_builds_without_variables_and_names_its_host_state_as_keras():
    """``Nadam().build([])`` works; ``_u_product`` (Keras' name) is the host state, a 0-d
    float64 variable (Keras keeps it in the variables' dtype: a deliberate difference, for
    the precision of the product over every step)."""
    opt = sparseopt_tf.Nadam()
    with pytest.raises(AttributeError):
        opt._u_product                                  # noqa: B018  (not built: none yet)
    opt.build([])
    assert opt._u_product.dtype == "float64" and tuple(opt._u_product.shape) == ()
    assert any(v is opt._u_product for v in opt.variables)
    assert "_u_product" not in dir(opt)                 # tracked once, in ``variables``
    products = []
    for module in (sparseopt_tf, keras.optimizers):     # Keras' in float64 with a float64 variable
        var = tf.Variable(tf.ones((3, 2), tf.float64))
        nadam = module.Nadam(0.1)
        for _ in range(3):
            nadam.apply_gradients([(tf.ones((3, 2), tf.float64), var)])
        products.append(float(nadam._u_product.numpy()))
    np.testing.assert_allclose(products[0], products[1], rtol=1e-12)


def test_set_weights_before_build_raises_keras_message():
    with pytest.raises(ValueError, match=r"^You are calling `set_weights\(\)` on an optimizer that has not yet been built"):
        sparseopt_tf.Adam().set_weights([np.zeros(())])


@pytest.mark.parametrize("name, kwargs", [("Adadelta", {}), ("Adagrad", {}), ("RMSprop", {}),
                                          ("SGD", {}), ("SGD", dict(momentum=0.5)), ("LossScale", {})])
def test_sparse_step_writes_in_place_and_never_calls_assign(name, kwargs):
    """What Keras' ``test_sparse_gradients_*`` look for by mocking ``assign`` (a sparse
    update through the optimizer's ``assign``) does not happen here: the kernels write the
    touched rows in place, and no ``assign`` of the optimizer or of the variable runs.
    The result equals Keras' with the dense gradient."""
    from unittest import mock

    def make(module):
        if name == "LossScale":
            return keras.optimizers.LossScaleOptimizer(module.SGD(learning_rate=0.5))
        return getattr(module, name)(**kwargs)

    results = []
    for module in (sparseopt_tf, keras.optimizers):
        var = keras.Variable(np.ones((5, 10), np.float32))
        opt = make(module)
        grad = tf.IndexedSlices(0.5 * tf.ones((3, 10)), tf.constant([0, 2, 4]), tf.constant([5, 10]))
        if module is keras.optimizers:
            opt.apply([tf.convert_to_tensor(grad)], [var])
            results.append(var.numpy())
            continue
        inner = opt.inner_optimizer if name == "LossScale" else opt
        inner.build([var])
        address = var.value.handle
        calls = []

        def record(variable, value):
            calls.append(tuple(variable.shape))

        patches = [mock.patch.object(inner, m, autospec=True, side_effect=record)
                   for m in ("assign", "assign_add", "assign_sub")]
        patches += [mock.patch.object(type(var.value), m, autospec=True, side_effect=record)
                    for m in ("assign", "assign_add", "assign_sub")]
        for p in patches:
            p.start()
        try:
            opt.apply([grad], [var])
        finally:
            for p in patches:
                p.stop()
        assert [shape for shape in calls if shape] == []   # scalars (iterations) only, as Keras allows
        assert var.value.handle is address
        results.append(var.numpy())
    np.testing.assert_array_equal(results[0][[1, 3]], 1.0)
    rel_close(results[0], results[1], np.float32)


def _stepper(opt, var, mode):
    def step(g):
        opt.apply_gradients([(g, var)])
    return tf.function(step) if mode == "function" else step


# Keras' norm constraints: (constraint, row-wise on a (6, 3) table). The table's rows have
# norm 0.4 (1 for UnitNorm): untouched rows satisfy the constraint, so Keras' whole-table
# pass leaves them as they are.
NORM_CONSTRAINTS = [pytest.param(make, row_wise, id=id_) for id_, make, row_wise in [
    ("MaxNorm()", lambda: keras.constraints.MaxNorm(), False),
    ("UnitNorm()", lambda: keras.constraints.UnitNorm(), False),
    ("MinMaxNorm()", lambda: keras.constraints.MinMaxNorm(), False),
    ("MaxNorm(axis=[0,1])", lambda: keras.constraints.MaxNorm(axis=[0, 1]), False),
    ("UnitNorm(axis=-2)", lambda: keras.constraints.UnitNorm(axis=-2), False),
    ("MaxNorm(axis=1)", lambda: keras.constraints.MaxNorm(0.5, axis=1), True),
    ("UnitNorm(axis=-1)", lambda: keras.constraints.UnitNorm(axis=-1), True),
    ("MinMaxNorm(axis=1)", lambda: keras.constraints.MinMaxNorm(0.2, 0.6, axis=1), True),
    ("NonNeg()", lambda: keras.constraints.NonNeg(), True),
]]


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("make, row_wise", NORM_CONSTRAINTS)
def test_norm_constraints_across_rows_are_refused_row_wise_ones_match_keras(make, row_wise, mode):
    rng = np.random.default_rng(5)
    init = np.abs(rng.normal(size=(6, 3))).astype(np.float32)
    unit = isinstance(make(), keras.constraints.UnitNorm)
    init /= np.linalg.norm(init, axis=1, keepdims=True) * (1.0 if unit else 2.5)
    grads = [tf.IndexedSlices(tf.constant(rng.normal(size=(2, 3)).astype(np.float32)),
                              tf.constant([1, 4]), tf.constant([6, 3])) for _ in range(3)]
    results = []
    for module in (sparseopt_tf, keras.optimizers):
        var = keras.Variable(init, name="table")
        var.constraint = make()
        opt = module.SGD(0.2)
        step = _stepper(opt, var, mode)
        if module is sparseopt_tf and not row_wise:
            with pytest.raises(errors.ConstraintNotRowWiseError,
                               match=rf"sgd\w*: the constraint of 'table' \(shape \(6, 3\)\), "
                                     rf"keras.constraints.{type(var.constraint).__name__}\(axis=.*\), "
                                     r"takes norms across rows .* row-wise constraint, e\.g\. "
                                     rf"{type(var.constraint).__name__}\(axis=1\)"):
                step(grads[0])
            assert isinstance(errors.ConstraintNotRowWiseError("x"), ValueError)
            np.testing.assert_array_equal(var.numpy(), init)             # nothing written
            assert int(opt.iterations.numpy()) == 0
            return
        for g in grads:
            step(g)
        results.append(var.numpy())
    rel_close(results[0], results[1], np.float32)


def test_model_fit_refuses_an_embedding_with_a_column_wise_max_norm():
    x, y = _data()
    ids = keras.Input(shape=(3,), dtype="int32")
    e = keras.layers.Embedding(50, 4, embeddings_constraint=keras.constraints.MaxNorm())(ids)
    model = keras.Model(ids, keras.layers.Dense(1)(keras.layers.Flatten()(e)))
    model.compile(optimizer=sparseopt_tf.Adam(0.01), loss="mse")
    with pytest.raises(errors.ConstraintNotRowWiseError, match=r"MaxNorm\(axis=0\).*MaxNorm\(axis=1\)"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)


def test_a_callable_constraint_is_applied_to_the_touched_rows_as_documented():
    """An unknown callable is trusted to be row-wise: it gets the touched rows (a 2-D
    tensor for a table), not the whole variable."""
    seen = []

    def constraint(w):
        seen.append(tuple(w.shape))
        return w

    var = tf.Variable(tf.ones((7, 2)), constraint=constraint)
    sparseopt_tf.SGD(0.1).apply_gradients(
        [(tf.IndexedSlices(tf.ones((2, 2)), tf.constant([3, 5]), tf.constant([7, 2])), var)])
    assert seen == [(2, 2)]
