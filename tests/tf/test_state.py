"""Optimizer state round trips: tf.train.Checkpoint, model.save('.keras'), tf_keras' model.save('.h5'),
set_weights; seed methods."""

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402

import sparseopt_tf  # noqa: E402
from tests.tf.helpers import BRIDGED, bridge_class  # noqa: E402


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    ids = keras.Input(shape=(3,), dtype="int32")
    x = keras.layers.Embedding(30, 4, name="emb")(ids)
    out = keras.layers.Dense(1, name="head")(keras.layers.Flatten()(x))
    return keras.Model(ids, out)


def _data(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 30, size=(32, 3)).astype(np.int32), rng.normal(size=(32, 1)).astype(np.float32)


def _fit(model, seed):
    model.fit(*_data(seed), batch_size=8, epochs=1, shuffle=False, verbose=0)


@pytest.mark.parametrize("case", BRIDGED)
def test_keras_file_round_trip_continues_identically(case, tmp_path):
    model = _model()
    model.compile(optimizer=bridge_class(case)(**case.kwargs), loss="mse")
    _fit(model, 1)
    model.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
    assert type(restored.optimizer) is bridge_class(case)
    assert int(restored.optimizer.iterations.numpy()) == 4
    _fit(model, 2)
    _fit(restored, 2)
    for a, b in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.optimizer.get_weights(), restored.optimizer.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", BRIDGED)
def test_checkpoint_round_trip_continues_identically(case, tmp_path):
    model = _model()
    model.compile(optimizer=bridge_class(case)(**case.kwargs), loss="mse")
    _fit(model, 1)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(tmp_path / "ckpt"))
    other = _model(seed=7)
    other.compile(optimizer=bridge_class(case)(**case.kwargs), loss="mse")
    other.optimizer.build(other.trainable_variables)
    tf.train.Checkpoint(model=other, optimizer=other.optimizer).read(path).assert_consumed()
    _fit(model, 2)
    _fit(other, 2)
    for a, b in zip(model.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_mismatched_state_raises_and_leaves_state_intact(tmp_path):
    small, big = _model(), _model()
    small.compile(optimizer=sparseopt_tf.Adam(), loss="mse")
    _fit(small, 1)
    opt = sparseopt_tf.Adam()
    other_vars = [tf.Variable(tf.zeros((30, 5))), tf.Variable(tf.zeros((20, 1))), tf.Variable(tf.zeros(1))]
    opt.build(other_vars)
    opt.apply_gradients(zip([tf.ones((30, 5)), tf.ones((20, 1)), tf.ones(1)], other_vars))
    before = opt.get_weights()
    with pytest.raises(ValueError, match="shape"):
        opt.set_weights(small.optimizer.get_weights())
    with pytest.raises(ValueError, match="arrays"):
        opt.set_weights(before[:-1])
    store = {str(i): w for i, w in enumerate(small.optimizer.get_weights())}
    with pytest.raises(ValueError, match="shape"):
        opt.load_own_variables(store)
    for a, b in zip(before, opt.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_seed_methods():
    var = tf.Variable(tf.ones((3, 2)))
    opt = sparseopt_tf.Adam(0.1, amsgrad=True)
    opt.build([var])
    assert opt.get_slot_names() == ["m", "v", "vhat"]
    extra = opt.add_slot(var, "extra", initializer="ones")
    assert opt.add_slot(var, "extra") is extra
    assert opt.get_slot_names() == ["m", "v", "vhat", "extra"]
    np.testing.assert_array_equal(extra.numpy(), np.ones((3, 2)))
    with pytest.raises(ValueError, match="no slot 'w'"):
        opt.get_slot(var, "w")
    weights = opt.get_weights()
    assert len(weights) == 2 + 4                    # iterations, learning_rate, m, v, vhat, extra
    weights[2] = np.full((3, 2), 0.5, np.float32)
    opt.set_weights(weights)
    np.testing.assert_array_equal(opt.get_slot(var, "m").numpy(), weights[2])

    created = []

    def var_list():
        return created

    def loss():
        if not created:
            created.append(tf.Variable([3.0]))
        return tf.reduce_sum(created[0] ** 2)

    sgd = sparseopt_tf.SGD(0.1)
    sgd.minimize(loss, var_list)
    np.testing.assert_allclose(created[0].numpy(), [2.4])
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(created[0] ** 2)
    sgd.minimize(value, [created[0]], tape=tape)
    np.testing.assert_allclose(created[0].numpy(), [2.4 - 0.48], rtol=1e-6)


def test_config_round_trip_with_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    opt = sparseopt_tf.SGD(schedule, momentum=0.9, nesterov=True, clipnorm=1.0)
    config = keras.optimizers.serialize(opt)
    again = keras.optimizers.deserialize(config)
    assert type(again) is sparseopt_tf.SGD
    assert again.momentum == 0.9 and again.nesterov and again.clipnorm == 1.0
    assert isinstance(again._learning_rate, keras.optimizers.schedules.ExponentialDecay)


# ----------------------------------------------- host state (Nadam's u_product) and row slots

@pytest.mark.parametrize("legacy", [False, True])
def test_nadam_host_state_is_a_variable_advanced_once_per_step(legacy, tmp_path):
    import sparseopt as so
    module = sparseopt_tf.legacy if legacy else sparseopt_tf
    rng = np.random.default_rng(0)
    init = rng.normal(size=(5, 3)).astype(np.float32)
    grads = [rng.normal(size=init.shape).astype(np.float32) for _ in range(8)]
    var, core_var = tf.Variable(init), init.copy()
    opt, core = module.Nadam(0.01), so.Nadam(0.01, _legacy=legacy)
    @tf.function
    def step(g):
        opt.apply_gradients([(g, var)])

    for g in grads[:5]:
        step(tf.constant(g))
        core.apply_gradients([(g, core_var)])
    state = opt.get_weights()[1 if legacy else 2]          # after iterations (and learning_rate)
    # Legacy: tf_keras' momentum_cache, in the first variable's dtype as tf_keras keeps it
    # (so that tf_keras' checkpoints restore).
    assert state.dtype == (np.float32 if legacy else np.float64) and state.shape == ()
    np.testing.assert_allclose(state, core.get_weights()[1], rtol=1e-6 if legacy else 1e-12)
    # tf.train.Checkpoint carries it: a fresh optimizer, restored before it is built,
    # continues exactly as the original.
    path = tf.train.Checkpoint(optimizer=opt, var=var).write(str(tmp_path / "ckpt"))
    var2, opt2 = tf.Variable(tf.zeros_like(init)), module.Nadam(0.01)
    tf.train.Checkpoint(optimizer=opt2, var=var2).read(path)

    @tf.function
    def step2(g):
        opt2.apply_gradients([(g, var2)])

    for g in grads[5:]:
        step(tf.constant(g))
        step2(tf.constant(g))
    np.testing.assert_array_equal(var.numpy(), var2.numpy())
    assert int(opt2.iterations.numpy()) == 8
    # (tf_keras orders get_weights by creation, which a deferred restore changes: compare by name)
    np.testing.assert_array_equal(opt._state_variables[0].numpy(), opt2._state_variables[0].numpy())
    for name in ("m", "v"):
        np.testing.assert_array_equal(opt.get_slot(var, name).numpy(), opt2.get_slot(var2, name).numpy())


@pytest.mark.parametrize("legacy", [False, True])
def test_rowwise_adagrad_keeps_one_accumulator_per_row(legacy):
    module = sparseopt_tf.legacy if legacy else sparseopt_tf
    table, bias = tf.Variable(tf.zeros((6, 4))), tf.Variable(3.0)
    opt = module.RowwiseAdagrad(0.1)
    opt.apply_gradients([(tf.IndexedSlices(tf.fill((2, 4), 2.0), tf.constant([3, 3]), [6, 4]), table),
                         (tf.constant(1.0), bias)])
    acc = opt.get_slot(table, "accumulator")
    assert tuple(acc.shape) == (6,) and tuple(opt.get_slot(bias, "accumulator").shape) == ()
    np.testing.assert_array_equal(acc.numpy(), [0, 0, 0, 16, 0, 0])     # mean of (2 + 2)^2
    np.testing.assert_allclose(table.numpy()[3], -0.1, rtol=1e-6)
    np.testing.assert_array_equal(np.delete(table.numpy(), 3, 0), 0.0)


# ------------------------------------ tf.train.Checkpoint of another optimizer or other shapes

def _trained(cls, shapes, steps=1, **kwargs):
    variables = [tf.Variable(tf.ones(s)) for s in shapes]
    opt = cls(0.1, **kwargs)
    for _ in range(steps):
        opt.apply_gradients(zip([tf.fill(s, 0.5) for s in shapes], variables))
    return opt, variables


SHAPES = [(4, 3), (2,)]
MISMATCHES = [
    ("other_optimizer", sparseopt_tf.Adamax, SHAPES, {}, r"state of another optimizer \(sparseopt_tf.Adam "),
    ("other_slots", sparseopt_tf.Adam, SHAPES, dict(amsgrad=True),
     r"slots \['m', 'v'\]\); this one is .* \['m', 'v', 'vhat'\]"),
    ("no_slots", sparseopt_tf.SGD, SHAPES, {}, r"another optimizer"),
    ("other_shape", sparseopt_tf.Adam, [(4, 3), (5,)], {}, r"has shape \(5,\).*checkpoint's has \(2,\)"),
    ("fewer_variables", sparseopt_tf.Adam, [(4, 3)], {}, r"built for 2 variables; this one for 1"),
]


@pytest.mark.parametrize("cls, shapes, kwargs, pattern", [m[1:] for m in MISMATCHES],
                         ids=[m[0] for m in MISMATCHES])
def test_checkpoint_of_another_optimizer_or_shape_raises_and_changes_nothing(cls, shapes, kwargs, pattern,
                                                                           tmp_path):
    source, _ = _trained(sparseopt_tf.Adam, SHAPES, steps=3)
    path = tf.train.Checkpoint(optimizer=source).write(str(tmp_path / "ckpt"))
    opt, variables = _trained(cls, shapes, **kwargs)
    before = opt.get_weights() + [v.numpy() for v in variables]
    with pytest.raises(ValueError, match=pattern) as info:
        tf.train.Checkpoint(optimizer=opt).read(path)
    assert "Nothing was restored" in str(info.value)
    for a, b in zip(before, opt.get_weights() + [v.numpy() for v in variables]):
        np.testing.assert_array_equal(a, b)
    # Not built yet: another optimizer is refused at once, other shapes when it is built.
    fresh = cls(0.1, **kwargs)
    variables = [tf.Variable(tf.ones(s)) for s in shapes]
    if cls is sparseopt_tf.Adam and not kwargs:
        tf.train.Checkpoint(optimizer=fresh).read(path)
        with pytest.raises(ValueError, match=pattern):
            fresh.build(variables)
        assert not fresh.built and len(fresh.variables) == 2           # iterations, learning_rate
    else:
        with pytest.raises(ValueError, match=pattern):
            tf.train.Checkpoint(optimizer=fresh).read(path)
        assert int(fresh.iterations.numpy()) == 0


@pytest.mark.parametrize("legacy", [False, True])
def test_rowwise_adagrad_runs_the_core_row_kernels_bit_for_bit(legacy):
    """Sparse steps with duplicates on a table and dense steps on a matrix and a vector, in a
    tf.function: variables and row accumulators equal the core's bit for bit."""
    import sparseopt as so
    module = sparseopt_tf.legacy if legacy else sparseopt_tf
    rng = np.random.default_rng(11)
    inits = [rng.normal(size=(30, 5)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32),
             rng.normal(size=(3,)).astype(np.float32)]
    tf_vars, core_vars = [tf.Variable(i) for i in inits], [i.copy() for i in inits]
    opt, core = module.RowwiseAdagrad(0.1, initial_accumulator_value=0.05), so.RowwiseAdagrad(
        0.1, initial_accumulator_value=0.05)

    @tf.function
    def step(values, indices, g1, g2):
        opt.apply_gradients([(tf.IndexedSlices(values, indices, [30, 5]), tf_vars[0]), (g1, tf_vars[1]),
                             (g2, tf_vars[2])])

    for _ in range(10):
        idx = rng.integers(0, 20, 12)
        values = rng.normal(size=(12, 5)).astype(np.float32)
        g1, g2 = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)
        step(tf.constant(values), tf.constant(idx), tf.constant(g1), tf.constant(g2))
        core.apply_gradients([(so.IndexedSlices(values, idx), core_vars[0]), (g1, core_vars[1]),
                              (g2, core_vars[2])])
    for v, c in zip(tf_vars, core_vars):
        np.testing.assert_array_equal(v.numpy(), c)
        np.testing.assert_array_equal(opt.get_slot(v, "accumulator").numpy(), core.get_slot(c, "accumulator"))
    np.testing.assert_array_equal(tf_vars[0].numpy()[20:], inits[0][20:])


#: A slot of each kind: two element slots (Adam, also in exact mode), Nadam's host state (its
#: ``momentum_cache`` weight), per-row slots (RowwiseAdagrad) and Ftrl's legacy math.
_LEGACY_H5 = [("adam", {}), ("adam", {"sparse_mode": "exact"}), ("nadam", {}), ("rowwise_adagrad", {}),
              ("ftrl_regularized", {})]


@pytest.mark.filterwarnings("ignore:.*caught up before they are read")  # exact mode, a plain lookup
@pytest.mark.parametrize("case_id,extra", _LEGACY_H5,
                         ids=[f"{i}-{e.get('sparse_mode', 'lazy')}" for i, e in _LEGACY_H5])
def test_legacy_h5_round_trip_continues_identically(case_id, extra, tmp_path):
    """tf_keras' ``model.save('m.h5')`` keeps a legacy optimizer's weights and
    ``load_model`` restores them, as for tf_keras' own legacy classes: training continues
    bit for bit. (Its SavedModel and ``.keras`` formats do not restore a legacy optimizer's
    state, tf_keras' own classes' neither: the loaded optimizer starts afresh.)"""
    tf_keras = pytest.importorskip("tf_keras")
    from tests.optimizer_table import CASES
    case = next(c for c in CASES if c.id == case_id)

    def model():
        tf_keras.utils.set_random_seed(0)
        ids = tf_keras.Input(shape=(3,), dtype="int32")
        x = tf_keras.layers.Embedding(30, 4, name="emb")(ids)
        return tf_keras.Model(ids, tf_keras.layers.Dense(1, name="head")(tf_keras.layers.Flatten()(x)))

    def fit(m, seed):
        m.fit(*_data(seed), batch_size=8, epochs=1, shuffle=False, verbose=0)

    original = model()
    original.compile(optimizer=bridge_class(case, legacy=True)(**case.kwargs, **extra), loss="mse")
    fit(original, 1)
    original.save(tmp_path / "m.h5")
    restored = tf_keras.models.load_model(tmp_path / "m.h5")
    assert type(restored.optimizer) is bridge_class(case, legacy=True)
    assert restored.optimizer.get_config()["sparse_mode"] == extra.get("sparse_mode", "lazy")
    assert int(restored.optimizer.iterations.numpy()) == 4
    fit(original, 2)
    fit(restored, 2)
    for a, b in zip(original.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(original.optimizer.get_weights(), restored.optimizer.get_weights()):
        np.testing.assert_array_equal(a, b)
