"""CPU kernels of factored rules (:mod:`sparseopt.rules.adafactor`): a second moment kept
as row and column statistics, and an update scaled by root-mean-squares over the unit.

Two kernels, each the whole unit (a dense variable, or the sub-table of a sparse step's
touched rows, gathered by the caller) in three passes:

* :func:`plain_kernel` (a variable of rank < 2, flat, with an element slot ``v``): the
  weight decay, ``v`` and the sums of ``p^2`` and ``u^2``; then ``scale``; then ``apply``.
* :func:`factored_kernel` (rank >= 2, as ``(B, R, C)``: ``B`` independent ``R x C``
  matrices, a row statistic ``r`` of shape ``(B, R)`` and a column statistic ``c`` of shape
  ``(B, C)``): the weight decay, ``r`` and partial column sums of ``q`` per block of rows;
  the column statistics and ``mean(r)`` from the blocks; ``u`` and the sum of ``u^2``;
  ``scale``; ``apply`` (``u`` recomputed: the same bits, no scratch of the variable's size).

Every sum is taken over blocks fixed by the shape alone (:data:`PARTS` flat blocks;
``min(R, ROW_BLOCKS)`` blocks of rows per matrix), each block in order, then the blocks
in order: the same bits for any number of threads. The CUDA kernels
(:mod:`sparseopt.kernels.cuda_factored`) take the same sums in the same order: change both
together (``tests/cuda/test_cuda_adafactor.py`` compares their bits on the simulator). The
rule's functions are bound as globals of a specialized template
(:func:`sparseopt.kernels._specialize.specialize`), so the kernels cache on disk as the
generic ones do.
"""

import functools

import numba
import numpy as np
from numba import prange

from sparseopt import _config
from sparseopt.kernels import _compile
from sparseopt.kernels._specialize import rule_key, specialize
from sparseopt.kernels.cpu import REDUCE_CHUNK, _lane_sum

#: Flat blocks of :func:`plain_kernel`'s sums (as the reduction kernels of ``cpu``).
PARTS = 256
#: The most blocks of rows per matrix in :func:`factored_kernel` (its column sums keep
#: ``B * min(R, ROW_BLOCKS) * C`` partial sums, at most the variable's size).
ROW_BLOCKS = 64

HAS_WD = False
SQUARE = DECAY = DIRECTION = SCALE = APPLY = None  # the rule's functions, bound per specialization


def _plain_template(p, g, v, c, wd_lr, n):
    """``p``, ``g``, ``v`` flat; ``n``: their size as a scalar of the math dtype. Each block
    sums its terms chunk by chunk (the element loop stores them, :func:`_lane_sum` adds
    them: the element loop vectorizes, as in the reduction kernels of ``cpu``)."""
    size = p.size
    zero = wd_lr - wd_lr
    sums = np.empty((PARTS, 2), p.dtype)
    terms = np.empty((PARTS, 2, REDUCE_CHUNK), p.dtype)
    for t in prange(PARTS):
        lo = t * size // PARTS
        hi = (t + 1) * size // PARTS
        sp = zero
        su = zero
        terms0 = terms[t, 0]
        terms1 = terms[t, 1]
        while lo < hi:
            count = min(REDUCE_CHUNK, hi - lo)
            base = numba.uint64(lo)
            for j in range(numba.uint64(count)):
                i = base + j
                x = p[i]
                if HAS_WD:
                    x = x - x * wd_lr
                    p[i] = x
                gi = g[i]
                vi = DECAY(v[i], SQUARE(gi, c), c)
                v[i] = vi
                u = DIRECTION(gi, vi)
                terms0[j] = x * x
                terms1[j] = u * u
            sp += _lane_sum(terms0, count, zero)
            su += _lane_sum(terms1, count, zero)
            lo += count
        sums[t, 0] = sp
        sums[t, 1] = su
    sp = sums[0, 0]
    su = sums[0, 1]
    for t in range(1, PARTS):
        sp += sums[t, 0]
        su += sums[t, 1]
    alpha, divisor = SCALE(sp, su, n, c)
    for i in prange(size):
        p[i] = APPLY(p[i], DIRECTION(g[i], v[i]), alpha, divisor)


def _factored_template(p, g, r, col, c, wd_lr, rows, cols, n):
    """``p``, ``g``: ``(B, R, C)``; ``r``: ``(B, R)``; ``col``: ``(B, C)``; ``rows``,
    ``cols``, ``n``: ``R``, ``C`` and ``B * R * C`` as scalars of the math dtype. A row's
    terms go to per-block scratch and :func:`_lane_sum` adds them (the element loops carry
    no float sum, so they vectorize)."""
    nb, nr, nc = p.shape
    zero = wd_lr - wd_lr
    blocks = min(nr, ROW_BLOCKS)
    tasks = nb * blocks
    partial = np.empty((tasks, nc), p.dtype)   # column sums of q per block of rows
    work = np.empty((tasks, 2, nc), p.dtype)   # a row's terms
    sums = np.empty((tasks, 3), p.dtype)       # per block: sum p^2, sum r, sum u^2
    rmean = np.empty(nb, p.dtype)
    width = numba.uint64(nc)
    # pass 1: weight decay, row statistics, partial column sums, sum of p^2
    for k in prange(tasks):
        b = k // blocks
        blk = k % blocks
        part = partial[k]
        w0 = work[k, 0]
        w1 = work[k, 1]
        for j in range(width):
            part[j] = zero
        sp = zero
        sr = zero
        for i in range(blk * nr // blocks, (blk + 1) * nr // blocks):
            prow = p[b, i]
            grow = g[b, i]
            for j in range(width):
                x = prow[j]
                if HAS_WD:
                    x = x - x * wd_lr
                    prow[j] = x
                q = SQUARE(grow[j], c)
                w0[j] = x * x
                w1[j] = q
                part[j] += q
            sp += _lane_sum(w0, nc, zero)
            ri = DECAY(r[b, i], _lane_sum(w1, nc, zero) / cols, c)
            r[b, i] = ri
            sr += ri
        sums[k, 0] = sp
        sums[k, 1] = sr
    # the column statistics and mean(r) of each matrix, blocks added in order
    for b in prange(nb):
        k0 = b * blocks
        sr = sums[k0, 1]
        for blk in range(1, blocks):
            sr += sums[k0 + blk, 1]
        rmean[b] = sr / rows
        for j in range(nc):
            s = partial[k0, j]
            for blk in range(1, blocks):
                s += partial[k0 + blk, j]
            col[b, j] = DECAY(col[b, j], s / rows, c)
    # pass 2: the sum of u^2
    for k in prange(tasks):
        b = k // blocks
        blk = k % blocks
        crow = col[b]
        w0 = work[k, 0]
        su = zero
        for i in range(blk * nr // blocks, (blk + 1) * nr // blocks):
            ratio = r[b, i] / rmean[b]
            grow = g[b, i]
            for j in range(width):
                u = DIRECTION(grow[j], ratio * crow[j])
                w0[j] = u * u
            su += _lane_sum(w0, nc, zero)
        sums[k, 2] = su
    sp = sums[0, 0]
    su = sums[0, 2]
    for k in range(1, tasks):
        sp += sums[k, 0]
        su += sums[k, 2]
    alpha, divisor = SCALE(sp, su, n, c)
    # pass 3: the update
    for k in prange(tasks):
        b = k // blocks
        blk = k % blocks
        crow = col[b]
        for i in range(blk * nr // blocks, (blk + 1) * nr // blocks):
            ratio = r[b, i] / rmean[b]
            prow = p[b, i]
            grow = g[b, i]
            for j in range(width):
                prow[j] = APPLY(prow[j], DIRECTION(grow[j], ratio * crow[j]), alpha, divisor)


@functools.lru_cache(maxsize=None)
def _kernel(template, rule_module, has_wd):
    constants = {name.upper(): _compile.function(rule_module, name, _compile.CPU)
                 for name in ("square", "decay", "direction", "scale", "apply")}
    suffix = f"{rule_key(rule_module)}{'_wd' if has_wd else ''}"
    return _config.parallel_kernel(numba.njit(**_config.CPU_KERNEL_FLAGS)(
        specialize(template, suffix, HAS_WD=bool(has_wd), **constants)))


def plain_kernel(rule_module, has_wd):
    """``kernel(p, g, v, c, wd_lr, n)``: a rank < 2 unit, flat (see the module docstring)."""
    return _kernel(_plain_template, rule_module, bool(has_wd))


def factored_kernel(rule_module, has_wd):
    """``kernel(p, g, r, col, c, wd_lr, rows, cols, n)``: ``B`` matrices ``R x C`` (see the
    module docstring)."""
    return _kernel(_factored_template, rule_module, bool(has_wd))
