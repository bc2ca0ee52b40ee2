"""Generic CPU kernels: any rule, dense elementwise or row-wise sparse, and row reductions.

The kernels own memory access; the rule supplies only the element update. Each is
one ``numba.njit(parallel=True)`` region per step, with no atomics: every element
(dense) or every unique row (sparse) is written by exactly one thread, so results
are bit-identical for any number of threads.

Every kernel takes the rule's slots as one tuple ``S`` of arrays in the rule's ``SLOTS``
order, any number of them, each of the variable's shape (views of the core's contiguous
slot storage, or the TensorFlow bridge's slot buffers), and passes an element's slot values
as a tuple ``v`` (:mod:`sparseopt.kernels._slots`, which generates the few functions that
take the tuples apart). A configuration that does not keep a slot passes a placeholder
(:func:`place`), which the kernel never touches.

The templates refer to globals bound per specialization: ``STEP`` (one element:
``LOAD``, weight decay, ``RULE``, ``STORE``; ``LOAD`` and ``STORE`` touch the kept slots only),
``HAS_WD`` (decoupled weight decay in the same pass), ``PREFETCH`` and ``AHEAD`` (cache
hints for a row, and for the row a sparse kernel updates next but one) and, for row-wise
rules, ``ROWWISE``, ``ROW_TERM`` and ``ROW_SLOTS`` (the row stage on the kept row slots),
``LOWP`` (a 16-bit variable: ``LOAD``,
``VALUE`` and ``STORE_ROUNDED`` are :mod:`sparseopt.kernels.lowp`'s, which widen its
``uint16`` bits to float32 and round the new value back with the step's random bits,
passed as ``c.rounding_key``), ``VALUE`` (the parameter's element as the rule sees it),
``GRADIENT_ROW`` (a unique row's gradient: :func:`_gradient_row`, or for a 16-bit
variable :func:`_gradient_reader`'s, which also reads gradient rows of the variable's own
16-bit dtype, widening them as it reads) and ``SCRATCH`` (the scratch rows, in the math dtype).

The row-reduction family (:func:`row_dense_kernel`, :func:`row_sparse_kernel`) runs
*row-wise rules* (:mod:`sparseopt.rules.rowwise_adagrad`), which keep some state per
row: per row, a first pass over its columns sums ``ROW_TERM`` (the rule's
``row_term``) and divides by the width, ``ROW_RULE`` (``row_update``) updates the row
slots (a tuple ``R`` of arrays of shape ``(rows,)``), then the element pass runs
``RULE`` with the new row values ``rv``. One thread owns a whole row.

Rules with a reduction stage (:mod:`sparseopt.rules.lamb`: a norm of the update) run two
passes per unit, the whole variable (dense) or each unique row (sparse): see "reduction
rules" below; :func:`dense_kernel` and :func:`sparse_kernel` return those kernels for them.
"""

import functools
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from sparseopt import _config, rules
from sparseopt.kernels import _compile, _slots
from sparseopt.kernels import lowp as lowp_kernels
from sparseopt.kernels._specialize import rule_key, specialize
from sparseopt.kernels.dedup import pointer

RULE = STEP = LOAD = STORE = ROW_STEP = HAS_WD = ROW_COST = None  # bound per specialization
PREFETCH = AHEAD = None  # bound per specialization
ROWWISE = ROW = ROW_TERM = ROW_SLOTS = None  # bound per row-wise specialization
TABLE_ROWS = SLOT_VIEWS = ROW_VIEWS = NS = NR = None  # bound per table-batched specialization
LOWP = False  # bound per specialization: a 16-bit variable (sparseopt.kernels.lowp)
VALUE = STORE_ROUNDED = None  # bound per specialization (STORE_ROUNDED: 16-bit variables)
GRADIENT_ROW = WIDEN = GRAD_LIKE = SCRATCH = None  # bound per specialization (see _gradient_reader)

#: Runs of :func:`balanced_parts` per sparse step. A fixed number, not the thread
#: count: ``numba.get_num_threads()`` inside a kernel would stop it from being cached.
#: ``prange`` hands each thread a contiguous block of runs, so a thread gets its share
#: of the work plus at most about one run (1/256 of it, or one very hot row).
PARTS = 256

#: How many unique rows ahead a sparse kernel prefetches (:func:`_ahead_template`).
PREFETCH_DISTANCE = 2


def _value_template(p, at):
    """Element ``at`` of ``p`` (the parameter only)."""
    return p[at]


def _step_template(p, S, at, g, rv, c, wd_lr):
    """One element at index ``at`` (an int or a tuple) of ``p`` and its slots (``rv``: a
    row-wise rule's row values, else unused).

    A 16-bit variable (``LOWP``) is stored rounded with the step's random bits, which
    come in ``c`` (:mod:`sparseopt.kernels.lowp`)."""
    o = LOAD(p, S, at)
    x = o[0]
    if HAS_WD:
        x = x - x * wd_lr
    if ROWWISE:
        n = RULE(x, g, o[1:], rv, c)
    else:
        n = RULE(x, g, o[1:], c)
    if LOWP:
        STORE_ROUNDED(p, S, at, n[0], n[1:], c)
    else:
        STORE(p, S, at, n[0], n[1:])


@numba.njit(**_config.CPU_RULE_FLAGS)
def _summed(values, order, lo, hi, j):
    """Column ``j`` of a unique row's gradient: its duplicates summed in position order."""
    gj = values[order[lo], j]
    for q in range(lo + 1, hi):
        gj += values[order[q], j]
    return gj


@numba.njit(**_config.CPU_RULE_FLAGS)
def _sum_rows(buf, values, order, lo, hi):
    """``buf[0]``: the duplicates ``values[order[lo:hi]]`` summed in position order.

    The same additions in the same order as :func:`_summed`, so the same bits, but
    row by row: each gradient row is read whole and contiguously (vectorized), where
    a column-by-column sum gathers one element from every duplicate per column.
    """
    first = order[lo]
    for j in range(buf.shape[1]):
        buf[0, j] = values[first, j]
    for q in range(lo + 1, hi):
        src = order[q]
        for j in range(buf.shape[1]):
            buf[0, j] += values[src, j]


@numba.njit(**_config.CPU_RULE_FLAGS)
def _gradient_row(buf, values, order, lo, hi):
    """A unique row's gradient as ``(array, row)``: its only gradient row in place, or
    its duplicates summed into ``buf[0]`` (:func:`_sum_rows`).

    The sparse kernels call their row step once, on whichever this returns: one
    inlined copy of the rule per kernel instead of two, which compiles each kernel
    0.5-0.7 s faster (SGD-momentum 1.5 instead of 2.0 s, RowwiseAdagrad 1.6 instead of 2.3 s).
    The kernels' speed is the same within 6 % (W1 SGD-momentum equal, Adam 4-6 % slower,
    RowwiseAdagrad 5 % faster).
    """
    if hi - lo == 1:
        return values, order[lo]
    _sum_rows(buf, values, order, lo, hi)
    return buf, 0


def _widened_row_template(buf, values, order, lo, hi):
    """:func:`_gradient_row` for 16-bit gradient rows (the ``uint16`` bits of a 16-bit
    variable's dtype): the unique row's gradient rows widened to float32 (``WIDEN``) as
    they are read, into ``buf[0]``, duplicates summed in position order. Widening is
    exact, so these are the bits of widening the whole gradient first and then
    :func:`_gradient_row`, without that float32 copy (a pass that writes twice the
    gradient's bytes, which the kernel then reads again)."""
    first = order[lo]
    for j in range(buf.shape[1]):
        buf[0, j] = WIDEN(values[first, j])
    for q in range(lo + 1, hi):
        src = order[q]
        for j in range(buf.shape[1]):
            buf[0, j] += WIDEN(values[src, j])
    return buf, 0


@functools.lru_cache(maxsize=None)
def _gradient_reader(kind):
    """``GRADIENT_ROW`` of the kernels of a variable of 16-bit ``kind`` (``"bfloat16"``,
    ``"float16"``; None: :func:`_gradient_row`): by the gradient values' type, float32
    rows as :func:`_gradient_row` reads them, ``uint16`` rows (a gradient of the
    variable's own dtype) through :func:`_widened_row_template`."""
    if kind is None:
        return _gradient_row
    widened = numba.njit(**_config.CPU_RULE_FLAGS)(specialize(
        _widened_row_template, kind, WIDEN=lowp_kernels.CONVERSIONS[kind][0]))

    def gradient_row(buf, values, order, lo, hi):
        if values.dtype == np.uint16:  # as Python (NUMBA_DISABLE_JIT); compiled: the overload
            return widened(buf, values, order, lo, hi)
        return _gradient_row(buf, values, order, lo, hi)

    # Not ``inline="always"``: Numba's IR inlining of this overload into the row-wise
    # kernels lost their row slots' writes (numba 0.68); LLVM inlines it anyway.
    @overload(gradient_row)
    def _gradient_row_typed(buf, values, order, lo, hi):
        if values.dtype == types.uint16:
            return lambda buf, values, order, lo, hi: widened(buf, values, order, lo, hi)
        return lambda buf, values, order, lo, hi: _gradient_row(buf, values, order, lo, hi)
    return gradient_row


@numba.njit(**_config.CPU_RULE_FLAGS)
def _scratch_like(shape, values):
    """``SCRATCH``: the sparse kernels' scratch rows, in the gradient values' dtype."""
    return np.empty(shape, values.dtype)


@numba.njit(**_config.CPU_RULE_FLAGS)
def _scratch_float32(shape, values):
    """``SCRATCH`` of a 16-bit variable: float32 (its math's), whether the gradient
    values are float32 or 16-bit bits (summed widened)."""
    return np.empty(shape, np.float32)


@numba.njit(**_config.CPU_RULE_FLAGS)
def _math_like(like, widths):
    """``GRAD_LIKE`` of the table-batched kernels for gradients in the math dtype."""
    return widths


@numba.njit(**_config.CPU_RULE_FLAGS)
def _bits_like(like, widths):
    """``GRAD_LIKE`` for 16-bit gradients: their bits are the tables' (``uint16``)."""
    return like


@numba.njit(**_config.CPU_SERIAL_FLAGS)
def balanced_parts(offsets, parts, row_cost):
    """Split the unique rows ``0..k-1`` into ``parts`` contiguous runs of equal cost.

    A row costs its gradient rows (``offsets[u + 1] - offsets[u]``) plus ``row_cost``
    (the rows of the parameter and slots it reads and writes, in gradient rows).
    Under a Zipf batch a few hot rows have hundreds of duplicates each, so the
    cost of a run of unique rows varies widely: an even split of the rows (plain
    ``prange``) can give one thread most of the work. Returns
    ``bounds``: run ``t`` is ``bounds[t]:bounds[t + 1]``. Which thread updates a row
    never changes its bits, so any split gives the same results.
    """
    k = offsets.size - 1
    total = offsets[k] - offsets[0] + row_cost * k
    bounds = np.empty(parts + 1, np.int64)
    bounds[0] = 0
    t = 1
    acc = 0
    for u in range(k):
        acc += offsets[u + 1] - offsets[u] + row_cost
        while t < parts and acc * parts >= total * t:
            bounds[t] = u + 1
            t += 1
    while t <= parts:
        bounds[t] = k
        t += 1
    return bounds


def _dense_template(p, g, S, c, wd_lr):
    """``p``, ``g`` and the slots: flat ``(n,)``."""
    for i in prange(p.size):
        STEP(p, S, i, g[i], wd_lr, c, wd_lr)


def _row_step_template(p, S, r, grad, src, c, wd_lr):
    """Row ``r`` of ``p`` and the slots, with the gradient row ``grad[src]``."""
    for j in range(p.shape[1]):
        STEP(p, S, (r, j), grad[src, j], wd_lr, c, wd_lr)


def _sparse_template(p, S, rows, offsets, order, values, c, wd_lr):
    """Row-wise update of the unique ``rows`` of ``p`` and the slots (all ``(num_rows, d)``).

    The gradient of unique row ``u`` is the in-order sum of
    ``values[order[offsets[u]:offsets[u + 1]]]``: the duplicate sum is fused into
    the pass, so the gradient is read once and each touched row of the parameter
    and slots is read and written once. A row without duplicates reads its gradient
    row in place; a row with duplicates is summed first into a scratch row that stays
    in L1 (:func:`_sum_rows`). Each thread takes one run of :func:`balanced_parts`.
    """
    d = p.shape[1]
    bounds = balanced_parts(offsets, PARTS, ROW_COST)
    scratch = SCRATCH((PARTS, d), values)
    for t in prange(PARTS):
        buf = scratch[t:t + 1]
        end = bounds[t + 1]
        for u in range(bounds[t], end):
            AHEAD(p, S, S, rows, offsets, order, values, u, end)
            grad, src = GRADIENT_ROW(buf, values, order, offsets[u], offsets[u + 1])
            ROW_STEP(p, S, rows[u], grad, src, c, wd_lr)


# ------------------------------------------------------------------ table-batched steps
#
# One parallel region for the sparse updates of many tables (issue 21): the tables of one
# kernel configuration (rule, dtype, kept slots, weight decay) may differ in rows and width.
# Each table is described by one row of ``meta`` (int64), the addresses of its arrays and
# where its plan lies in the concatenated plan arrays (columns below); the kernels view
# the arrays with ``numba.carray`` (:func:`sparseopt.kernels.dedup.pointer`). A tuple of
# arrays would be a new Numba type, so a new compile, for every count of tables.
# Unique row ``u`` of table ``t`` is the same row step as in :func:`_sparse_template`
# (the same gradient sum, the same element code), so the bits are the per-table kernel's.

#: Columns of ``meta``: the address of the parameter, the table's rows and width (these
#: three stay the same from step to step); the address of the gradient values, where the
#: table's unique rows start in ``rows``, its ``k + 1`` offsets in ``offsets`` and its
#: positions in ``order``; its gradient rows (``n``, the length of its ``order`` part). A
#: family's own columns may follow (exact mode's); the *last* ``NS + NR`` columns are the
#: addresses of the rule's ``NS`` slots (a kept slot's, else the parameter's, never
#: touched) and of its ``NR`` row slots (row-wise rules; ``NR = 0`` for the others).
M_P, M_ROWS, M_WIDTH, M_VALUES, M_UNIQUE, M_OFFSETS, M_ORDER, M_N = range(8)
META_COLUMNS = 8


@numba.njit(**_config.CPU_RULE_FLAGS)
def view(address, like, shape):
    """``VIEW`` of :func:`sparseopt.kernels._slots.views`: the array of ``shape`` and ``like``'s
    dtype at ``address``."""
    return numba.carray(pointer(address, like), shape)


@numba.njit(**_config.CPU_SERIAL_FLAGS)
def table_parts(meta, vstart, offsets, parts, row_cost):
    """:func:`balanced_parts` over the unique rows of all tables, numbered table after
    table (table ``t``'s are ``vstart[t]:vstart[t + 1]``), a row costing its gradient
    rows plus ``row_cost`` times its width: runs may span tables."""
    tables = vstart.size - 1
    k = vstart[tables]
    total = 0
    for t in range(tables):
        width = max(meta[t, M_WIDTH], 1)
        total += (meta[t, M_N] + row_cost * (vstart[t + 1] - vstart[t])) * width
    bounds = np.empty(parts + 1, np.int64)
    bounds[0] = 0
    p = 1
    acc = 0
    u = 0
    for t in range(tables):
        width = max(meta[t, M_WIDTH], 1)
        f = meta[t, M_OFFSETS]
        for ul in range(vstart[t + 1] - vstart[t]):
            acc += (offsets[f + ul + 1] - offsets[f + ul] + row_cost) * width
            u += 1
            while p < parts and acc * parts >= total * p:
                bounds[p] = u
                p += 1
    while p <= parts:
        bounds[p] = k
        p += 1
    return bounds


def _elementwise_rows_template(meta, t, like, slot_like, rows, offsets, order, buf, lo, hi, c, wd_lr, widths):
    """Unique rows ``lo:hi`` (its own numbering) of table ``t``: :func:`_sparse_template`'s loop."""
    n_rows = meta[t, M_ROWS]
    d = meta[t, M_WIDTH]
    p = numba.carray(pointer(meta[t, M_P], like), (n_rows, d))
    S = SLOT_VIEWS(meta, t, meta.shape[1] - NS - NR, slot_like, (n_rows, d))
    values = numba.carray(pointer(meta[t, M_VALUES], GRAD_LIKE(like, widths)), (meta[t, M_N], d))
    u0 = meta[t, M_UNIQUE]
    f0 = meta[t, M_OFFSETS]
    o0 = meta[t, M_ORDER]
    rows_t = rows[u0:u0 + hi]
    offsets_t = offsets[f0:f0 + hi + 1]
    order_t = order[o0:o0 + meta[t, M_N]]
    for u in range(lo, hi):
        AHEAD(p, S, S, rows_t, offsets_t, order_t, values, u, hi)
        grad, src = GRADIENT_ROW(buf, values, order_t, offsets_t[u], offsets_t[u + 1])
        ROW_STEP(p, S, rows_t[u], grad, src, c, wd_lr)


def _rowwise_rows_template(meta, t, like, slot_like, rows, offsets, order, buf, lo, hi, c, wd_lr, widths):
    """:func:`_elementwise_rows_template` for a row-wise rule (:func:`_row_sparse_template`'s loop)."""
    n_rows = meta[t, M_ROWS]
    d = meta[t, M_WIDTH]
    p = numba.carray(pointer(meta[t, M_P], like), (n_rows, d))
    S = SLOT_VIEWS(meta, t, meta.shape[1] - NS - NR, slot_like, (n_rows, d))
    R = ROW_VIEWS(meta, t, meta.shape[1] - NR, widths, (n_rows,))
    values = numba.carray(pointer(meta[t, M_VALUES], GRAD_LIKE(like, widths)), (meta[t, M_N], d))
    width = widths[t]
    u0 = meta[t, M_UNIQUE]
    f0 = meta[t, M_OFFSETS]
    o0 = meta[t, M_ORDER]
    rows_t = rows[u0:u0 + hi]
    offsets_t = offsets[f0:f0 + hi + 1]
    order_t = order[o0:o0 + meta[t, M_N]]
    for u in range(lo, hi):
        AHEAD(p, S, R, rows_t, offsets_t, order_t, values, u, hi)
        grad, src = GRADIENT_ROW(buf, values, order_t, offsets_t[u], offsets_t[u + 1])
        ROW(p, S, R, rows_t[u], grad, src, c, wd_lr, width)


def _batched_template(meta, vstart, rows, offsets, order, like, slot_like, c, wd_lr, widths):
    """The sparse updates of the tables of ``meta`` (see its columns above) in one parallel
    region: the runs of :func:`table_parts` over all their unique rows, each run table
    by table (``TABLE_ROWS``: the rule family's row loop). ``like``: an array of the
    tables' dtype (for a 16-bit table, of its ``uint16`` bits), ``slot_like`` one of
    their slots' (``like`` where the tables keep none); ``widths``: an array of the math
    dtype, which the gradient values and the row slots have (and, for row-wise rules,
    each table's width in it)."""
    tables = vstart.size - 1
    bounds = table_parts(meta, vstart, offsets, PARTS, ROW_COST)
    widest = 1
    for t in range(tables):
        widest = max(widest, meta[t, M_WIDTH])
    scratch = np.empty(PARTS * widest, widths.dtype)
    start = scratch.ctypes.data
    for r in prange(PARTS):
        u = bounds[r]
        end = bounds[r + 1]
        t = 0
        while t < tables and vstart[t + 1] <= u:
            t += 1
        while u < end:
            stop = min(end, vstart[t + 1])
            if stop > u and meta[t, M_WIDTH] > 0:
                buf = numba.carray(pointer(start + r * widest * scratch.itemsize, widths),
                                   (1, meta[t, M_WIDTH]))
                TABLE_ROWS(meta, t, like, slot_like, rows, offsets, order, buf, u - vstart[t], stop - vstart[t],
                           c, wd_lr, widths)
            u = stop
            t += 1


def _batched_kernel(rule_module, used, row_used, has_wd, lowp, grad16):
    suffix, constants = _helpers(rule_module, tuple(used), row_used, has_wd, lowp)
    if grad16:  # 16-bit gradient values, the tables' dtype: read as the tables' bits
        suffix += "_g16"
    inline = numba.njit(**_config.CPU_RULE_FLAGS)
    rows_template = _rowwise_rows_template if row_used is not None else _elementwise_rows_template
    constants = dict(constants, GRAD_LIKE=_bits_like if grad16 else _math_like, **table_views(used, row_used))
    constants["TABLE_ROWS"] = inline(specialize(rows_template, suffix, **constants))
    return _config.parallel_kernel(
        numba.njit(**_config.CPU_KERNEL_FLAGS)(specialize(_batched_template, suffix, **constants)))


def table_views(used, row_used):
    """The constants of the table-batched templates that view a table's slots and row slots
    (the last columns of ``meta``): ``NS``, ``NR``, ``SLOT_VIEWS``, ``ROW_VIEWS``."""
    inline = numba.njit(**_config.CPU_RULE_FLAGS)
    nr = len(row_used) if row_used is not None else 0
    return dict(NS=len(used), NR=nr,
                SLOT_VIEWS=inline(specialize(_slots.views(len(used), __name__), "cpu", VIEW=view)),
                ROW_VIEWS=inline(specialize(_slots.views(max(nr, 1), __name__), "cpu", VIEW=view)))


def batched_sparse_kernel(rule_module, used, has_wd, lowp=None, grad16=False):
    """``kernel(meta, vstart, rows, offsets, order, like, slot_like, c, wd_lr, widths)``:
    the sparse updates of many tables of one configuration in one parallel region (columns
    of ``meta`` above, no row slots; ``lowp`` as for :func:`sparse_kernel`: 16-bit
    tables, each rounded with the same bits as by its own kernel; ``grad16``: their gradient
    values are of their own dtype, read as ``uint16`` bits and widened row by row)."""
    return _batched_sparse_kernel(rule_module, used, has_wd, lowp, bool(grad16))


@functools.lru_cache(maxsize=None)
def _batched_sparse_kernel(rule_module, used, has_wd, lowp, grad16):
    return _batched_kernel(rule_module, used, None, has_wd, lowp, grad16)


def batched_row_sparse_kernel(rule_module, used, row_used, has_wd, lowp=None, grad16=False):
    """:func:`batched_sparse_kernel` for a row-wise rule (``row_used``: which of its
    ``ROW_SLOTS`` are kept; ``widths``: each table's width in the math dtype)."""
    return _batched_row_sparse_kernel(rule_module, used, tuple(row_used), has_wd, lowp, bool(grad16))


@functools.lru_cache(maxsize=None)
def _batched_row_sparse_kernel(rule_module, used, row_used, has_wd, lowp, grad16):
    return _batched_kernel(rule_module, used, row_used, has_wd, lowp, grad16)


@intrinsic
def prefetch(typingctx, arr, index):
    """Ask the CPU to fetch row ``index`` of a C-contiguous 2-D array (every 64-byte
    line of it), or element ``index`` of a 1-D one, into the cache for writing
    (LLVM's ``prefetch``: a hint, which never faults and changes no value)."""
    if not isinstance(arr, types.Array) or arr.ndim not in (1, 2) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        intp = context.get_value_type(types.intp)
        at = context.cast(builder, args[1], signature.args[1], types.intp)
        zero = ir.Constant(intp, 0)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [at, zero][:aryty.ndim],
                                       wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8")
        itemsize = context.get_abi_sizeof(context.get_data_type(aryty.dtype))
        if aryty.ndim == 1:
            nbytes = ir.Constant(intp, itemsize)
        else:
            nbytes = builder.mul(cgutils.unpack_tuple(builder, ary.shape, 2)[1], ir.Constant(intp, itemsize))
        # Every line the bytes [start, start + nbytes) touch: a row need not begin on a
        # line (NumPy aligns its data to 16 bytes), and then it spans one line more.
        start = builder.ptrtoint(ptr, intp)
        first = builder.and_(start, ir.Constant(intp, -64))
        with cgutils.for_range_slice(builder, first, builder.add(start, nbytes), ir.Constant(intp, 64),
                                     intp=intp) as (line, _):
            builder.call(fn, [builder.inttoptr(line, i8p), i32(1), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(arr, index), codegen


if numba.config.DISABLE_JIT:  # pragma: no cover - run in a subprocess: tests/test_runtime_environment.py
    def prefetch(arr, index):  # noqa: F811 - NUMBA_DISABLE_JIT runs the kernels as Python
        """A cache hint: nothing to do when the kernels run as plain Python."""


def _ahead_template(p, S, R, rows, offsets, order, values, u, end):
    """Prefetch what unique row ``u + PREFETCH_DISTANCE`` (if before ``end``) will read
    and write: its rows of ``p``, the slots and row slots, and its first gradient row.

    The rows of a sparse step are random, so no hardware prefetcher finds them, and
    a row's update is too long for the CPU to start the next row's loads on its own:
    without this hint each row waits for its misses in turn. With it the kernels of
    the W2 Adam step went from 1.2x the memory-touch probe to 0.96x, W1 SGD-momentum's
    from 1.05x to 0.95x.
    """
    ahead = u + PREFETCH_DISTANCE
    if ahead < end:
        PREFETCH(p, S, R, rows[ahead])
        prefetch(values, order[offsets[ahead]])


def _row_reduce_and_update(p, S, R, row, grad, src, c, wd_lr, width):
    """One row of a row-wise rule, with the (de-duplicated) gradient row ``grad[src]``.

    The row's parameter, slot rows and row slots are prefetched first: the element
    pass needs the row sum, so without the hint their cache misses would only start
    after the gradient row's (a chain of two memory latencies per row, which cost
    RowwiseAdagrad's W1 step about a quarter). The sparse kernel has asked for them
    two rows earlier as well (:func:`_ahead_template`), which took its W2 kernel
    from 1.68x to 1.38x the probe; the hint here then finds them in cache.
    """
    d = p.shape[1]
    PREFETCH(p, S, R, row)
    total = width - width  # a zero of the variables' dtype
    for j in range(d):
        total += ROW_TERM(VALUE(p, (row, j)), grad[src, j], c)
    rv = ROW_SLOTS(R, row, total / width, c)
    for j in range(d):
        STEP(p, S, (row, j), grad[src, j], rv, c, wd_lr)


def _row_dense_template(p, g, S, R, c, wd_lr, width):
    """Every row of ``p``, ``g`` ``(n, d)`` is touched; ``width``: ``d`` in the variables' dtype."""
    if p.shape[1] == 0:  # no columns: nothing to reduce or update
        return
    for u in prange(p.shape[0]):
        ROW(p, S, R, u, g, u, c, wd_lr, width)


def _row_sparse_template(p, S, R, rows, offsets, order, values, c, wd_lr, width):
    """:func:`_row_dense_template` on the unique ``rows``, duplicates summed in order
    into a scratch row first, in the runs of :func:`balanced_parts`."""
    d = p.shape[1]
    if d == 0:
        return
    bounds = balanced_parts(offsets, PARTS, ROW_COST)
    scratch = SCRATCH((PARTS, d), values)
    for t in prange(PARTS):
        buf = scratch[t:t + 1]
        end = bounds[t + 1]
        for u in range(bounds[t], end):
            AHEAD(p, S, R, rows, offsets, order, values, u, end)
            grad, src = GRADIENT_ROW(buf, values, order, offsets[u], offsets[u + 1])
            ROW(p, S, R, rows[u], grad, src, c, wd_lr, width)


def _rule_function(rule_module, name="update"):
    """The rule's function ``name`` compiled for inlining (:mod:`sparseopt.kernels._compile`)."""
    return _compile.function(rule_module, name, _compile.CPU)


def _flags(used):
    return "".join("1" if u else "0" for u in used)


def _helpers(rule_module, used, row_used, has_wd, lowp=None):
    """:func:`_specialized_helpers`, with ``lowp`` given or not (one cache entry)."""
    return _specialized_helpers(rule_module, used, row_used, has_wd, lowp)


@functools.lru_cache(maxsize=None)
def _specialized_helpers(rule_module, used, row_used, has_wd, lowp):
    """The inline element step (and row step) of one rule and slot configuration.

    ``used``: whether each of the kernel's slot arrays is kept (:func:`place`); ``row_used``
    likewise for a row-wise rule's row slots, else None. ``lowp``: None for a float32 or
    float64 variable; ``(kind, stochastic, slot_kind)`` for a 16-bit one
    (:mod:`sparseopt.kernels.lowp`: ``kind`` is ``"bfloat16"`` or ``"float16"``, ``slot_kind``
    ``"bfloat16"`` or None for float32 slots).
    """
    rowwise = row_used is not None
    n_rows = len(row_used) if rowwise else None
    constants = dict(RULE=_compile.on_tuples(rule_module, "update", _compile.CPU, len(used), n_rows),
                     HAS_WD=bool(has_wd), ROWWISE=rowwise, LOWP=lowp is not None)
    suffix = f"{rule_key(rule_module)}_{_flags(used)}{'_wd' if has_wd else ''}"
    inline = numba.njit(**_config.CPU_RULE_FLAGS)
    constants["GRADIENT_ROW"] = _gradient_reader(lowp[0] if lowp else None)
    constants["SCRATCH"] = _scratch_float32 if lowp else _scratch_like
    if lowp is not None:
        suffix += lowp_suffix(lowp)
        constants.update(lowp_constants(lowp))
    constants.update(load_store(used, lowp, constants, suffix, inline))
    value = _value_template if lowp is None else lowp_kernels._value_template
    constants["VALUE"] = inline(specialize(value, suffix, **constants))
    constants["STEP"] = inline(specialize(_step_template, suffix, **constants))
    constants["ROW_STEP"] = inline(specialize(_row_step_template, suffix, **constants))
    suffix_rows = suffix + (f"_r{_flags(row_used)}" if rowwise else "")
    constants["PREFETCH"] = inline(specialize(_slots.prefetch(used, row_used or (), __name__), suffix_rows,
                                              **constants))
    constants["AHEAD"] = inline(specialize(_ahead_template, suffix_rows, **constants))
    # A unique row's cost in gradient rows (balanced_parts): read and write the
    # parameter row and each kept slot row.
    constants["ROW_COST"] = 2 * (1 + sum(used))
    if rowwise:
        suffix = suffix_rows
        constants.update(ROW_TERM=_rule_function(rule_module, "row_term"),
                         ROW_RULE=_compile.on_tuples(rule_module, "row_update", _compile.CPU, n_rows))
        constants["ROW_SLOTS"] = inline(specialize(_slots.row_slots(row_used, __name__), suffix, **constants))
        constants["ROW"] = inline(specialize(_row_reduce_and_update, suffix, **constants))
    return suffix, constants


def load_store(used, lowp, constants, suffix, compile_):
    """``LOAD`` and ``STORE`` (``STORE_ROUNDED`` for a 16-bit variable, ``lowp``) of the kept
    slots ``used`` (:mod:`sparseopt.kernels._slots`), specialized with ``constants`` and compiled
    by ``compile_`` (the CPU's inline ``njit``, or CUDA's device functions)."""
    if lowp is None:
        return dict(LOAD=compile_(specialize(_slots.load(used, __name__), suffix, **constants)),
                    STORE=compile_(specialize(_slots.store(used, __name__), suffix, **constants)))
    namespace = lowp_kernels.__name__
    return dict(LOAD=compile_(specialize(_slots.load(used, namespace, widen=True), suffix, **constants)),
                STORE_ROUNDED=compile_(specialize(_slots.store_rounded(used, namespace), suffix, **constants)))


def lowp_suffix(lowp):
    """The part of a kernel's name that says its 16-bit configuration ``lowp``."""
    kind, stochastic, slot_kind = lowp
    return f"_{kind}{'_sr' if stochastic else '_rne'}{'_s' + slot_kind if slot_kind else ''}"


def lowp_constants(lowp):
    """The constants of :mod:`sparseopt.kernels.lowp`'s templates for the 16-bit configuration ``lowp``."""
    kind, stochastic, slot_kind = lowp
    widen, narrow = lowp_kernels.CONVERSIONS[kind]
    return dict(WIDEN=widen, NARROW=narrow, STOCHASTIC=bool(stochastic), SLOT16=slot_kind is not None,
                WIDEN_SLOT=lowp_kernels.bf16_to_f32 if slot_kind else lowp_kernels.same)


def _kernel(template, rule_module, used, row_used, has_wd, lowp=None):
    suffix, constants = _helpers(rule_module, tuple(used), row_used, has_wd, lowp)
    return _config.parallel_kernel(
        numba.njit(**_config.CPU_KERNEL_FLAGS)(specialize(template, suffix, **constants)))


def dense_kernel(rule_module, used, has_wd, lowp=None):
    """``kernel(p, g, S, c, wd_lr)`` on flat C-contiguous arrays (``S``: the tuple of slot
    arrays of :func:`place`).

    ``used``: whether the configuration keeps each of the slot arrays (see :func:`place`).
    For a rule with a reduction stage, the two-pass kernel over the whole variable
    (:func:`_reduce_dense_template`).
    """
    if has_reduction(rule_module):
        return _reduce_dense_kernel(rule_module, tuple(used), has_wd, lowp)
    return _dense_kernel(rule_module, used, has_wd, lowp)


@functools.lru_cache(maxsize=None)
def _dense_kernel(rule_module, used, has_wd, lowp):
    return _kernel(_dense_template, rule_module, used, None, has_wd, lowp)


def sparse_kernel(rule_module, used, has_wd, lowp=None):
    """``kernel(p, S, rows, offsets, order, values, c, wd_lr)`` on 2-D rows (for a
    rule with a reduction stage, the two passes on each row: :func:`_reduce_sparse_template`)."""
    if has_reduction(rule_module):
        return _reduce_kernel(_reduce_sparse_template, rule_module, tuple(used), has_wd, lowp)
    return _sparse_kernel(rule_module, used, has_wd, lowp)


@functools.lru_cache(maxsize=None)
def _sparse_kernel(rule_module, used, has_wd, lowp):
    return _kernel(_sparse_template, rule_module, used, None, has_wd, lowp)


def row_dense_kernel(rule_module, used, row_used, has_wd, lowp=None):
    """``kernel(p, g, S, R, c, wd_lr, width)`` for a row-wise rule.

    ``p``, ``g`` and the element slots ``S`` are ``(n, d)``, the row slots ``R`` ``(n,)``;
    ``row_used`` says which of the rule's ``ROW_SLOTS`` are kept; ``width`` is ``d``
    in the variables' dtype.
    """
    return _row_dense_kernel(rule_module, used, row_used, has_wd, lowp)


@functools.lru_cache(maxsize=None)
def _row_dense_kernel(rule_module, used, row_used, has_wd, lowp):
    return _kernel(_row_dense_template, rule_module, used, tuple(row_used), has_wd, lowp)


def row_sparse_kernel(rule_module, used, row_used, has_wd, lowp=None):
    """``kernel(p, S, R, rows, offsets, order, values, c, wd_lr, width)``.

    :func:`row_dense_kernel` on the unique ``rows``, duplicates summed in order.
    """
    return _row_sparse_kernel(rule_module, used, row_used, has_wd, lowp)


@functools.lru_cache(maxsize=None)
def _row_sparse_kernel(rule_module, used, row_used, has_wd, lowp):
    return _kernel(_row_sparse_template, rule_module, used, tuple(row_used), has_wd, lowp)


# ---------------------------------------------------------------- reduction rules
#
# A rule with a reduction stage (``REDUCTION = True``, :mod:`sparseopt.rules.lamb`) updates
# in two passes over a unit: the whole variable in a dense step, each unique row in a sparse
# step. The first pass runs ``reduce_terms`` on every element (after the weight decay): it
# writes the slots, keeps the element's update direction in scratch and sums two terms over
# the unit; ``reduce_scale`` turns the two sums into one scale; the second pass runs
# ``reduce_apply`` on the parameter (the element step of :func:`_step_template`, reading the
# direction as its gradient and the scale as a row value: its weight decay, 16-bit loads and
# rounding are the elementwise kernels'). The dense sums are taken over ``PARTS`` fixed
# blocks, then across blocks in order: the same bits for any number of threads.
# ``dense_kernel`` and ``sparse_kernel`` return these kernels for such a rule (the same
# signatures), so every caller of those runs it.

TERMS = APPLY_STEP = REDUCE_ROW = STORE_SLOTS = KEPT_SLOTS = None  # bound per reduction specialization
REDUCE_TERMS = REDUCE_SCALE = REDUCE_APPLY = None  # the rule's stage, bound likewise


def _store_slots_template(p, S, at, x, v, c):
    """Write the kept slots at ``at``; a 16-bit parameter is written back as it was loaded
    (``x``: an exact 16-bit value, which rounding leaves as it is) with its slots."""
    if LOWP:
        STORE_ROUNDED(p, S, at, x, v, c)
    else:
        KEPT_SLOTS(S, at, v)


def _terms_template(p, S, at, g, c, wd_lr):
    """First pass on element ``at``: ``(direction, term 0, term 1)``; writes the slots."""
    o = LOAD(p, S, at)
    x = o[0]
    y = x
    if HAS_WD:
        y = x - x * wd_lr
    n = REDUCE_TERMS(y, g, o[1:], c)
    STORE_SLOTS(p, S, at, x, n[3:], c)
    return n[0], n[1], n[2]


def _apply_as_row_rule(x, d, v, rv, c):
    """``reduce_apply`` in the element step's row-wise form (``d`` as the gradient, the
    unit's scale as the one row value ``rv[0]``)."""
    return (REDUCE_APPLY(x, d, rv[0], c),) + v


#: Elements whose terms a dense first pass keeps in scratch before summing them (per thread,
#: in L1): the element loop stores, the sum loop adds, so the element loop (divisions, square
#: roots) vectorizes, which a loop carrying a float sum does not (no fast-math reassociation).
REDUCE_CHUNK = 512


@numba.njit(**_config.CPU_RULE_FLAGS)
def _lane_sum(x, n, zero):
    """``x[0] + ... + x[n - 1]`` in a fixed order: eight running sums (element ``i`` in sum
    ``i % 8``), then added pairwise. Eight independent chains instead of one: the sum is not
    bound by the latency of one addition per element. The same bits for any thread count."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero
    i = 0
    while i + 8 <= n:
        a0 += x[i]
        a1 += x[i + 1]
        a2 += x[i + 2]
        a3 += x[i + 3]
        a4 += x[i + 4]
        a5 += x[i + 5]
        a6 += x[i + 6]
        a7 += x[i + 7]
        i += 8
    while i < n:
        a0 += x[i]
        i += 1
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


def _reduce_row_template(p, S, row, grad, src, c, wd_lr, work):
    """Both passes on row ``row`` with the gradient row ``grad[src]`` (``work``: a ``(3, d)``
    scratch of the math dtype: directions, then the two terms)."""
    PREFETCH(p, S, S, row)
    d = p.shape[1]
    for j in range(d):
        dj, a, b = TERMS(p, S, (row, j), grad[src, j], c, wd_lr)
        work[0, j] = dj
        work[1, j] = a
        work[2, j] = b
    zero = wd_lr - wd_lr  # a zero of the math dtype (wd_lr is finite)
    scale = REDUCE_SCALE(_lane_sum(work[1], d, zero), _lane_sum(work[2], d, zero), c)
    for j in range(d):
        APPLY_STEP(p, S, (row, j), work[0, j], (scale,), c, wd_lr)


def _reduce_dense_template(p, g, S, c, wd_lr, direction):
    """The whole flat variable as one unit (see the comment above); ``direction``: scratch of
    ``p.size`` elements of the math dtype. Block ``t`` of ``PARTS`` sums its terms chunk by
    chunk (:data:`REDUCE_CHUNK`, :func:`_lane_sum`); the blocks' sums are added in order."""
    n = p.size
    zero = wd_lr - wd_lr
    sums = np.empty((PARTS, 2), g.dtype)
    terms = np.empty((PARTS, 2, REDUCE_CHUNK), g.dtype)
    for t in prange(PARTS):
        t0 = zero
        t1 = zero
        terms0 = terms[t, 0]
        terms1 = terms[t, 1]
        lo = t * n // PARTS
        hi = (t + 1) * n // PARTS
        while lo < hi:
            count = min(REDUCE_CHUNK, hi - lo)
            # unsigned indices: no negative-index wraparound in the loop, which would stop
            # it from vectorizing (measured: 12 ms instead of 31 for 4M float32 elements)
            base = numba.uint64(lo)
            for j in range(numba.uint64(count)):
                i = base + j
                d, a, b = TERMS(p, S, i, g[i], c, wd_lr)
                direction[i] = d
                terms0[j] = a
                terms1[j] = b
            t0 += _lane_sum(terms0, count, zero)
            t1 += _lane_sum(terms1, count, zero)
            lo += count
        sums[t, 0] = t0
        sums[t, 1] = t1
    t0 = sums[0, 0]
    t1 = sums[0, 1]
    for t in range(1, PARTS):
        t0 += sums[t, 0]
        t1 += sums[t, 1]
    scale = REDUCE_SCALE(t0, t1, c)
    for i in prange(n):
        APPLY_STEP(p, S, i, direction[i], (scale,), c, wd_lr)


def _reduce_sparse_template(p, S, rows, offsets, order, values, c, wd_lr):
    """Each unique row as one unit: :func:`_sparse_template`'s loop over the runs of
    :func:`balanced_parts`, each row through :func:`_reduce_row_template`."""
    d = p.shape[1]
    bounds = balanced_parts(offsets, PARTS, ROW_COST)
    scratch = SCRATCH((PARTS, d), values)
    works = SCRATCH((PARTS, 3, d), values)
    for t in prange(PARTS):
        buf = scratch[t:t + 1]
        work = works[t]
        end = bounds[t + 1]
        for u in range(bounds[t], end):
            AHEAD(p, S, S, rows, offsets, order, values, u, end)
            grad, src = GRADIENT_ROW(buf, values, order, offsets[u], offsets[u + 1])
            REDUCE_ROW(p, S, rows[u], grad, src, c, wd_lr, work)


class _DenseScratch:
    """A dense reduction kernel called as :func:`dense_kernel`'s are, with its directions'
    scratch: one buffer per thread and dtype, kept between steps and grown to the largest
    variable seen (a fresh array of a variable's size per step would cost its page faults,
    about half of a large step)."""

    _local = threading.local()

    def __init__(self, kernel):
        self.kernel = kernel

    def __call__(self, p, g, S, c, wd_lr):
        buffers = self._local.__dict__.setdefault("buffers", {})
        buf = buffers.get(g.dtype)
        if buf is None or buf.size < p.size:
            buf = buffers[g.dtype] = np.empty(p.size, g.dtype)
        self.kernel(p, g, S, c, wd_lr, buf[:p.size])


def has_reduction(rule_module):
    """Whether a rule has a reduction stage (:func:`sparseopt.rules.kind`). Asked per kernel
    call: a dict lookup once the rule's kind is known."""
    return rules.kind(rule_module) == rules.REDUCTION


@functools.lru_cache(maxsize=None)
def _reduce_helpers(rule_module, used, has_wd, lowp):
    """The inline passes of a reduction rule for one slot configuration (``lowp`` as in
    :func:`_specialized_helpers`)."""
    inline = numba.njit(**_config.CPU_RULE_FLAGS)
    suffix = f"{rule_key(rule_module)}_{_flags(used)}{'_wd' if has_wd else ''}"
    constants = dict(HAS_WD=bool(has_wd), ROWWISE=True, LOWP=lowp is not None,
                     REDUCE_TERMS=_compile.on_tuples(rule_module, "reduce_terms", _compile.CPU, len(used)),
                     REDUCE_SCALE=_rule_function(rule_module, "reduce_scale"),
                     REDUCE_APPLY=_rule_function(rule_module, "reduce_apply"),
                     # a sparse step's gradient rows: 16-bit ones widened as they are read
                     GRADIENT_ROW=_gradient_reader(lowp[0] if lowp else None),
                     SCRATCH=_scratch_float32 if lowp else _scratch_like)
    constants["KEPT_SLOTS"] = inline(specialize(_slots.store_slots(used, __name__), suffix, **constants))
    if lowp is not None:
        suffix += lowp_suffix(lowp)
        constants.update(lowp_constants(lowp))
    # The second pass touches only the parameter: its load and store keep no slot.
    apply = dict(constants)
    for where, tag, kept in ((constants, "t", used), (apply, "a", (False,) * len(used))):
        where.update(load_store(kept, lowp, where, f"{suffix}_{tag}", inline))
    apply["RULE"] = inline(specialize(_apply_as_row_rule, suffix, **apply))
    constants["STORE_SLOTS"] = inline(specialize(_store_slots_template, suffix, **constants))
    constants["TERMS"] = inline(specialize(_terms_template, suffix, **constants))
    constants["APPLY_STEP"] = inline(specialize(_step_template, f"{suffix}_a", **apply))
    constants["PREFETCH"] = inline(specialize(_slots.prefetch(used, (), __name__), suffix, **constants))
    constants["AHEAD"] = inline(specialize(_ahead_template, suffix, **constants))
    constants["ROW_COST"] = 2 * (1 + sum(used))
    constants["REDUCE_ROW"] = inline(specialize(_reduce_row_template, suffix, **constants))
    return f"{suffix}_reduce", constants


@functools.lru_cache(maxsize=None)
def _reduce_kernel(template, rule_module, used, has_wd, lowp):
    suffix, constants = _reduce_helpers(rule_module, tuple(used), has_wd, lowp)
    return _config.parallel_kernel(
        numba.njit(**_config.CPU_KERNEL_FLAGS)(specialize(template, suffix, **constants)))


@functools.lru_cache(maxsize=None)
def _reduce_dense_kernel(rule_module, used, has_wd, lowp):
    return _DenseScratch(_reduce_kernel(_reduce_dense_template, rule_module, used, has_wd, lowp))


def place(rule_slots, kept, placeholder):
    """The slot arrays of a kernel (the tuple ``S``, or ``R`` of row slots) and their ``used`` flags.

    Args:
        rule_slots: the rule's ``SLOTS`` (or ``ROW_SLOTS``), in order.
        kept: ``{slot name: array}`` of the slots this configuration keeps.
        placeholder: passed where a slot is not kept (never touched by the kernel), and as the
            one array of a rule without slots (:func:`sparseopt.kernels._slots.count`).
    """
    arrays = [kept.get(name, placeholder) for name in rule_slots]
    used = tuple(name in kept for name in rule_slots)
    pad = _slots.count(rule_slots) - len(arrays)
    return tuple(arrays) + (placeholder,) * pad, used + (False,) * pad


def slot_rows(rule_slots, kept_slots):
    """Where each of the rule's slots lives in a storage that holds ``kept_slots`` in order."""
    rows = [kept_slots.index(name) if name in kept_slots else -1 for name in rule_slots]
    return tuple(rows + [-1] * (_slots.count(rule_slots) - len(rows)))


_slots.register(__name__, globals())
