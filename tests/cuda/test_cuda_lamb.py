"""Lamb on CUDA arrays: the reduction kernels against the CPU kernels.

Expected values come from the CPU kernels on the same inputs (checked against float64
references in ``tests/test_lamb.py``). The sums of the reduction stage are added in
another order (per-thread partial sums, then a tree; the CPU adds left to right), so as
for the row-wise rules (``test_cuda_rowwise.py``) the device agrees with the CPU to
``steps * n * eps`` (relative), ``n`` the terms of a sum: a row's width in sparse steps,
the variable's size in dense ones. On a GPU, fused multiply-adds add a few ulps more: there
the bound is at least SPEC section 4's.
"""

import numpy as np
import pytest

import sparseopt as so
from tests.cuda.conftest import SIMULATOR
from tests.cuda.helpers import dev, dev_slices, host, sparse_batch

ROWS, WIDTH, K = 60, 6, 40


def tolerance(steps, terms, dtype):
    tol = steps * terms * np.finfo(dtype).eps
    if not SIMULATOR:
        tol = max(tol, 1e-5 if dtype == np.float32 else 1e-10)
    return tol


def assert_close(actual, expected, tol):
    actual = host(actual)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_steps_match_the_cpu(dtype):
    """Per-row trust ratios: duplicates summed in order, weight decay, untouched rows kept."""
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    batches = [sparse_batch(rng, ROWS, WIDTH, K, dtype) for _ in range(3)]
    var, cpu_var = dev(p0), p0.copy()
    opt, cpu_opt = (so.Lamb(learning_rate=0.05, weight_decay=0.1) for _ in range(2))
    for values, idx in batches:
        opt.apply_gradients([(dev_slices(values, idx, p0.shape), var)])
        cpu_opt.apply_gradients([(so.IndexedSlices(values, idx), cpu_var)])
    tol = tolerance(3, WIDTH, dtype)
    assert_close(var, cpu_var, tol)
    assert_close(opt.get_slot(var, "v"), cpu_opt.get_slot(cpu_var, "v"), tol)
    untouched = np.setdiff1d(np.arange(ROWS), np.concatenate([i for _, i in batches]))
    assert untouched.size > 0
    np.testing.assert_array_equal(host(var)[untouched], p0[untouched])


def test_dense_steps_match_the_cpu():
    """Norms over the whole variable: several blocks' partial sums (the shrunk launch
    configuration of the simulator), added in order by one thread."""
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=(ROWS, WIDTH))
    grads = [rng.normal(size=p0.shape) for _ in range(3)]
    var, cpu_var = dev(p0), p0.copy()
    opt, cpu_opt = (so.Lamb(learning_rate=0.05, clipnorm=2.0) for _ in range(2))
    for g in grads:
        opt.apply_gradients([(dev(g), var)])
        cpu_opt.apply_gradients([(g, cpu_var)])
    assert_close(var, cpu_var, tolerance(3, p0.size, np.float64))
    assert_close(opt.get_slot(var, "m"), cpu_opt.get_slot(cpu_var, "m"), tolerance(3, p0.size, np.float64))
