"""The memory-touch probe and the bandwidth kernels of ``peers.py`` (PERF.md, "The floor").

They live in an importable module so that Numba can cache them on disk (a function of
a script run as ``__main__`` or loaded from a file path cannot be cached reliably).
"""

import statistics
import time
import types

import numba
import numpy as np
from numba import prange

from sparseopt.kernels.cpu import PARTS, balanced_parts


@numba.njit(parallel=True, nogil=True, cache=True)
def _triad(a, b, c, s):
    for i in prange(a.size):
        a[i] = b[i] + s * c[i]


def measure_bandwidth(nbytes=256 << 20, repeats=7):
    """Bandwidth in GB/s (1e9 bytes/s), counting bytes read and written.

    ``copyto``: NumPy ``copyto`` of an ``nbytes`` array (one thread; 2 x nbytes moved).
    ``triad``: ``a = b + s * c`` in one Numba parallel pass (3 x nbytes moved).
    """
    n = nbytes // 8
    a = np.full(n, 1.0)
    b = np.full(n, 2.0)
    c = np.full(n, 3.0)
    _triad(a, b, c, 0.5)  # compile
    out = {}
    for name, fn, moved in (("copyto", lambda: np.copyto(a, b), 2 * n * 8),
                            ("triad", lambda: _triad(a, b, c, 0.5), 3 * n * 8)):
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(moved / (time.perf_counter() - t0) / 1e9)
        out[name] = {"median": statistics.median(samples), "max": max(samples)}
    out["nbytes"] = nbytes
    return out



NS = 0  # the probe templates' slot count, bound per specialization (see probe_kernels)
NR = 0  # the row-slot templates' count of per-row slots (one value per row, RowwiseAdagrad)


def _probe_sparse_template(p, s, rs, rows, offsets, order, values, c):
    # Each gradient row is read once, whole (contiguous, vectorizable), into the parameter
    # row, which stays in L1 across a row's duplicates; then each slot row is read and
    # written once, and each per-row slot value (``rs``: (NR, rows), RowwiseAdagrad's
    # accumulator) once. The bytes of a lazy step, in the best order, split across the
    # threads in runs of equal cost as sparseopt's kernels split them (so neither gets
    # an advantage from the hot rows that come first in a Zipf batch).
    d = p.shape[1]
    bounds = balanced_parts(offsets, PARTS, 2 * (1 + NS))
    for t in prange(PARTS):
        for u in range(bounds[t], bounds[t + 1]):
            r = rows[u]
            for q in range(offsets[u], offsets[u + 1]):
                src = order[q]
                for j in range(d):
                    p[r, j] = p[r, j] - c * values[src, j]
            if NS > 0:
                for j in range(d):
                    s[0, r, j] = s[0, r, j] + p[r, j]
            if NS > 1:
                for j in range(d):
                    s[1, r, j] = s[1, r, j] + p[r, j]
            if NS > 2:
                for j in range(d):
                    s[2, r, j] = s[2, r, j] + p[r, j]
            if NR > 0:
                rs[0, r] = rs[0, r] + p[r, 0]
            if NR > 1:
                rs[1, r] = rs[1, r] + p[r, 0]
            if NR > 2:
                rs[2, r] = rs[2, r] + p[r, 0]


def _probe_dense_template(p, s, g, c):
    for i in prange(p.size):
        x = g[i]
        p[i] = p[i] - c * x
        if NS > 0:
            s[0, i] = s[0, i] + x
        if NS > 1:
            s[1, i] = s[1, i] + x
        if NS > 2:
            s[2, i] = s[2, i] + x


def _probe_dense_rows_template(p, s, rs, g, c):
    # Dense, with per-row slots: p, s[k] and g are (rows, d), rs is (NR, rows).
    d = p.shape[1]
    for i in prange(p.shape[0]):
        for j in range(d):
            x = g[i, j]
            p[i, j] = p[i, j] - c * x
            if NS > 0:
                s[0, i, j] = s[0, i, j] + x
            if NS > 1:
                s[1, i, j] = s[1, i, j] + x
            if NS > 2:
                s[2, i, j] = s[2, i, j] + x
        if NR > 0:
            rs[0, i] = rs[0, i] + p[i, 0]
        if NR > 1:
            rs[1, i] = rs[1, i] + p[i, 0]
        if NR > 2:
            rs[2, i] = rs[2, i] + p[i, 0]


_PROBES = {}


def probe_kernels(nslots, nrowslots=0):
    """The memory-touch probe for ``nslots`` slots: (sparse, dense) Numba kernels.

    Sparse: for each unique row (given, no de-duplication) read its gradient rows once,
    read and write the parameter row and each slot row once, with trivial math.
    Dense: the same over every element. One parallel region, like sparseopt's kernels.
    The templates read ``NS`` as a global, so each slot count is its own function
    (a compile-time constant) that Numba can cache on disk.

    Sparse: ``(p, s, rs, rows, offsets, order, values, c)``, with ``rs`` the
    ``(nrowslots, rows)`` row-slot array (``nrowslots > 0``: a rule with per-row slots,
    e.g. RowwiseAdagrad; one value of each is read and written per touched row) or any
    array when ``nrowslots == 0``. Dense: ``(p_flat, s_flat, g_flat, c)``, or
    ``(p2d, s3d, rs, g2d, c)`` with row slots.
    """
    key = (nslots, nrowslots)
    if key not in _PROBES:
        templates = (_probe_sparse_template,
                     _probe_dense_rows_template if nrowslots else _probe_dense_template)
        suffix = f"_s{nslots}" + (f"_r{nrowslots}" if nrowslots else "")
        kernels = []
        for template in templates:
            glb = dict(template.__globals__, NS=nslots, NR=nrowslots)
            fn = types.FunctionType(template.__code__, glb, f"{template.__name__}{suffix}")
            fn.__qualname__ = fn.__name__
            kernels.append(numba.njit(parallel=True, nogil=True, cache=True)(fn))
        _PROBES[key] = tuple(kernels)
    return _PROBES[key]


def plan(indices, num_rows):
    """Unique rows in increasing order (as sparseopt's plan gives them: the fastest order
    for the row pass), and the positions of each (NumPy, untimed)."""
    order = np.argsort(indices, kind="stable").astype(np.int64)
    rows, counts = np.unique(indices, return_counts=True)
    offsets = np.zeros(rows.size + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return rows.astype(np.int64), offsets, order
