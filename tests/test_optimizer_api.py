"""The optimizer interface of SPEC §3 (the Keras names), on NumPy arrays."""

import json

import numpy as np
import pytest

import sparseopt as so
from tests import references as ref
from tests.conftest import rel_close


def test_get_slot_is_a_view_into_contiguous_storage():
    table = np.zeros((6, 3), np.float32)
    opt = so.Adam(amsgrad=True)
    opt.build([table])
    m, v, vhat = (opt.get_slot(table, n) for n in ("m", "v", "vhat"))
    assert m.shape == table.shape and m.dtype == table.dtype
    # one contiguous block (the slots in the rule's order), starting on a cache line
    assert m.base is v.base is vhat.base
    assert all(s.flags.c_contiguous for s in (m, v, vhat))
    assert v.ctypes.data - m.ctypes.data == vhat.ctypes.data - v.ctypes.data == m.nbytes
    assert m.ctypes.data % 64 == 0
    m[2] = 5.0  # writing through the view changes the optimizer's state
    opt.apply_gradients([(so.IndexedSlices(np.zeros((1, 3), np.float32), [2]), table)])
    np.testing.assert_allclose(opt.get_slot(table, "m")[2], 5.0 * 0.9, rtol=1e-6)


def test_variables_order_iterations_then_slots_in_creation_order():
    a, b = np.zeros(2), np.zeros((3, 1))
    opt = so.Adam()
    opt.build([a, b])
    extra = opt.add_slot(a, "ema", initializer="ones")
    w = opt.variables()
    assert w[0].shape == () and w[0].dtype == np.int64
    assert [x is y for x, y in zip(w[1:], [opt.get_slot(a, "m"), opt.get_slot(a, "v"),
                                            opt.get_slot(b, "m"), opt.get_slot(b, "v"), extra])] == [True] * 5
    assert opt.weights[-1] is extra and np.all(extra == 1)
    assert opt.get_slot_names() == ["m", "v", "ema"]
    assert opt.add_slot(a, "ema") is extra
    custom = opt.add_slot(b, "scale", initializer=lambda shape, dtype: np.full(shape, 2.0, dtype), shape=(1,))
    assert custom.shape == (1,) and custom[0] == 2.0


def test_iterations_counts_and_can_be_set():
    var = np.zeros(2)
    opt = so.SGD()
    for _ in range(3):
        opt.apply_gradients([(np.ones(2), var)])
    assert opt.iterations == 3 and opt.get_weights()[0] == 3
    opt.iterations = 10
    assert opt.variables()[0] == 10


def test_hyperparameters_float_callable_schedule_and_reassignment():
    var = np.zeros(1)
    calls = []
    opt = so.SGD(learning_rate=lambda: calls.append(1) or 0.5)
    opt.apply_gradients([(np.ones(1), var)])
    assert var[0] == pytest.approx(-0.5) and calls == [1]
    opt.learning_rate = 0.25
    opt.apply_gradients([(np.ones(1), var)])
    assert var[0] == pytest.approx(-0.75)
    opt.learning_rate = so.schedules.PiecewiseConstantDecay([2], [1.0, 0.125])
    opt.apply_gradients([(np.ones(1), var)])  # iterations == 2 -> 1.0
    opt.apply_gradients([(np.ones(1), var)])  # iterations == 3 -> 0.125
    assert var[0] == pytest.approx(-0.75 - 1.0 - 0.125)


def test_coefficients_kept_between_steps_follow_changes_and_dtypes():
    """The kernels' coefficients are converted once per dtype and kept while they stay
    the same: a float32 and a float64 variable in one step each get their own, and a
    reassigned learning rate is used from the next step on (float64 reference: Keras
    rounds the learning rate to float32 for both dtypes)."""
    rng = np.random.default_rng(3)
    v32 = rng.standard_normal((4, 3)).astype(np.float32)
    v64 = rng.standard_normal((4, 3))
    want32, want64 = v32.astype(np.float64), v64.copy()
    opt = so.SGD(learning_rate=0.5)
    for lr in (0.5, 0.5, 0.1, 0.1, 0.5, 0.3):
        opt.learning_rate = lr
        g32 = rng.standard_normal((4, 3)).astype(np.float32)
        g64 = rng.standard_normal((4, 3))
        opt.apply_gradients([(g32, v32), (g64, v64)])
        lr32 = float(np.float32(lr))
        want32 = (want32 - np.float64(np.float32(lr32) * g32)).astype(np.float32).astype(np.float64)
        want64 = want64 - lr32 * g64
        np.testing.assert_array_equal(v32, want32.astype(np.float32))
        np.testing.assert_allclose(v64, want64, rtol=1e-15, atol=1e-15)
    assert opt.iterations == 6


def test_config_round_trip_with_schedule_is_json():
    sched = so.schedules.CosineDecay(0.1, decay_steps=100, alpha=0.1)
    opt = so.Adam(learning_rate=sched, beta_1=0.8, amsgrad=True, clipnorm=2.0, weight_decay=0.01, name="mine")
    config = json.loads(json.dumps(opt.get_config()))
    assert config["learning_rate"]["class_name"] == "CosineDecay"
    clone = so.Adam.from_config(config)
    assert clone.get_config() == opt.get_config()
    assert isinstance(clone.learning_rate, so.schedules.CosineDecay)
    assert clone.amsgrad and clone.beta_1 == 0.8 and clone.name == "mine"
    callable_opt = so.SGD(learning_rate=lambda: 0.3)
    assert callable_opt.get_config()["learning_rate"] == 0.3


def test_sparse_clipnorm_uses_the_norm_of_the_deduplicated_rows():
    # The dense gradient of rows [1, 1] with values [3, 4] and [3, 4] is [6, 8] on row 1:
    # norm 10. Keras clips by the norm of the raw values (sqrt(50)), which is wrong.
    values = np.array([[3.0, 4.0], [3.0, 4.0]])
    sparse = np.zeros((3, 2))
    dense = np.zeros((3, 2))
    so.SGD(learning_rate=1.0, clipnorm=5.0).apply_gradients([(so.IndexedSlices(values, [1, 1]), sparse)])
    so.SGD(learning_rate=1.0, clipnorm=5.0).apply_gradients([(so.IndexedSlices(values, [1, 1]).to_dense((3, 2)), dense)])
    np.testing.assert_allclose(sparse, dense)
    np.testing.assert_allclose(sparse[1], [-3.0, -4.0])


@pytest.mark.parametrize("clip", [dict(clipvalue=0.5), dict(global_clipnorm=1.5), dict(clipnorm=0.7)])
def test_sparse_clipping_equals_dense_clipping_of_the_densified_gradient(clip, rng):
    values = rng.normal(size=(6, 3))
    idx = np.array([0, 2, 2, 5, 0, 2])
    w_grad = rng.normal(size=(2,))
    sparse_t, dense_t = rng.normal(size=(7, 3)), None
    dense_t = sparse_t.copy()
    w1, w2 = np.zeros(2), np.zeros(2)
    opt1, opt2 = so.SGD(0.1, **clip), so.SGD(0.1, **clip)
    opt1.apply_gradients([(so.IndexedSlices(values, idx), sparse_t), (w_grad, w1)])
    opt2.apply_gradients([(so.IndexedSlices(values, idx).to_dense((7, 3)), dense_t), (w_grad, w2)])
    np.testing.assert_allclose(sparse_t, dense_t, rtol=1e-12)
    np.testing.assert_allclose(w1, w2, rtol=1e-12)


def test_clipping_does_not_modify_the_callers_gradient():
    g = np.full(4, 10.0)
    values = np.full((2, 2), 10.0)
    so.SGD(clipnorm=1.0, clipvalue=0.5).apply_gradients(
        [(g, np.zeros(4)), (so.IndexedSlices(values, [0, 0]), np.zeros((2, 2)))])
    assert np.all(g == 10.0) and np.all(values == 10.0)


def test_weight_decay_lazy_touches_only_touched_rows_and_respects_exclusions(rng):
    table0 = rng.normal(size=(8, 2))
    table, w = table0.copy(), np.ones(3)
    opt = so.Adam(learning_rate=0.1, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_list=[w])
    opt.apply_gradients([(so.IndexedSlices(np.ones((2, 2)), [3, 3]), table), (np.zeros(3), w)])
    expected, _ = ref.run_lazy(ref.weight_decayed(ref.adam, 0.5), table0, [(np.ones((2, 2)), [3, 3])],
                               learning_rate=ref.f32(0.1))
    rel_close(table, expected, np.float64)
    untouched = [0, 1, 2, 4, 5, 6, 7]
    np.testing.assert_array_equal(table[untouched], table0[untouched])
    np.testing.assert_array_equal(w, 1.0)  # zero gradient, no decay: unchanged
    opt2 = so.Adam(weight_decay=0.5)
    named = np.ones(2)
    opt2.build([named], names=["layer/bias"])
    opt2.exclude_from_weight_decay(var_names=["bias"])
    opt2.apply_gradients([(np.zeros(2), named)])
    np.testing.assert_array_equal(named, 1.0)


def test_constraints_dense_and_touched_rows():
    table = np.zeros((4, 2))
    w = np.zeros(3)
    clip = lambda x: np.clip(x, -0.05, 0.05)  # noqa: E731
    so.SGD(learning_rate=1.0).apply_gradients(
        [(so.IndexedSlices(np.ones((1, 2)), [2]), table), (np.ones(3), w)],
        constraints={id(table): clip, id(w): clip})
    np.testing.assert_array_equal(table[2], -0.05)
    np.testing.assert_array_equal(table[[0, 1, 3]], 0.0)
    np.testing.assert_array_equal(w, -0.05)
    so.SGD(learning_rate=1.0).apply_gradients([(np.ones(3), w)], constraints=[(w, clip)])
    np.testing.assert_array_equal(w, -0.05)


def test_aggregator_then_transformers_in_order():
    seen = []

    def aggregator(pairs):
        seen.append("aggregate")
        return [(g * 2, v) for g, v in pairs]

    def add_one(pairs):
        seen.append("add_one")
        return [(g + 1, v) for g, v in pairs]

    def square(pairs):
        seen.append("square")
        return [(g * g, v) for g, v in pairs]

    var = np.zeros(1)
    so.SGD(learning_rate=1.0, gradient_aggregator=aggregator,
           gradient_transformers=[add_one, square]).apply_gradients([(np.ones(1), var)])
    assert seen == ["aggregate", "add_one", "square"]
    assert var[0] == -9.0  # ((1 * 2) + 1) ** 2


def test_none_gradients_are_skipped_and_all_none_raises():
    a, b = np.zeros(2), np.zeros(2)
    opt = so.SGD(learning_rate=1.0)
    opt.apply_gradients([(None, a), (np.ones(2), b)])
    np.testing.assert_array_equal(a, 0.0)
    np.testing.assert_array_equal(b, -1.0)
    with pytest.raises(ValueError, match="every gradient is None"):
        opt.apply_gradients([(None, a)])


def test_minimize_with_callable_var_list_returns_the_loss():
    w = np.array([3.0])

    def loss_and_grads():
        return float(w[0] ** 2), [2 * w]

    opt = so.SGD(learning_rate=0.25)
    losses = [opt.minimize(loss_and_grads, lambda: [w]) for _ in range(3)]
    assert losses == [9.0, 2.25, 0.5625]
    assert w[0] == pytest.approx(0.375)


def test_indexed_slices_to_dense_sums_duplicates():
    g = so.IndexedSlices(np.ones((3, 2)), np.array([1, 1, 0]), (3, 2))
    np.testing.assert_array_equal(g.to_dense(), [[1, 1], [2, 2], [0, 0]])
    assert "dense_shape=(3, 2)" in repr(g)


def test_import_touches_neither_tensorflow_nor_cuda():
    import subprocess
    import sys
    code = ("import sys, sparseopt; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'keras', 'torch', 'cupy') or m.startswith('numba.cuda')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ftrl_compiles_the_sqrt_variant_only_for_steps_with_a_power_of_minus_half(rng):
    """The rule is chosen per step from its coefficients, so it follows
    ``learning_rate_power`` also when it is reassigned mid-training or given as a
    callable, and every step matches the float64 reference."""
    from sparseopt.kernels import _compile
    from sparseopt.rules import ftrl as rule
    assert _compile.for_step(rule, rule.coefficients(0.1, -0.5, 0, 0, 0, 0)) is _compile.variant(rule, "sqrt")
    assert _compile.for_step(rule, rule.coefficients(0.1, -0.7, 0, 0, 0, 0)) is rule
    opt = so.Ftrl(learning_rate=0.1)
    var = rng.normal(size=(6, 3))
    p, slots = var.copy(), {}
    powers = [-0.5, -0.5, -0.7, -0.7, -0.5, -0.7]
    for t, power in enumerate(powers, start=1):
        opt.learning_rate_power = (lambda power=power: power) if t >= 5 else power
        g = rng.normal(size=var.shape)
        opt.apply_gradients([(g, var)])
        p = ref.ftrl(p, g, slots, t, learning_rate=float(np.float32(0.1)),  # Keras' float32 rate
                     learning_rate_power=power)
    rel_close(var, p, np.float64)
