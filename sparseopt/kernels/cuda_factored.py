"""CUDA kernels of factored rules (:mod:`sparseopt.rules.adafactor`): the passes of the CPU
kernels (:mod:`sparseopt.kernels.factored`), with every sum taken in the CPU's order.

The CPU kernels fix each sum's order by the shape alone: :data:`~sparseopt.kernels.factored.PARTS`
flat blocks cut in chunks of :data:`~sparseopt.kernels.cpu.REDUCE_CHUNK`, each chunk (and
each row of a matrix) added in :data:`LANES` running sums combined pairwise
(:func:`sparseopt.kernels.cpu._lane_sum`); blocks of rows per matrix; blocks added in order.
The kernels here take the same sums in the same order, in parallel where the CPU's order
allows it: one thread per lane of a chunk or row (lane ``l`` adds the elements ``l, l + 8,
...``, lane 0 then the tail), the lanes combined by the row's first thread; one thread per
block of rows, per column, or per flat block for the sums over those; one thread for the
sums over the blocks and ``scale``. No atomics: the same bits on every run, and on the
simulator the CPU's bits. On a GPU, NVVM contracts ``a * b + c`` into fused multiply-adds
(see :mod:`sparseopt.kernels.cuda`), so results agree with the CPU to a few ulps.

The unit is ``(p, g)`` with statistics, as on the CPU: a flat variable of rank < 2 with its
element slot ``v`` (:func:`plain_step`), or ``B`` matrices ``R x C`` with ``r`` ``(B, R)``
and ``c`` ``(B, C)`` (:func:`factored_step`). A sparse step's unit is the gathered touched
rows (:mod:`sparseopt.backends.cuda_factored`). The rule's functions are compiled as device
functions by :func:`sparseopt.kernels.cuda._rule_function`, as the generic CUDA kernels'.
"""

import functools

import numba
import numpy as np
from numba import cuda

from sparseopt.kernels import cuda as kc
from sparseopt.kernels._specialize import rule_key, specialize
from sparseopt.kernels.cpu import REDUCE_CHUNK
from sparseopt.kernels.factored import PARTS, ROW_BLOCKS

#: The running sums of :func:`sparseopt.kernels.cpu._lane_sum`: the threads of a chunk or a row.
LANES = 8

HAS_WD = False
THREADS = DTYPE = None
SQUARE = DECAY = DIRECTION = SCALE = APPLY = None  # the rule's functions, bound per specialization


@cuda.jit(device=True)
def _first(lane, main, count):
    """The first of ``count`` elements that lane ``lane`` adds (``count``: none), in
    ``_lane_sum``'s order: lane ``l`` adds ``l, l + 8, ...`` below ``main`` (``count`` less
    ``count % 8``), then lane 0 the tail ``main, main + 1, ...``."""
    if lane < main:
        return lane
    return main if lane == 0 else count


@cuda.jit(device=True)
def _next(j, lane, main, count):
    """The element lane ``lane`` adds after ``j`` (``count``: none left); see :func:`_first`."""
    if j < main:
        j += LANES
        if j < main:
            return j
        return main if lane == 0 else count
    return j + 1


@cuda.jit(device=True)
def _combine(s, base):
    """``_lane_sum``'s last line on the eight lane sums ``s[base:base + 8]``."""
    return ((s[base] + s[base + 1]) + (s[base + 2] + s[base + 3])) + (
        (s[base + 4] + s[base + 5]) + (s[base + 6] + s[base + 7]))


def _plain_lanes_template(p, g, v, c, wd_lr, chunks, out):
    """A flat unit's first pass: weight decay, ``v``, and the lane sums of ``p^2`` and
    ``u^2``. Block ``(LANES, THREADS // LANES)``: each row of threads owns one chunk
    ``(part, m)`` (``chunks`` per part at most), its lanes as ``_lane_sum``'s; the chunk's
    two sums go to ``out[:, part * chunks + m]``."""
    sp_lanes = cuda.shared.array(THREADS, DTYPE)
    su_lanes = cuda.shared.array(THREADS, DTYPE)
    size = p.size
    lane = numba.int64(cuda.threadIdx.x)
    y = numba.int64(cuda.threadIdx.y)
    slot = y * LANES + lane
    zero = wd_lr - wd_lr
    groups = PARTS * chunks
    first = numba.int64(cuda.blockIdx.x) * cuda.blockDim.y
    stride = numba.int64(cuda.gridDim.x) * cuda.blockDim.y
    while first < groups:
        group = first + y
        t = group // chunks
        lo = t * size // PARTS + (group - t * chunks) * REDUCE_CHUNK
        count = numba.int64(0)
        if group < groups:
            count = max(count, min(REDUCE_CHUNK, (t + 1) * size // PARTS - lo))
        sp = zero
        su = zero
        main = count - count % LANES
        j = _first(lane, main, count)
        while j < count:
            i = lo + j
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
            j = _next(j, lane, main, count)
        sp_lanes[slot] = sp
        su_lanes[slot] = su
        cuda.syncthreads()
        if lane == 0 and count > 0:
            out[0, group] = _combine(sp_lanes, y * LANES)
            out[1, group] = _combine(su_lanes, y * LANES)
        cuda.syncthreads()
        first += stride


def _plain_parts_template(lanes, chunks, size, zero, parts):
    """``parts[:, t]``: part ``t``'s chunk sums added in order (one thread per part)."""
    t = numba.int64(cuda.grid(1))
    step = numba.int64(cuda.gridsize(1))
    while t < PARTS:
        lo = t * size // PARTS
        n = (t + 1) * size // PARTS - lo
        s0 = zero
        s1 = zero
        m = numba.int64(0)
        while m * REDUCE_CHUNK < n:
            s0 += lanes[0, t * chunks + m]
            s1 += lanes[1, t * chunks + m]
            m += 1
        parts[0, t] = s0
        parts[1, t] = s1
        t += step


def _scale_template(sums_p2, sums_u2, n, c, out):
    """One thread: the blocks' sums of ``p^2`` and ``u^2`` added in order, then ``scale``:
    ``out = (alpha, divisor)``."""
    if cuda.grid(1) == 0:
        sp = sums_p2[0]
        su = sums_u2[0]
        for k in range(1, sums_p2.shape[0]):
            sp += sums_p2[k]
            su += sums_u2[k]
        alpha, divisor = SCALE(sp, su, n, c)
        out[0] = alpha
        out[1] = divisor


def _plain_apply_template(p, g, v, scaled):
    """Grid-stride: the update of every element (``scaled``: ``(alpha, divisor)``)."""
    i = numba.int64(cuda.grid(1))
    step = numba.int64(cuda.gridsize(1))
    alpha = scaled[0]
    divisor = scaled[1]
    while i < p.size:
        p[i] = APPLY(p[i], DIRECTION(g[i], v[i]), alpha, divisor)
        i += step


def _row_terms_template(p, g, r, c, wd_lr, cols, row_p2):
    """A matrix unit's first pass on each row ``(b, i)`` (block ``(LANES, THREADS //
    LANES)``, a row per row of threads): weight decay, the lane sums of ``p^2`` and ``q``
    over the row; then ``r[b, i]`` from the mean of ``q``, and ``row_p2[b, i]``."""
    sp_lanes = cuda.shared.array(THREADS, DTYPE)
    sq_lanes = cuda.shared.array(THREADS, DTYPE)
    nb, nr, nc = p.shape
    lane = numba.int64(cuda.threadIdx.x)
    y = numba.int64(cuda.threadIdx.y)
    slot = y * LANES + lane
    zero = wd_lr - wd_lr
    main = nc - nc % LANES
    first = numba.int64(cuda.blockIdx.x) * cuda.blockDim.y
    stride = numba.int64(cuda.gridDim.x) * cuda.blockDim.y
    while first < nb * nr:
        row = first + y
        active = row < nb * nr
        b = row // nr if active else 0
        i = row - b * nr if active else 0
        sp = zero
        sq = zero
        j = _first(lane, main, nc) if active else nc
        while j < nc:
            x = p[b, i, j]
            if HAS_WD:
                x = x - x * wd_lr
                p[b, i, j] = x
            sp += x * x
            sq += SQUARE(g[b, i, j], c)
            j = _next(j, lane, main, nc)
        sp_lanes[slot] = sp
        sq_lanes[slot] = sq
        cuda.syncthreads()
        if lane == 0 and active:
            row_p2[b, i] = _combine(sp_lanes, y * LANES)
            r[b, i] = DECAY(r[b, i], _combine(sq_lanes, y * LANES) / cols, c)
        cuda.syncthreads()
        first += stride


def _column_partials_template(g, c, blocks, zero, partial):
    """``partial[k, j]``: the sum of ``q`` over block ``k``'s rows of column ``j``, in row
    order (one thread per block and column)."""
    nb, nr, nc = g.shape
    e = numba.int64(cuda.grid(1))
    step = numba.int64(cuda.gridsize(1))
    while e < nb * blocks * nc:
        k = e // nc
        j = e - k * nc
        b = k // blocks
        blk = k - b * blocks
        s = zero
        for i in range(blk * nr // blocks, (blk + 1) * nr // blocks):
            s += SQUARE(g[b, i, j], c)
        partial[k, j] = s
        e += step


def _block_sums_template(x, blocks, zero, out):
    """``out[k]``: the sum of ``x[b, i]`` over block ``k``'s rows, in row order."""
    nb, nr = x.shape
    k = numba.int64(cuda.grid(1))
    step = numba.int64(cuda.gridsize(1))
    while k < nb * blocks:
        b = k // blocks
        blk = k - b * blocks
        s = zero
        for i in range(blk * nr // blocks, (blk + 1) * nr // blocks):
            s += x[b, i]
        out[k] = s
        k += step


def _column_stats_template(partial, block_r, col, c, blocks, rows, rmean):
    """The column statistics from the blocks' partial sums, added in order (one thread per
    column), and ``mean(r)`` of each matrix (its column 0's thread)."""
    nb, nc = col.shape
    e = numba.int64(cuda.grid(1))
    step = numba.int64(cuda.gridsize(1))
    while e < nb * nc:
        b = e // nc
        j = e - b * nc
        k0 = b * blocks
        s = partial[k0, j]
        for blk in range(1, blocks):
            s += partial[k0 + blk, j]
        col[b, j] = DECAY(col[b, j], s / rows, c)
        if j == 0:
            sr = block_r[k0]
            for blk in range(1, blocks):
                sr += block_r[k0 + blk]
            rmean[b] = sr / rows
        e += step


def _row_directions_template(g, r, col, rmean, zero, row_u2):
    """``row_u2[b, i]``: the lane sums of ``u^2`` over row ``(b, i)``, combined (threads as
    :func:`_row_terms_template`'s)."""
    su_lanes = cuda.shared.array(THREADS, DTYPE)
    nb, nr, nc = g.shape
    lane = numba.int64(cuda.threadIdx.x)
    y = numba.int64(cuda.threadIdx.y)
    slot = y * LANES + lane
    main = nc - nc % LANES
    first = numba.int64(cuda.blockIdx.x) * cuda.blockDim.y
    stride = numba.int64(cuda.gridDim.x) * cuda.blockDim.y
    while first < nb * nr:
        row = first + y
        active = row < nb * nr
        b = row // nr if active else 0
        i = row - b * nr if active else 0
        su = zero
        ratio = zero
        j = _first(lane, main, nc) if active else nc
        if active:
            ratio = r[b, i] / rmean[b]
        while j < nc:
            u = DIRECTION(g[b, i, j], ratio * col[b, j])
            su += u * u
            j = _next(j, lane, main, nc)
        su_lanes[slot] = su
        cuda.syncthreads()
        if lane == 0 and active:
            row_u2[b, i] = _combine(su_lanes, y * LANES)
        cuda.syncthreads()
        first += stride


def _factored_apply_template(p, g, r, col, rmean, scaled):
    """Grid-stride: the update of every element (``u`` recomputed, as on the CPU)."""
    nb, nr, nc = p.shape
    e = numba.int64(cuda.grid(1))
    step = numba.int64(cuda.gridsize(1))
    alpha = scaled[0]
    divisor = scaled[1]
    while e < nb * nr * nc:
        row = e // nc
        j = e - row * nc
        b = row // nr
        i = row - b * nr
        ratio = r[b, i] / rmean[b]
        p[b, i, j] = APPLY(p[b, i, j], DIRECTION(g[b, i, j], ratio * col[b, j]), alpha, divisor)
        e += step


@functools.lru_cache(maxsize=None)
def kernel(template, rule_module, has_wd, dtype, threads):
    """``template`` compiled for ``rule_module`` (its functions bound as globals), weight
    decay or not; ``dtype`` and ``threads`` size the shared memory of the lane kernels
    (the others take any, and are compiled once per rule: pass None)."""
    constants = {name.upper(): kc._rule_function(rule_module, name)
                 for name in ("square", "decay", "direction", "scale", "apply")}
    suffix = f"{rule_key(rule_module)}{'_wd' if has_wd else ''}_cuda"
    if dtype is not None:
        dtype = np.dtype(dtype)
        suffix += f"_{dtype.name}_t{threads}"
        constants.update(THREADS=threads, DTYPE=numba.from_dtype(dtype))
    return cuda.jit(**kc.KERNEL_FLAGS)(specialize(template, suffix, HAS_WD=bool(has_wd), **constants))


def _lane_block(threads):
    """The block of a lane kernel: ``LANES`` threads per chunk or row, ``threads // LANES`` rows."""
    return LANES, max(1, threads // LANES)


def plain_step(rule_module, has_wd, p, g, v, c, wd_lr, n, scratch, stream):
    """One step of a flat unit ``p``, ``g``, ``v`` (contiguous ``(size,)`` device arrays);
    ``n``: the size as a scalar of the math dtype; ``scratch(key, shape)``: a device array of
    the math dtype (reused)."""
    size = p.size
    dtype = p.dtype
    zero = dtype.type(0)
    threads = kc.launch_config().threads
    per_part = -(-size // PARTS)
    chunks = max(1, -(-per_part // REDUCE_CHUNK))
    lanes = scratch("lanes", (2, PARTS * chunks))
    parts = scratch("parts", (2, PARTS))
    scaled = scratch("scaled", (2,))
    block = _lane_block(threads)
    kernel(_plain_lanes_template, rule_module, has_wd, dtype, block[0] * block[1])[
        kc.blocks_for(PARTS * chunks, block[1]), block, stream](p, g, v, c, wd_lr, chunks, lanes)
    kernel(_plain_parts_template, rule_module, False, None, None)[
        kc.blocks_for(PARTS, threads), threads, stream](lanes, chunks, size, zero, parts)
    kernel(_scale_template, rule_module, False, None, None)[1, 1, stream](parts[0], parts[1], n, c, scaled)
    kernel(_plain_apply_template, rule_module, False, None, None)[
        kc.blocks_for(size, threads), threads, stream](p, g, v, scaled)


def factored_step(rule_module, has_wd, p, g, r, col, c, wd_lr, rows, cols, n, scratch, stream):
    """One step of ``B`` matrices: ``p``, ``g`` ``(B, R, C)``, ``r`` ``(B, R)``, ``col``
    ``(B, C)`` (contiguous device arrays); ``rows``, ``cols``, ``n``: ``R``, ``C`` and
    ``B * R * C`` as scalars of the math dtype; ``scratch`` as :func:`plain_step`'s."""
    nb, nr, nc = p.shape
    dtype = p.dtype
    zero = dtype.type(0)
    threads = kc.launch_config().threads
    blocks = min(nr, ROW_BLOCKS)
    tasks = nb * blocks
    row_sums = scratch("row sums", (2, nb, nr))       # per row: sum p^2, sum u^2
    partial = scratch("partial", (tasks, nc))         # column sums of q per block of rows
    task_sums = scratch("task sums", (3, tasks))      # per block: sum p^2, sum r, sum u^2
    rmean = scratch("rmean", (nb,))
    scaled = scratch("scaled", (2,))
    block = _lane_block(threads)
    lane_grid = kc.blocks_for(nb * nr, block[1]), block, stream
    sums = kernel(_block_sums_template, rule_module, False, None, None)

    def grid(count):
        return kc.blocks_for(count, threads), threads, stream

    kernel(_row_terms_template, rule_module, has_wd, dtype, block[0] * block[1])[lane_grid](
        p, g, r, c, wd_lr, cols, row_sums[0])
    kernel(_column_partials_template, rule_module, False, None, None)[grid(tasks * nc)](
        g, c, blocks, zero, partial)
    sums[grid(tasks)](row_sums[0], blocks, zero, task_sums[0])
    sums[grid(tasks)](r, blocks, zero, task_sums[1])
    kernel(_column_stats_template, rule_module, False, None, None)[grid(nb * nc)](
        partial, task_sums[1], col, c, blocks, rows, rmean)
    kernel(_row_directions_template, rule_module, False, dtype, block[0] * block[1])[lane_grid](
        g, r, col, rmean, zero, row_sums[1])
    sums[grid(tasks)](row_sums[1], blocks, zero, task_sums[2])
    kernel(_scale_template, rule_module, False, None, None)[1, 1, stream](
        task_sums[0], task_sums[2], n, c, scaled)
    kernel(_factored_apply_template, rule_module, False, None, None)[grid(nb * nr * nc)](
        p, g, r, col, rmean, scaled)
