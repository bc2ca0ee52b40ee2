"""bfloat16 and float16 CUDA variables against the CPU kernels, bit for bit.

The expected values are the CPU's 16-bit steps on the same inputs (checked against
float64/ml_dtypes references in ``tests/test_low_precision.py``). The device runs the
same element code (:mod:`sparseopt.kernels.lowp`'s templates and conversions) with the
same random bits (a hash of seed, step and flat index), so on the simulator the
variable's and the slots' bits are the CPU's. RowwiseAdagrad's row sum is a tree on the
device (``test_cuda_rowwise.py``): its test uses gradients whose row sums are exact in
float32 (multiples of 1/4, small), so the order of the sum cannot change a bit.
"""

import numpy as np
import pytest

import sparseopt as so
from sparseopt import errors
from sparseopt.kernels import cuda as kc
from tests.cuda.conftest import SIMULATOR
from tests.cuda.helpers import InterfaceArray, dev, host
from tests.optimizer_table import CASES

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)

ROWS, WIDTH, K = 40, 5, 30
BY_ID = {c.id: c for c in CASES}


def bits16(a):
    a = host(a) if not isinstance(a, np.ndarray) else a
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def assert_same_bits(actual, expected, what):
    actual = host(actual) if not isinstance(actual, np.ndarray) else actual
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    if SIMULATOR:
        assert np.array_equal(bits16(actual), bits16(expected)), (
            f"{what}: {int(np.sum(bits16(actual) != bits16(expected)))} elements differ")
    else:  # a GPU fuses multiply-adds: the float32 value may differ by an ulp, and so its rounding
        np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                                   rtol=2 ** -7, atol=1e-6)


def steps_for(rng, dtype, exact_sums=False):
    """Sparse (duplicates, a hot row; float32 values), dense (16-bit), sparse (16-bit values,
    int32 indices)."""
    def normal(shape):
        x = rng.normal(size=shape)
        if exact_sums:  # multiples of 1/4 in [-1, 1]: every sum of squares below is exact
            x = np.round(np.clip(x, -1, 1) * 4) / 4
        return x.astype(np.float32)
    idx = rng.integers(0, ROWS, K)
    idx[::3] = 7
    idx2 = rng.integers(0, ROWS, K // 2).astype(np.int32)
    return [(normal((K, WIDTH)), idx), normal((ROWS, WIDTH)).astype(dtype),
            (normal((K // 2, WIDTH)).astype(dtype), idx2)]


def run(make, p0, steps, to_device):
    put = dev if to_device else (lambda a: a)
    var = put(p0.copy())
    opt = make()
    for step in steps:
        if isinstance(step, tuple):
            opt.apply_gradients([(so.IndexedSlices(put(step[0]), put(step[1]), p0.shape), var)])
        else:
            opt.apply_gradients([(put(step), var)])
    return opt, var


def assert_matches_cpu(make, p0, steps):
    gpu_opt, gpu_var = run(make, p0, steps, True)
    cpu_opt, cpu_var = run(make, p0, steps, False)
    assert gpu_opt.iterations == cpu_opt.iterations == len(steps)
    assert_same_bits(gpu_var, cpu_var, "variable")
    assert gpu_opt.get_slot_names() == cpu_opt.get_slot_names()
    for name in cpu_opt.get_slot_names():
        assert_same_bits(gpu_opt.get_slot(gpu_var, name), cpu_opt.get_slot(cpu_var, name), name)
    return gpu_opt, gpu_var, cpu_var


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("case", ["sgd_momentum", "adam"])
def test_16_bit_steps_match_cpu(case, dtype, rng):
    p0 = (rng.normal(size=(ROWS, WIDTH)) * 0.5).astype(dtype)
    _, var, _ = assert_matches_cpu(lambda: BY_ID[case].make(seed=77), p0, steps_for(rng, dtype))
    assert host(var).dtype == dtype


@pytest.mark.parametrize("config", [dict(slot_dtype="bfloat16"), dict(stochastic_rounding=False),
                                    dict(slot_dtype="bfloat16", stochastic_rounding=False, weight_decay=0.1)],
                         ids=["bf16_slots", "nearest", "bf16_slots_nearest_wd"])
def test_bfloat16_slots_and_round_to_nearest_match_cpu(config, rng):
    p0 = (rng.normal(size=(ROWS, WIDTH)) * 0.5).astype(BF16)
    gpu_opt, gpu_var, _ = assert_matches_cpu(lambda: so.AdamW(learning_rate=0.01, seed=5, **config), p0,
                                             steps_for(rng, BF16))
    expected = BF16 if config.get("slot_dtype") else np.dtype(np.float32)
    assert host(gpu_opt.get_slot(gpu_var, "m")).dtype == expected


def test_rowwise_adagrad_16_bit_matches_cpu(rng):
    p0 = (rng.normal(size=(ROWS, WIDTH)) * 0.5).astype(BF16)
    opt, var, _ = assert_matches_cpu(lambda: so.RowwiseAdagrad(learning_rate=0.1, seed=3), p0,
                                     steps_for(rng, BF16, exact_sums=True))
    assert host(opt.get_slot(var, "accumulator")).dtype == np.float32


def test_any_launch_configuration_gives_the_same_bits(rng):
    p0 = (rng.normal(size=(ROWS, WIDTH)) * 0.5).astype(BF16)
    steps = steps_for(rng, BF16)
    make = lambda: so.Adam(learning_rate=0.01, seed=11)  # noqa: E731
    first = run(make, p0, steps, True)[1]
    previous = kc.set_launch_config(threads=8, row_threads=8, max_lanes=2, max_blocks=2)
    try:
        second = run(make, p0, steps, True)[1]
    finally:
        kc.set_launch_config(**vars(previous))
    assert np.array_equal(bits16(first), bits16(second))


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bfloat16", "float16"])
def test_interface_arrays_of_16_bits(dtype, rng):
    """torch reports bfloat16 with typestr ``<V2`` (ml_dtypes' ``dtype.str``), float16 ``<f2``."""
    p0 = (rng.normal(size=(ROWS, WIDTH)) * 0.5).astype(dtype)
    values, idx = steps_for(rng, dtype)[0]
    var = InterfaceArray(p0)
    assert var.__cuda_array_interface__["typestr"] == ("<V2" if dtype == BF16 else "<f2")
    opt = so.Adam(learning_rate=0.01, seed=1)
    opt.apply_gradients([(so.IndexedSlices(InterfaceArray(values), InterfaceArray(idx)), var)])
    cpu = p0.copy()
    so.Adam(learning_rate=0.01, seed=1).apply_gradients([(so.IndexedSlices(values, idx), cpu)])
    assert_same_bits(var.to_host(), cpu, "variable")


@pytest.mark.parametrize("case, dtype, extra", [
    ("adam", BF16, dict(slot_dtype="bfloat16")), ("sgd_momentum", F16, dict(weight_decay=0.05)),
    ("rowwise_adagrad", BF16, dict(weight_decay=0.05))],
    ids=["adam_bf16_slots", "sgd_momentum_wd_float16", "rowwise_adagrad_wd"])
def test_exact_mode_16_bit_matches_cpu(case, dtype, extra, rng):
    """Sparse steps on a few rows each (rows idle for several steps are caught up with
    the window's last step's bits), a ``catch_up`` of some rows, then a ``flush``."""
    p0 = (rng.normal(size=(ROWS, WIDTH)) * 0.5).astype(dtype)
    steps = []
    for _ in range(5):
        idx = rng.integers(0, 12, 8)
        values = rng.normal(size=(8, WIDTH))
        if case == "rowwise_adagrad":  # exact row sums (see the module docstring)
            values = np.round(np.clip(values, -1, 1) * 4) / 4
        steps.append((values.astype(np.float32), idx))
    sides = []
    for to_device in (True, False):
        put = dev if to_device else (lambda a: a)
        var = put(p0.copy())
        opt = BY_ID[case].make(sparse_mode="exact", seed=21, **extra)
        for values, idx in steps:
            opt.apply_gradients([(so.IndexedSlices(put(values), put(idx), p0.shape), var)])
        opt.catch_up(var, put(np.array([0, 5, 11, 30])))
        caught = bits16(var).copy()
        opt.flush()
        sides.append((opt, var, caught))
    (gpu_opt, gpu_var, gpu_caught), (cpu_opt, cpu_var, cpu_caught) = sides
    assert_same_bits(gpu_caught.view(dtype), cpu_caught.view(dtype), "after catch_up")
    assert_same_bits(gpu_var, cpu_var, "variable")
    for name in cpu_opt.get_slot_names():
        assert_same_bits(gpu_opt.get_slot(gpu_var, name), cpu_opt.get_slot(cpu_var, name), name)


def test_refusals_are_clear_and_write_nothing(rng):
    p0 = (rng.normal(size=(ROWS, WIDTH)) * 0.5).astype(BF16)
    var = dev(p0)
    with pytest.raises(errors.DtypeMismatchError, match="takes bfloat16 or float32 gradients"):
        so.Adam(learning_rate=0.01).apply_gradients([(dev(p0.astype(np.float16)), var)])
    assert np.array_equal(bits16(var), bits16(p0))
