"""RowwiseAdagrad on CUDA arrays: the row-reduction kernels against the CPU kernels.

Expected values come from the CPU row-reduction kernels on the same inputs (they are
checked against float64 references in ``tests/test_rowwise_adagrad.py``). The one
difference by design is the order of the row sum: the CPU adds a row's ``g**2``
left to right, the device adds per-thread partial sums in a tree. Two orders of a
sum of ``d`` non-negative terms differ by at most ``(d - 1) eps`` relative, and that
difference enters the accumulator once per step; the parameter moves by
``lr g / sqrt(acc)``, half as sensitive. So after ``s`` steps the device agrees with
the CPU to :func:`row_tolerance` ``= s * d * eps`` (relative, and absolute at the
scale of the values): 2.1e-6 for three float32 steps of width 6. On a GPU, fused
multiply-adds in the element update add a few ulps more: there the bound is SPEC
section 4's 1e-5 (float32) or 1e-10 (float64). Two device runs are bit-identical.
"""

import numpy as np
import pytest

import sparseopt as so
from sparseopt.kernels import cuda as kc
from tests.cuda.conftest import SIMULATOR
from tests.cuda.helpers import InterfaceArray, dev, dev_slices, host, sparse_batch

ROWS, WIDTH, K = 120, 6, 80


def row_tolerance(steps, width, dtype):
    """How close the device result is to the CPU's (see the module docstring)."""
    tol = steps * max(width, 2) * np.finfo(dtype).eps
    if not SIMULATOR:
        tol = max(tol, 1e-5 if dtype == np.float32 else 1e-10)
    return tol


def assert_close(actual, expected, tol):
    actual = host(actual) if not isinstance(actual, np.ndarray) else actual
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    scale = max(float(np.nanmax(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def steps_for(rng, shape, dtype):
    """Sparse (int64 indices, a hot row, duplicates), dense, sparse (int32 indices)."""
    width = int(np.prod(shape[1:], dtype=np.int64))
    a = sparse_batch(rng, shape[0], width, K, dtype)
    b = sparse_batch(rng, shape[0], width, K // 2, dtype, index_dtype=np.int32)
    return [(a[0].reshape((K,) + shape[1:]), a[1]), rng.normal(size=shape).astype(dtype),
            (b[0].reshape((K // 2,) + shape[1:]), b[1])]


def run(make, p0, steps, to_device):
    var = dev(p0) if to_device else p0.copy()
    opt = make()
    put = dev if to_device else (lambda a: a)
    for step in steps:
        if isinstance(step, tuple):
            opt.apply_gradients([(so.IndexedSlices(put(step[0]), put(step[1]), p0.shape), var)])
        else:
            opt.apply_gradients([(put(step), var)])
    return opt, var


def assert_matches_cpu(make, p0, steps):
    gpu_opt, gpu_var = run(make, p0, steps, True)
    cpu_opt, cpu_var = run(make, p0, steps, False)
    width = int(np.prod(p0.shape[1:], dtype=np.int64))
    tol = row_tolerance(len(steps), width, p0.dtype)
    assert gpu_opt.iterations == cpu_opt.iterations == len(steps)
    assert gpu_opt.get_slot_names() == cpu_opt.get_slot_names() == ["accumulator"]
    acc = gpu_opt.get_slot(gpu_var, "accumulator")
    assert not isinstance(acc, np.ndarray) and acc.shape == p0.shape[:1]
    assert_close(acc, cpu_opt.get_slot(cpu_var, "accumulator"), tol)
    assert_close(gpu_var, cpu_var, tol)
    return gpu_opt, gpu_var


CONFIGS = {
    "defaults": lambda: so.RowwiseAdagrad(),
    "table_row": lambda: so.RowwiseAdagrad(learning_rate=0.1, initial_accumulator_value=0.1),
    "weight_decay": lambda: so.RowwiseAdagrad(learning_rate=0.1, weight_decay=0.05, epsilon=1e-3),
    "clipnorm": lambda: so.RowwiseAdagrad(learning_rate=0.1, clipnorm=1.5),
    "clipvalue": lambda: so.RowwiseAdagrad(learning_rate=0.1, clipvalue=0.3),
    "global_clipnorm_schedule": lambda: so.RowwiseAdagrad(
        learning_rate=so.schedules.ExponentialDecay(0.2, decay_steps=1, decay_rate=0.5),
        global_clipnorm=2.0),
}


@pytest.mark.parametrize("make", list(CONFIGS.values()), ids=list(CONFIGS))
def test_sparse_and_dense_steps_match_cpu(make, rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    assert_matches_cpu(make, p0, steps_for(rng, p0.shape, np.float32))


def test_float64_matches_cpu(rng):
    p0 = rng.normal(size=(ROWS, WIDTH))
    assert_matches_cpu(CONFIGS["weight_decay"], p0, steps_for(rng, p0.shape, np.float64))


@pytest.mark.parametrize("shape", [(40,), (30, 37), (25, 2, 3), (20, 3)],
                         ids=["1d", "wide_rows", "3d", "rows_narrower_than_lanes"])
def test_row_shapes(shape, rng):
    p0 = rng.normal(size=shape).astype(np.float32)
    assert_matches_cpu(CONFIGS["table_row"], p0, steps_for(rng, shape, np.float32))


def test_lanes_not_a_power_of_two(rng):
    """The reduction tree pairs ``(i, i + ceil(n / 2))``: any number of lanes per row."""
    previous = kc.set_launch_config(row_threads=12, max_lanes=3)
    try:
        p0 = rng.normal(size=(ROWS, 11)).astype(np.float32)
        assert_matches_cpu(CONFIGS["table_row"], p0, steps_for(rng, p0.shape, np.float32))
    finally:
        kc.set_launch_config(**vars(previous))


def test_two_runs_are_bit_identical(rng):
    """Determinism: a Zipf batch with hot rows, twice, gives the same bits (the tree's
    shape depends only on the launch configuration)."""
    rows, width, k = 600, 9, 100
    p0 = rng.normal(size=(rows, width)).astype(np.float32)
    idx = (rng.zipf(1.1, k) - 1) % rows
    values = rng.normal(size=(k, width)).astype(np.float32)
    results = []
    for _ in range(2):
        var = dev(p0)
        opt = so.RowwiseAdagrad(learning_rate=0.1, weight_decay=0.01)
        for _ in range(2):
            opt.apply_gradients([(dev_slices(values, idx), var)])
        results.append((host(var), host(opt.get_slot(var, "accumulator"))))
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def test_untouched_rows_stay_bit_identical(rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    values, idx = sparse_batch(rng, ROWS, WIDTH, K, np.float32)
    var = dev(p0)
    opt = so.RowwiseAdagrad(learning_rate=0.1, initial_accumulator_value=0.25, weight_decay=0.1)
    opt.apply_gradients([(dev_slices(values, idx), var)])
    untouched = np.setdiff1d(np.arange(ROWS), idx)
    assert np.array_equal(host(var)[untouched], p0[untouched])
    acc = host(opt.get_slot(var, "accumulator"))
    assert np.all(acc[untouched] == np.float32(0.25))
    assert np.all(acc[np.unique(idx)] > np.float32(0.25))


def test_interface_arrays_and_weights_round_trip(rng):
    """A ``__cuda_array_interface__`` variable; ``get_weights``/``set_weights`` move the row
    slots through the host and the clone continues as the original does."""
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    batches = [sparse_batch(rng, ROWS, WIDTH, K, np.float32) for _ in range(2)]
    var = InterfaceArray(p0, device_index=0)
    opt = so.RowwiseAdagrad(learning_rate=0.1)
    opt.apply_gradients([(so.IndexedSlices(InterfaceArray(batches[0][0]), InterfaceArray(batches[0][1])), var)])
    weights = opt.get_weights()
    assert weights[0] == 1 and isinstance(weights[1], np.ndarray) and weights[1].shape == (ROWS,)
    clone_var = dev(var.to_host())
    clone = so.RowwiseAdagrad(learning_rate=0.1)
    clone.build([clone_var])
    clone.set_weights(weights)
    values, idx = batches[1]
    opt.apply_gradients([(so.IndexedSlices(InterfaceArray(values), InterfaceArray(idx)), var)])
    clone.apply_gradients([(dev_slices(values, idx), clone_var)])
    assert np.array_equal(var.to_host(), host(clone_var))
    assert np.array_equal(host(opt.get_slot(var, "accumulator")), host(clone.get_slot(clone_var, "accumulator")))


def test_constraint_on_touched_rows(rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    values, idx = sparse_batch(rng, ROWS, WIDTH, K, np.float32)
    var = dev(p0)
    opt = so.RowwiseAdagrad(learning_rate=0.5)

    def zero_first_column(rows):
        out = host(rows)
        out[:, 0] = 0
        return dev(out)
    opt.apply_gradients([(dev_slices(values, idx), var)], constraints=[(var, zero_first_column)])
    result = host(var)
    touched = np.unique(idx)
    assert not result[touched, 0].any()
    untouched = np.setdiff1d(np.arange(ROWS), idx)
    assert np.array_equal(result[untouched], p0[untouched])


def test_row_kernel_runs_a_rule_with_element_and_row_slots(monkeypatch, rng):
    """The row kernel is generic: ``tests/test_rowwise_adagrad.py``'s PARTIAL_ROWWISE_ADAM
    (first moment per element, second per row), dense then sparse (row 5 twice), against
    the CPU row kernels on the same arrays."""
    from sparseopt import _config
    from sparseopt.kernels import cpu
    from tests.test_rowwise_adagrad import PARTIAL_ROWWISE_ADAM as rule
    from tests.test_rowwise_adagrad import _PartialCoefficients
    # A rule defined in a test has no stable source hash: keep its kernels out of the disk cache.
    monkeypatch.setattr(_config, "CPU_KERNEL_FLAGS", {**_config.CPU_KERNEL_FLAGS, "cache": False})
    monkeypatch.setattr(kc, "KERNEL_FLAGS", {**kc.KERNEL_FLAGS, "cache": False})
    c = _PartialCoefficients(0.1, 0.1, 0.01, 1e-8)
    n, d = 12, 5
    p = rng.normal(size=(n, d)).astype(np.float32)
    m, v = np.zeros((n, d), np.float32), np.full(n, 0.5, np.float32)
    g = rng.normal(size=(n, d)).astype(np.float32)
    rows, offsets, order = np.array([5, 2]), np.array([0, 2, 3]), np.array([0, 2, 1])
    values = rng.normal(size=(3, d)).astype(np.float32)
    arrays = [dev(a) for a in (p, m, v, g, rows, offsets, order, values)]
    dp, dm, dv, dg, drows, doffsets, dorder, dvalues = arrays
    width = np.float32(d)
    used, row_used = (True,), (True,)
    cpu.row_dense_kernel(rule, used, row_used, False)(p, g, (m,), (v,), c, np.float32(0), width)
    cpu.row_sparse_kernel(rule, used, row_used, False)(p, (m,), (v,), rows, offsets, order, values, c,
                                                       np.float32(0), width)
    lanes, per_block = kc.row_layout(d)
    threads = kc.launch_config().row_threads
    for dense, args in ((True, (drows, drows, drows, dg, n)), (False, (drows, doffsets, dorder, dvalues, 2))):
        kernel = kc.row_kernel(rule, used, row_used, False, dense, np.float32, threads)
        kernel[kc.blocks_for(args[-1], per_block), (lanes, per_block), 0](
            dp, (dm,), (dv,), *args, c, np.float32(0), width)
    tol = row_tolerance(2, d, np.float32)
    assert_close(dp, p, tol)
    assert_close(dm, m, tol)
    assert_close(dv, v, tol)
