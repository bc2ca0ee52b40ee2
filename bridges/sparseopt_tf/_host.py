"""One optimizer step on host arrays: validate, plan, then run the kernels.

This is the part of a step that runs inside the hand-over (eagerly, or as the body of
a ``tf.numpy_function``). It sees only NumPy arrays that alias the TensorFlow
buffers; :mod:`sparseopt_tf._handover` guarantees that they do. The checks are the
core's own (:mod:`sparseopt._validation`, the functions ``sparseopt.Optimizer``
runs), so a bad input raises the same error with the same message as in the core.
As there, every input is validated and every sparse gradient is planned (duplicates
grouped, indices range-checked) before the first write, so a bad step changes nothing.

The step itself is the core's: each job becomes the core's update
(``sparseopt.optimizer._SparseUpdate`` / ``_DenseUpdate``, a row-wise rule's wrapped in
``sparseopt.optimizers._rowwise._RowUpdate``) on a :class:`_State` that shows the core
this hand-over's views, the sparse jobs' plans are made together
(``sparseopt.optimizer._plan_sparse``), and the kernels run by
``sparseopt.optimizer.run_lazy`` (the lazy sparse jobs of one kernel configuration in one
parallel region) or, in exact mode, by :func:`sparseopt._exact.run`.
"""

import math
import threading
from dataclasses import dataclass

import numpy as np

from sparseopt import _config, errors
from sparseopt import optimizer as _core
from sparseopt.indexed_slices import IndexedSlices
from sparseopt.kernels import cpu, lowp
from sparseopt.optimizers._rowwise import _RowUpdate
from sparseopt.optimizers.adafactor import _FactoredUpdate
from sparseopt.rules import _variant
from sparseopt_tf import _exact


@dataclass(frozen=True)
class Job:
    """What is known at trace time about one ``(gradient, variable)`` pair.

    Attributes:
        name: the variable's name, for error messages.
        sparse: True for an ``IndexedSlices`` gradient (then two gradient arrays follow
            the variable and slots: values, indices), else one dense gradient array.
        nslots: how many element slot arrays follow the variable (the kept slots, in
            ``SLOTS`` order; each of the variable's shape).
        used: three booleans: which of the rule's ``SLOTS`` those are.
        has_wd: whether decoupled weight decay applies to this variable.
        key: the variable's key in the exact-mode states (one per variable and device).
        nrowslots: for a row-wise rule, how many row slot arrays (shape ``(rows,)``,
            in ``ROW_SLOTS`` order) follow the element slots.
        row_used: for a row-wise rule, three booleans: which of the rule's
            ``ROW_SLOTS`` those are (``None`` for an elementwise rule).
    """

    name: str
    sparse: bool
    nslots: int
    used: tuple
    has_wd: bool
    key: object
    nrowslots: int = 0
    row_used: tuple = None

    @property
    def num_arrays(self):
        return 1 + self.nslots + self.nrowslots + (2 if self.sparse else 1)


class HostStep:
    """Runs one step of ``rule`` for a list of :class:`Job`.

    Args:
        core: the configured core optimizer; its ``_coefficients(hypers, step)`` turns
            the step's hyperparameters into the rule's ``Coefficients``, and its
            ``_next_scalar_state(hypers, step)`` advances its host state (Nadam's
            ``u_product``), which the bridge keeps in TensorFlow variables.
        rule: the rule module the kernels run.
        hyper_names: names of the hyperparameters in the scalars vector (the learning
            rate first). The host state after this step follows them, named by the
            core's ``_scalar_state_names``.

    In exact mode (the core's ``sparse_mode``) the validated step runs through
    :meth:`sparseopt_tf._exact.ExactBook.step`, the core's own exact-mode step.
    """

    def __init__(self, core, rule, hyper_names):
        self.core = core
        self.rule = rule
        self.hyper_names = tuple(hyper_names)
        self.state_names = tuple(type(core)._scalar_state_names)
        self.rowwise = hasattr(rule, "ROW_SLOTS")
        # Adafactor: its r and c come as a job's row slots (sparseopt.optimizers.adafactor)
        self.factored = vars(rule).get("FACTORED", False) is True
        self._state_lock = threading.Lock()
        self._threads = _config.StepThreads()  # the thread count's measurements (sparseopt._config)
        #: ``sparse_mode="exact"``: the exact-mode states (:class:`sparseopt_tf._exact.ExactBook`).
        self.exact = _exact.ExactBook(core) if core.sparse_mode == "exact" else None
        self._slot_names = {}  # id(Job) -> (Job, kept slot names, kept row slot names)

    def _hypers(self, scalars, with_state):
        """``(step, weight_decay * lr, {name: value})`` from a scalars vector, checked finite."""
        scalars = np.asarray(scalars, np.float64)
        names = self.hyper_names + (self.state_names if with_state else ())
        if scalars.shape != (2 + len(names),):
            raise ValueError(f"{self.core.name}: internal error: {scalars.shape[0]} scalars for "
                             f"step, weight decay and {names}")
        step = int(scalars[0])
        wd_lr = float(scalars[1])
        hypers = dict(zip(names, (float(x) for x in scalars[2:])))
        for key, value in list(hypers.items()) + [("weight_decay * learning_rate", wd_lr)]:
            if not math.isfinite(value):
                raise errors.HyperparameterError(
                    f"{self.core.name}: hyperparameter {key!r} is {value}; it must be finite")
        return step, wd_lr, hypers

    def check_dtype(self, name, dtype):
        """The core's check of a variable's dtype (NumPy ``dtype``), raised when the slots
        are made, before anything is: float32, float64, bfloat16 or float16 (with the core's
        message)."""
        self.core._check_variable(np.empty((0,), dtype), name)

    def next_scalar_state(self, scalars, current):
        """The core's host state after this step, as a float64 vector.

        Args:
            scalars: float64 ``[step, weight_decay * lr, *hyperparameters]`` (no state).
            current: float64, the state before this step, in ``_scalar_state_names`` order.

        The core reads its state from its own ``_scalar_state``; this instance is never
        stepped, so that dict is scratch, filled here under a lock (replicas of a
        ``tf.distribute`` strategy may call this concurrently).
        """
        step, _, hypers = self._hypers(scalars, with_state=False)
        current = np.asarray(current, np.float64).reshape(-1)
        with self._state_lock:
            for name, value in zip(self.state_names, current):
                self.core._scalar_state[name][...] = value
            nxt = self.core._next_scalar_state(hypers, step)
        return np.array([nxt[name] for name in self.state_names], np.float64)

    def __call__(self, jobs, scalars, arrays):
        """``scalars``: float64 ``[step, weight_decay * lr, *hyperparameters, *state after this
        step]``; ``arrays``: per job, the variable, its slots, its row slots, then the gradient
        (dense) or values and indices (sparse)."""
        step, wd_lr, hypers = self._hypers(scalars, with_state=True)
        if sum(job.num_arrays for job in jobs) != len(arrays):
            raise ValueError(f"{self.core.name}: internal error: {len(arrays)} arrays for "
                             f"{sum(job.num_arrays for job in jobs)} expected")
        updates = self._validate(jobs, arrays)
        if type(self.core)._zero_learning_rate_is_no_step and hypers["learning_rate"] == 0.0:
            # As in the core (Ftrl, whose rule divides by the learning rate): a valid step
            # at learning rate 0 writes nothing; the optimizer's iterations still advance.
            return np.int32(0)
        coefficients = self.core._coefficients(hypers, step)
        # 16-bit variables: this step's rounding (the core's: its seed, iterations, mode)
        self.core._set_rounding(updates, step)

        # Every input is valid: from here on the step runs to completion, with as many of
        # Numba's threads as its work warrants (sparseopt._config.enter_step).
        threads = _config.enter_step(_work(updates), self._threads)
        try:
            if self.rowwise:  # the core's row-reduction kernels (sparseopt.optimizers._rowwise)
                updates = [(state, _RowUpdate(update, state.row_slots)) for state, update in updates]
            elif self.factored:
                updates = [(state, _FactoredUpdate(update)) for state, update in updates]
            def lazy_run(pairs):
                _core.run_lazy(self.rule, pairs, coefficients, wd_lr, _has_wd,
                               self.core._batch_tables)

            if self.exact is not None:
                _core.widen_sparse(updates)  # exact mode's kernels read float gradient values
                rule = self.rule
                self.exact.step(updates, coefficients, wd_lr, _core._SparseUpdate,
                                lambda state, update, c, wd, has_wd: update.run(
                                    _variant.for_step(rule, c), state, c, wd, has_wd), lazy_run)
            else:
                lazy_run(updates)
            return np.int32(0)
        finally:
            _config.leave_step(threads)

    def exact_variable(self, job, group):
        """The :class:`sparseopt_tf._exact.Variable` of a job's arrays (variable, slots, ...)."""
        names = [n for n, u in zip(self.rule.SLOTS, job.used) if u]
        return _exact.Variable(job.key, group[0], job.name,
                               dict(zip(names, group[1:1 + job.nslots])), job.has_wd, self.core.slot_dtype)

    def _validate(self, jobs, arrays):
        """Every job's arrays checked with the core's checks, every sparse gradient planned,
        as the core's ``Optimizer._validate`` does it: the plans of a step's sparse jobs made
        together (``sparseopt.optimizer._plan_sparse``), and the first bad job in order
        raises, before anything is written. Returns the core's ``(state, update)`` pairs."""
        batch = self.core._batch_tables and len(jobs) > 1
        pending = []   # sparse updates whose plans are made together, once all are checked
        updates = []
        try:
            for job, group in zip(jobs, _groups(jobs, arrays)):
                state = self._state(job, group)
                var = state.var
                if job.sparse:
                    update = _core._SparseUpdate.validate(IndexedSlices(group[-2], group[-1]),
                                                          var, job.name)
                    if batch:
                        pending.append((update, var.shape[0]))
                    else:
                        update.plan(var)
                else:
                    update = _core._DenseUpdate.validate(group[-1], var, job.name)
                updates.append((state, update))
        except Exception as exc:  # planned outside the handler: no chained traceback
            error = exc
        else:
            error = None
        _core._plan_sparse(pending)  # raises for the first bad index of the jobs before `error`
        if error is not None:
            raise error
        return updates

    def _state(self, job, group):
        """One job's variable and slots, checked, as a :class:`_State`."""
        var = group[0]
        slots = group[1:1 + job.nslots]
        row_slots = group[1 + job.nslots:1 + job.nslots + job.nrowslots]
        self.core._check_variable(var, job.name)   # the core's checks (dtype, layout)
        slot_dtype, row_dtype = slot_dtypes(self.core, var.dtype)
        for s in slots:
            if s.shape != var.shape or s.dtype != slot_dtype:
                raise errors.ShapeMismatchError(
                    f"{job.name!r}: a slot has shape {s.shape} and dtype {s.dtype}; expected "
                    f"{var.shape} and {slot_dtype}")
        shapes = self.rule.factored_shapes(var.shape) if self.factored else [var.shape[:1]] * len(row_slots)
        for s, shape in zip(row_slots, shapes):
            if s.shape != shape or s.dtype != row_dtype:
                raise errors.ShapeMismatchError(
                    f"{job.name!r}: a row slot has shape {s.shape} and dtype {s.dtype}; expected "
                    f"{shape} and {row_dtype}")
        names, row_names = self._names(job)
        return _State(job, var, dict(zip(names, slots)),
                      dict(zip(row_names, row_slots)) if self.rowwise or self.factored else None,
                      self.core.slot_dtype)

    def _names(self, job):
        """``(slot names, row slot names)`` of a job's kept slots, in the rule's order."""
        found = self._slot_names.get(id(job))
        if found is None or found[0] is not job:
            found = self._slot_names[id(job)] = (
                job, tuple(n for n, u in zip(self.rule.SLOTS, job.used) if u),
                tuple(n for n, u in zip(getattr(self.rule, "ROW_SLOTS", None)
                                        or getattr(self.rule, "FACTORED_SLOTS", ()),
                                        job.row_used or ()) if u))
        names = found[1:]
        return names


def slot_dtypes(core, dtype):
    """``(element slots' dtype, row slots' dtype)`` of a variable of NumPy ``dtype``, as the
    core keeps them (:class:`sparseopt.slots.VariableState`): the variable's for float32 and
    float64; for a 16-bit variable float32 (the math's), or bfloat16 element slots with the
    core's ``slot_dtype="bfloat16"``; row slots (``RowwiseAdagrad``) always in the math's."""
    if not lowp.kind(dtype):
        return np.dtype(dtype), np.dtype(dtype)
    f32 = np.dtype(np.float32)
    return (lowp.BFLOAT16 if core.slot_dtype == "bfloat16" else f32), f32


class _State:
    """One variable of one hand-over, as the core's :class:`~sparseopt.slots.VariableState`
    (what ``sparseopt.optimizer.run_lazy`` and :func:`sparseopt._exact.run` read): the
    hand-over's views of the variable and its kept slots. The views are new at each
    hand-over, so nothing is kept from one step to the next (``kernel_views`` makes them).

    A 16-bit variable (and bfloat16 slots) reach the kernels as their ``uint16`` views,
    with float32 math and the step's rounding, as in the core: ``kind``, ``slot_kind``,
    ``math_dtype``, and ``lowp`` / ``rounding_key``, which the core's ``_set_rounding``
    sets for the step."""

    __slots__ = ("key", "var", "name", "slots", "kernel_slot_names", "row_slots", "has_wd",
                 "kind", "slot_kind", "math_dtype", "lowp", "rounding_key")

    def __init__(self, job, var, slots, row_slots, slot_dtype=None):
        self.key = job.key
        self.var = var
        self.name = job.name
        self.kernel_slot_names = tuple(slots)       # the kept element slots
        self.row_slots = row_slots                  # {name: (rows,) view} (row-wise rules)
        self.slots = {**slots, **row_slots} if row_slots else slots  # {name: view}, all kept
        self.has_wd = job.has_wd
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


def _has_wd(state):
    """Whether decoupled weight decay applies to a job's kernel (its ``Job.has_wd``)."""
    return state.has_wd


def _work(updates):
    """The elements the step's kernels touch (as ``sparseopt.optimizer._work`` counts them)."""
    work = 0
    for state, update in updates:
        slots = 2 + 2 * len(state.slots)
        if type(update) is _core._SparseUpdate:
            values = update.values
            n = values.shape[0]
            if n:
                work += values.size + slots * (values.size // n) * update.rows.size
        else:
            work += (1 + slots) * state.var.size
    return work


def _groups(jobs, arrays):
    """Each job's arrays: the variable, its slots, its row slots, then its gradient arrays."""
    pos = 0
    for job in jobs:
        yield arrays[pos:pos + job.num_arrays]
        pos += job.num_arrays
