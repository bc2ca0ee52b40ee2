"""Deterministic de-duplication of sparse gradient indices on the device.

The plan of a sparse step is the one :mod:`sparseopt.kernels.dedup` makes on the
CPU: the unique rows, and for each the positions of its duplicates in increasing
order, so that the row kernel sums a row's value rows left to right, as the CPU
does, and results do not depend on scheduling. It is built in device memory:

1. ``prepare``: check every index against ``[0, num_rows)`` (the first bad position
   goes into ``info[0]`` with an integer ``atomic.min``, which is order-independent),
   and write the pairs ``(key=row, value=position)``;
2. a stable LSD radix sort of the pairs by row, 4 bits per pass, as many passes as
   the table's row count needs: each pass counts digits per thread chunk, takes an
   exclusive prefix scan of the counts (digit-major), and scatters every chunk in
   order, so positions of one row stay in increasing order;
3. ``segments``: a row starts where the sorted key changes; a prefix scan of those
   heads numbers the unique rows, giving ``rows``, ``offsets`` (and ``k``, the
   number of unique rows, in ``info[1]``), while ``order`` is the sorted positions.

No float atomics anywhere; integer counts are exact, so the plan, and the update
that follows it, are bit-identical from run to run. The unique rows come out in
increasing row order, as the CPU plan's do.

``info`` (two int64) is the only thing the host reads back, once per step, before
the update kernel is launched. Scratch arrays are kept per variable and grow by
doubling, so a step allocates nothing in the steady state.
"""

import functools

import numba
import numpy as np
from numba import cuda

from sparseopt.kernels import cuda as ck
from sparseopt.kernels._specialize import specialize

RADIX_BITS = 4
RADIX = 1 << RADIX_BITS
NO_BAD = np.iinfo(np.int64).max  # info[0] when every index is in range
THREADS = None                   # bound per launch configuration (shared-memory size)


@cuda.jit(**ck.KERNEL_FLAGS)
def _prepare(indices, num_rows, keys, vals, info):
    """Range check (first bad position to ``info[0]``) and ``keys = indices``, ``vals = positions``."""
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < indices.size:
        r = numba.int64(indices[i])
        if r < 0 or r >= num_rows:
            cuda.atomic.min(info, 0, i)
            r = 0
        keys[i] = r
        vals[i] = i
        i += stride


@cuda.jit(**ck.KERNEL_FLAGS)
def _radix_count(keys, shift, items, counts):
    """Thread chunk ``t`` (``items`` consecutive keys) writes its digit counts to ``counts[digit * chunks + t]``."""
    n = keys.size
    chunks = (n + items - 1) // items
    local = cuda.local.array(RADIX, numba.int64)
    t = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while t < chunks:
        for b in range(RADIX):
            local[b] = 0
        lo = t * items
        hi = min(lo + items, n)
        for i in range(lo, hi):
            local[(keys[i] >> shift) & (RADIX - 1)] += 1
        for b in range(RADIX):
            counts[b * chunks + t] = local[b]
        t += stride


@cuda.jit(**ck.KERNEL_FLAGS)
def _radix_scatter(keys, vals, shift, items, starts, keys_out, vals_out):
    """Each chunk writes its pairs, in order, from its scanned start of each digit: a stable pass."""
    n = keys.size
    chunks = (n + items - 1) // items
    local = cuda.local.array(RADIX, numba.int64)
    t = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while t < chunks:
        for b in range(RADIX):
            local[b] = starts[b * chunks + t]
        lo = t * items
        hi = min(lo + items, n)
        for i in range(lo, hi):
            key = keys[i]
            b = (key >> shift) & (RADIX - 1)
            pos = local[b]
            keys_out[pos] = key
            vals_out[pos] = vals[i]
            local[b] = pos + 1
        t += stride


def _scan_block_template(x, out, items, block_sums):
    """Exclusive scan of each block's tile of ``THREADS * items`` elements of ``x`` into ``out``.

    Each thread scans a contiguous run of ``items`` serially; the run totals are
    combined by a shared-memory Hillis-Steele scan; the tile total goes to
    ``block_sums[block]``. ``out`` may be ``x``.
    """
    sh = cuda.shared.array(THREADS, numba.int64)
    n = x.size
    t = cuda.threadIdx.x
    b = numba.int64(cuda.blockIdx.x)
    base = (b * THREADS + t) * items
    acc = numba.int64(0)
    for q in range(items):
        i = base + q
        if i < n:
            acc += x[i]
    sh[t] = acc
    cuda.syncthreads()
    off = 1
    while off < THREADS:
        v = numba.int64(0)
        if t >= off:
            v = sh[t - off]
        cuda.syncthreads()
        sh[t] += v
        cuda.syncthreads()
        off *= 2
    run = sh[t] - acc
    for q in range(items):
        i = base + q
        if i < n:
            v = x[i]
            out[i] = run
            run += v
    if t == THREADS - 1:
        block_sums[b] = sh[t]


@cuda.jit(**ck.KERNEL_FLAGS)
def _scan_add(out, tile, block_offsets):
    """``out[i] += block_offsets[i // tile]``: the second level of a multi-block scan."""
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < out.size:
        out[i] += block_offsets[i // tile]
        i += stride


@cuda.jit(**ck.KERNEL_FLAGS)
def _heads(keys, heads):
    """``heads[i] = 1`` where a run of equal sorted keys starts."""
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < keys.size:
        if i == 0 or keys[i] != keys[i - 1]:
            heads[i] = 1
        else:
            heads[i] = 0
        i += stride


@cuda.jit(**ck.KERNEL_FLAGS)
def _segments(keys, head_index, rows, offsets, info):
    """From the heads' exclusive scan: ``rows[u]``, ``offsets[u]``, ``offsets[k] = n``, ``info[1] = k``."""
    n = keys.size
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < n:
        head = i == 0 or keys[i] != keys[i - 1]
        if head:
            u = head_index[i]
            rows[u] = keys[i]
            offsets[u] = i
        if i == n - 1:
            k = head_index[i]
            if head:
                k += 1
            offsets[k] = n
            info[1] = k
        i += stride


_scan_kernels = {}


def _scan_block_kernel(threads):
    kernel = _scan_kernels.get(threads)
    if kernel is None:
        fn = specialize(_scan_block_template, f"t{threads}", THREADS=threads)
        kernel = _scan_kernels[threads] = cuda.jit(**ck.KERNEL_FLAGS)(fn)
    return kernel


def _scan_levels(n, tile):
    """Sizes of the block-sum arrays of a multi-level scan of ``n`` elements."""
    sizes = []
    while True:
        n = -(-n // tile)
        sizes.append(max(n, 1))
        if n <= 1:
            return sizes


def exclusive_scan(x, out, levels, stream):
    """Exclusive prefix sum of the int64 device array ``x`` into ``out`` (may be ``x``).

    ``levels``: preallocated block-sum arrays, as sized by ``_scan_levels``.
    """
    cfg = ck.launch_config()
    tile = cfg.threads * cfg.scan_items
    n = x.size
    blocks = -(-n // tile)
    sums = levels[0][:blocks]
    _scan_block_kernel(cfg.threads)[blocks, cfg.threads, stream](x, out, cfg.scan_items, sums)
    if blocks > 1:
        exclusive_scan(sums, sums, levels[1:], stream)
        _scan_add[ck.blocks_for(n, cfg.threads), cfg.threads, stream](out, tile, sums)


class Planner:
    """The de-duplication scratch of one variable, and the launches that fill it.

    ``enqueue`` launches the plan of a batch of indices; after the host has read
    ``info`` (see :meth:`read_info`), :meth:`result` gives the plan.
    """

    def __init__(self):
        self.capacity = -1
        self._layout = None
        self.info = cuda.to_device(np.array([NO_BAD, 0], np.int64))
        self.info_dirty = False
        self.n = 0
        self.sorted_in_b = False

    def _reserve(self, n, stream):
        cfg = ck.launch_config()
        key = (n, cfg.sort_items, cfg.threads, cfg.scan_items)
        if self.capacity >= n and self._layout == key[1:]:
            return
        cap = max(n, 2 * max(self.capacity, 0), 16)
        chunks = -(-cap // cfg.sort_items)
        self.keys_a = cuda.device_array(cap, np.int64)
        self.keys_b = cuda.device_array(cap, np.int64)
        self.vals_a = cuda.device_array(cap, np.int64)
        self.vals_b = cuda.device_array(cap, np.int64)
        self.counts = cuda.device_array(RADIX * chunks, np.int64)
        self.heads = cuda.device_array(cap, np.int64)
        self.rows = cuda.device_array(cap, np.int64)
        self.offsets = cuda.device_array(cap + 1, np.int64)
        tile = cfg.threads * cfg.scan_items
        biggest = max(RADIX * chunks, cap)
        self.levels = [cuda.device_array(size, np.int64) for size in _scan_levels(biggest, tile)]
        self.capacity = cap
        self._layout = key[1:]

    def enqueue(self, indices, num_rows, stream):
        """Launch the plan of the device array ``indices`` (``n > 0``) against ``num_rows`` rows."""
        n = indices.size
        self._start(n, stream)
        threads = ck.launch_config().threads
        _prepare[ck.blocks_for(n, threads), threads, stream](indices, num_rows, self.keys_a[:n],
                                                              self.vals_a[:n], self.info)
        self._sort(n, num_rows, stream)

    def _start(self, n, stream):
        self.n = n
        self._reserve(n, stream)
        if self.info_dirty:
            ck.fill[1, 1, stream](self.info[:1], NO_BAD)
            self.info_dirty = False

    def _sort(self, n, num_rows, stream):
        """The sort and the segments of the ``n`` prepared pairs (keys below ``num_rows``)."""
        cfg = ck.launch_config()
        threads = cfg.threads
        keys, vals = self.keys_a[:n], self.vals_a[:n]
        keys_b, vals_b = self.keys_b[:n], self.vals_b[:n]
        chunks = -(-n // cfg.sort_items)
        counts = self.counts[:RADIX * chunks]
        nbits = max(1, int(num_rows - 1).bit_length())
        for shift in range(0, nbits, RADIX_BITS):
            _radix_count[ck.blocks_for(chunks, threads), threads, stream](
                keys, shift, cfg.sort_items, counts)
            exclusive_scan(counts, counts, self.levels, stream)
            _radix_scatter[ck.blocks_for(chunks, threads), threads, stream](
                keys, vals, shift, cfg.sort_items, counts, keys_b, vals_b)
            keys, vals, keys_b, vals_b = keys_b, vals_b, keys, vals
        heads = self.heads[:n]
        _heads[ck.blocks_for(n, threads), threads, stream](keys, heads)
        exclusive_scan(heads, heads, self.levels, stream)
        _segments[ck.blocks_for(n, threads), threads, stream](keys, heads, self.rows, self.offsets, self.info)
        self.order = vals

    def read_info(self, stream):
        """Copy ``info`` to the host (the step's one synchronization); returns ``(bad, k)``."""
        if isinstance(stream, int):  # the default stream: a plain copy waits for it
            host = self.info.copy_to_host()
        else:
            host = self.info.copy_to_host(stream=stream)
            stream.synchronize()
        bad = int(host[0])
        if bad != NO_BAD:
            self.info_dirty = True
            return bad, 0
        return -1, int(host[1])

    def result(self, k):
        """``(rows, offsets, order)`` device views of the last plan with ``k`` unique rows."""
        return self.rows[:k], self.offsets[:k + 1], self.order


# ----------------------------------------------------------- several tables, one plan



def _prepare_tables_template(meta, tables, like, keys, vals, info):
    """:func:`_prepare` over the indices of several tables, concatenated in table order
    (``meta``: per table its indices' address, their start in the concatenation (row
    ``tables``: the total), its rows and its first key): ``keys = first key + index``,
    ``vals`` = the position in the table's own indices (the plan's ``order``)."""
    starts = meta[T_START]
    n = starts[tables]
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < n:
        t = ck.table_of(starts, tables, i)
        local = i - starts[t]
        idx = POINTER(meta[T_ADDRESS, t], like, starts[t + 1] - starts[t])
        r = numba.int64(idx[local])
        if r < 0 or r >= meta[T_ROWS, t]:
            cuda.atomic.min(info, 0, i)
            r = 0
        keys[i] = meta[T_KEY, t] + r
        vals[i] = local
        i += stride


def _localize_template(keys, meta, tables, rows, info, ustart):
    """The ``k = info[1]`` unique keys as each table's rows (``rows[u] = key - first key``),
    and ``ustart[t]``: where table ``t``'s unique rows start (``ustart[tables] = k``)."""
    firsts = meta[T_KEY]
    k = info[1]
    u = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    if u == 0:
        t0 = ck.table_of(firsts, tables, keys[0]) if k > 0 else tables
        for t in range(t0 + 1):
            ustart[t] = 0
    while u < k:
        t = ck.table_of(firsts, tables, keys[u])
        rows[u] = keys[u] - firsts[t]
        after = tables
        if u + 1 < k:
            after = ck.table_of(firsts, tables, keys[u + 1])
        for q in range(t + 1, after + 1):
            ustart[q] = u + 1
        u += stride


#: Rows of a table plan's ``meta`` (int64, ``(4, tables + 1)``): the indices' address, their
#: start in the concatenation, the table's rows, its first key (the rows of the tables before).
T_ADDRESS, T_START, T_ROWS, T_KEY = range(4)
POINTER = None  # bound per index dtype: the indices of a table, by address


@functools.lru_cache(maxsize=None)
def _prepare_tables(like_dtype):
    return cuda.jit(**ck.KERNEL_FLAGS)(specialize(
        _prepare_tables_template, np.dtype(like_dtype).name, POINTER=ck.table_pointer()))


_localize = cuda.jit(**ck.KERNEL_FLAGS)(_localize_template)


class TablePlanner(Planner):
    """One plan for the sparse gradients of several tables (issue 21): their indices keyed
    ``(table, row)`` as one sorted key range, so one launch sequence whatever the number of
    tables. Each table's plan is a view of it: its unique rows (its own numbering, increasing),
    their offsets into the shared ``order``, whose entries are positions in the table's own
    gradient rows, so the per-table kernels take it as they take a plan of their own."""

    def __init__(self):
        super().__init__()
        self.tables = -1

    def _info(self, tables):
        if tables != self.tables:
            self.ext = cuda.to_device(np.array([NO_BAD, 0] + [0] * (tables + 1), np.int64))
            self.info = self.ext[:2]
            self.info_dirty = False
            self.tables = tables
        return self.ext

    def enqueue_tables(self, meta, like, n, total_rows, stream):
        """Launch the plan of ``n > 0`` indices of ``meta.shape[1] - 1`` tables (``meta``: a
        device array, see :data:`T_ADDRESS`; ``like``: an array of the indices' dtype)."""
        tables = meta.shape[1] - 1
        ext = self._info(tables)
        self._start(n, stream)
        threads = ck.launch_config().threads
        _prepare_tables(like.dtype)[ck.blocks_for(n, threads), threads, stream](
            meta, tables, like, self.keys_a[:n], self.vals_a[:n], self.info)
        self._sort(n, total_rows, stream)
        self.local = self.heads  # free after the segments: the tables' own rows
        _localize[ck.blocks_for(n, threads), threads, stream](
            self.rows, meta, tables, self.local, self.info, ext[2:])

    def read_tables(self, stream):
        """``(bad, ustart)`` (one copy): the first bad position in the concatenation (-1: none)
        and where each table's unique rows start (``tables + 1`` entries)."""
        if isinstance(stream, int):
            host = self.ext.copy_to_host()
        else:
            host = self.ext.copy_to_host(stream=stream)
            stream.synchronize()
        if int(host[0]) != NO_BAD:
            self.info_dirty = True
            return int(host[0]), None
        return -1, host[2:]

    def table_result(self, ustart, t):
        """Table ``t``'s ``(rows, offsets, order, k)``."""
        u0, u1 = int(ustart[t]), int(ustart[t + 1])
        return self.local[u0:u1], self.offsets[u0:u1 + 1], self.order, u1 - u0
