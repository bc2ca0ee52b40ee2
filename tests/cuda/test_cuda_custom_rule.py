"""A user's ``sparseopt.Rule`` on CUDA arrays: the example's AdaBelief
(``examples/custom_optimizer.py``) gives the CPU kernels' results on the device, dense,
sparse, lazy and exact (``tests/test_custom_rule.py`` checks the CPU against the formula)."""

import importlib.util
import pathlib

import numpy as np
import pytest

import sparseopt as so
from tests.cuda.helpers import assert_state_matches, dev, dev_slices, host, sparse_batch

_spec = importlib.util.spec_from_file_location(
    "custom_optimizer", pathlib.Path(__file__).resolve().parents[2] / "examples" / "custom_optimizer.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

ROWS, WIDTH, K = 60, 4, 40


def _steps(steps, cpu_opt, cpu_var, gpu_opt, gpu_var):
    """The same steps on the CPU variable and the device one: ``(values, indices)`` sparse,
    an array dense."""
    for step in steps:
        if isinstance(step, tuple):
            cpu_opt.apply_gradients([(so.IndexedSlices(step[0], step[1], cpu_var.shape), cpu_var)])
            gpu_opt.apply_gradients([(dev_slices(step[0], step[1], cpu_var.shape), gpu_var)])
        else:
            cpu_opt.apply_gradients([(step, cpu_var)])
            gpu_opt.apply_gradients([(dev(step), gpu_var)])


def _matches_cpu(cls, sparse_mode, rng):
    """Sparse (duplicates), dense, sparse and sparse steps of ``cls`` on a CUDA array and on a
    NumPy one: the same state (exact mode's flushed)."""
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    steps = [sparse_batch(rng, ROWS, WIDTH, K, np.float32), rng.normal(size=(ROWS, WIDTH)).astype(np.float32),
             sparse_batch(rng, ROWS, WIDTH, K // 2, np.float32), sparse_batch(rng, ROWS, WIDTH, 3, np.float32)]
    cpu_var, gpu_var = p0.copy(), dev(p0)
    make = lambda: cls(learning_rate=0.01, weight_decay=0.01, sparse_mode=sparse_mode)  # noqa: E731
    cpu_opt, gpu_opt = make(), make()
    _steps(steps, cpu_opt, cpu_var, gpu_opt, gpu_var)
    if sparse_mode == "exact":
        cpu_opt.flush()
        gpu_opt.flush()
    assert_state_matches(gpu_opt, gpu_var, cpu_opt, cpu_var)


@pytest.mark.parametrize("sparse_mode", ["lazy", "exact"])
def test_custom_rule_on_the_device_matches_cpu(sparse_mode, rng):
    _matches_cpu(example.AdaBelief, sparse_mode, rng)


def test_custom_reduction_rule_on_the_device_is_the_built_in_lamb(rng):
    """A rule with a reduction stage (the built-in Lamb's functions as a user's rule) runs the
    device's two-pass kernels as ``sparseopt.Lamb`` does, bit for bit, dense (norms over the
    variable) and sparse (norms per touched row); ``tests/cuda/test_cuda_lamb.py`` checks
    those kernels against the CPU."""
    from sparseopt.rules import lamb

    def coefficients(step, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        return lamb.coefficients(learning_rate, beta_1, beta_2, epsilon, step)
    MyLamb = so.Rule("mylamb", lamb.SLOTS, coefficients,
                     reduction=(lamb.reduce_terms, lamb.reduce_scale, lamb.reduce_apply)).optimizer_class()
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    mine, builtin = dev(p0), dev(p0)
    ours, theirs = MyLamb(learning_rate=0.01, weight_decay=0.01), so.Lamb(learning_rate=0.01, weight_decay=0.01)
    for step in [sparse_batch(rng, ROWS, WIDTH, K, np.float32), rng.normal(size=(ROWS, WIDTH)).astype(np.float32)]:
        if isinstance(step, tuple):
            ours.apply_gradients([(dev_slices(step[0], step[1], p0.shape), mine)])
            theirs.apply_gradients([(dev_slices(step[0], step[1], p0.shape), builtin)])
        else:
            ours.apply_gradients([(dev(step), mine)])
            theirs.apply_gradients([(dev(step), builtin)])
    assert np.array_equal(host(mine), host(builtin)) and not np.array_equal(host(mine), p0)
    for slot in ("m", "v"):
        assert np.array_equal(host(ours.get_slot(mine, slot)), host(theirs.get_slot(builtin, slot)))


def test_custom_row_stage_on_the_device_matches_cpu(rng):
    """A rule with per-row slots (``tests/test_custom_rule.py``'s RowRMS, checked there against
    its formula) runs the device's row-reduction kernels: the CPU's results, dense and sparse,
    with weight decay, to the rounding of the row sums (a tree over a row's lanes on the
    device, in order on the CPU: ``tests/cuda/test_cuda_rowwise.py``'s tolerance)."""
    from tests.test_custom_rule import ROWRMS
    RowRMS = ROWRMS.optimizer_class("RowRMS")
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    cpu_var, gpu_var = p0.copy(), dev(p0)
    cpu_opt, gpu_opt = RowRMS(learning_rate=0.05, weight_decay=0.01), RowRMS(learning_rate=0.05, weight_decay=0.01)
    _steps([sparse_batch(rng, ROWS, WIDTH, K, np.float32), rng.normal(size=(ROWS, WIDTH)).astype(np.float32),
            sparse_batch(rng, ROWS, WIDTH, K // 2, np.float32)], cpu_opt, cpu_var, gpu_opt, gpu_var)
    assert not np.array_equal(cpu_var, p0)
    from tests.cuda.test_cuda_rowwise import assert_close, row_tolerance
    tol = row_tolerance(3, WIDTH, np.float32)
    assert gpu_opt.get_slot_names() == cpu_opt.get_slot_names() == ["m", "v"]
    for name in ("m", "v"):
        assert_close(gpu_opt.get_slot(gpu_var, name), cpu_opt.get_slot(cpu_var, name), tol)
    assert_close(gpu_var, cpu_var, tol)


@pytest.mark.parametrize("sparse_mode", ["lazy", "exact"])
def test_a_rule_with_four_slots_on_the_device_matches_cpu(sparse_mode, rng):
    """More than three slots (``tests/test_many_slots.py``'s Adan): the device kernels take a
    rule's slots as one tuple of arrays, as the CPU's do."""
    from tests.test_many_slots import Adan
    _matches_cpu(Adan, sparse_mode, rng)


@pytest.mark.parametrize("slots", [4, 8])
def test_bfloat16_slots_past_the_third_on_the_device_match_cpu(slots, rng):
    """A bfloat16 table with four (Adan) and eight bfloat16 slots: those past the third rounded
    with the further hashes' bits on the device as on the CPU."""
    from tests.cuda.test_cuda_low_precision import BF16, assert_matches_cpu, steps_for
    from tests.test_many_slots import Adan, _n_slot_rule
    cls = Adan if slots == 4 else _n_slot_rule(8).optimizer_class()
    p0 = (rng.normal(size=(40, 5)) * 0.5).astype(BF16)
    gpu_opt, gpu_var, _ = assert_matches_cpu(lambda: cls(learning_rate=0.01, seed=9, slot_dtype="bfloat16"), p0,
                                             steps_for(rng, BF16))
    assert host(gpu_opt.get_slot(gpu_var, gpu_opt.get_slot_names()[-1])).dtype == BF16
