"""Lamb: the reduction stage of the CPU kernels (dense: norms over the variable; sparse:
per touched row), against the float64 references ``tests.references.lamb`` (checked
against ``keras.optimizers.Lamb`` below) and ``lamb_rows`` (the same formula per row)."""

import numba
import numpy as np
import pytest

import sparseopt as so
from sparseopt import errors
from sparseopt.kernels import cpu
from tests import references as ref
from tests.conftest import rel_close

STEPS = 20
LR = ref.f32(0.01)  # the core (as Keras) keeps the learning rate in float32


def _dense_run(opt, p0, grads):
    p = p0.copy()
    for g in grads:
        opt.apply_gradients([(g, p)])
    return p


def test_reference_matches_keras_lamb():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    for dtype, wd in ((np.float64, None), (np.float32, None), (np.float64, 0.05)):
        p0 = rng.normal(size=(6, 4)).astype(dtype)
        grads = [rng.normal(size=p0.shape).astype(dtype) for _ in range(STEPS)]
        var = tf.Variable(p0)
        opt = tf.keras.optimizers.Lamb(learning_rate=0.01, weight_decay=wd)
        for g in grads:
            opt.apply_gradients([(tf.constant(g), var)])
        step = ref.lamb if wd is None else ref.weight_decayed(ref.lamb, wd)
        expected, _ = ref.run_dense(step, p0, grads, learning_rate=LR)
        rel_close(expected, var.numpy(), dtype)


@pytest.mark.parametrize("dtype, wd", [(np.float32, None), (np.float64, None), (np.float64, 0.05)])
def test_dense_steps_match_the_reference(dtype, wd):
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=(300, 6)).astype(dtype)
    grads = [rng.normal(size=p0.shape).astype(dtype) for _ in range(STEPS)]
    opt = so.Lamb(learning_rate=0.01, beta_2=0.99, weight_decay=wd)
    p = _dense_run(opt, p0, grads)
    step = ref.lamb if wd is None else ref.weight_decayed(ref.lamb, wd)
    expected, slots = ref.run_dense(step, p0, grads, learning_rate=LR, beta_2=0.99)
    rel_close(p, expected, dtype)
    rel_close(opt.get_slot(p, "v"), slots["v"], dtype)


@pytest.mark.parametrize("dtype, wd", [(np.float32, None), (np.float64, 0.05)])
def test_sparse_steps_use_per_row_trust_ratios(dtype, wd):
    """Lazy mode: duplicates summed, each touched row its own trust ratio, untouched rows
    (and their moments) bit-identical; two tables of one call as each on its own."""
    rng = np.random.default_rng(2)
    p0 = rng.normal(size=(400, 8)).astype(dtype)
    q0 = rng.normal(size=(50, 3)).astype(dtype)
    batches = [(rng.normal(size=(60, 8)).astype(dtype), rng.integers(0, 400, 60)) for _ in range(STEPS)]
    small = [(rng.normal(size=(20, 3)).astype(dtype), rng.integers(0, 50, 20)) for _ in range(STEPS)]
    p, q = p0.copy(), q0.copy()
    opt = so.Lamb(learning_rate=0.01, weight_decay=wd)
    for (values, idx), (qv, qi) in zip(batches, small):
        opt.apply_gradients([(so.IndexedSlices(values, idx), p), (so.IndexedSlices(qv, qi), q)])
    step = ref.lamb_rows if wd is None else ref.weight_decayed(ref.lamb_rows, wd)
    expected, slots = ref.run_lazy(step, p0, batches, learning_rate=LR)
    rel_close(p, expected, dtype)
    rel_close(opt.get_slot(p, "m"), slots["m"], dtype)
    untouched = np.setdiff1d(np.arange(400), np.concatenate([i for _, i in batches]))
    assert untouched.size > 0
    np.testing.assert_array_equal(p[untouched], p0[untouched])
    assert not opt.get_slot(p, "v")[untouched].any()
    alone = q0.copy()
    other = so.Lamb(learning_rate=0.01, weight_decay=wd)
    for qv, qi in small:
        other.apply_gradients([(so.IndexedSlices(qv, qi), alone)])
    np.testing.assert_array_equal(q, alone)


def test_sparse_rule_differs_from_the_dense_rule_on_a_table():
    """The sparse semantics are per row: a gradient touching every row once does not give
    the dense step (whole-table norms), but the dense step of each row on its own."""
    rng = np.random.default_rng(3)
    p0 = rng.normal(size=(40, 5))
    g = rng.normal(size=p0.shape)
    sparse, dense = p0.copy(), p0.copy()
    so.Lamb(learning_rate=0.1).apply_gradients([(so.IndexedSlices(g, np.arange(40)), sparse)])
    so.Lamb(learning_rate=0.1).apply_gradients([(g, dense)])
    rows = np.empty_like(p0)
    for r in range(40):
        row = p0[r:r + 1].copy()
        so.Lamb(learning_rate=0.1).apply_gradients([(g[r:r + 1], row)])
        rows[r] = row[0]
    rel_close(sparse, rows, np.float64)
    assert np.max(np.abs(sparse - dense)) > 1e-4


@pytest.mark.parametrize("clip", [dict(clipnorm=0.5), dict(clipvalue=0.1), dict(global_clipnorm=0.7)])
def test_clipping_happens_before_the_rule(clip):
    rng = np.random.default_rng(4)
    p0 = rng.normal(size=(30, 4))
    grads = [rng.normal(size=p0.shape) for _ in range(5)]
    p = _dense_run(so.Lamb(learning_rate=0.01, **clip), p0, grads)
    clipped = []
    for g in grads:
        if "clipvalue" in clip:
            g = np.clip(g, -0.1, 0.1)
        else:
            limit = clip.get("clipnorm", clip.get("global_clipnorm"))
            g = g * min(1.0, limit / np.linalg.norm(g))
        clipped.append(g)
    expected, _ = ref.run_dense(ref.lamb, p0, clipped, learning_rate=LR)
    rel_close(p, expected, np.float64)


def test_zero_norms_give_a_trust_ratio_of_one():
    """Zero weights (||p|| = 0): the plain Adam-like step ``lr * u``, as Keras; a zero row
    of a sparse step likewise."""
    g = np.array([[1.0, -2.0], [0.5, 0.25]])
    p = np.zeros((2, 2))
    so.Lamb(learning_rate=0.1).apply_gradients([(g, p)])
    expected, _ = ref.run_dense(ref.lamb, np.zeros((2, 2)), [g], learning_rate=ref.f32(0.1))
    rel_close(p, expected, np.float64)
    assert np.all(p != 0)
    table = np.zeros((3, 2))
    so.Lamb(learning_rate=0.1).apply_gradients([(so.IndexedSlices(g, np.array([2, 0])), table)])
    rel_close(table[[2, 0]], expected, np.float64)


def test_dense_reduction_is_the_same_for_any_thread_count():
    rng = np.random.default_rng(5)
    p0 = rng.normal(size=5000).astype(np.float32)
    g = rng.normal(size=5000).astype(np.float32)
    c = so.Lamb()._coefficients({"learning_rate": 0.01, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}, 1)
    c = type(c)(*(np.float32(x) for x in c))
    kernel = cpu.dense_kernel(so.Lamb._rule, (True, True), False)
    results = []
    threads = numba.get_num_threads()
    try:
        for n in sorted({1, threads}):
            numba.set_num_threads(n)
            p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
            kernel(p, g, (m, v), c, np.float32(0))
            results.append(p)
    finally:
        numba.set_num_threads(threads)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    assert not np.array_equal(results[0], p0)


def test_bfloat16_table_rounds_the_float32_step():
    """A bfloat16 table (round to nearest): the float32 step on its values, rounded."""
    lowp = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(6)
    table = rng.normal(size=(100, 8)).astype(lowp.bfloat16)
    wide = table.astype(np.float32)
    values, idx = rng.normal(size=(30, 8)).astype(np.float32), rng.integers(0, 100, 30)
    so.Lamb(learning_rate=0.1, stochastic_rounding=False, weight_decay=0.1).apply_gradients(
        [(so.IndexedSlices(values, idx), table)])
    so.Lamb(learning_rate=0.1, weight_decay=0.1).apply_gradients([(so.IndexedSlices(values, idx), wide)])
    np.testing.assert_array_equal(table.view(np.uint16), wide.astype(lowp.bfloat16).view(np.uint16))


def test_bfloat16_gradients_give_the_bits_of_their_float32_values():
    """A bfloat16 table's sparse gradient in bfloat16 (read as bits by the kernel, widened as
    each row is read) steps as the same values given in float32 (duplicates included)."""
    lowp = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(7)
    table = rng.normal(size=(100, 8)).astype(lowp.bfloat16)
    other, start = table.copy(), table.copy()
    values = rng.normal(size=(30, 8)).astype(lowp.bfloat16)
    idx = rng.integers(0, 20, 30)
    for t, v in ((table, values), (other, values.astype(np.float32))):
        so.Lamb(learning_rate=0.1, seed=3).apply_gradients([(so.IndexedSlices(v, idx), t)])
    assert not np.array_equal(table.view(np.uint16), start.view(np.uint16))
    np.testing.assert_array_equal(table.view(np.uint16), other.view(np.uint16))


def test_exact_mode_is_refused_at_construction():
    with pytest.raises(errors.HyperparameterError, match=r"lamb: Lamb has no sparse_mode='exact'"):
        so.Lamb(sparse_mode="exact")


def test_bad_input_writes_nothing():
    p = np.ones((10, 3))
    opt = so.Lamb(learning_rate=0.1)
    opt.apply_gradients([(so.IndexedSlices(np.ones((1, 3)), np.array([1])), p)])
    before = p.copy(), opt.get_slot(p, "m").copy(), opt.iterations
    with pytest.raises(errors.IndexOutOfRangeError, match=r"indices must lie in \[0, 10\); got 10"):
        opt.apply_gradients([(so.IndexedSlices(np.ones((2, 3)), np.array([2, 10])), p)])
    np.testing.assert_array_equal(p, before[0])
    np.testing.assert_array_equal(opt.get_slot(p, "m"), before[1])
    assert opt.iterations == before[2]
    with pytest.raises(errors.HyperparameterError, match="epsilon"):
        so.Lamb(epsilon=float("nan"))
