"""The step of a configured optimizer, for a host that keeps the variables itself.

``sparseopt.Optimizer`` owns its slots and state and runs its steps on NumPy or CUDA
arrays. A host that keeps the variables, the slots and the host state elsewhere (the
TensorFlow bridge keeps them in ``tf.Variable`` buffers, handed over as NumPy views for
each step) runs the same step through :meth:`sparseopt.Optimizer.step_config`: a
:class:`StepConfig` says what the optimizer keeps (its slots, their initial values and
dtypes, its host state), computes a step's coefficients and next host state, checks
and plans a step's gradients with the core's checks, and runs the step by the core's own
code (:func:`run_step`, which ``Optimizer`` runs too), lazy or exact. Nothing in it
reads or writes the optimizer's own variables, slots or ``iterations``.

A variable of the host is shown to the step as a :class:`HostVariable`: its array and
its slots' arrays (views of the host's buffers), as the optimizer's own
:class:`sparseopt.slots.VariableState` shows its own.
"""

import threading
import warnings
from typing import NamedTuple

import numpy as np

from sparseopt import _exact, _validation, rules
from sparseopt.backends import cpu
from sparseopt.indexed_slices import IndexedSlices
from sparseopt.kernels import _compile, lowp
from sparseopt.kernels import cpu as cpu_kernels
from sparseopt.rules._floatx import f32

__all__ = ["ExactBook", "HostVariable", "SlotLayout", "StepConfig", "run_lazy", "run_step"]


class StepConfig:
    """A configured optimizer's step (``optimizer.step_config()``).

    Attributes (fixed at construction, as the optimizer's structure is):
        name: the optimizer's name, for messages.
        rule: the rule module (or :class:`sparseopt.Rule`) its kernels run.
        slot_names: the element slots it keeps (each of the variable's shape), in the
            rule's ``SLOTS`` order; ``slot_used``: three booleans, which of ``SLOTS`` those are.
        rowwise: whether the rule keeps per-row slots (``RowwiseAdagrad``).
        row_slot_names: a row-wise rule's kept per-row slots (shape ``(rows,)``), in
            ``ROW_SLOTS`` order; ``row_slot_used``: three booleans (``None`` for an
            elementwise rule).
        factored: whether the rule keeps, for a variable of rank >= 2, statistics of
            other shapes in place of its element slots (``Adafactor``: see
            :meth:`slot_layout`).
        slot_initial_values: ``{slot name: float}`` for every slot a variable may keep.
        scalar_state: ``((name, initial value), ...)``: the host state the host keeps
            across steps (Nadam's ``u_product``), advanced by :meth:`next_scalar_state`.
        zero_learning_rate_is_no_step: a valid step at learning rate 0 writes nothing
            (Ftrl, whose rule divides by the learning rate).
        hyper_names: the float hyperparameters :meth:`coefficients` reads, the learning
            rate first (their values: :meth:`hypers`, or the host's own).
        sparse_mode, exact_history: as the optimizer's.

    ``stochastic_rounding``, ``slot_dtype``, ``seed`` and ``batch_tables`` are read from
    the optimizer when asked (a host may restore the seed).
    """

    def __init__(self, optimizer):
        self._opt = optimizer
        rule = optimizer._rule
        self.name = optimizer.name
        self.rule = rule
        kept = set(optimizer._slot_names())
        self.slot_names = tuple(n for n in rule.SLOTS if n in kept)
        self.slot_used = _used(rule.SLOTS, kept)
        self.rowwise = rules.kind(rule) == rules.ROW
        if self.rowwise:
            kept_rows = set(optimizer._row_slot_names())
            self.row_slot_names = tuple(n for n in rule.ROW_SLOTS if n in kept_rows)
            self.row_slot_used = _used(rule.ROW_SLOTS, kept_rows)
        else:
            self.row_slot_names, self.row_slot_used = (), None
        self.factored = rules.kind(rule) == rules.FACTORED
        self._factored_names = tuple(rule.FACTORED_SLOTS) if self.factored else ()
        self.slot_initial_values = {n: float(optimizer._slot_initial_value(n))
                                    for n in self.slot_names + self.row_slot_names + self._factored_names}
        self.scalar_state = tuple((n, float(optimizer._scalar_state_initial_value(n)))
                                  for n in type(optimizer)._scalar_state_names)
        self.hyper_names = tuple(type(optimizer)._hyper_names)
        self.zero_learning_rate_is_no_step = bool(type(optimizer)._zero_learning_rate_is_no_step)
        self.sparse_mode = optimizer.sparse_mode
        self.exact_history = optimizer.exact_history
        self._state_lock = threading.Lock()
        #: ``check_variable(var, name)``: the optimizer's check of a variable (dtype,
        #: layout), raising its error (its own method: a host calls it for every variable
        #: of every step).
        self.check_variable = optimizer._check_variable
        #: The optimizer's ``_wrap_update``, where its class has one (row-wise, factored rules).
        self._wrap = optimizer._wrap_update if optimizer._wraps_updates() else None

    @property
    def stochastic_rounding(self):
        return self._opt.stochastic_rounding

    @property
    def slot_dtype(self):
        return self._opt.slot_dtype

    @property
    def seed(self):
        return self._opt.seed

    @property
    def batch_tables(self):
        """Whether the sparse tables of a step that share a kernel configuration run in one
        parallel region (the core's switch; the same bits either way)."""
        return self._opt._batch_tables

    def hypers(self, iterations):
        """``{name: float}``: the optimizer's hyperparameters for the step after
        ``iterations`` steps (schedules and callables evaluated as its own step evaluates
        them; the learning rate rounded through float32, as Keras holds it)."""
        opt = self._opt
        hypers = {k: opt._resolve(k, iterations) for k in self.hyper_names}
        hypers["learning_rate"] = f32(hypers["learning_rate"])
        return hypers

    def weight_decay(self, learning_rate):
        """The step's decoupled weight decay, ``weight_decay * learning_rate`` (0.0 without
        one), with ``weight_decay`` rounded through float32 as Keras does."""
        wd = self._opt.weight_decay
        return f32(wd) * learning_rate if wd else 0.0

    def slot_layout(self, shape):
        """The slots a variable of ``shape`` keeps, as a :class:`SlotLayout`: the element
        slots (each of the variable's shape), and the slots of other shapes: a row-wise
        rule's per-row slots (``(rows,)``), or a factored rule's statistics of a variable of
        rank >= 2 (``Adafactor``'s ``r`` and ``c``, which it keeps in place of ``v``)."""
        shape = tuple(shape)
        if self.factored and len(shape) >= 2:
            return SlotLayout((), (False, False, False), self._factored_names,
                              _used(self._factored_names, self._factored_names),
                              tuple(self.rule.factored_shapes(shape)))
        return SlotLayout(self.slot_names, self.slot_used, self.row_slot_names, self.row_slot_used,
                          (shape[:1],) * len(self.row_slot_names))

    def coefficients(self, hypers, step):
        """The rule's ``Coefficients`` of step ``step`` (``iterations + 1``), from ``hypers``
        (``{name: float}``: the resolved hyperparameters, the learning rate first, and the
        host state after this step)."""
        return self._opt._coefficients(hypers, step)

    def next_scalar_state(self, hypers, step, current):
        """``{name: float}``: the host state after step ``step`` from ``current`` (the
        values before it, in :attr:`scalar_state` order). Pure for the caller; safe to
        call from several threads (replicas of a strategy), but not while the optimizer
        itself steps (it lends the optimizer's own state arrays)."""
        opt = self._opt
        with self._state_lock:  # the optimizer reads its state from its own arrays: lent here
            arrays = [opt._scalar_state[name] for name, _ in self.scalar_state]
            kept = [a.copy() for a in arrays]
            try:
                for a, value in zip(arrays, current):
                    a[...] = value
                return dict(opt._next_scalar_state(hypers, step))
            finally:
                for a, value in zip(arrays, kept):
                    a[...] = value

    def slot_dtypes(self, dtype):
        """``(element slots' dtype, row slots' dtype)`` for a variable of NumPy ``dtype``, as
        the optimizer keeps them: the variable's for float32 and float64; for a 16-bit
        variable float32 (the math's), or bfloat16 element slots with
        ``slot_dtype="bfloat16"``; row slots always in the math's dtype."""
        if not lowp.kind(dtype):
            return np.dtype(dtype), np.dtype(dtype)
        f32 = np.dtype(np.float32)
        return (lowp.BFLOAT16 if self.slot_dtype == "bfloat16" else f32), f32

    def idle_is_identity(self, hypers, weight_decay, dtype):
        """Whether exact mode's idle step (the step of a row with a zero gradient) is the
        identity for a variable of NumPy ``dtype``, with ``hypers`` (``{name: float}``,
        every float hyperparameter but the learning rate, which it may not read) and
        ``weight_decay`` (0 where it does not apply). False where the rule cannot say, or
        where the step depends on host state."""
        identity = getattr(self.rule, "idle_is_identity", None)
        if identity is None or self.scalar_state:
            return False
        math_dtype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
        c = self.coefficients({"learning_rate": 1.0, **hypers}, 1)
        return bool(identity(type(c)(*(math_dtype(x) for x in c)), math_dtype(weight_decay)))

    def set_rounding(self, updates, step):
        """This step's rounding of each 16-bit variable of ``updates`` (``(state, update)``)."""
        self._opt._set_rounding(updates, step)

    def validate(self, items, then=None):
        """Check every ``(state, gradient)`` of a step and plan every sparse gradient, with the
        optimizer's checks and in its order (:func:`validate`, which the optimizer's own steps
        run too): the first bad item raises, before anything is written. ``gradient``: an
        :class:`~sparseopt.IndexedSlices` or a dense array. ``then``: an error the host found
        in the item after the last of ``items`` (making its state), raised if none of
        ``items`` fails. Returns the ``(state, update)`` pairs :func:`run_step` takes."""
        def checked():
            for state, g in items:
                yield state.name, state.var, g, cpu
            if then is not None:
                raise then
        updates = validate(checked(), self.batch_tables and len(items) > 1)
        return [(state, update) for (state, _), (_, _, update) in zip(items, updates)]

    def rows_of(self, var, name, indices):
        """The unique rows of ``indices`` into ``var``'s rows, checked as a sparse gradient's
        indices (type, range), for a catch-up."""
        idx = np.asarray(indices).reshape(-1)
        values = np.empty((idx.shape[0],) + var.shape[1:], var.dtype)
        _, idx = cpu.sparse_gradient(IndexedSlices(values, idx), var, name)
        return _validation.plan(idx, var.shape[0], name)[0]

    def run(self, updates, coefficients, wd, has_wd, exact=None, convert=None):
        """Run a validated step (``updates`` from :meth:`validate`): :func:`run_step` with
        this optimizer's rule and switches. ``wd``: :meth:`weight_decay`; ``has_wd(v)``:
        whether it applies to the :class:`HostVariable` ``v``; ``exact``: an
        :class:`ExactBook`'s ``step`` in exact mode (``None``: a lazy step). A row-wise or
        factored rule's updates run that rule's own kernels, as in the optimizer's steps."""
        wrap = self._wrap
        if wrap is not None:
            updates = [(state, wrap(state, update)) for state, update in updates]
        run_step(self.rule, updates, coefficients, wd, has_wd, self.batch_tables, exact, convert)

    def work(self, updates):
        """The elements a step's kernels touch (the measure of its thread count,
        ``sparseopt._config.enter_step``)."""
        return cpu.work(updates, None)


def validate(items, batch, store=None):
    """Check every item of a step and plan every sparse gradient: the one validation of the
    optimizer's steps and of the hosts' (:meth:`StepConfig.validate`).

    ``items`` yields ``(name, variable, gradient, backend)`` (the variable already checked; an
    iterator may raise a check of its own between items: it counts as that item's error).
    Each gradient is checked against its variable by the variable's backend, a sparse one
    planned; with ``batch``, the sparse gradients of NumPy variables are checked in one pass
    (:func:`sparseopt.backends.cpu.sparse_gradients`) after the loop and planned together
    (:func:`sparseopt.backends.cpu.plan_sparse`): an item that fails a check first has the
    items before it checked and planned, so the first bad item in order raises, as if each
    were checked and planned in turn. A device backend's plans and range checks finish after
    the loop (:meth:`~sparseopt.backends.Backend.finish_validation`). ``store``: the
    optimizer's per-variable scratch, for the backends. Returns ``[(name, variable, update)]``.
    """
    checked = []
    deferred = []  # (place in checked, gradient, variable, name)
    device = None  # the device backend whose checks finish after the loop
    try:
        for name, var, g, backend in items:
            if backend.on_device:
                device = backend
            elif batch and isinstance(g, IndexedSlices):
                deferred.append((len(checked), g, var, name))
                checked.append(None)
                continue
            checked.append((name, var, backend.validate(g, var, name, store)))
    except Exception as exc:  # planned outside the handler: no chained traceback
        error = exc
    else:
        error = None
    if deferred:  # every deferred item comes before the item that raised, if one did
        arrays, failed = cpu.sparse_gradients([item[1:] for item in deferred])
        if failed is not None:
            error = failed
        pending = []
        for (at, _, var, name), (values, indices) in zip(deferred, arrays):
            update = cpu.SparseUpdate(values, indices, name)
            checked[at] = (name, var, update)
            pending.append((update, var.shape[0]))
        cpu.plan_sparse(pending)
    if error is not None:
        raise error
    if device is not None:  # the device plans and range checks: one small read per plan
        device.finish_validation([update for _, _, update in checked], batch)
    return checked


class SlotLayout(NamedTuple):
    """The slots of one variable (:meth:`StepConfig.slot_layout`)."""

    names: tuple        #: element slots, each of the variable's shape, in the rule's order
    used: tuple         #: three booleans: which of the rule's ``SLOTS`` those are
    other_names: tuple  #: slots of other shapes (per-row, or a factored rule's statistics)
    other_used: tuple   #: three booleans: which of ``ROW_SLOTS`` / ``FACTORED_SLOTS`` (or None)
    other_shapes: tuple  #: the shape of each of ``other_names``


class HostVariable:
    """A variable that a host keeps, for one step: its array and its slots' arrays, as
    the optimizer's own :class:`~sparseopt.slots.VariableState` presents its own to the
    kernels (nothing is kept from one step to the next: the arrays may be new views at
    each step).

    Args:
        var: the variable's array (float32, float64, bfloat16 or float16), written in place.
        name: for error messages.
        slots: ``{slot name: array}`` of the kept element slots (each of ``var``'s shape,
            in :attr:`StepConfig.slot_dtypes`), in the rule's order.
        row_slots: the slots of other shapes (:attr:`SlotLayout.other_names`: a row-wise
            rule's ``(rows,)`` slots, a factored rule's statistics), ``{slot name: array}``
            (else ``None``).
        has_wd: whether decoupled weight decay applies to the variable.
        slot_dtype: the optimizer's ``slot_dtype`` (``"bfloat16"``: a 16-bit variable's
            element slots are bfloat16).
        key: the host's key of the variable (exact mode keeps its state under it).

    A 16-bit variable (and bfloat16 slots) reach the kernels as their ``uint16`` views, with
    float32 math and the step's rounding (``kind``, ``slot_kind``, ``math_dtype``; ``lowp``
    and ``rounding_key`` are set by :meth:`StepConfig.set_rounding`).
    """

    __slots__ = ("key", "var", "name", "slots", "kernel_slot_names", "row_slots", "has_wd",
                 "kind", "slot_kind", "math_dtype", "lowp", "rounding_key")

    #: A host's arrays are NumPy arrays (:mod:`sparseopt.backends.cpu`).
    backend = cpu

    def __init__(self, var, name, slots, row_slots=None, has_wd=False, slot_dtype=None, key=None):
        self.key = key
        self.var = var
        self.name = name
        self.kernel_slot_names = tuple(slots)       # the kept element slots
        self.row_slots = row_slots                  # {name: (rows,) view} (row-wise rules)
        self.slots = {**slots, **row_slots} if row_slots else slots  # {name: view}, all kept
        self.has_wd = has_wd
        self.kind = lowp.kind(var.dtype)
        self.slot_kind = "bfloat16" if self.kind and slot_dtype == "bfloat16" else None
        self.math_dtype = np.float32 if self.kind else var.dtype.type
        self.lowp = None
        self.rounding_key = 0

    @property
    def storage(self):
        """The kernels read the slots' dtype here (as from the optimizer's slot storage)."""
        return self.var

    def kernel_arrays(self, rule_slots, shape):
        """``(p, slots, used)`` reshaped to ``shape``, as ``VariableState.kernel_arrays``
        (16-bit arrays as their ``uint16`` views)."""
        p = (lowp.as_bits(self.var) if self.kind else self.var).reshape(shape)
        slots, used = cpu_kernels.place(rule_slots, {
            n: (lowp.as_bits(self.slots[n]) if self.slot_kind else self.slots[n]).reshape(shape)
            for n in self.kernel_slot_names}, p)
        return p, slots, used

    def kernel_step(self, c):
        """``(lowp, c)`` as ``VariableState.kernel_step``: for a 16-bit variable the step's
        rounding and ``c`` with its key."""
        if self.kind is None:
            return None, c
        return self.lowp, lowp.keyed(c, self.rounding_key)

    def kernel_views(self, key, make):
        return make()


class _Scope:
    """The optimizer that :mod:`sparseopt._exact` sees during one operation of an
    :class:`ExactBook`: the operation's variables (their arrays of this step), with the
    book's states filed under them; new states are filed back into the book."""

    def __init__(self, book, variables):
        self._book = book
        self._rule = book.rule
        self.exact_history = book.history
        self.stochastic_rounding = book.stochastic_rounding
        self.name = book.name
        self._batch_tables = book.config.batch_tables  # the core's switch (tests turn it off)
        self._variables = list(variables)
        self._states = {id(v.var): v for v in self._variables}
        self._markers = None  # a device backend's scratch: a host's variables are NumPy arrays
        self._exact_states = {id(v.var): book.states[v.key] for v in self._variables
                              if v.key in book.states}

    def _uses_weight_decay(self, state):
        return state.has_wd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for v in self._variables:          # states the core created during this operation
            ex = self._exact_states.get(id(v.var))
            if ex is not None:
                self._book.states[v.key] = ex


class ExactBook:
    """The exact-mode states (``sparse_mode="exact"``) of a host's variables, kept by each
    :class:`HostVariable`'s ``key`` (host memory, not saved: a host saves flushed state).

    Args:
        config: the optimizer's :class:`StepConfig` (its rule, ``exact_history``,
            rounding and name).

    :meth:`step` is the ``exact`` argument of :meth:`StepConfig.run`; :meth:`catch_up`
    brings given rows current before they are read, :meth:`flush` every row. Every method
    takes a lock: the kernels release the GIL, and a host may run the catch-ups of two
    tables at once.
    """

    def __init__(self, config):
        self.config = config
        self.rule = config.rule
        self.history = config.exact_history
        self.stochastic_rounding = config.stochastic_rounding
        self.name = config.name
        self.states = {}
        #: Keys of the variables whose lookups a traced function reads without a catch-up
        #: (:meth:`assume_current`, where the idle step is the identity); a step that leaves
        #: rows of one behind (another function traced with weight decay) brings them all
        #: current (:meth:`step`).
        self.traced_current = set()
        self._lock = threading.Lock()

    def step(self, updates, coefficients, wd_lr, sparse_type, dense_run, lazy_run):
        """One step, by :func:`sparseopt._exact.run`: ``updates`` are ``(HostVariable, update)``
        pairs, validated; a sparse update is a ``sparse_type`` (``rows``, ``offsets``,
        ``order``, ``values``); ``dense_run(variable, update, c, wd, has_wd)`` runs an
        update the lazy way (a dense one, or a row-wise rule's rows); ``lazy_run(pairs)``
        runs pairs as a lazy step (tables batched)."""
        with self._lock, _Scope(self, [v for v, _ in updates]) as scope:
            _exact.run(scope, updates, coefficients, wd_lr, sparse_type, dense_run, lazy_run)
            for v, _ in updates:
                ex = scope._exact_states.get(id(v.var)) if v.key in self.traced_current else None
                if ex is not None and ex.pending():
                    # Lookups traced without a catch-up read this variable: no row may stay
                    # behind. Correct, at a dense pass per step, until they are traced again.
                    warnings.warn(
                        f"{self.name}: a step left rows of {v.name!r} behind (its idle step is "
                        "not the identity: weight decay, or a hyperparameter changed), but a "
                        "function traced when it was reads them without a catch-up: every row "
                        "is brought current after each such step (a pass over the whole "
                        "table). Trace that function again (e.g. compile the model again).",
                        stacklevel=2)
                    _exact.catch_up_rows(scope, v, ex)

    def assume_current(self, key):
        """A lookup of the variable ``key`` is traced without a catch-up: say whether it may
        be (no row is behind now) and, if so, keep every row current from now on."""
        with self._lock:
            ex = self.states.get(key)
            if ex is not None and ex.pending():
                return False
            self.traced_current.add(key)
            return True

    def catch_up(self, variable, indices):
        """Bring rows ``indices`` of ``variable`` (a :class:`sparseopt.engine.HostVariable`)
        current; the indices are checked as a sparse gradient's (type, range) before
        anything is written."""
        var = variable.var

        def rows(state, idx):
            return self.config.rows_of(var, state.name, idx)

        with self._lock, _Scope(self, [variable]) as scope:
            _exact.catch_up(scope, var, indices, rows)

    def flush(self, variables):
        """Bring every row of ``variables`` (:class:`sparseopt.engine.HostVariable`) current."""
        with self._lock, _Scope(self, variables) as scope:
            _exact.flush(scope)

    def pending(self, key=None):
        """Whether some row (of the variable ``key``, or of any) may be behind."""
        states = self.states.values() if key is None else [self.states.get(key)]
        return any(ex is not None and ex.pending() for ex in states)

    def reset(self):
        """Every row is current: the variables and slots were just set (restored, loaded)."""
        with self._lock:
            for ex in self.states.values():
                ex.mark_current()


def run_step(rule, updates, coefficients, wd, has_wd, batch, exact=None, convert=None):
    """Step 4 of every step (after validation, coefficients and clipping): run ``updates``.

    The one place a step's kernels are chosen, for ``Optimizer`` and for the hosts of
    :class:`StepConfig`: lazily, the tables of one kernel configuration batched
    (:func:`run_lazy`); in exact mode through ``exact(updates,
    coefficients, wd, sparse_type, dense_run, lazy_run)`` (:func:`sparseopt._exact.run`
    with the optimizer, or a host's book that keeps the exact-mode states), after
    16-bit gradient values are widened (exact mode's kernels read floats).

    Args:
        rule: the rule the kernels run (the step's variant is picked per dtype).
        updates: ``(state, update)`` pairs, validated, planned and clipped.
        coefficients: the rule's ``Coefficients`` (floats).
        wd: ``weight_decay * learning_rate``.
        has_wd: ``has_wd(state)``: whether weight decay applies to the state's variable.
        batch: the tables-in-one-region switch.
        exact: ``None`` for a lazy step.
        convert: ``convert(coefficients, dtype)`` (default: value by value).
    """
    def lazy_run(pairs):
        run_lazy(rule, pairs, coefficients, wd, has_wd, batch, convert)

    if exact is None:
        lazy_run(updates)
        return
    cpu.widen_sparse(updates)
    exact(updates, coefficients, wd, cpu.SparseUpdate,
          lambda state, update, c, wd_v, uses_wd: update.run(
              _compile.for_step(rule, c), state, c, wd_v, uses_wd), lazy_run)


def run_lazy(rule, updates, coefficients, wd, has_wd, batch, convert=None):
    """Step 5 of a lazy step: run the validated, planned (and clipped) ``updates``.

    Run by :func:`run_step`, for :meth:`sparseopt.Optimizer._run` and the TensorFlow
    bridge's host step (``sparseopt_tf._host.HostStep``) alike.

    Args:
        rule: the rule module (the step's variant is picked per dtype here).
        updates: ``(state, update)`` pairs: a state as :class:`~sparseopt.slots.VariableState`
            (``var``, ``storage``, ``kernel_slot_names``, ``kernel_arrays``, ``kernel_views``,
            ``slots``, ``backend``), an update its backend's (:mod:`sparseopt.backends`): a
            dense one, a planned sparse one (:func:`sparseopt.backends.cpu.plan_sparse` for
            NumPy variables), or a wrapper of one (a row-wise optimizer's
            ``optimizers._rowwise._RowUpdate``).
        coefficients: the rule's ``Coefficients`` of this step (floats).
        wd: ``weight_decay * learning_rate`` (a float).
        has_wd: ``has_wd(state)``: whether weight decay applies to that variable's kernel.
        batch: whether lazy sparse updates that share a kernel configuration (their
            backend's ``table_key``) run together (:func:`_run_tables`: NumPy variables in
            one parallel region, CUDA variables planned together in one launch); a
            configuration with one table, and every other update, runs on its own
            (``update.run``). The same bits either way.
        convert: ``convert(coefficients, dtype)``: the coefficients as ``dtype`` scalars
            (default: converted value by value; the core keeps its last conversion).
    """
    if convert is None:
        convert = _convert
    groups = {} if batch and len(updates) > 1 else None
    converted = {}
    for state, update in updates:
        uses_wd = has_wd(state)
        # the variable's (float32 for a 16-bit one; a CUDA array's may not be NumPy's)
        dtype = getattr(state, "math_dtype", None) or state.storage.dtype.type
        found = converted.get(dtype)
        if found is None:
            c = convert(coefficients, dtype)
            step_rule = _compile.for_step(rule, c)
            # a rule with a reduction stage runs its own two-pass kernel per table
            # (sparseopt.kernels.cpu, .cuda): asked once per dtype, not per table
            found = converted[dtype] = (c, step_rule,
                                        groups is not None and not cpu_kernels.has_reduction(step_rule))
        c, step_rule, batched = found
        if batched:
            key = state.backend.table_key(step_rule, state, update, dtype, uses_wd)
            if key is not None:
                group = groups.get(key)
                if group is None:
                    groups[key] = group = []
                group.append((state, update))
                continue
        update.run(step_rule, state, c, dtype(wd if uses_wd else 0.0), uses_wd)
    if groups:
        for (step_rule, dtype, uses_wd, _, row_used, _), group in groups.items():
            c = converted[dtype][0]
            wd_v = dtype(wd if uses_wd else 0.0)
            if len(group) == 1:
                state, update = group[0]
                update.run(step_rule, state, c, wd_v, uses_wd)
            else:
                _run_tables(step_rule, group, c, wd_v, uses_wd, row_used)


def _convert(coefficients, dtype):
    return type(coefficients)(*(dtype(x) for x in coefficients))


def _run_tables(rule, group, c, wd, has_wd, row_names):
    """The lazy sparse updates ``group`` (``[(state, update)]``: two or more, one kernel
    configuration) together, by their backend's ``run_tables``."""
    group[0][0].backend.run_tables(rule, group, c, wd, has_wd, row_names)


def exact_run(opt):
    """The ``exact`` argument of :func:`run_step` for an optimizer that keeps its own
    exact-mode states (:func:`sparseopt._exact.run`)."""
    def run(*args):
        _exact.run(opt, *args)
    return run


def _used(names, kept):
    return tuple(n in kept for n in names) + (False,) * (3 - len(names))
