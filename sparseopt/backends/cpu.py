"""The CPU backend: NumPy variables, updated in place by the Numba CPU kernels.

What the core asks of a backend (:class:`sparseopt.backends.Backend`) for a NumPy
variable: its checks (:func:`check_variable`, :func:`dense_gradient`,
:func:`sparse_gradient`, :func:`sparse_gradients`: the one implementation of these
checks, for the core optimizer and the TensorFlow bridge's host step alike, so a bad
input gets the same exception and message whichever way it came; they write nothing),
its slot storage (:func:`slot_storage`, on a 64-byte cache line: :func:`aligned_empty`),
and the step objects: :class:`DenseUpdate`, :class:`SparseUpdate` (planned alone or with
the step's other tables, :func:`plan_sparse`), and the table-batched regions
(:func:`run_tables`, :func:`run_exact_tables`: every table of a kernel configuration in
one parallel region over all their unique rows, with the per-table path's bits).

The checks return the arrays the kernels take: C-contiguous, without a copy where the
input already is.
"""

import math

import numpy as np

from sparseopt import _validation, errors
from sparseopt.backends._detect import is_device_array
from sparseopt.indexed_slices import IndexedSlices
from sparseopt.kernels import cpu, dedup, lowp
from sparseopt.kernels import exact as exact_kernels

#: NumPy arrays live on the host (:class:`sparseopt.backends.Backend`).
on_device = False

_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)
_INT32, _INT64 = np.dtype(np.int32), np.dtype(np.int64)


# ------------------------------------------------------------------------- checks


def check_variable(var, name, low_precision=True):
    """A NumPy variable the CPU kernels can update in place: float32 or float64 (or,
    with ``low_precision``, bfloat16 or float16), C-contiguous and writeable."""
    if var.dtype not in _validation.FLOAT_DTYPES and not (low_precision and lowp.kind(var.dtype)):
        allowed = "float32, float64, bfloat16 (ml_dtypes) or float16" if low_precision else "float32 or float64"
        raise errors.DtypeMismatchError(f"{name!r}: variables must be {allowed}; got {var.dtype}")
    flags = var.flags
    if not flags.c_contiguous:
        raise errors.ArrayLayoutError(
            f"{name!r}: variables must be C-contiguous (they are updated in place); "
            f"got strides {var.strides}")
    if not flags.writeable:
        raise errors.ArrayLayoutError(f"{name!r}: the variable is read-only")


def dense_gradient(g, var, name):
    """The dense gradient ``g`` of NumPy variable ``var``, checked: a C-contiguous array
    of the variable's shape and dtype."""
    if not isinstance(g, np.ndarray):
        if is_device_array(g):
            raise errors.DeviceMismatchError(
                f"{name!r}: the gradient is a CUDA array but the variable is a NumPy array")
        g = np.asarray(g)
    _validation.check_gradient_dtype(name, var, g.dtype)
    if g.shape != var.shape:
        raise errors.ShapeMismatchError(
            f"{name!r}: gradient shape {g.shape} differs from the variable's {var.shape}")
    return _validation.math_values(np.ascontiguousarray(g))


def sparse_gradient(g, var, name):
    """The ``IndexedSlices``-like ``g`` (``values``, ``indices``, ``dense_shape``) of NumPy
    variable ``var``, checked.

    Returns:
        ``(values, indices)``: ``values`` C-contiguous of shape ``(k, row size)``, of the
        gradient's dtype (16-bit values are not widened: the sparse kernels widen them
        row by row as they read them, :class:`SparseUpdate`),
        ``indices`` a C-contiguous 1-D int32 or int64 array of ``k`` entries (not yet
        range-checked: :func:`sparseopt._validation.plan` does that).
    """
    values, indices = g.values, g.indices
    if type(values) is not np.ndarray or type(indices) is not np.ndarray:
        if is_device_array(values) or is_device_array(indices):
            raise errors.DeviceMismatchError(
                f"{name!r}: the gradient values are a CUDA array but the variable is a NumPy array")
        values = np.asarray(values)
        indices = np.asarray(indices)
    _validation.check_sparse_layout(name, var, values, indices, getattr(g, "dense_shape", None))
    if indices.dtype.itemsize < 4 or indices.dtype.kind == "u":  # int8/16, uint8/16/32 (uint64 refused)
        indices = indices.astype(np.int64)
    elif not indices.flags.c_contiguous:
        indices = np.ascontiguousarray(indices)
    if values.ndim != 2 or not values.flags.c_contiguous:  # else already (k, row size)
        values = np.ascontiguousarray(values).reshape(values.shape[0], math.prod(var.shape[1:]))
    return values, indices


def sparse_gradients(items):
    """:func:`sparse_gradient` of several pairs in one pass (the sparse pairs of a step).

    The common case (NumPy values and indices, int32 or int64 indices, 2-D C-contiguous
    values of a 2-D float32 or float64 variable's dtype and row width, a matching or
    absent ``dense_shape``) is recognised with a few attribute reads (dtypes compared by
    identity: NumPy's built-in dtypes are singletons) and returns the arrays themselves,
    as :func:`sparse_gradient` would; any other pair goes through :func:`sparse_gradient`,
    which converts it or raises its error (the same exception and message either way).

    Args:
        items: ``(gradient, variable, name)`` triples; the variables already checked
            (:func:`check_variable`).

    Returns:
        ``(checked, error)``: ``(values, indices)`` of each item before the first bad one,
        and that item's exception (None if every item passed). Nothing is raised, so the
        caller can order this error among its other checks.
    """
    checked = []
    append = checked.append
    for g, var, name in items:
        values = g.values
        indices = g.indices
        if type(values) is np.ndarray and type(indices) is np.ndarray:
            dtype = values.dtype
            index_dtype = indices.dtype
            shape = var.shape
            row_shape = values.shape
            dense_shape = getattr(g, "dense_shape", None)
            if ((dtype is _FLOAT32 or dtype is _FLOAT64) and dtype is var.dtype
                    and (index_dtype is _INT64 or index_dtype is _INT32) and indices.ndim == 1
                    and len(row_shape) == 2 and len(shape) == 2 and row_shape[1] == shape[1]
                    and row_shape[0] == indices.shape[0] and (dense_shape is None or dense_shape == shape)
                    and values.flags.c_contiguous and indices.flags.c_contiguous):
                append((values, indices))
                continue
        try:
            append(sparse_gradient(g, var, name))
        except Exception as exc:  # returned, not raised: no chained traceback in the caller
            return checked, exc
    return checked, None


def validate(g, var, name, store=None):
    """The update of one ``(gradient, variable)`` pair of a checked NumPy variable: a
    :class:`DenseUpdate`, or a :class:`SparseUpdate`, planned."""
    if isinstance(g, IndexedSlices):
        values, indices = sparse_gradient(g, var, name)
        update = SparseUpdate(values, indices, name)
        update.plan(var)
        return update
    return DenseUpdate(dense_gradient(g, var, name))


def finish_validation(updates, batch=False):
    """Nothing left to check: a NumPy variable's checks and plans ran on the host."""


# ------------------------------------------------------------------- slot storage

#: Alignment of the slot storage: a cache line. NumPy aligns its data to 16 bytes, so a
#: 256-byte float32 row of a random sparse step touches 5 lines (4 when aligned) and a
#: 128-byte bfloat16 row 3 (2 when aligned).
ALIGNMENT = 64


def aligned_empty(shape, dtype, alignment=ALIGNMENT):
    """An uninitialized C-contiguous array whose data starts on an ``alignment``-byte boundary
    (a view of a slightly larger byte buffer, which it keeps alive)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def variable_kind(var):
    """``"bfloat16"`` or ``"float16"`` for a 16-bit NumPy variable, else None."""
    return lowp.kind(var.dtype)


def slot_storage(var, initial_values, slot_kind=None):
    """One C-contiguous array ``(len(initial_values), *var.shape)`` on a cache line
    (:func:`aligned_empty`), filled slot by slot: of the variable's dtype, float32 for a
    16-bit variable, or bfloat16 where ``slot_kind`` is ``"bfloat16"``."""
    kind = lowp.kind(var.dtype)
    dtype = lowp.BFLOAT16 if slot_kind and kind else (np.float32 if kind else var.dtype)
    storage = aligned_empty((len(initial_values),) + var.shape, dtype)
    for i, value in enumerate(initial_values):
        storage[i, ...].fill(value)
    return storage


def slot_view(storage, i):
    """Slot ``i`` of a storage: a view, also for a 0-d variable (``storage[i]`` is a scalar copy)."""
    return storage[i, ...]


def row_slot_storage(var, initial_values):
    """The row slots of a row-wise rule: one ``(len(initial_values), rows)`` array (rows: the
    first axis; a 0-d variable is one row) in the math's dtype (the variable's, float32 for a
    16-bit one, also with bfloat16 slots), filled slot by slot."""
    dtype = np.float32 if lowp.kind(var.dtype) else var.dtype
    storage = np.empty((len(initial_values), var.shape[0] if var.ndim else 1), dtype)
    for i, value in enumerate(initial_values):
        storage[i].fill(value)
    return storage


def to_device(array):
    """A host array as the CPU keeps it: itself."""
    return array


def to_host(array):
    """A copy of a NumPy array."""
    return np.array(array, copy=True)


def host_array(array):
    """A NumPy array: itself."""
    return array


def copy_from_host(array, host):
    """``array[...] = host`` (cast as NumPy's ``same_kind``)."""
    np.copyto(array, host, casting="same_kind")


def dtype_of(array):
    """A NumPy array's dtype."""
    return array.dtype


# ------------------------------------------------------------------------- exact mode


def exact_device(var, hist, tab, lowp_config):
    """None: a NumPy variable's exact-mode bookkeeping lives on the host (``ExactState.last``)."""
    return None


def exact_rows(store, state, indices, stream, validate_rows):
    """``(rows, count)``: the unique rows of ``indices`` for a catch-up (``validate_rows``)."""
    rows = validate_rows(state, indices)
    return rows, rows.size


# ------------------------------------------------------------------------- updates


def work(updates, exact_states):
    """The elements a step's CPU kernels touch: gradient elements read, plus parameter and
    slot elements read and written (the thread count's measure, :func:`_config.enter_step`).
    In exact mode a variable whose history ring is full is caught up whole in this step
    (:func:`sparseopt._exact._push`): a pass over every row, counted as such."""
    work = 0
    for state, update in updates:
        if exact_states:
            ex = exact_states.get(id(state.var))
            if ex is not None and ex.pending() and ex.steps + 1 - ex.floor >= ex.history:
                work += (2 + 2 * len(state.slots)) * state.var.size
        kind = type(update)
        if kind is SparseUpdate:
            values = update.values
            n = values.shape[0]
            if n:
                work += values.size + (2 + 2 * len(state.slots)) * (values.size // n) * update.rows.size
        elif kind is DenseUpdate:
            work += (3 + 2 * len(state.slots)) * update.values.size
    return work


class DenseUpdate:
    """A validated dense gradient of a NumPy variable (``values``: the variable's shape, in
    the math's dtype)."""

    on_device = False
    sparse = False
    __slots__ = ("values",)

    def __init__(self, values):
        self.values = values

    @classmethod
    def validate(cls, g, var, name):
        return cls(dense_gradient(g, var, name))

    def map_values(self, fn):
        self.values = fn(self.values)

    def norm(self):
        return float(np.sqrt(np.sum(np.square(self.values, dtype=np.float64))))

    def run(self, rule, state, c, wd, has_wd):
        p, slots, used = state.kernel_arrays(rule.SLOTS, (-1,))
        rounding, c = kernel_step(state, c)
        cpu.dense_kernel(rule, used, has_wd, rounding)(p, self.values.reshape(-1), slots, c, wd)

    def run_rowwise(self, rule, state, row_slots, c, wd, has_wd):
        """:meth:`run` for a row-wise rule (``row_slots``: ``{name: (rows,) view}`` of its kept
        row slots): every row, through the row-reduction kernel."""
        rows, width, p, slots, used, rslots, row_used = _row_arrays(rule, state, row_slots)
        rounding, c = kernel_step(state, c)
        kernel = cpu.row_dense_kernel(rule, used, row_used, has_wd, rounding)
        kernel(p, self.values.reshape(rows, width), slots, rslots, c, wd, type(wd)(width))

    def constrain(self, var, fn):
        np.copyto(var, _constrained(fn(var), var.shape, var.dtype), casting="same_kind")


class SparseUpdate:
    """A validated sparse gradient. ``values``: float32/float64 rows, or the ``uint16`` bits
    of a 16-bit variable's own-dtype gradient (``kind`` says which: None, ``"bfloat16"``
    or ``"float16"``), which the lazy kernels widen as they read each row; what needs the
    values as floats (clipping, exact mode) calls :meth:`widen` first."""

    on_device = False
    sparse = True
    __slots__ = ("values", "indices", "rows", "offsets", "order", "name", "summed", "at", "kind")

    def __init__(self, values, indices, name):
        self.kind = lowp.kind(values.dtype)
        self.values = lowp.as_bits(values) if self.kind else values
        self.indices = indices
        self.name = name
        self.summed = False
        self.at = None  # (plan, unique start, offsets start, order start) in a plan_sparse plan

    @classmethod
    def validate(cls, g, var, name):
        values, indices = sparse_gradient(g, var, name)
        return cls(values, indices, name)

    def widen(self):
        """16-bit gradient values widened to a float32 copy (exact), as the kernels widen them."""
        if self.kind:
            self.values = lowp.widen_bits(self.values, self.kind)
            self.kind = None

    def plan(self, var):
        self.rows, self.offsets, self.order = _validation.plan(self.indices, var.shape[0], self.name)

    def _sum_duplicates(self):
        self.widen()
        if not self.summed:
            self.values = dedup.segment_sum(self.values, self.offsets, self.order)
            self.offsets, self.order = dedup.identity_plan(self.rows.size)
            self.summed = True
            self.at = None

    def map_values(self, fn):
        self._sum_duplicates()
        self.values = np.ascontiguousarray(fn(self.values))

    def norm(self):
        self._sum_duplicates()
        return float(np.sqrt(np.sum(np.square(self.values, dtype=np.float64))))

    def run(self, rule, state, c, wd, has_wd):
        if self.rows.size == 0:
            return
        p, slots, used = state.kernel_arrays(rule.SLOTS, (state.var.shape[0], self.values.shape[1]))
        rounding, c = kernel_step(state, c)
        cpu.sparse_kernel(rule, used, has_wd, rounding)(p, slots, self.rows, self.offsets, self.order,
                                                        self.values, c, wd)

    def run_rowwise(self, rule, state, row_slots, c, wd, has_wd):
        """:meth:`run` for a row-wise rule: the unique rows, through the row-reduction kernel."""
        rows, width, p, slots, used, rslots, row_used = _row_arrays(rule, state, row_slots)
        if self.rows.size == 0:
            return
        rounding, c = kernel_step(state, c)
        kernel = cpu.row_sparse_kernel(rule, used, row_used, has_wd, rounding)
        kernel(p, slots, rslots, self.rows, self.offsets, self.order, self.values, c, wd, type(wd)(width))

    def constrain(self, var, fn):
        if self.rows.size:
            var[self.rows] = _constrained(fn(var[self.rows]), (self.rows.size,) + var.shape[1:],
                                          var.dtype)


def _row_arrays(rule, state, row_slots):
    """``(rows, width, p, slots, used, row slots, row_used)``: a row-wise rule's kernel views of
    the variable as ``(rows, width)`` (a 0-d variable is one row), of its slots and row slots."""
    var = state.var
    rows = var.shape[0] if var.ndim else 1
    width = math.prod(var.shape[1:])
    p, slots, used = state.kernel_arrays(rule.SLOTS, (rows, width))
    rslots, row_used = state.kernel_views(
        ("rows", rule.ROW_SLOTS, rows),
        lambda: cpu.place(rule.ROW_SLOTS, {n: v.reshape(rows) for n, v in row_slots.items()},
                          p[:, 0] if width else p.reshape(rows)))
    return rows, width, p, slots, used, rslots, row_used


def plan_sparse(pending):
    """The de-duplication plans of the sparse updates ``pending`` (``[(update, table rows)]``,
    in pair order): the tables whose indices share a dtype in one call
    (:func:`sparseopt.kernels.dedup.plan_tables`; each update's ``rows``, ``offsets``,
    ``order`` are views of the shared plan and ``at`` says where). The same plans as
    ``update.plan`` one by one, and the same error: the first bad table in pair order
    raises :class:`~sparseopt.errors.IndexOutOfRangeError` (its own plan, remade to raise it)."""
    if not pending:
        return
    by_dtype = {}
    alone = []
    for position, (update, num_rows) in enumerate(pending):
        if num_rows > dedup.INT32_LIMIT or update.indices.size > dedup.INT32_LIMIT:
            alone.append(position)
        else:
            by_dtype.setdefault(update.indices.dtype, []).append(position)
    bad = []
    for positions in by_dtype.values():
        if len(positions) == 1:
            alone.extend(positions)
            continue
        updates = [pending[i][0] for i in positions]
        rows, offsets, order, ustart, ostart, failed = dedup.plan_tables(
            [u.indices for u in updates], [pending[i][1] for i in positions])
        if failed >= 0:
            bad.append(positions[failed])
            continue
        plan = (rows, offsets, order)
        u0 = ustart.tolist()
        o0 = ostart.tolist()
        for j, update in enumerate(updates):
            update.rows = rows[u0[j]:u0[j + 1]]
            update.offsets = offsets[u0[j] + j:u0[j + 1] + j + 1]
            update.order = order[o0[j]:o0[j + 1]]
            update.at = (plan, u0[j], u0[j] + j, o0[j])
    for position in alone:
        update, num_rows = pending[position]
        rows, offsets, order, failed = dedup.plan_rows(update.indices, num_rows)
        if failed >= 0:
            bad.append(position)
        else:
            update.rows, update.offsets, update.order = rows, offsets, order
    if bad:
        update, num_rows = pending[min(bad)]
        _validation.plan(update.indices, num_rows, update.name)  # raises IndexOutOfRangeError
        raise AssertionError("a bad index that plans")  # pragma: no cover


def widen_sparse(updates):
    """16-bit sparse gradient values of ``updates`` (``(state, update)`` pairs, a row-wise
    rule's wrapped) widened to float32 (:meth:`SparseUpdate.widen`): exact mode's kernels
    read float values."""
    for _, update in updates:
        inner = getattr(update, "update", update)
        if type(inner) is SparseUpdate:
            inner.widen()


def kernel_step(state, c):
    """``(lowp, c)`` for a kernel on ``state``'s variable (:meth:`VariableState.kernel_step`:
    ``(None, c)`` for a float32/float64 variable, or a state without it)."""
    step = getattr(state, "kernel_step", None)
    return (None, c) if step is None else step(c)


def table_key(rule, state, update, dtype, has_wd):
    """The kernel configuration under which a lazy sparse update of a NumPy variable runs
    in a table-batched region (:func:`run_tables`), or None (it runs on its own). A 16-bit
    variable's includes its rounding (``state.lowp``: kind, stochastic, slot kind), so
    bfloat16, float16 and float32 tables of one call run in regions of their own, and whether
    its gradient values are 16-bit (``inner.kind``), which the region reads as bits. The
    caller has checked that ``rule`` has no reduction stage (``cpu.has_reduction``)."""
    if type(update) is SparseUpdate:
        inner = update
        row_names = None
    else:  # a row-wise optimizer's update (optimizers._rowwise._RowUpdate)
        inner = getattr(update, "update", None)
        if type(inner) is not SparseUpdate or 0 in state.var.shape[1:]:
            return None
        row_names = tuple(update.row_slots)
    lowp_config = getattr(state, "lowp", None)
    if not inner.rows.size or type(state.var) is not np.ndarray or (
            lowp_config is None and getattr(state, "kind", None) is not None):
        return None
    return rule, dtype, has_wd, state.kernel_slot_names, row_names, (lowp_config, inner.kind)


def _table_views(rule, state, row_names):
    """``(head, tail, used, row_used, p, slot)`` of one table for :func:`run_tables`: the
    step-invariant columns of ``meta`` (see :mod:`sparseopt.kernels.cpu`: ``head``, the
    parameter's address, rows and width; ``tail``, the addresses of the slots and row slots,
    its last columns), which slots the kernel uses, and the kernel's views of the parameter
    and of a kept slot (``p`` if none: the kernels' type of each). Kept per state."""
    def make():
        var = state.var
        rows = var.shape[0]
        width = math.prod(var.shape[1:])
        p, slots, used = state.kernel_arrays(rule.SLOTS, (rows, width))
        if row_names is None:
            row_slots, row_used = (), None
        else:
            row_slots, row_used = cpu.place(rule.ROW_SLOTS, {n: state.slots[n] for n in row_names}, p)
        head = [dedup.address(p), rows, width]
        tail = [dedup.address(a) for a in tuple(slots) + tuple(row_slots)]
        return head, tail, used, row_used, p, next((s for s, u in zip(slots, used) if u), p)
    return state.kernel_views(("tables", rule.SLOTS, row_names), make)


_NO_WIDTHS = {}  # dtype -> an empty array: the widths argument of elementwise rules


def run_tables(rule, group, c, wd, has_wd, row_names):
    """The lazy sparse updates ``group`` (``[(state, update)]``, one kernel configuration,
    two or more tables of any rows and widths) in one parallel region
    (:func:`sparseopt.kernels.cpu.batched_sparse_kernel`): the same row steps, so the
    same bits, as ``update.run`` table by table (16-bit tables: the same rounding key,
    the step's, and each element's bits from its index in its own table)."""
    inners = [update if row_names is None else update.update for _, update in group]
    meta, vstart, plan, (used, row_used, like, slot_like) = _tables_meta(
        rule, [state for state, _ in group], inners, row_names)
    dtype = type(wd)
    lowp_config, c = kernel_step(group[0][0], c)  # one rounding and key for the whole group
    grad16 = inners[0].kind is not None  # the group's gradient values are all 16-bit bits, or none
    if row_names is None:
        kernel = cpu.batched_sparse_kernel(rule, used, has_wd, lowp_config, grad16)
        w = _no_widths(dtype)
    else:
        w = np.array(meta[:, cpu.M_WIDTH], dtype)
        kernel = cpu.batched_row_sparse_kernel(rule, used, row_used, has_wd, lowp_config, grad16)
    kernel(meta, vstart, *plan, like, slot_like, c, wd, w)


def _no_widths(dtype):
    """An empty array of ``dtype``: the widths argument of elementwise rules."""
    w = _NO_WIDTHS.get(dtype)
    if w is None:
        w = _NO_WIDTHS[dtype] = np.empty(0, dtype)
    return w


def _tables_meta(rule, states, inners, row_names, extra=None):
    """``(meta, vstart, (rows, offsets, order), (used, row_used, like, slot_like))`` of the
    table-batched kernels for the planned sparse updates ``inners`` of ``states``: ``meta``
    (:mod:`sparseopt.kernels.cpu`'s columns, then each table's ``extra`` columns, a tuple
    per table, then the addresses of its slots and row slots) and the concatenated plan,
    which is the plan the updates were made in together (:func:`plan_sparse`) when it is one,
    else their own plans concatenated. The used slots and kernel views are the first table's
    (the group shares its configuration)."""
    flat = []
    ks = [0]
    plan = inners[0].at
    plan = plan[0] if plan is not None else None
    views = None
    for t, (state, inner) in enumerate(zip(states, inners)):
        head, tail, used, row_used, like, slot_like = _table_views(rule, state, row_names)
        if views is None:
            views = (used, row_used, like, slot_like)
        flat += head
        at = inner.at
        if at is None or at[0] is not plan:
            plan = None
        flat += (dedup.address(inner.values), 0, 0, 0, inner.order.size) if at is None else \
            (dedup.address(inner.values), at[1], at[2], at[3], inner.order.size)
        if extra is not None:
            flat += extra[t]
        flat += tail
        ks.append(ks[-1] + inner.rows.size)
    meta = np.array(flat, np.int64).reshape(len(inners), -1)
    if plan is not None:
        rows, offsets, order = plan
    else:  # plans of their own (summed by clipping, or made alone): concatenated
        rows = np.concatenate([u.rows for u in inners])
        offsets = np.concatenate([u.offsets for u in inners])
        order = np.concatenate([u.order for u in inners])
        meta[:, cpu.M_UNIQUE] = ks[:-1]
        meta[:, cpu.M_OFFSETS] = np.array(ks[:-1]) + np.arange(len(inners))
        meta[:, cpu.M_ORDER] = np.cumsum([0] + [u.order.size for u in inners[:-1]])
    return meta, np.array(ks, np.int64), (rows, offsets, order), views


def run_exact_tables(rule, group, c, wd, has_wd, lowp_config, zero, tol):
    """Exact mode's sparse updates ``group`` (``[(state, update, ex, floor, hi)]``: a planned
    :class:`SparseUpdate` of a NumPy variable, its :class:`~sparseopt._exact.ExactState`
    and the ``floor`` and step count ``hi`` it is caught up from and to; two or more tables
    of one kernel configuration, any rows and widths) in one parallel region
    (:func:`sparseopt.kernels.exact.batched_sparse_kernel`): the same catch-ups and row
    steps, so the same bits, as :func:`sparseopt.kernels.exact.sparse_kernel` table by
    table. ``c``: the step's coefficients (a 16-bit group's with the step's rounding key),
    ``has_wd``: the tables' ``ex.has_wd``, ``lowp_config`` their ``ex.lowp``."""
    # each table's exact-mode columns of meta (exact_kernels.X_LAST to X_TAB_COLUMNS)
    extra = [(dedup.address(ex.last), dedup.address(ex.hist), dedup.address(ex.tab), floor, hi,
              ex.hist.shape[0], ex.tab.shape[1]) for _, _, ex, floor, hi in group]
    meta, vstart, plan, (used, _, like, slot_like) = _tables_meta(
        rule, [g[0] for g in group], [g[1] for g in group], None, extra)
    ex = group[0][2]
    kernel = exact_kernels.batched_sparse_kernel(rule, used, has_wd, lowp_config)
    kernel(meta, vstart, *plan, like, slot_like, ex.hist, ex.tab, _no_widths(type(wd)), c, wd, zero, tol)


def _constrained(out, shape, dtype):
    """A constraint's result, checked to replace an array of ``shape`` and ``dtype``."""
    if out is None:
        raise errors.ConstraintError(f"constraint returned None; expected an array of shape {shape}")
    out = np.asarray(out)
    if out.shape != tuple(shape):
        raise errors.ShapeMismatchError(
            f"constraint returned shape {out.shape}; expected the shape it was given, {tuple(shape)}")
    if not np.can_cast(out.dtype, dtype, casting="same_kind"):
        raise errors.ConstraintError(
            f"constraint returned dtype {out.dtype}; expected a float array ({np.dtype(dtype)})")
    return out
