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
in order: the same bits for any number of threads. The rule's functions are bound as
globals of a specialized template (:func:`sparseopt.kernels._specialize.specialize`), so
the kernels cache on disk as the generic ones do.
"""

import functools

import numba
import numpy as np
from numba import prange

from sparseopt import _config
from sparseopt.kernels._specialize import rule_key, specialize

#: Flat blocks of :func:`plain_kernel`'s sums (as the reduction kernels of ``cpu``).
PARTS = 256
#: The most blocks of rows per matrix in :func:`factored_kernel` (its column sums keep
#: ``B * min(R, ROW_BLOCKS) * C`` partial sums, at most the variable's size).
ROW_BLOCKS = 64

HAS_WD = False
SQUARE = DECAY = DIRECTION = SCALE = APPLY = None  # the rule's functions, bound per specialization


def _plain_template(p, g, v, c, wd_lr, n):
    """``p``, ``g``, ``v`` flat; ``n``: their size as a scalar of the math dtype."""
    size = p.size
    zero = wd_lr - wd_lr
    sums = np.empty((PARTS, 2), p.dtype)
    for t in prange(PARTS):
        lo = t * size // PARTS
        hi = (t + 1) * size // PARTS
        sp = zero
        su = zero
        for i in range(lo, hi):
            x = p[i]
            if HAS_WD:
                x = x - x * wd_lr
                p[i] = x
            gi = g[i]
            vi = DECAY(v[i], SQUARE(gi, c), c)
            v[i] = vi
            u = DIRECTION(gi, vi)
            sp += x * x
            su += u * u
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
    ``cols``, ``n``: ``R``, ``C`` and ``B * R * C`` as scalars of the math dtype."""
    nb, nr, nc = p.shape
    zero = wd_lr - wd_lr
    blocks = min(nr, ROW_BLOCKS)
    tasks = nb * blocks
    partial = np.empty((tasks, nc), p.dtype)   # column sums of q per block of rows
    sums = np.empty((tasks, 3), p.dtype)       # per block: sum p^2, sum r, sum u^2
    rmean = np.empty(nb, p.dtype)
    # pass 1: weight decay, row statistics, partial column sums, sum of p^2
    for k in prange(tasks):
        b = k // blocks
        blk = k % blocks
        lo = blk * nr // blocks
        hi = (blk + 1) * nr // blocks
        part = partial[k]
        for j in range(nc):
            part[j] = zero
        sp = zero
        sr = zero
        for i in range(lo, hi):
            rs = zero
            for j in range(nc):
                x = p[b, i, j]
                if HAS_WD:
                    x = x - x * wd_lr
                    p[b, i, j] = x
                sp += x * x
                q = SQUARE(g[b, i, j], c)
                rs += q
                part[j] += q
            ri = DECAY(r[b, i], rs / cols, c)
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
        su = zero
        for i in range(blk * nr // blocks, (blk + 1) * nr // blocks):
            ratio = r[b, i] / rmean[b]
            for j in range(nc):
                u = DIRECTION(g[b, i, j], ratio * col[b, j])
                su += u * u
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
        for i in range(blk * nr // blocks, (blk + 1) * nr // blocks):
            ratio = r[b, i] / rmean[b]
            for j in range(nc):
                p[b, i, j] = APPLY(p[b, i, j], DIRECTION(g[b, i, j], ratio * col[b, j]), alpha, divisor)


@functools.lru_cache(maxsize=None)
def _kernel(template, rule_module, has_wd):
    inline = numba.njit(**_config.CPU_RULE_FLAGS)
    constants = {name.upper(): inline(getattr(rule_module, name))
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
