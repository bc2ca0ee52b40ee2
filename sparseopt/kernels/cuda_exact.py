"""CUDA kernels of ``sparse_mode="exact"``: the catch-up of idle rows fused into the row update.

The device side of :mod:`sparseopt.kernels.exact`, with the same bookkeeping
(:mod:`sparseopt._exact`): ``last`` (int64 per row) lives on the device, ``hist`` (the
ring of per-step coefficient records) has a device mirror written one record per
step, and ``tab`` (the rule's idle tables, computed on the host by
:func:`sparseopt.kernels.exact.table_kernel`) is copied over for the windows in use.

The math is the CPU's, compiled once more: the element catch-up ``CATCH`` is
:func:`sparseopt.kernels.exact._catch_up_element_template` as a device function, over the
rule's ``idle_apply`` (closed form or truncated series, short then full as on the CPU; the
series helper of :mod:`sparseopt.rules._idle` compiled for the device too), else a replay
of the rule's ``update`` with a zero gradient and each past step's record; ``STEP`` is the
element step of the lazy kernels (:mod:`sparseopt.kernels.cuda`).

Layout: the lazy sparse kernel's, one group of ``blockDim.x`` lanes per unique row,
the row's columns across the lanes. ``last`` is written by a separate launch
(:func:`set_last`): the lanes of a row read ``last[r]`` at different times, so no
lane may write it in the kernel that reads it.
"""

import functools
import types

import numba
from numba import cuda

from sparseopt.kernels import cuda as ck
from sparseopt.kernels import exact as cpu_exact
from sparseopt.kernels._specialize import rule_key, specialize
from sparseopt.rules import _idle

CATCH = STEP = None  # bound per specialization


def _device(fn, suffix, **constants):
    """``fn`` as a device function; on the simulator with float32-preserving ``math``."""
    if ck._simulator():
        constants["math"] = ck._SimulatorMath()
    return cuda.jit(device=True)(specialize(fn, suffix, **constants))


@functools.lru_cache(maxsize=None)
def _idle_module(terms=_idle.SERIES_TERMS):
    """:mod:`sparseopt.rules._idle` as the rules' ``idle_apply`` sees it on the device:
    the same constants, ``series`` a device function (the CPU one is an ``njit``) of
    ``terms`` terms (the CPU's first pass sums ``cpu_exact.FAST_SERIES_TERMS``)."""
    module = types.ModuleType(f"sparseopt.rules._idle_cuda{terms}")
    module.SERIES_TERMS = terms
    module.SERIES_LIMIT = _idle.SERIES_LIMIT
    suffix = f"cuda{terms}"
    module.series = _device(_idle.series.py_func, suffix, SERIES_TERMS=terms)
    module.series_apply = _device(_idle.series_apply.py_func, suffix, series=module.series)
    module.window_series_apply = _device(_idle.window_series_apply.py_func, suffix,
                                         series=module.series)
    return module


@functools.lru_cache(maxsize=None)
def _catch(rule_module, used, has_wd):
    """The element catch-up of one rule and slot configuration, as a device function: the
    CPU's, element by element (:func:`sparseopt.kernels.exact._catch_up_element_template`:
    the short series first, then all terms, then the replay), so the simulator gives its bits."""
    suffix, step = ck._step(rule_module, tuple(used), has_wd)
    idle_apply = getattr(rule_module, "idle_apply", _idle.no_idle_apply)
    key = rule_key(rule_module)
    constants = dict(RULE=ck._rule_function(rule_module), U0=used[0], U1=used[1], U2=used[2],
                     HAS_WD=bool(has_wd), LOWP=False,
                     IDLE_APPLY=_device(idle_apply, f"{key}_cuda", _idle=_idle_module()),
                     IDLE_APPLY_FAST=_device(idle_apply, f"{key}_cuda_fast",
                                             _idle=_idle_module(cpu_exact.FAST_SERIES_TERMS)))
    for name, template in (("LOAD", ck.cpu._load_template), ("STORE", ck.cpu._store_template),
                           ("SAVE", cpu_exact._save_template),
                           ("REPLAY", cpu_exact._replay_template),
                           ("CATCH", cpu_exact._catch_up_template)):
        constants[name] = cuda.jit(device=True)(specialize(template, "x" + suffix, **constants))
    catch = cuda.jit(device=True)(specialize(cpu_exact._catch_up_element_template, "x" + suffix,
                                             **constants))
    return f"x{suffix}", step, catch


def _exact_sparse_template(p, s0, s1, s2, rows, offsets, order, values, k, last, floor, hi, hist,
                           tab, c, wd_lr, c_idle, zero, tol):
    """Step ``hi + 1`` on the ``k`` unique ``rows`` (duplicates summed in position order),
    each element first caught up from its row's last step to ``hi`` (``c_idle``: the
    coefficients of step ``hi``), as :func:`sparseopt.kernels.exact._exact_sparse_template`.
    ``last`` is only read here (:func:`set_last` follows)."""
    n = hist.shape[0]
    d = p.shape[1]
    lanes = cuda.blockDim.x
    u = numba.int64(cuda.blockIdx.x) * cuda.blockDim.y + cuda.threadIdx.y
    ustride = numba.int64(cuda.gridDim.x) * cuda.blockDim.y
    while u < k:
        r = rows[u]
        lo = max(last[r], floor)
        first = offsets[u]
        end = offsets[u + 1]
        j = numba.int64(cuda.threadIdx.x)
        if lo < hi:
            trow = tab[lo % n]
            while j < d:
                CATCH(p, s0, s1, s2, (r, j), hist, lo, hi, trow, c_idle, zero, tol)
                STEP(p, s0, s1, s2, (r, j), ck._row_sum(values, order, first, end, j),
                     zero, zero, zero, c, wd_lr)
                j += lanes
        else:
            while j < d:
                STEP(p, s0, s1, s2, (r, j), ck._row_sum(values, order, first, end, j),
                     zero, zero, zero, c, wd_lr)
                j += lanes
        u += ustride


def _exact_catch_up_template(p, s0, s1, s2, rows, k, every_row, last, floor, hi, hist, tab, c_idle,
                             zero, tol):
    """Catch the ``k`` unique ``rows`` (or every row, ``every_row``) up to step ``hi``."""
    n = hist.shape[0]
    d = p.shape[1]
    count = numba.int64(p.shape[0]) if every_row else k
    lanes = cuda.blockDim.x
    u = numba.int64(cuda.blockIdx.x) * cuda.blockDim.y + cuda.threadIdx.y
    ustride = numba.int64(cuda.gridDim.x) * cuda.blockDim.y
    while u < count:
        r = u if every_row else rows[u]
        lo = max(last[r], floor)
        if lo < hi:
            trow = tab[lo % n]
            j = numba.int64(cuda.threadIdx.x)
            while j < d:
                CATCH(p, s0, s1, s2, (r, j), hist, lo, hi, trow, c_idle, zero, tol)
                j += lanes
        u += ustride


@functools.lru_cache(maxsize=None)
def sparse_kernel(rule_module, used, has_wd):
    """``kernel[blocks, (lanes, rows), stream](p, s0, s1, s2, rows, offsets, order, values, k, last,
    floor, hi, hist, tab, c, wd_lr, c_idle, zero, tol)``."""
    suffix, step, catch = _catch(rule_module, tuple(used), has_wd)
    return cuda.jit(**ck.KERNEL_FLAGS)(
        specialize(_exact_sparse_template, suffix, STEP=step, CATCH=catch))


@functools.lru_cache(maxsize=None)
def catch_up_kernel(rule_module, used, has_wd):
    """``kernel[blocks, (lanes, rows), stream](p, s0, s1, s2, rows, k, every_row, last, floor, hi,
    hist, tab, c_idle, zero, tol)``."""
    suffix, _, catch = _catch(rule_module, tuple(used), has_wd)
    return cuda.jit(**ck.KERNEL_FLAGS)(specialize(_exact_catch_up_template, suffix, CATCH=catch))


@cuda.jit(**ck.KERNEL_FLAGS)
def decay_rows(p, rows, k, every_row, last, floor, hi, tab):
    """Row-wise rules, whose zero-gradient step changes a row only by weight decay: scale
    each element of the ``k`` listed rows (or every row) behind ``hi`` by its idle
    window's weight decay product ``tab[L % H, 0]``, as
    :func:`sparseopt.kernels.exact._decay_rows_template` does (launched only when
    some step had weight decay). Grid-stride over the elements."""
    n = tab.shape[0]
    d = p.shape[1]
    count = numba.int64(p.shape[0]) if every_row else k
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < count * d:
        u = i // d
        j = i - u * d
        r = u if every_row else rows[u]
        lo = max(last[r], floor)
        if lo < hi:
            p[r, j] = p[r, j] * tab[lo % n, 0]
        i += stride


@cuda.jit(**ck.KERNEL_FLAGS)
def set_last(last, rows, k, value):
    """``last[rows[:k]] = value`` (``rows`` unique)."""
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < k:
        last[rows[i]] = value
        i += stride
