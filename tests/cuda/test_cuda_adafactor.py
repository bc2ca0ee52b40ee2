"""Adafactor on CUDA arrays: the factored kernels (``sparseopt/kernels/cuda_factored.py``)
against the CPU kernels.

Expected values come from the CPU kernels on the same inputs (checked against float64
references and Keras in ``tests/test_adafactor.py``). The device kernels take every sum of
the CPU kernels in the CPU's order (the eight lanes of a chunk or a row, the blocks of
rows, the flat blocks, then the blocks in order), and the simulator evaluates the rule's
functions as compiled code does: bit-identical (``assert_matches_cpu``). On a GPU, fused
multiply-adds put them a few ulps apart: there SPEC section 4's tolerance. The shapes make
every order matter: rows of 11 and 10 elements (eight lanes and a tail), 70 rows (64 blocks,
some of two rows), 2100 elements (flat blocks of 8 and 9: lanes and a tail).
"""

import numpy as np
import pytest
from numba import cuda

import sparseopt as so
from sparseopt import errors
from tests.cuda.helpers import (InterfaceArray, assert_matches_cpu, assert_unchanged, dev, dev_slices,
                                host, snapshot, sparse_batch)

HP = dict(learning_rate=0.5, beta_2_decay=-0.65, epsilon_1=1e-15, epsilon_2=1e-4, clip_threshold=0.9)
DEVICE_ARRAY = type(cuda.device_array(1))


def assert_state_matches(opt, var, cpu_opt, cpu_var, exact=True):
    """The variable and every slot (``v``; ``r`` and ``c``) as the CPU's."""
    assert opt.iterations == cpu_opt.iterations
    assert_matches_cpu(var, cpu_var, exact)
    names = list(cpu_opt._states[id(cpu_var)].slots)
    assert names == list(opt._states[id(var)].slots) == (["v"] if cpu_var.ndim < 2 else ["r", "c"])
    for name in names:
        slot = opt.get_slot(var, name)
        assert isinstance(slot, DEVICE_ARRAY)
        assert_matches_cpu(slot, cpu_opt.get_slot(cpu_var, name), exact)


@pytest.mark.parametrize("shape, dtype, wd", [((), np.float32, None), ((2100,), np.float32, 0.05),
                                              ((70, 11), np.float64, None), ((3, 7, 10), np.float32, 0.05)],
                         ids=["0d", "vector", "matrix", "3d_interface"])
def test_dense_steps_match_the_cpu(shape, dtype, wd):
    """Three dense steps: ``v`` (rank < 2) or ``r`` and ``c`` over the last two axes; the
    3-D variable is known only by ``__cuda_array_interface__`` (as a CuPy or torch array)."""
    rng = np.random.default_rng(0)
    p0 = np.asarray(rng.normal(size=shape), dtype)
    grads = [np.asarray(rng.normal(size=shape), dtype) for _ in range(3)]
    var = InterfaceArray(p0) if len(shape) == 3 else dev(p0)
    cpu_var = p0.copy()
    opt, cpu_opt = (so.Adafactor(weight_decay=wd, **HP) for _ in range(2))
    for g in grads:
        opt.apply_gradients([(dev(g), var)])
        cpu_opt.apply_gradients([(g, cpu_var)])
    assert_state_matches(opt, var, cpu_opt, cpu_var)


@pytest.mark.parametrize("shape, dtype, wd, k", [((50,), np.float64, None, 40),
                                                 ((60, 11), np.float32, 0.05, 40),
                                                 ((30, 3, 5), np.float64, 0.05, 12)],
                         ids=["vector", "table", "3d"])
def test_sparse_steps_match_the_cpu(shape, dtype, wd, k):
    """Three sparse steps with duplicates (a hot row): the touched rows summed, then
    stepped as a table of their own; untouched rows and their ``r`` stay as they were."""
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=shape).astype(dtype)
    width = int(np.prod(shape[1:]))
    batches = [sparse_batch(rng, shape[0], width, k, dtype) for _ in range(3)]
    var, cpu_var = dev(p0), p0.copy()
    opt, cpu_opt = (so.Adafactor(weight_decay=wd, **HP) for _ in range(2))
    for values, idx in batches:
        values = values.reshape((-1,) + shape[1:])
        opt.apply_gradients([(dev_slices(values, idx, shape), var)])
        cpu_opt.apply_gradients([(so.IndexedSlices(values, idx), cpu_var)])
    assert_state_matches(opt, var, cpu_opt, cpu_var)
    untouched = np.setdiff1d(np.arange(shape[0]), np.concatenate([i for _, i in batches]))
    assert untouched.size > 0
    np.testing.assert_array_equal(host(var)[untouched], p0[untouched])
    if len(shape) >= 2:
        assert not host(opt.get_slot(var, "r"))[untouched].any()


@pytest.mark.parametrize("clip", [dict(clipvalue=0.3), dict(global_clipnorm=0.7)],
                         ids=["clipvalue", "global_clipnorm"])
def test_clipping_and_a_schedule_match_the_cpu(clip):
    """A sparse table and a dense matrix in one call, clipped, with a learning rate
    schedule (below 1 / sqrt(t): it sets the step). The device sums the norm in another
    order (``test_cuda_state.py``): the scale of a clipped gradient may differ in its last
    bit, so clipping by norm agrees to SPEC section 4's tolerance, clipping by value bit for bit."""
    rng = np.random.default_rng(2)
    p0, w0 = rng.normal(size=(60, 11)).astype(np.float32), rng.normal(size=(7, 9)).astype(np.float32)
    steps = [(sparse_batch(rng, 60, 11, 40, np.float32), rng.normal(size=w0.shape).astype(np.float32))
             for _ in range(3)]
    var, w, cpu_var, cpu_w = dev(p0), dev(w0), p0.copy(), w0.copy()
    schedule = so.schedules.ExponentialDecay(0.2, decay_steps=1, decay_rate=0.5)
    opt, cpu_opt = (so.Adafactor(**{**HP, **clip, "learning_rate": schedule}) for _ in range(2))
    for (values, idx), gw in steps:
        opt.apply_gradients([(dev_slices(values, idx), var), (dev(gw), w)])
        cpu_opt.apply_gradients([(so.IndexedSlices(values, idx), cpu_var), (gw, cpu_w)])
    exact = "clipvalue" in clip
    assert_state_matches(opt, var, cpu_opt, cpu_var, exact)
    assert_state_matches(opt, w, cpu_opt, cpu_w, exact)


def test_weights_save_and_load_continue_identically(tmp_path):
    """``get_weights`` gives host copies of ``r`` and ``c``; ``sparseopt.save`` and ``load``
    (``set_weights``) into new device variables continue as the CPU does."""
    rng = np.random.default_rng(3)
    p0, w0 = rng.normal(size=(40, 9)), rng.normal(size=(13,))
    steps = [(sparse_batch(rng, 40, 9, 30, np.float64), rng.normal(size=w0.shape)) for _ in range(3)]
    var, w, cpu_var, cpu_w = dev(p0), dev(w0), p0.copy(), w0.copy()
    opt, cpu_opt = so.Adafactor(**HP), so.Adafactor(**HP)
    for (values, idx), gw in steps[:2]:
        opt.apply_gradients([(dev_slices(values, idx), var), (dev(gw), w)])
        cpu_opt.apply_gradients([(so.IndexedSlices(values, idx), cpu_var), (gw, cpu_w)])
    weights = opt.get_weights()
    assert all(isinstance(a, np.ndarray) for a in weights)
    assert [a.shape for a in weights] == [(), (40,), (9,), (13,)]  # iterations, r, c, v
    so.save(tmp_path / "run.npz", opt, variables=[var, w])
    var2, w2 = dev(np.zeros_like(p0)), dev(np.zeros_like(w0))
    opt2, _ = so.load(tmp_path / "run.npz", variables=[var2, w2])
    (values, idx), gw = steps[2]
    opt2.apply_gradients([(dev_slices(values, idx), var2), (dev(gw), w2)])
    cpu_opt.apply_gradients([(so.IndexedSlices(values, idx), cpu_var), (gw, cpu_w)])
    assert_state_matches(opt2, var2, cpu_opt, cpu_var)
    assert_state_matches(opt2, w2, cpu_opt, cpu_w)


def test_failed_constraint_restores_the_statistics():
    """A constraint that fails (here: returns another shape) undoes the step: the variable,
    ``r``, ``c`` (device arrays of their own, outside the slot storage) and ``iterations``."""
    rng = np.random.default_rng(4)
    var = dev(rng.normal(size=(20, 6)).astype(np.float32))
    opt = so.Adafactor(**HP)
    opt.apply_gradients([(dev(rng.normal(size=(20, 6)).astype(np.float32)), var)])
    before = snapshot(opt, var)
    with pytest.raises(errors.ShapeMismatchError):
        opt.apply_gradients([(dev(rng.normal(size=(20, 6)).astype(np.float32)), var)],
                            constraints=[(var, lambda x: dev(np.zeros(3, np.float32)))])
    assert_unchanged(before, opt, var)


def test_a_16_bit_variable_is_refused():
    """A float16 CUDA variable is refused, naming it, before anything is written (a
    float32 CUDA variable of the same step included)."""
    var = dev(np.ones((4, 3), np.float32))
    half = dev(np.ones((4, 3), np.float16))
    opt = so.Adafactor()
    opt.build([var])
    before = snapshot(opt, var)
    with pytest.raises(errors.DtypeMismatchError,
                       match=r"'variable 1 \(shape \(4, 3\), float16\)': Adafactor runs on float32 and "
                             r"float64 variables only; got dtype float16"):
        opt.apply_gradients([(dev(np.ones((4, 3), np.float32)), var),
                             (dev(np.ones((4, 3), np.float16)), half)])
    assert_unchanged(before, opt, var)
