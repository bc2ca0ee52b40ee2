"""CUDA steps of every optimizer of the table against the CPU kernels, on the same inputs."""

import numpy as np
import pytest

import sparseopt as so
from tests.cuda.helpers import (InterfaceArray, assert_matches_cpu, assert_state_matches, dev,
                                dev_slices, host, sparse_batch)
from tests.optimizer_table import CASES

# Every elementwise row of the table runs here (bit-identical on the simulator), so a new
# optimizer joins with its table row. Row-wise rules (RowwiseAdagrad) sum each row in a
# tree on the device, which rounds differently: test_cuda_rowwise.py compares them.
CUDA_CASES = [c for c in CASES if not hasattr(c.cls._rule, "ROW_SLOTS")]
CUDA_IDS = [c.id for c in CUDA_CASES]
FLOAT64_IDS = {"sgd_momentum", "adam", "adagrad"}

ROWS, WIDTH, K = 150, 6, 90


def run_both(make, p0, steps):
    """Apply the same steps to a NumPy copy and a device copy of ``p0``; return both sides."""
    cpu_var, gpu_var = p0.copy(), dev(p0)
    cpu_opt, gpu_opt = make(), make()
    for step in steps:
        if isinstance(step, tuple):
            values, idx = step
            cpu_opt.apply_gradients([(so.IndexedSlices(values, idx, p0.shape), cpu_var)])
            gpu_opt.apply_gradients([(dev_slices(values, idx, p0.shape), gpu_var)])
        else:
            cpu_opt.apply_gradients([(step, cpu_var)])
            gpu_opt.apply_gradients([(dev(step), gpu_var)])
    return gpu_opt, gpu_var, cpu_opt, cpu_var


def mixed_steps(rng, shape, dtype):
    """Sparse (int64 indices, a hot row), dense, sparse again (int32 indices, another batch)."""
    first = sparse_batch(rng, shape[0], int(np.prod(shape[1:])), K, dtype)
    first = (first[0].reshape((K,) + shape[1:]), first[1])
    second = sparse_batch(rng, shape[0], int(np.prod(shape[1:])), K // 2, dtype, index_dtype=np.int32)
    second = (second[0].reshape((K // 2,) + shape[1:]), second[1])
    return [first, rng.normal(size=shape).astype(dtype), second]


@pytest.mark.parametrize("case", CUDA_CASES, ids=CUDA_IDS)
def test_sparse_and_dense_steps_match_cpu(case, rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    assert_state_matches(*run_both(case.make, p0, mixed_steps(rng, p0.shape, np.float32)))


@pytest.mark.parametrize("case", [c for c in CUDA_CASES if c.id in FLOAT64_IDS],
                         ids=[c.id for c in CUDA_CASES if c.id in FLOAT64_IDS])
def test_float64_matches_cpu(case, rng):
    p0 = rng.normal(size=(ROWS, WIDTH))
    assert_state_matches(*run_both(case.make, p0, mixed_steps(rng, p0.shape, np.float64)))


@pytest.mark.parametrize("shape", [(40,), (30, 2, 3)], ids=["1d", "3d"])
def test_sparse_on_1d_and_3d_variables(shape, rng):
    p0 = rng.normal(size=shape).astype(np.float32)
    steps = mixed_steps(rng, shape, np.float32)
    assert_state_matches(*run_both(lambda: so.Adam(learning_rate=0.01), p0, steps))


def test_lazy_leaves_untouched_rows_bit_identical(rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    values, idx = sparse_batch(rng, ROWS, WIDTH, K, np.float32)
    var = dev(p0)
    opt = so.Adam(learning_rate=0.01)
    opt.build([var])
    opt.apply_gradients([(dev_slices(values, idx), var)])
    untouched = np.setdiff1d(np.arange(ROWS), idx)
    assert np.array_equal(host(var)[untouched], p0[untouched])
    for name in ("m", "v"):
        assert not host(opt.get_slot(var, name))[untouched].any()
    assert host(opt.get_slot(var, "m"))[np.unique(idx)].any()


@pytest.mark.parametrize("make", [lambda: so.Adam(learning_rate=0.01, weight_decay=0.05),
                                  lambda: so.SGD(learning_rate=0.1, momentum=0.9, weight_decay=0.1),
                                  lambda: so.Adagrad(learning_rate=0.1, weight_decay=0.02)],
                         ids=["adam", "sgd_momentum", "adagrad"])
def test_weight_decay_matches_cpu(make, rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    assert_state_matches(*run_both(make, p0, mixed_steps(rng, p0.shape, np.float32)))


def test_exclude_from_weight_decay(rng):
    a0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    b0 = rng.normal(size=(20, 3)).astype(np.float32)
    values, idx = sparse_batch(rng, ROWS, WIDTH, K, np.float32)
    gb = rng.normal(size=b0.shape).astype(np.float32)
    sides = []
    for to in (np.copy, dev):
        a, b = to(a0), to(b0)
        opt = so.Adam(learning_rate=0.01, weight_decay=0.3)
        opt.exclude_from_weight_decay(var_list=[b])
        ga = so.IndexedSlices(to(values), to(idx))
        opt.apply_gradients([(ga, a), (to(gb), b)])
        sides.append((a, b))
    (ca, cb), (ga_, gb_) = sides
    assert_matches_cpu(ga_, ca)
    assert_matches_cpu(gb_, cb)


def test_two_runs_are_bit_identical(rng):
    """Determinism on the device: a Zipf batch with hot rows, twice, gives the same bits."""
    rows, width, k = 2000, 4, 200
    p0 = rng.normal(size=(rows, width)).astype(np.float32)
    idx = (rng.zipf(1.1, k) - 1) % rows
    values = rng.normal(size=(k, width)).astype(np.float32)
    results = []
    for _ in range(2):
        var = dev(p0)
        opt = so.Adam(learning_rate=0.01)
        for _ in range(2):
            opt.apply_gradients([(dev_slices(values, idx), var)])
        results.append([host(var), host(opt.get_slot(var, "m")), host(opt.get_slot(var, "v"))])
    for a, b in zip(*results):
        assert np.array_equal(a, b)
    cpu = p0.copy()
    opt = so.Adam(learning_rate=0.01)
    for _ in range(2):
        opt.apply_gradients([(so.IndexedSlices(values, idx), cpu)])
    assert_matches_cpu(results[0][0], cpu)


def test_permuted_batch_changes_only_rounding(rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    values, idx = sparse_batch(rng, ROWS, WIDTH, K, np.float32)
    perm = rng.permutation(K)
    a, b = dev(p0), dev(p0)
    so.SGD(learning_rate=0.1).apply_gradients([(dev_slices(values, idx), a)])
    so.SGD(learning_rate=0.1).apply_gradients([(dev_slices(values[perm], idx[perm]), b)])
    np.testing.assert_allclose(host(a), host(b), rtol=1e-5, atol=1e-5)


def test_interface_arrays_are_updated_in_place(rng):
    """Objects known only by ``__cuda_array_interface__`` (CuPy, torch) are variables and gradients."""
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    values, idx = sparse_batch(rng, ROWS, WIDTH, K, np.float32)
    g = rng.normal(size=p0.shape).astype(np.float32)
    var = InterfaceArray(p0, device_index=0)
    opt = so.Adam(learning_rate=0.01)
    opt.apply_gradients([(so.IndexedSlices(InterfaceArray(values), InterfaceArray(idx)), var)])
    opt.apply_gradients([(InterfaceArray(g, device_index=0), var)])
    cpu, cpu_opt = p0.copy(), so.Adam(learning_rate=0.01)
    cpu_opt.apply_gradients([(so.IndexedSlices(values, idx), cpu)])
    cpu_opt.apply_gradients([(g, cpu)])
    assert_state_matches(opt, var, cpu_opt, cpu)


def test_mixed_host_and_device_variables_in_one_step(rng):
    table0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    values, idx = sparse_batch(rng, ROWS, WIDTH, K, np.float32)
    gw = rng.normal(size=w0.shape).astype(np.float32)
    table, w = dev(table0), w0.copy()
    opt = so.Adam(learning_rate=0.01)
    opt.apply_gradients([(dev_slices(values, idx), table), (gw, w)])
    ct, cw, copt = table0.copy(), w0.copy(), so.Adam(learning_rate=0.01)
    copt.apply_gradients([(so.IndexedSlices(values, idx), ct), (gw, cw)])
    assert_matches_cpu(table, ct)
    assert np.array_equal(w, cw)


def test_empty_sparse_gradient_advances_only_iterations(rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    var = dev(p0)
    opt = so.Adam(learning_rate=0.01)
    opt.apply_gradients([(dev_slices(np.zeros((0, WIDTH), np.float32), np.zeros(0, np.int64)), var)])
    assert opt.iterations == 1
    assert np.array_equal(host(var), p0)


def test_nan_gradient_propagates(rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    values, idx = sparse_batch(rng, ROWS, WIDTH, K, np.float32)
    values[3, 1] = np.nan
    assert_state_matches(*run_both(lambda: so.Adam(learning_rate=0.01), p0, [(values, idx)]))
    assert np.isnan(host(dev(values))).any()
