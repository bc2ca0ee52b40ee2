"""``sparse_mode="exact"`` on CUDA arrays: the same steps give the CPU's exact-mode results.

Expected values come from the CPU exact mode on the same inputs, which
``tests/test_exact.py`` checks against the dense float64 references. The device runs
the same math (the CPU's catch-up template and the rules' ``idle_apply``, compiled as
device functions; the host computes the same idle tables, and the same records are
replayed), so on the simulator the results are bit-identical (:func:`tolerance` 0),
except where a rule calls ``math`` functions other than ``sqrt`` (the simulator's
``pow`` is float64, rounded, which may differ from the CPU's in the last bit: ``16
eps``, relative and absolute at the values' scale) and for RowwiseAdagrad, whose row
sum is a tree on the device (``steps * width * eps``, see ``test_cuda_rowwise.py``).
On a GPU, fused multiply-adds differ by a few ulps per step: SPEC section 4's 1e-5
(float32) and 1e-10 (float64).
"""

import inspect
import re

import numpy as np
import pytest

import sparseopt as so
from tests.cuda.conftest import SIMULATOR
from tests.cuda.helpers import dev, dev_slices, host
from tests.optimizer_table import CASES, IDS
from tests.test_exact import ROWS, STEPS, WIDTH, StepDecay, random_sparse


def tolerance(case, dtype, steps=STEPS):
    """How close the device's exact mode is to the CPU's (0: bit-identical; see the module docstring)."""
    if not SIMULATOR:
        return 1e-5 if dtype == np.float32 else 1e-10
    rule = case.cls._rule
    eps = np.finfo(dtype).eps
    if hasattr(rule, "ROW_SLOTS"):
        return steps * WIDTH * eps
    functions = [rule.update, getattr(rule, "idle_apply", rule.update)]
    if any(re.search(r"math\.(?!sqrt\b)\w+", inspect.getsource(fn)) for fn in functions):
        return 16 * eps
    return 0.0


def assert_close(actual, expected, tol):
    actual = host(actual) if not isinstance(actual, np.ndarray) else actual
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if tol == 0:
        assert np.array_equal(actual, expected, equal_nan=True), (
            f"not bit-identical: max abs difference {np.nanmax(np.abs(actual - expected))}")
        return
    scale = max(float(np.nanmax(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def run_exact(case, p0, grads, device, **extra):
    """``grads``: ``(values, indices)`` pairs (an array in place of a pair: a dense step)."""
    var = dev(p0) if device else p0.copy()
    opt = case.make(sparse_mode="exact", **extra)
    for step in grads:
        if isinstance(step, tuple):
            values, idx = step
            g = dev_slices(values, idx, p0.shape) if device else so.IndexedSlices(values, idx, p0.shape)
        else:
            g = dev(step) if device else step
        opt.apply_gradients([(g, var)])
    return opt, var


def assert_same_state(case, gpu, cpu, tol):
    (gpu_opt, gpu_var), (cpu_opt, cpu_var) = gpu, cpu
    assert gpu_opt.iterations == cpu_opt.iterations
    assert_close(gpu_var, cpu_var, tol)
    assert gpu_opt.get_slot_names() == cpu_opt.get_slot_names()
    for name in cpu_opt.get_slot_names():
        assert_close(gpu_opt.get_slot(gpu_var, name), cpu_opt.get_slot(cpu_var, name), tol)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_exact_steps_then_flush_match_cpu(case, rng):
    """30 random sparse steps (some empty, duplicates), then ``flush()``: every row current."""
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    grads = random_sparse(rng, np.float32)
    gpu, cpu = run_exact(case, p0, grads, True), run_exact(case, p0, grads, False)
    gpu[0].flush()
    cpu[0].flush()
    assert_same_state(case, gpu, cpu, tolerance(case, np.float32))


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("adam", "sgd_momentum", "ftrl_regularized",
                                                               "rowwise_adagrad")],
                         ids=lambda c: c.id)
def test_schedule_weight_decay_short_history_and_float64(case, rng):
    """A learning rate that changes every step, weight decay, and a history of 8 (the ring
    forces intermediate flushes), in float64; then a dense step, which catches up first."""
    p0 = rng.normal(size=(ROWS, WIDTH))
    grads = random_sparse(rng, np.float64, steps=16) + [rng.normal(size=(ROWS, WIDTH))]
    extra = dict(learning_rate=StepDecay(case.hp()["learning_rate"]), exact_history=8,
                 weight_decay=case.kwargs.get("weight_decay", 0.05))
    gpu, cpu = run_exact(case, p0, grads, True, **extra), run_exact(case, p0, grads, False, **extra)
    assert_same_state(case, gpu, cpu, tolerance(case, np.float64, steps=len(grads)))


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("adam", "rowwise_adagrad")],
                         ids=lambda c: c.id)
def test_catch_up_given_rows(case, rng):
    """``catch_up`` with device or host indices (duplicates allowed) brings those rows to
    what the CPU's catch-up gives, and changes no other row."""
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    grads = random_sparse(rng, np.float32, steps=12)
    extra = dict(weight_decay=0.05)
    (gpu_opt, gpu_var), (cpu_opt, cpu_var) = (run_exact(case, p0, grads, True, **extra),
                                              run_exact(case, p0, grads, False, **extra))
    rows = np.array([5, 0, 5, 39])
    before = host(gpu_var)
    gpu_opt.catch_up(gpu_var, dev(rows))
    cpu_opt.catch_up(cpu_var, rows)
    after = host(gpu_var)
    tol = tolerance(case, np.float32)
    assert_close(after[rows], cpu_var[rows], tol)
    others = np.setdiff1d(np.arange(ROWS), rows)
    assert np.array_equal(after[others], before[others])
    gpu_opt.catch_up(gpu_var, [39, 7])  # host indices; row 39 already current
    cpu_opt.catch_up(cpu_var, [39, 7])
    assert_close(host(gpu_var)[[39, 7]], cpu_var[[39, 7]], tol)


def test_untouched_rows_wait_for_flush(rng):
    """A sparse step writes only the touched rows; ``flush()`` then moves the others."""
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    var = dev(p0)
    opt = so.Adam(learning_rate=0.01, sparse_mode="exact")
    opt.apply_gradients([(dev_slices(np.ones((2, WIDTH), np.float32), np.array([1, 2])), var)])
    opt.apply_gradients([(dev_slices(np.ones((1, WIDTH), np.float32), np.array([3])), var)])
    after = host(var)
    assert np.array_equal(np.delete(after, [1, 2, 3], axis=0), np.delete(p0, [1, 2, 3], axis=0))
    opt.flush()
    assert not np.array_equal(host(var)[1], after[1])


def test_catch_up_checks_indices_before_writing(rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    var = dev(p0)
    opt = so.Adam(learning_rate=0.01, sparse_mode="exact")
    opt.apply_gradients([(dev_slices(np.ones((1, WIDTH), np.float32), np.array([1])), var)])
    opt.apply_gradients([(dev_slices(np.ones((1, WIDTH), np.float32), np.array([2])), var)])
    before = host(var)
    with pytest.raises(so.errors.IndexOutOfRangeError, match=r"indices must lie in \[0, 40\); got 40 at position 1"):
        opt.catch_up(var, dev(np.array([1, 40])))
    with pytest.raises(so.errors.IndicesTypeError, match="indices must be a signed or 32-bit integer array"):
        opt.catch_up(var, dev(np.array([1.0])))
    assert np.array_equal(host(var), before)


IDENTITY_CASES = [c for c in CASES if c.id in ("sgd", "adagrad", "rowwise_adagrad")]


@pytest.mark.parametrize("case", IDENTITY_CASES, ids=[c.id for c in IDENTITY_CASES])
def test_idle_identity_shortcut_on_the_device(case, rng):
    """Where the idle step is the identity (no weight decay) the device's exact step is its
    lazy step: no bookkeeping, lazy mode's bits, the CPU's results. With weight decay on for
    the first steps (rows behind), the full path runs until a flush, then the shortcut."""
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    grads = random_sparse(rng, np.float32, steps=12)
    (gpu_opt, gpu_var), cpu = run_exact(case, p0, grads, True), run_exact(case, p0, grads, False)
    assert gpu_opt._exact_states == {}
    lazy_var = dev(p0)
    lazy = case.make()
    for values, idx in grads:
        lazy.apply_gradients([(dev_slices(values, idx, p0.shape), lazy_var)])
    assert np.array_equal(host(gpu_var), host(lazy_var))
    assert_same_state(case, (gpu_opt, gpu_var), cpu, tolerance(case, np.float32, steps=12))

    def decayed_then_not(device):
        var = dev(p0) if device else p0.copy()
        opt = case.make(sparse_mode="exact", weight_decay=0.05)
        for t, (values, idx) in enumerate(grads):
            if t == 4:
                opt.weight_decay = 0.0
            if t == 8:
                opt.flush()
            g = dev_slices(values, idx, p0.shape) if device else so.IndexedSlices(values, idx, p0.shape)
            opt.apply_gradients([(g, var)])
        ex = opt._exact_states[id(var)]
        assert ex.floor == ex.steps == len(grads)     # the last steps took the shortcut
        return opt, var
    assert_same_state(case, decayed_then_not(True), decayed_then_not(False),
                      tolerance(case, np.float32, steps=12))
