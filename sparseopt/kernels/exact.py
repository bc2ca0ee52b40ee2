"""CPU kernels of ``sparse_mode="exact"``: catch-up of idle rows fused into the row update.

A variable in exact mode keeps (see :mod:`sparseopt._exact`)

* ``hist``: a ring of the last ``H`` steps' coefficients, a NumPy structured array
  whose fields are the rule's ``Coefficients`` plus ``wd`` (the decoupled weight decay
  factor of the step), in the variable's math dtype (float32 for a 16-bit variable, whose
  records also keep the step's ``rounding_key``); step ``tau`` lives at ``hist[tau % H]``.
  A Numba record reads ``rec.alpha`` as the NamedTuple does, so ``RULE`` replays a
  past step with the very coefficients it had;
* ``last``: int64 per row, the step through which the row is current (effective value
  ``max(last[r], floor)``);
* ``tab``: float64 ``(H, IDLE_COLUMNS)``, the rule's per-window scalars: row ``L % H``
  describes the idle window ``(L, hi]`` (:func:`idle_tables`, recomputed per step).

Per unique row with effective ``L < hi``, every element is first caught up over the
window (the rule's ``idle_apply`` closed form or truncated series, in a vectorized pass
over the row; the elements where that fails are retried with the full series, then by a
replay of ``RULE`` with a zero gradient, always bounded by ``H``), then the ordinary element step
(``cpu._step_template``) runs in the same pass; ``last[r]`` becomes ``hi + 1``.
Each row is owned by one thread, as in the lazy kernels. A 16-bit variable's caught-up
values are rounded once per window, with the random bits of its last step
(:func:`_save_template`).
"""

import functools

import numba
import numpy as np
from numba import prange

from sparseopt import _config
from sparseopt.kernels import _compile, _slots, cpu
from sparseopt.kernels import lowp as lowp_kernels
from sparseopt.kernels._specialize import rule_key, specialize
from sparseopt.kernels.dedup import pointer
from sparseopt.rules import _idle

RULE = STEP = LOAD = STORE = CATCH = CATCH_ROW = REPLAY = AHEAD = IDLE_APPLY = IDLE_APPLY_FAST = None  # bound per specialization
TABLE_INIT = TABLE_STEP = SAVE = STORE_ROUNDED = WIDEN = NARROW = CAST = SELECT = None
LOWP = STOCHASTIC = False  # bound per specialization: a 16-bit variable (sparseopt.kernels.lowp)

#: Terms of the eps-series in the first, vectorized pass of the CPU catch-up (the tables
#: keep ``_idle.SERIES_TERMS``): enough for float32 and float64 when ``eps / sqrt(v)`` is
#: small, as it is in practice; an element where they are not is retried with all terms.
FAST_SERIES_TERMS = 6
#: How ``IDLE_APPLY_FAST`` compiles a rule's ``idle_apply`` (the ``rebind`` of
#: :func:`sparseopt.kernels._compile.function`): the helpers of :mod:`sparseopt.rules._idle`
#: sum :data:`FAST_SERIES_TERMS` terms.
SHORT_SERIES = ((_idle, (("SERIES_TERMS", FAST_SERIES_TERMS),)),)
HAS_WD = ROW_STEP = ROW_COST = PREFETCH = None
TABLE_ROWS = SLOT_VIEWS = NS = NR = None  # bound per table-batched specialization


def _replay_template(p, S, at, hist, lo, hi, zero):
    """Bring element ``at`` from step ``lo`` to step ``hi`` by replaying ``RULE`` with a
    zero gradient and each step's own coefficients (bit for bit the dense rule)."""
    o = LOAD(p, S, at)
    n = hist.shape[0]
    for tau in range(lo + 1, hi + 1):
        rec = hist[tau % n]
        x = o[0]
        if HAS_WD:
            x = x - x * rec.wd
        o = RULE(x, zero, o[1:], rec)
    SAVE(p, S, at, o[0], o[1:], hist[hi % n])


def _save_template(p, S, at, x, v, c):
    """Write element ``at`` after idle steps through ``c``'s step: as it is, or, for a
    16-bit variable, rounded with that step's random bits (``c.rounding_key``: the
    record or coefficients of the window's last step), once for the whole window, from the
    value as float32 (the closed forms compute in float64, as they do for a float32 variable)."""
    if LOWP:
        STORE_ROUNDED(p, S, at, np.float32(x), CAST(v), c)
    else:
        STORE(p, S, at, x, v)


def _catch_up_template(p, S, at, hist, lo, hi, trow, c_idle, zero, tol):
    """Bring element ``at`` of ``p`` and its slots from step ``lo`` to step ``hi`` with all
    the series' terms, else by the replay: the retry of an element whose short series
    failed (:func:`_catch_up_row_template`, :func:`_catch_up_element_template`)."""
    o = LOAD(p, S, at)
    n = IDLE_APPLY(o[0], o[1:], trow, c_idle, tol, zero)
    if n[1]:
        SAVE(p, S, at, n[0], n[2:], c_idle)
    else:
        REPLAY(p, S, at, hist, lo, hi, zero)


def _catch_up_element_template(p, S, at, hist, lo, hi, trow, c_idle, zero, tol):
    """Element ``at`` as :func:`_catch_up_row_template` brings it (the CUDA kernels' catch-up:
    one thread per element): the short series, then :func:`_catch_up_template` where it fails."""
    o = LOAD(p, S, at)
    n = IDLE_APPLY_FAST(o[0], o[1:], trow, c_idle, tol, zero)
    if n[1]:
        SAVE(p, S, at, n[0], n[2:], c_idle)
    else:
        CATCH(p, S, at, hist, lo, hi, trow, c_idle, zero, tol)


def _catch_up_row_template(p, S, r, hist, lo, hi, trow, c_idle, zero, tol, redo):
    """Bring row ``r`` from step ``lo`` to step ``hi`` (the CPU kernels' catch-up).

    A first pass applies the rule's ``idle_apply`` with a short series
    (``IDLE_APPLY_FAST``: :data:`FAST_SERIES_TERMS` terms) to every element. The rules
    write ``idle_apply`` branch-free (every case computed, then selected), so the pass
    vectorizes. It stores the result where that succeeded and the unchanged element
    elsewhere, and marks those in ``redo`` (a row of scratch). A second pass retries
    the marked elements with the full series, then replays those where that fails too;
    both are rare (a series that converges slowly, a moment that underflowed).
    """
    d = p.shape[1]
    again = 0
    for j in range(d):
        o = LOAD(p, S, (r, j))
        n = IDLE_APPLY_FAST(o[0], o[1:], trow, c_idle, tol, zero)
        x = o[0]
        x2 = n[0]
        ok = n[1]
        redo[j] = not ok
        again += 0 if ok else 1
        # (an element left for the second pass is stored unchanged: exact also for a
        # 16-bit variable, whose widened value rounds back to itself)
        SAVE(p, S, (r, j), x2 if ok else x, SELECT(ok, n[2:], o[1:]), c_idle)
    if again:
        for j in range(d):
            if redo[j]:
                CATCH(p, S, (r, j), hist, lo, hi, trow, c_idle, zero, tol)


def _exact_sparse_template(p, S, rows, offsets, order, values, last, floor, hi, hist,
                           tab, c, wd_lr, c_idle, zero, tol):
    """Step ``hi + 1`` (coefficients ``c``, ``wd_lr``: the NamedTuple, so they stay in
    registers) on the unique ``rows`` (duplicates summed in order), each first caught up
    from its last step to ``hi`` (``c_idle``: step ``hi``'s coefficients); ``last[rows] = hi + 1``.
    Rows are split and summed as in :func:`sparseopt.kernels.cpu._sparse_template`."""
    n = hist.shape[0]
    d = p.shape[1]
    bounds = cpu.balanced_parts(offsets, cpu.PARTS, ROW_COST)
    scratch = np.empty((cpu.PARTS, d), values.dtype)
    redo = np.empty((cpu.PARTS, d), np.bool_)
    for t in prange(cpu.PARTS):
        buf = scratch[t:t + 1]
        stop = bounds[t + 1]
        for u in range(bounds[t], stop):
            AHEAD(p, S, S, rows, offsets, order, values, u, stop)
            r = rows[u]
            lo = max(last[r], floor)
            first = offsets[u]
            end = offsets[u + 1]
            if lo < hi:
                CATCH_ROW(p, S, r, hist, lo, hi, tab[lo % n], c_idle, zero, tol, redo[t])
            grad, src = cpu._gradient_row(buf, values, order, first, end)
            ROW_STEP(p, S, r, grad, src, c, wd_lr)
            last[r] = hi + 1


def _exact_catch_up_template(p, S, rows, every_row, last, floor, hi, hist, tab, c_idle,
                             zero, tol):
    """Catch up ``rows`` (or every row, ``every_row``) to step ``hi``; ``last[r] = hi``
    for the listed rows (a full pass leaves ``last`` alone: the caller raises ``floor``).
    The rows are split into ``cpu.PARTS`` equal runs, each with its row of scratch."""
    n = hist.shape[0]
    d = p.shape[1]
    count = p.shape[0] if every_row else rows.size
    redo = np.empty((cpu.PARTS, d), np.bool_)
    for t in prange(cpu.PARTS):
        stop = (t + 1) * count // cpu.PARTS
        for u in range(t * count // cpu.PARTS, stop):
            r = np.int64(u) if every_row else rows[u]
            if not every_row:       # random rows: ask for a later row's lines now (as the steps do)
                ahead = u + cpu.PREFETCH_DISTANCE
                if ahead < stop:
                    PREFETCH(p, S, S, rows[ahead])
            lo = max(last[r], floor)
            if lo < hi:
                CATCH_ROW(p, S, r, hist, lo, hi, tab[lo % n], c_idle, zero, tol, redo[t])
                if not every_row:
                    last[r] = hi


# ------------------------------------------------------------------ table-batched steps
#
# The exact sparse updates of many tables of one kernel configuration in one parallel region
# (issue 21), as :func:`sparseopt.kernels.cpu.batched_sparse_kernel` runs lazy ones: a table
# is one row of ``meta``, :mod:`sparseopt.kernels.cpu`'s columns, its exact-mode bookkeeping
# (below), then the addresses of its slots. Unique row ``u`` of table ``t`` takes the same row
# step as in :func:`_exact_sparse_template` (the same catch-up, gradient sum and element
# code), so the bits are the per-table kernel's.

#: Columns of ``meta`` after :data:`sparseopt.kernels.cpu.META_COLUMNS`: the addresses of the
#: table's ``last``, ``hist`` and ``tab``, its ``floor`` and ``hi`` (its step count before
#: this step), ``hist``'s length ``H`` and ``tab``'s columns.
X_LAST, X_HIST, X_TAB, X_FLOOR, X_HI, X_HISTORY, X_TAB_COLUMNS = range(cpu.META_COLUMNS, cpu.META_COLUMNS + 7)
META_COLUMNS = cpu.META_COLUMNS + 7


def _exact_rows_template(meta, t, like, slot_like, hist_like, tab_like, rows, offsets, order, buf, redo,
                         lo, hi, c, wd_lr, zero, tol):
    """Unique rows ``lo:hi`` (its own numbering) of table ``t``: :func:`_exact_sparse_template`'s
    loop. Its ``c_idle`` is the record of the table's step ``hi`` in ``hist``: the values of
    the coefficients the per-table kernel is given (the record is what they are read from)."""
    n_rows = meta[t, cpu.M_ROWS]
    d = meta[t, cpu.M_WIDTH]
    p = numba.carray(pointer(meta[t, cpu.M_P], like), (n_rows, d))
    S = SLOT_VIEWS(meta, t, meta.shape[1] - NS - NR, slot_like, (n_rows, d))
    values = numba.carray(pointer(meta[t, cpu.M_VALUES], buf), (meta[t, cpu.M_N], d))
    last = numba.carray(pointer(meta[t, X_LAST], meta), (n_rows,))
    n = meta[t, X_HISTORY]
    hist = numba.carray(pointer(meta[t, X_HIST], hist_like), (n,))
    tab = numba.carray(pointer(meta[t, X_TAB], tab_like), (n, meta[t, X_TAB_COLUMNS]))
    floor = meta[t, X_FLOOR]
    step = meta[t, X_HI]
    c_idle = hist[step % n]
    u0 = meta[t, cpu.M_UNIQUE]
    f0 = meta[t, cpu.M_OFFSETS]
    o0 = meta[t, cpu.M_ORDER]
    rows_t = rows[u0:u0 + hi]
    offsets_t = offsets[f0:f0 + hi + 1]
    order_t = order[o0:o0 + meta[t, cpu.M_N]]
    for u in range(lo, hi):
        AHEAD(p, S, S, rows_t, offsets_t, order_t, values, u, hi)
        r = rows_t[u]
        behind = max(last[r], floor)
        if behind < step:
            CATCH_ROW(p, S, r, hist, behind, step, tab[behind % n], c_idle, zero, tol, redo)
        grad, src = cpu._gradient_row(buf, values, order_t, offsets_t[u], offsets_t[u + 1])
        ROW_STEP(p, S, r, grad, src, c, wd_lr)
        last[r] = step + 1


def _exact_batched_template(meta, vstart, rows, offsets, order, like, slot_like, hist_like, tab_like,
                            values_like, c, wd_lr, zero, tol):
    """The exact sparse updates of the tables of ``meta`` in one parallel region: the runs of
    :func:`sparseopt.kernels.cpu.table_parts` over all their unique rows, each run table by
    table (:func:`_exact_rows_template`). ``like``, ``slot_like``: as for the lazy batched
    kernel; ``hist_like``, ``tab_like``: one table's ``hist`` and ``tab`` (all have their
    dtypes); ``values_like``: an array of the math dtype (the gradients')."""
    tables = vstart.size - 1
    bounds = cpu.table_parts(meta, vstart, offsets, cpu.PARTS, ROW_COST)
    widest = 1
    for t in range(tables):
        widest = max(widest, meta[t, cpu.M_WIDTH])
    scratch = np.empty(cpu.PARTS * widest, values_like.dtype)
    start = scratch.ctypes.data
    redo = np.empty((cpu.PARTS, widest), np.bool_)
    for r in prange(cpu.PARTS):
        u = bounds[r]
        end = bounds[r + 1]
        t = 0
        while t < tables and vstart[t + 1] <= u:
            t += 1
        while u < end:
            stop = min(end, vstart[t + 1])
            if stop > u:  # (a table of width 0 too: its rows' ``last`` advance, as per table)
                buf = numba.carray(pointer(start + r * widest * scratch.itemsize, values_like),
                                   (1, meta[t, cpu.M_WIDTH]))
                TABLE_ROWS(meta, t, like, slot_like, hist_like, tab_like, rows, offsets, order, buf, redo[r],
                           u - vstart[t], stop - vstart[t], c, wd_lr, zero, tol)
            u = stop
            t += 1


def _decay_rows_template(p, rows, every_row, last, floor, hi, tab, set_last, key):
    """Row-wise rules: scale the listed rows (or every row) by their idle windows' weight
    decay product ``tab[L % H, DECAY]`` (a zero gradient changes nothing else). A 16-bit
    variable's product is rounded to float32, then to 16 bits with the random bits of
    step ``hi`` (``key``), as :func:`_save_template` does."""
    n = tab.shape[0]
    d = p.shape[1]
    count = p.shape[0] if every_row else rows.size
    for u in prange(count):
        r = np.int64(u) if every_row else rows[u]
        lo = max(last[r], floor)
        if lo < hi:
            if HAS_WD:
                scale = tab[lo % n, _idle.DECAY]
                for j in range(d):
                    if LOWP:
                        bits = lowp_kernels.element_bits(key, r * d + j) if STOCHASTIC else np.uint64(0)
                        p[r, j] = NARROW(np.float32(WIDEN(p[r, j]) * scale), bits, STOCHASTIC)
                    else:
                        p[r, j] = p[r, j] * scale
            if set_last:
                last[r] = hi


def _table_template(hist, tab, lo, hi, nxt):
    """``tab[L % H]`` for the windows ``(L, hi]``, ``L`` from ``hi`` down to ``lo``."""
    n = hist.shape[0]
    for i in range(tab.shape[1]):
        nxt[i] = 0.0
    nxt[_idle.DECAY] = 1.0
    TABLE_INIT(nxt)
    top = tab[hi % n]
    for i in range(tab.shape[1]):
        top[i] = nxt[i]
    for L in range(hi - 1, lo - 1, -1):
        rec = hist[(L + 1) % n]
        t = tab[L % n]
        t_next = tab[(L + 1) % n]
        t[_idle.DECAY] = t_next[_idle.DECAY] * (1.0 - rec.wd)
        TABLE_STEP(t, t_next, rec)


def _rule_part(rule_module, name, default, rebind=()):
    """The rule's exact-mode function ``name`` (``default`` where it has none), compiled for
    inlining with the helpers it calls (:mod:`sparseopt.kernels._compile`)."""
    return _compile.function(rule_module, name, _compile.CPU, default, rebind)


@functools.lru_cache(maxsize=None)
def _exact_helpers(rule_module, used, has_wd, lowp):
    suffix, constants = cpu._helpers(rule_module, tuple(used), None, has_wd, lowp)
    inline = numba.njit(**_config.CPU_RULE_FLAGS)
    n = len(used)
    constants = dict(constants,
                     IDLE_APPLY=_compile.on_tuples(rule_module, "idle_apply", _compile.CPU, n),
                     IDLE_APPLY_FAST=_compile.on_tuples(rule_module, "idle_apply", _compile.CPU, n,
                                                        rebind=SHORT_SERIES),
                     CAST=inline(specialize(_slots.cast(n, __name__), "f32", TO=np.float32)),
                     SELECT=inline(specialize(_slots.select(n, __name__), "cpu")))
    constants["SAVE"] = inline(specialize(_save_template, "x" + suffix, **constants))
    constants["REPLAY"] = inline(specialize(_replay_template, "x" + suffix, **constants))
    # The catch-up paths are called, not inlined: inlined, they made up most of an exact
    # sparse kernel's first compile (Adam: 5.2 -> 3.6 CPU s), at no measured cost per step.
    called = numba.njit(error_model="numpy")
    constants["CATCH"] = called(specialize(_catch_up_template, "x" + suffix, **constants))
    constants["CATCH_ROW"] = called(specialize(_catch_up_row_template, "x" + suffix, **constants))
    return "x" + suffix, constants


def _compiled(flags, fn):
    """``numba.njit(**flags)(fn)``; a parallel kernel goes through
    :func:`sparseopt._config.parallel_kernel` (serialized under Numba's ``workqueue`` layer).

    Under ``NUMBA_DISABLE_JIT=1`` the kernels run as Python, where a structured array's
    element (a ``hist`` record) has no attribute access to its fields, as a Numba record
    has: a ``numpy.recarray`` view of such an argument gives it."""
    kernel = numba.njit(**flags)(fn)
    if not numba.config.DISABLE_JIT:
        return _config.parallel_kernel(kernel) if flags.get("parallel") else kernel

    @functools.wraps(fn)
    def run(*args):  # pragma: no cover - run in a subprocess: tests/test_runtime_environment.py
        return kernel(*(a.view(np.recarray) if isinstance(a, np.ndarray) and a.dtype.names else a
                        for a in args))
    return run


def _kernel(template, rule_module, used, has_wd, lowp):
    suffix, constants = _exact_helpers(rule_module, tuple(used), bool(has_wd), lowp)
    return _compiled(_config.CPU_KERNEL_FLAGS, specialize(template, suffix, **constants))


@functools.lru_cache(maxsize=None)
def sparse_kernel(rule_module, used, has_wd, lowp=None):
    """``kernel(p, S, rows, offsets, order, values, last, floor, hi, hist, tab, c, wd_lr,
    c_idle, zero, tol)``. ``lowp``: as :func:`sparseopt.kernels.cpu.sparse_kernel`'s (``c``
    and ``c_idle`` then carry their steps' ``rounding_key``)."""
    return _kernel(_exact_sparse_template, rule_module, used, has_wd, lowp)


@functools.lru_cache(maxsize=None)
def batched_sparse_kernel(rule_module, used, has_wd, lowp=None):
    """``kernel(meta, vstart, rows, offsets, order, like, slot_like, hist_like, tab_like, values_like,
    c, wd_lr, zero, tol)``: the exact sparse updates of many tables of one configuration in one
    parallel region (``meta``'s columns above; ``c``, ``wd_lr``, ``zero``, ``tol`` as for
    :func:`sparse_kernel`, the same for every table; each table's ``c_idle`` is read from its
    ``hist``)."""
    suffix, constants = _exact_helpers(rule_module, tuple(used), bool(has_wd), lowp)
    inline = numba.njit(**_config.CPU_RULE_FLAGS)
    constants = dict(constants, **cpu.table_views(used, None))
    constants["TABLE_ROWS"] = inline(specialize(_exact_rows_template, suffix, **constants))
    return _compiled(_config.CPU_KERNEL_FLAGS, specialize(_exact_batched_template, suffix, **constants))


@functools.lru_cache(maxsize=None)
def catch_up_kernel(rule_module, used, has_wd, lowp=None):
    """``kernel(p, S, rows, every_row, last, floor, hi, hist, tab, c_idle, zero, tol)``."""
    return _kernel(_exact_catch_up_template, rule_module, used, has_wd, lowp)


@functools.lru_cache(maxsize=None)
def decay_rows_kernel(has_wd, lowp=None):
    """``kernel(p, rows, every_row, last, floor, hi, tab, set_last, key)`` for row-wise rules
    (``key``: step ``hi``'s rounding key, read for a 16-bit variable only)."""
    constants = dict(HAS_WD=bool(has_wd), LOWP=lowp is not None)
    suffix = f"wd{int(bool(has_wd))}"
    if lowp is not None:
        kind, stochastic, _ = lowp
        widen, narrow = lowp_kernels.CONVERSIONS[kind]
        constants.update(WIDEN=widen, NARROW=narrow, STOCHASTIC=bool(stochastic))
        suffix += f"_{kind}{'_sr' if stochastic else '_rne'}"
    return _compiled(_config.CPU_KERNEL_FLAGS, specialize(_decay_rows_template, suffix, **constants))


@functools.lru_cache(maxsize=None)
def table_kernel(rule_module):
    """``kernel(hist, tab, lo, hi, nxt)``: the rule's idle tables (:mod:`sparseopt.rules._idle`)."""
    constants = dict(TABLE_INIT=_rule_part(rule_module, "idle_table_init", _idle.no_idle_table_init),
                     TABLE_STEP=_rule_part(rule_module, "idle_table_step", _idle.no_idle_table_step))
    return _compiled(_config.CPU_SERIAL_FLAGS,
                     specialize(_table_template, rule_key(rule_module), **constants))


def idle_columns(rule_module):
    """The width of the rule's idle tables: its ``IDLE_COLUMNS``, else one (the weight decay's,
    :data:`sparseopt.rules._idle.DECAY`)."""
    return max(1, getattr(rule_module, "IDLE_COLUMNS", 1))


_slots.register(__name__, globals())
