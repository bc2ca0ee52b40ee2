"""``sparse_mode="exact"``: dense-equivalent sparse training at sparse cost (CPU and CUDA).

Dense semantics update *every* row at every step in which a variable gets a gradient:
a row outside a sparse gradient sees a zero gradient (its slots decay, Adam-like
rules keep moving it, decoupled weight decay shrinks it). Exact mode defers that work:

* each variable keeps :class:`ExactState`: its own step count ``steps`` (the steps in
  which it got a gradient), ``last`` (int64 per row: the step through which the row
  is current; effective value ``max(last[r], floor)``), and ``hist``, a ring of the
  last ``H`` steps' coefficients (the rule's ``Coefficients`` fields plus the weight
  decay factor ``wd``, in the variable's dtype; learning rates from schedules and
  callables included, as they were resolved at their step);
* a sparse step catches each touched row up over its idle steps and applies the real
  update in the same kernel pass (:mod:`sparseopt.kernels.exact`);
* before the ring would overwrite a step that some row may still need (every ``H``
  steps at most), and before a dense gradient, the variable is flushed (one parallel
  pass over its rows): the amortized cost is ``1/H`` of a full pass per step;
* :func:`flush` catches every row of every variable up; :func:`catch_up` given rows;
* the sparse steps of one call whose kernel configuration is the same run in one parallel
  region over the unique rows of all their tables, with the same bits (issue 21,
  :func:`sparseopt.backends.cpu.run_exact_tables`);
* where the rule declares a step's idle step the identity (``idle_is_identity``: Adagrad
  with ``epsilon > 0``, plain SGD, RowwiseAdagrad, each without weight decay) and no row
  is behind, none of this is needed: the sparse step runs as a lazy one (:func:`run`).

A CUDA variable keeps the same bookkeeping on the host (step counts, ``hist``, and
``tab``, computed by the same host kernel) and its device half, which its backend makes
(``exact_device``: :class:`sparseopt.backends.cuda.ExactDevice`, ``ex.device``): ``last``
on the device, a device mirror of ``hist`` written one record per step, and a device copy of the windows of
``tab`` in use; the kernels are :mod:`sparseopt.kernels.cuda_exact`, the same math
compiled for the device. Nothing is read back from the device except a ``catch_up``'s
index range check, as for a sparse gradient.
"""

import math

import numpy as np

from sparseopt import backends, errors
from sparseopt.backends import cpu
from sparseopt.kernels import exact as kernels
from sparseopt.kernels import lowp
from sparseopt.rules import ROW, kind

#: Default length of the coefficient history (the optimizer's ``exact_history``).
DEFAULT_HISTORY = 1024


def record_dtype(rule, dtype, keyed=False):
    """The structured dtype of one history record: ``Coefficients`` fields plus ``wd``,
    and for a 16-bit variable (``keyed``) the step's ``rounding_key``."""
    fields = [(name, dtype) for name in rule.Coefficients._fields] + [("wd", dtype)]
    return np.dtype(fields + ([("rounding_key", np.uint64)] if keyed else []))


class ExactState:
    """The exact-mode bookkeeping of one variable (see the module docstring)."""

    __slots__ = ("rows", "steps", "floor", "last", "hist", "tab", "nxt", "has_wd", "dtype",
                 "tables_at", "device", "lowp")

    def __init__(self, rule, var, history, dtype, lowp=None):
        """``dtype``: the variable's math dtype, as a NumPy dtype (float32 for a 16-bit
        variable; a CUDA array's may be another library's). ``lowp``: a 16-bit variable's
        rounding, as the kernels take it (:mod:`sparseopt.kernels.lowp`), else None."""
        self.rows = var.shape[0] if len(var.shape) else 1
        self.dtype = np.dtype(dtype)
        self.lowp = lowp
        self.steps = 0
        self.floor = 0
        self.hist = np.zeros(history, record_dtype(rule, self.dtype, lowp is not None))
        ncol = kernels.idle_columns(rule)
        self.tab = np.zeros((history, ncol), np.float64)
        self.nxt = np.zeros(ncol, np.float64)
        self.has_wd = False
        self.tables_at = -1
        # A CUDA variable's device half (``last`` lives on its device: ``self.device.last``), or None.
        self.device = backends.backend_for(var).exact_device(var, self.hist, self.tab, self.lowp)
        self.last = np.zeros(self.rows, np.int64) if self.device is None else None

    @property
    def history(self):
        return self.hist.shape[0]

    def pending(self):
        """Whether some row may be behind ``steps``."""
        return self.floor < self.steps

    def mark_current(self):
        """Every row is current (after a full catch-up, a dense step or ``set_weights``)."""
        self.floor = self.steps


def _exact_state(opt, state, create=True):
    ex = opt._exact_states.get(id(state.var))
    if ex is None and create:
        lowp = None if state.kind is None else (state.kind, opt.stochastic_rounding, state.slot_kind)
        ex = ExactState(opt._rule, state.var, opt.exact_history, state.math_dtype, lowp)
        opt._exact_states[id(state.var)] = ex
    return ex


def _is_rowwise(rule):
    return kind(rule) == ROW


def _tol(dtype):
    return np.float64(np.finfo(dtype).eps / 2)


def _tables(rule, ex):
    """The idle tables of every window a row may need: ``(L, steps]`` for ``L >= floor``."""
    if ex.tables_at != ex.steps and ex.pending():
        kernels.table_kernel(rule)(ex.hist, ex.tab, ex.floor, ex.steps, ex.nxt)
        ex.tables_at = ex.steps
        if ex.device is not None:
            ex.device.copy_tables(ex.tab, ex.floor, ex.steps)


def _arrays(rule, state, ex):
    width = math.prod(state.var.shape[1:])
    return state.kernel_arrays(rule.SLOTS, (ex.rows, width))


def catch_up_rows(opt, state, ex, rows=None):
    """Catch ``rows`` (int64, unique; for a CUDA variable ``(device rows, k)``; ``None``:
    every row) of one variable up to ``ex.steps``."""
    if not ex.pending():
        return
    rule = opt._rule
    _tables(rule, ex)
    every = rows is None
    if ex.device is not None:
        if _is_rowwise(rule):
            ex.device.decay_rows(rule, state, rows, ex.floor, ex.steps, ex.has_wd)
        else:
            ex.device.catch_up(rule, state, rows, ex.floor, ex.steps, ex.has_wd,
                               _idle_coefficients(rule, ex), ex.dtype.type(0), _tol(ex.dtype))
        if every:
            ex.mark_current()
        return
    rows = np.empty(0, np.int64) if every else rows
    p, slots, used = _arrays(rule, state, ex)
    if _is_rowwise(rule):
        key = ex.hist[ex.steps % ex.history]["rounding_key"] if ex.lowp else np.uint64(0)
        kernels.decay_rows_kernel(ex.has_wd, ex.lowp)(p, rows, every, ex.last, ex.floor, ex.steps,
                                                      ex.tab, not every, key)
    else:
        zero = ex.dtype.type(0)
        kernels.catch_up_kernel(rule, used, ex.has_wd, ex.lowp)(
            p, slots, rows, every, ex.last, ex.floor, ex.steps, ex.hist, ex.tab,
            _idle_coefficients(rule, ex), zero, _tol(ex.dtype))
    if every:
        ex.mark_current()


def _idle_coefficients(rule, ex, step=None):
    """The coefficients of step ``step`` (default ``ex.steps``: the last idle step), as the
    rule's NamedTuple (for a 16-bit variable with that step's ``rounding_key``: the catch-up
    rounds with it)."""
    rec = ex.hist[(ex.steps if step is None else step) % ex.history]
    c = rule.Coefficients(*(rec[name] for name in rule.Coefficients._fields))
    return lowp.keyed(c, rec["rounding_key"]) if ex.lowp else c


def _record(state, ex, c, wd):
    """The history record of a step with coefficients ``c`` and weight decay ``wd`` (and,
    for a 16-bit variable, the step's rounding key, set on ``state`` before the step)."""
    key = (state.rounding_key,) if ex.lowp else ()
    return np.array(tuple(c) + (wd,) + key, ex.hist.dtype)


def _constants_changed(rule, ex, record):
    if ex.steps == 0:
        return False
    previous = ex.hist[ex.steps % ex.history]
    return any(previous[name] != record[name] for name in getattr(rule, "IDLE_CONSTANT", ()))


def _push(opt, state, ex, c, wd):
    """Make room for, and write, the record of step ``ex.steps + 1``."""
    rule = opt._rule
    rec = _record(state, ex, c, wd)
    if ex.pending() and (ex.steps + 1 - ex.floor >= ex.history
                         or _constants_changed(rule, ex, rec)):
        catch_up_rows(opt, state, ex)
    _write_record(ex, ex.steps + 1, rec)
    if wd != 0:
        ex.has_wd = True


def _write_record(ex, step, rec):
    """``hist``'s record of ``step`` (and its device mirror)."""
    index = step % ex.history
    ex.hist[index] = rec
    if ex.device is not None:
        ex.device.write_record(ex.hist, index)


def run(opt, updates, coefficients, wd, sparse_type, dense_run, lazy_run):
    """One exact-mode step: ``updates`` are the base class's ``(state, update)`` pairs.

    Where the rule declares this step's idle step the identity (``idle_is_identity(c, wd)``,
    see :mod:`sparseopt.rules._idle`) and no row of the variable is behind, a sparse
    update runs as a lazy one: no :class:`ExactState` is made (an existing one only counts
    the step, every row current), so exact mode costs what lazy mode costs. Otherwise
    (weight decay, momentum, ``epsilon == 0``, or rows still behind from earlier steps)
    the full path runs.

    ``sparse_type``: the class of a host sparse update (:class:`sparseopt.backends.cpu.SparseUpdate`;
    a device update says whether it is sparse, ``update.sparse``);
    ``dense_run(state, update, c, wd, has_wd)`` runs an update the ordinary way;
    ``lazy_run(pairs)`` runs ``(state, update)`` pairs as a lazy step does
    (:func:`sparseopt.engine.run_lazy`: the tables of one kernel configuration in one parallel
    region): the lazy updates of this step (those above, and dense updates of variables
    with no row behind) run through it together, after the others.

    With ``opt._batch_tables`` (the core's switch; the bridge's ``_Scope`` reads its core's),
    the fused catch-up + update of the NumPy variables (elementwise rules) whose kernel
    configuration is the same run in one parallel region after the loop
    (:func:`_run_tables`), with the same bits. Row-wise rules (a weight-decay pass over the
    touched rows, then the row kernel) and CUDA variables run variable by variable.
    """
    rule = opt._rule
    identity = getattr(rule, "idle_is_identity", None)
    lazy = []
    batch = {} if getattr(opt, "_batch_tables", False) and len(updates) > 1 else None
    for state, update in updates:
        has_wd = wd != 0.0 and opt._uses_weight_decay(state)
        dtype = state.math_dtype
        c = type(coefficients)(*(dtype(x) for x in coefficients))
        wd_v = dtype(wd if has_wd else 0.0)
        inner = getattr(update, "update", update)  # a row-wise optimizer wraps its updates
        on_device = getattr(inner, "on_device", False)  # a CUDA update (sparseopt.backends.cuda)
        if not (inner.sparse if on_device else isinstance(inner, sparse_type)):
            ex = _exact_state(opt, state, create=False)
            if ex is not None:  # rows pending: bring them current, then the dense step
                if on_device:
                    ex.device.stream = inner.stream
                catch_up_rows(opt, state, ex)
                ex.steps += 1
                _write_record(ex, ex.steps, _record(state, ex, c, wd_v))
                ex.mark_current()
                dense_run(state, update, c, wd_v, has_wd)
            else:
                lazy.append((state, update))
            continue
        ex = opt._exact_states.get(id(state.var))
        if identity is not None and (ex is None or not ex.pending()) and identity(c, wd_v):
            # The idle step is the identity and no row is behind: every row stays current
            # without bookkeeping, and the step is a lazy one.
            lazy.append((state, update))
            if ex is not None:
                ex.steps += 1
                ex.mark_current()
            continue
        if ex is None:
            ex = _exact_state(opt, state)
        if on_device:
            ex.device.stream = inner.stream
        _push(opt, state, ex, c, wd_v)
        if inner.k if on_device else inner.rows.size:
            touched = (inner.rows, inner.k) if on_device else inner.rows
            if _is_rowwise(rule):
                # A zero gradient changes a row-wise rule's row only through weight decay:
                # scale the touched rows (a separate pass over those rows), then the row kernel.
                catch_up_rows(opt, state, ex, touched)
                dense_run(state, update, c, wd_v, has_wd)
                if on_device:
                    ex.device.set_last(touched, ex.steps + 1, inner.stream)
                else:
                    ex.last[inner.rows] = ex.steps + 1
            elif on_device:
                _tables(rule, ex)
                ex.device.sparse_step(rule, state, inner, ex.floor, ex.steps, c, wd_v, ex.has_wd,
                                      _idle_coefficients(rule, ex), dtype(0), _tol(ex.dtype))
            else:
                _tables(rule, ex)
                c_step = lowp.keyed(c, state.rounding_key) if ex.lowp else c
                if batch is None:
                    _sparse_step(rule, state, inner, ex, ex.floor, ex.steps, c_step, wd_v)
                else:  # run after the loop, with the tables of the same configuration
                    key = (dtype, has_wd, ex.has_wd, state.kernel_slot_names, ex.lowp)
                    group = batch.get(key)
                    if group is None:
                        group = batch[key] = (c_step, wd_v, [])
                    group[2].append((state, inner, ex, ex.floor, ex.steps))
        ex.steps += 1
    if batch:
        _run_tables(rule, batch)
    if lazy:
        lazy_run(lazy)


def _sparse_step(rule, state, inner, ex, floor, hi, c, wd_v):
    """The fused catch-up + update of one NumPy variable: the rows of the planned sparse
    update ``inner`` caught up to step ``hi`` (from ``max(last, floor)``), then step ``hi + 1``
    with coefficients ``c`` (a 16-bit variable's with the step's rounding key)."""
    p, slots, used = _arrays(rule, state, ex)
    kernels.sparse_kernel(rule, used, ex.has_wd, ex.lowp)(
        p, slots, inner.rows, inner.offsets, inner.order, inner.values, ex.last, floor, hi,
        ex.hist, ex.tab, c, wd_v, _idle_coefficients(rule, ex, hi), ex.dtype.type(0), _tol(ex.dtype))


def _run_tables(rule, batch):
    """The sparse steps ``run`` collected, ``{configuration: (c, wd_v, [(state, update, ex,
    floor, hi)])}``: a configuration's tables in one parallel region
    (:func:`sparseopt.backends.cpu.run_exact_tables`), a lone table by :func:`_sparse_step`."""
    for (dtype, _, has_wd, _, lowp_config), (c, wd_v, group) in batch.items():
        if len(group) == 1:
            _sparse_step(rule, *group[0], c, wd_v)
        else:
            cpu.run_exact_tables(rule, group, c, wd_v, has_wd, lowp_config, dtype(0), _tol(dtype))


def flush(opt):
    """Bring every row of every variable current."""
    for state in opt._states.values():
        ex = _exact_state(opt, state, create=False)
        if ex is not None:
            catch_up_rows(opt, state, ex)


def catch_up(opt, var, indices, validate_rows):
    """Bring the rows ``indices`` of ``var`` current; ``validate_rows(indices) -> rows``
    checks and de-duplicates them (as a sparse gradient's)."""
    state = opt._states.get(id(var))
    if state is None:
        raise errors.UnknownSlotError(
            f"{opt.name}: catch_up got a variable this optimizer never built or updated")
    ex = _exact_state(opt, state, create=False)
    # (a CUDA variable's indices are checked and de-duplicated on its device)
    rows, count = backends.backend_for(state.var).exact_rows(
        opt._markers, state, indices, ex.device.stream if ex is not None and ex.device is not None else 0,
        validate_rows)
    if ex is None or count == 0:
        return
    catch_up_rows(opt, state, ex, rows)


def reset(opt):
    """After ``set_weights``: every row holds the state it was given, current at its step."""
    for ex in opt._exact_states.values():
        ex.mark_current()


def check_history(opt_name, value):
    """The ``exact_history`` argument: ``None`` (the default) or an int >= 2."""
    if value is None:
        return DEFAULT_HISTORY
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
        raise errors.HyperparameterError(f"{opt_name}: exact_history must be an int >= 2; got {value!r}")
    return int(value)
