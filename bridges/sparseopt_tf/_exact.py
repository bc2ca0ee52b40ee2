"""``sparse_mode="exact"`` in the bridge: the core's bookkeeping, on TensorFlow buffers.

The core (:mod:`sparseopt._exact`) keeps an :class:`~sparseopt._exact.ExactState` per
variable (its step count, the step through which each row is current, the ring of past
coefficients) and runs every exact-mode operation: the fused catch-up + update of a
sparse step, the catch-up of given rows, the flush of every row. Its functions take the
optimizer (for ``_rule``, ``exact_history``, ``name``, ``_states`` and ``_exact_states``,
both keyed by ``id`` of the variable's array) and each variable's ``VariableState``
(``var``, ``name``, ``storage``, ``kernel_arrays``).

The bridge reuses those functions unchanged. What differs is where the arrays come from:
each hand-over (:func:`sparseopt_tf._handover.run_on_host`) makes fresh NumPy views of
the variables' buffers, so the states cannot be keyed by the arrays. :class:`ExactBook`
keeps them by variable instead (the key of the variable's de-duplication scratch: its
key and device) and, for one hand-over, shows the core a :class:`_Scope`: an optimizer
holding this hand-over's views, with the book's states filed under them, and files any
new state back into the book afterwards.

None of this is saved: exact mode saves flushed state (every row current), and a
restored optimizer starts with every row current (:meth:`ExactBook.reset`).
"""

import threading
import warnings

import numpy as np
import tensorflow as tf

from sparseopt import _exact, _validation, errors
from sparseopt.indexed_slices import IndexedSlices
from sparseopt.kernels import cpu, lowp


class ExactModeNotSupportedError(errors.SparseoptError, ValueError):
    """``sparse_mode="exact"`` asked for where it cannot give dense training's results
    (a ``tf.distribute`` strategy other than ``MirroredStrategy`` and
    ``MultiWorkerMirroredStrategy``); raised before anything is written."""


#: Strategies whose replicas each keep a whole copy of every variable and apply the same
#: all-reduced update to it: each copy keeps its own record of rows behind (the book's key
#: holds the copy's device), advanced identically on every replica.
_MIRRORING_STRATEGIES = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy,
                         tf.distribute.OneDeviceStrategy)


def check_can_run(name, sparse_mode):
    """Exact mode under a ``tf.distribute`` strategy other than the mirroring ones: raise,
    before anything is written (both bridge families call this before a step, a catch-up
    or a flush)."""
    if sparse_mode == "exact" and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
        if not isinstance(strategy, _MIRRORING_STRATEGIES):
            raise ExactModeNotSupportedError(
                f"{name}: sparse_mode='exact' cannot run under {type(strategy).__name__}: it "
                "runs under MirroredStrategy, MultiWorkerMirroredStrategy and OneDeviceStrategy, "
                "whose replicas each keep a whole copy of every table. Use sparse_mode='lazy'.")


def warn_unread(opt, key, variable, read):
    """Warn once per variable when an exact-mode sparse step updates a variable for which
    no ``catch_up`` was ever asked: a forward pass that reads it without one (a plain
    ``keras.layers.Embedding``) reads rows that dense training would already have moved.
    ``read``: ``{"caught_up": keys, "warned": keys}``; ``key`` is ``variable``'s."""
    if opt.sparse_mode != "exact" or key in read["caught_up"] or key in read["warned"]:
        return
    read["warned"].add(key)
    warnings.warn(
        f"{getattr(opt, 'name', None) or opt._name}: sparse_mode='exact' updates "
        f"{getattr(variable, 'name', 'a variable')!r} sparsely, but nothing has asked for its rows "
        "to be caught up before they are read: a plain keras.layers.Embedding (or tf.gather) "
        "reads rows that dense training would already have moved, so the model trains as "
        "neither dense nor lazy training would. Read the table through sparseopt_tf.Embedding "
        "or sparseopt_tf.embedding_lookup (or call optimizer.catch_up(table, ids) before the "
        "read), or use sparse_mode='lazy'. (A table read only after optimizer.flush() is "
        "current: then ignore this.)", stacklevel=3)


def on_each_copy(variable, fn):
    """``fn(copy)`` for each local copy of ``variable``: for a distributed variable, in
    cross-replica context (its strategy's scope is entered if none is), once per component
    (in its update context, so that its slots resolve to the same device); otherwise
    (in a replica's context: its own copy) once, for ``variable``. Returns the results that are not ``None``.
    """
    if isinstance(variable, tf.distribute.DistributedValues):
        strategy = variable.distribute_strategy
        if not tf.distribute.has_strategy():        # e.g. the end of model.fit, outside the scope
            with strategy.scope():
                return on_each_copy(variable, fn)
        if tf.distribute.in_cross_replica_context():
            results = strategy.extended.update(variable, fn, group=False)
            # (each copy's result, None where it had nothing to do: flattened, so that a
            # list of Nones is no result)
            return [r for r in tf.nest.flatten(strategy.experimental_local_results(results))
                    if r is not None]
    result = fn(variable)
    return [] if result is None else [result]


def group(ops):
    """``None`` for no ops (eagerly, or nothing to do), else one op."""
    return tf.group(ops) if ops else None


def idle_always_identity(core, hypers, weight_decay, dtype):
    """Whether, in a function being traced now, every step's idle step of a variable of
    ``dtype`` is the identity, so that its lookups need no catch-up (decided while tracing
    the lookup's ``catch_up``).

    True where the rule declares it (``idle_is_identity``, see :mod:`sparseopt.rules._idle`:
    it depends on the hyperparameters other than the learning rate and on the weight
    decay only) for the values a traced step bakes in: ``hypers`` (``{name: value}``, every
    float hyperparameter but the learning rate) all plain numbers, and ``weight_decay``
    (the variable's: 0 where it does not apply; the caller checks the variable's
    ``has_wd``), which the step's graph takes as it was when traced. A tensor, variable,
    callable or schedule among ``hypers``, or host state (Nadam), and the answer is False:
    the catch-up stays.
    """
    identity = getattr(core._rule, "idle_is_identity", None)
    if identity is None or type(core)._scalar_state_names:
        return False
    values = {"learning_rate": 1.0}
    for name, value in hypers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            return False
        values[name] = float(value)
    math_dtype = np.float64 if dtype == tf.float64 else np.float32
    c = core._coefficients(values, 1)
    return bool(identity(type(c)(*(math_dtype(x) for x in c)), math_dtype(weight_decay)))


class Variable:
    """One variable of one hand-over, as the core's ``VariableState``.

    Args:
        key: the book's key of the variable (the de-duplication scratch's).
        var: the writable view of the variable's buffer, in the variable's shape.
        name: for error messages.
        slots: ``{slot name: view}`` of the kept element slots (each of ``var``'s shape).
        has_wd: whether decoupled weight decay applies to the variable.
        slot_dtype: the core's ``slot_dtype`` (``"bfloat16"``: a 16-bit variable's slots are
            bfloat16).

    A 16-bit variable (and bfloat16 slots) reach the kernels as their ``uint16`` views, with
    float32 math (``kind``, ``slot_kind``, ``math_dtype``, as ``VariableState``); a catch-up
    rounds with the keys its history records.
    """

    __slots__ = ("key", "var", "name", "slots", "has_wd", "kind", "slot_kind", "math_dtype",
                 "lowp", "rounding_key")

    def __init__(self, key, var, name, slots, has_wd=False, slot_dtype=None):
        self.key = key
        self.var = var
        self.name = name
        self.slots = slots
        self.has_wd = has_wd
        self.kind = lowp.kind(var.dtype)
        self.slot_kind = "bfloat16" if self.kind and slot_dtype == "bfloat16" else None
        self.math_dtype = np.float32 if self.kind else var.dtype.type
        self.lowp = None
        self.rounding_key = 0

    @property
    def storage(self):
        """The core reads the slots' dtype here (its slot storage has the variable's)."""
        return self.var

    def kernel_arrays(self, rule_slots, shape):
        """``(p, (s0, s1, s2), used)`` reshaped to ``shape``, as ``VariableState.kernel_arrays``
        (16-bit arrays as their ``uint16`` views)."""
        p = (lowp.as_bits(self.var) if self.kind else self.var).reshape(shape)
        slots, used = cpu.place(rule_slots, {
            n: (lowp.as_bits(s) if self.slot_kind else s).reshape(shape) for n, s in self.slots.items()}, p)
        return p, slots, used


class _Scope:
    """The optimizer that :mod:`sparseopt._exact` sees during one hand-over."""

    def __init__(self, book, variables):
        self._book = book
        self._rule = book.rule
        self.exact_history = book.history
        self.stochastic_rounding = book.stochastic_rounding
        self.name = book.name
        self._batch_tables = book.core._batch_tables  # the core's switch (tests turn it off)
        self._variables = list(variables)
        self._states = {id(v.var): v for v in self._variables}
        self._exact_states = {id(v.var): book.states[v.key] for v in self._variables
                              if v.key in book.states}

    def _uses_weight_decay(self, state):
        return state.has_wd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for v in self._variables:          # states the core created during this hand-over
            ex = self._exact_states.get(id(v.var))
            if ex is not None:
                self._book.states[v.key] = ex


class ExactBook:
    """The exact-mode states of one bridge optimizer (host memory, not saved).

    Args:
        core: the configured core optimizer (its rule, ``exact_history`` and name).

    Every method takes a lock: the kernels release the GIL, and a graph may run the
    catch-ups of two tables at once.
    """

    def __init__(self, core):
        self.core = core
        self.rule = core._rule
        self.history = core.exact_history
        self.stochastic_rounding = core.stochastic_rounding
        self.name = core.name
        self.states = {}
        #: Keys of the variables whose lookups a traced function reads without a catch-up
        #: (:func:`idle_always_identity`); a step that leaves rows of one behind (another
        #: function traced with weight decay) brings them all current (:meth:`step`).
        self.traced_current = set()
        self._lock = threading.Lock()

    def step(self, updates, coefficients, wd_lr, sparse_type, dense_run, lazy_run):
        """One step, by :func:`sparseopt._exact.run`: ``updates`` are ``(Variable, update)``
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
        """Bring rows ``indices`` of ``variable`` (a :class:`Variable`) current; the indices
        are checked as a sparse gradient's (type, range) before anything is written."""
        var = variable.var

        def rows(state, idx):
            idx = np.asarray(idx).reshape(-1)
            values = np.empty((idx.shape[0],) + var.shape[1:], var.dtype)
            _, idx = _validation.sparse_gradient(IndexedSlices(values, idx), var, state.name)
            return _validation.plan(idx, var.shape[0], state.name)[0]

        with self._lock, _Scope(self, [variable]) as scope:
            _exact.catch_up(scope, var, indices, rows)

    def flush(self, variables):
        """Bring every row of ``variables`` (:class:`Variable` objects) current."""
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
