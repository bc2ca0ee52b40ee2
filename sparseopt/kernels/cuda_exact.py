"""CUDA kernels of ``sparse_mode="exact"``: the catch-up of idle rows fused into the row update.

The device side of :mod:`sparseopt.kernels.exact`, with the same bookkeeping
(:mod:`sparseopt._exact`): ``last`` (int64 per row) lives on the device, ``hist`` (the
ring of per-step coefficient records) has a device mirror written one record per
step, and ``tab`` (the rule's idle tables, computed on the host by
:func:`sparseopt.kernels.exact.table_kernel`) is copied over for the windows in use.

The math is the CPU's, compiled once more: the element catch-up ``CATCH`` is
:func:`sparseopt.kernels.exact._catch_up_element_template` as a device function, over the
rule's ``idle_apply`` (closed form or truncated series, short then full as on the CPU; with
the helpers of :mod:`sparseopt.rules._idle` it calls, compiled for the device by
:mod:`sparseopt.kernels._compile`), else a replay
of the rule's ``update`` with a zero gradient and each past step's record; ``STEP`` is the
element step of the lazy kernels (:mod:`sparseopt.kernels.cuda`).

Layout: the lazy sparse kernel's, one group of ``blockDim.x`` lanes per unique row,
the row's columns across the lanes. ``last`` is written by a separate launch
(:func:`set_last`): the lanes of a row read ``last[r]`` at different times, so no
lane may write it in the kernel that reads it.
"""

import functools

import numba
import numpy as np
from numba import cuda

from sparseopt.kernels import _compile, _slots
from sparseopt.kernels import cuda as ck
from sparseopt.kernels import exact as cpu_exact
from sparseopt.kernels import lowp
from sparseopt.kernels._specialize import specialize
from sparseopt.rules import _idle

CATCH = STEP = WIDEN = NARROW = STOCHASTIC = element_bits = None  # bound per specialization
LOWP = False  # bound per specialization (decay_rows: a 16-bit variable)


@functools.lru_cache(maxsize=None)
def _catch(rule_module, used, has_wd, lowp_config=None):
    """The element catch-up of one rule and slot configuration, as a device function: the
    CPU's, element by element (:func:`sparseopt.kernels.exact._catch_up_element_template`:
    the short series first, then all terms, then the replay), so the simulator gives its bits.
    ``lowp_config``: a 16-bit variable's rounding (:func:`sparseopt.kernels.cuda._helpers`,
    whose load and rounded store the catch-up's ``SAVE`` uses, as on the CPU)."""
    suffix, constants = ck._helpers(rule_module, tuple(used), has_wd, None, lowp_config)
    n = len(used)
    device = cuda.jit(device=True)
    constants = dict(
        constants,
        IDLE_APPLY=_compile.on_tuples(rule_module, "idle_apply", _compile.CUDA, n),
        IDLE_APPLY_FAST=_compile.on_tuples(rule_module, "idle_apply", _compile.CUDA, n,
                                           rebind=cpu_exact.SHORT_SERIES),
        CAST=device(specialize(_slots.cast(n, cpu_exact.__name__), "f32_cuda", TO=np.float32)))
    for name, template in (("SAVE", cpu_exact._save_template),
                           ("REPLAY", cpu_exact._replay_template),
                           ("CATCH", cpu_exact._catch_up_template)):
        constants[name] = cuda.jit(device=True)(specialize(template, "x" + suffix, **constants))
    catch = cuda.jit(device=True)(specialize(cpu_exact._catch_up_element_template, "x" + suffix,
                                             **constants))
    return f"x{suffix}", constants["STEP"], catch


def _exact_sparse_template(p, S, rows, offsets, order, values, k, last, floor, hi, hist,
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
                CATCH(p, S, (r, j), hist, lo, hi, trow, c_idle, zero, tol)
                STEP(p, S, (r, j), ck._row_sum(values, order, first, end, j), zero, c, wd_lr)
                j += lanes
        else:
            while j < d:
                STEP(p, S, (r, j), ck._row_sum(values, order, first, end, j), zero, c, wd_lr)
                j += lanes
        u += ustride


def _exact_catch_up_template(p, S, rows, k, every_row, last, floor, hi, hist, tab, c_idle,
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
                CATCH(p, S, (r, j), hist, lo, hi, trow, c_idle, zero, tol)
                j += lanes
        u += ustride


@functools.lru_cache(maxsize=None)
def sparse_kernel(rule_module, used, has_wd, lowp_config=None):
    """``kernel[blocks, (lanes, rows), stream](p, S, rows, offsets, order, values, k, last,
    floor, hi, hist, tab, c, wd_lr, c_idle, zero, tol)``. ``lowp_config``: as
    :func:`sparseopt.kernels.cuda.sparse_kernel`'s (``c`` and ``c_idle`` then carry their
    steps' ``rounding_key``, and ``hist``'s records theirs)."""
    suffix, step, catch = _catch(rule_module, tuple(used), has_wd, lowp_config)
    return cuda.jit(**ck.KERNEL_FLAGS)(
        specialize(_exact_sparse_template, suffix, STEP=step, CATCH=catch))


@functools.lru_cache(maxsize=None)
def catch_up_kernel(rule_module, used, has_wd, lowp_config=None):
    """``kernel[blocks, (lanes, rows), stream](p, S, rows, k, every_row, last, floor, hi,
    hist, tab, c_idle, zero, tol)`` (``lowp_config``: as :func:`sparse_kernel`'s)."""
    suffix, _, catch = _catch(rule_module, tuple(used), has_wd, lowp_config)
    return cuda.jit(**ck.KERNEL_FLAGS)(specialize(_exact_catch_up_template, suffix, CATCH=catch))


def _decay_rows_template(p, rows, k, every_row, last, floor, hi, tab, key):
    """Row-wise rules, whose zero-gradient step changes a row only by weight decay: scale
    each element of the ``k`` listed rows (or every row) behind ``hi`` by its idle
    window's weight decay product ``tab[L % H, DECAY]``, as
    :func:`sparseopt.kernels.exact._decay_rows_template` does (launched only when
    some step had weight decay); a 16-bit variable's (``LOWP``: its ``uint16`` bits)
    rounded to float32, then to 16 bits with the random bits of step ``hi`` (``key``).
    Grid-stride over the elements."""
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
            scale = tab[lo % n, _idle.DECAY]
            if LOWP:
                bits = element_bits(key, r * d + j) if STOCHASTIC else np.uint64(0)
                p[r, j] = NARROW(np.float32(WIDEN(p[r, j]) * scale), bits, STOCHASTIC)
            else:
                p[r, j] = p[r, j] * scale
        i += stride


@functools.lru_cache(maxsize=None)
def decay_rows(lowp_config=None):
    """``kernel[blocks, threads, stream](p, rows, k, every_row, last, floor, hi, tab, key)``
    (``lowp_config``: a 16-bit variable's ``(kind, stochastic, ...)``, ``key`` then step
    ``hi``'s rounding key; else None, ``key`` unread)."""
    if lowp_config is None:
        return cuda.jit(**ck.KERNEL_FLAGS)(specialize(_decay_rows_template, "f", LOWP=False))
    kind, stochastic = lowp_config[:2]
    widen, narrow = ck._conversions(kind)
    constants = dict(LOWP=True, WIDEN=widen, NARROW=narrow, STOCHASTIC=bool(stochastic),
                     element_bits=lowp.element_bits)
    if ck._simulator():
        constants["element_bits"] = ck._simulated_lowp({})["element_bits"]
    return cuda.jit(**ck.KERNEL_FLAGS)(specialize(
        _decay_rows_template, f"{kind}{'_sr' if stochastic else '_rne'}", **constants))


@cuda.jit(**ck.KERNEL_FLAGS)
def set_last(last, rows, k, value):
    """``last[rows[:k]] = value`` (``rows`` unique)."""
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < k:
        last[rows[i]] = value
        i += stride
