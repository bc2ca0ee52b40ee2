"""One optimizer step on host arrays: validate, plan, then run the kernels.

This is the part of a step that runs inside the hand-over (eagerly, or as the body of
a ``tf.numpy_function``). It sees only NumPy arrays that alias the TensorFlow
buffers; :mod:`sparseopt_tf._handover` guarantees that they do. The checks are the
core's own (:mod:`sparseopt._validation`, the functions ``sparseopt.Optimizer``
runs), so a bad input raises the same error with the same message as in the core.
As there, every input is validated and every sparse gradient is planned (duplicates
grouped, indices range-checked) before the first write, so a bad step changes nothing.
"""

import math
import threading
from dataclasses import dataclass

import numpy as np

from sparseopt import _config, _validation, errors
from sparseopt.indexed_slices import IndexedSlices
from sparseopt.kernels import cpu
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
        self._state_lock = threading.Lock()
        self._threads = _config.StepThreads()  # the thread count's measurements (sparseopt._config)
        #: ``sparse_mode="exact"``: the exact-mode states (:class:`sparseopt_tf._exact.ExactBook`).
        self.exact = _exact.ExactBook(core) if core.sparse_mode == "exact" else None

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
        planned = [self._validate(job, group) for job, group in zip(jobs, _groups(jobs, arrays))]
        if type(self.core)._zero_learning_rate_is_no_step and hypers["learning_rate"] == 0.0:
            # As in the core (Ftrl, whose rule divides by the learning rate): a valid step
            # at learning rate 0 writes nothing; the optimizer's iterations still advance.
            return np.int32(0)
        coefficients = self.core._coefficients(hypers, step)

        # Every input is valid: from here on the step runs to completion, with as many of
        # Numba's threads as its work warrants (sparseopt._config.enter_step).
        threads = _config.enter_step(_work(jobs, planned), self._threads)
        try:
            if self.exact is not None:
                updates = [(self.exact_variable(job, group), _Update.of(job, plan))
                           for job, group, plan in zip(jobs, _groups(jobs, arrays), planned)]
                self.exact.step(updates, coefficients, wd_lr, _SparseUpdate,
                                lambda _, u, c, wd, has_wd: self._run_job(u.job, u.plan, c, wd))
                return np.int32(0)
            for job, plan in zip(jobs, planned):
                dtype = plan[0].dtype.type
                c = type(coefficients)(*(dtype(x) for x in coefficients))
                self._run_job(job, plan, c, dtype(wd_lr if job.has_wd else 0.0))
            return np.int32(0)
        finally:
            _config.leave_step(threads)

    def exact_variable(self, job, group):
        """The :class:`sparseopt_tf._exact.Variable` of a job's arrays (variable, slots, ...)."""
        names = [n for n, u in zip(self.rule.SLOTS, job.used) if u]
        return _exact.Variable(job.key, group[0], job.name,
                               dict(zip(names, group[1:1 + job.nslots])), job.has_wd)

    def _run_job(self, job, plan, c, wd):
        """One job's kernel, the lazy way (``c`` and ``wd`` in the variable's dtype)."""
        var = plan[0]
        if self.rowwise:
            self._run_rowwise(job, plan, c, wd)
        elif job.sparse:
            _, slots, _, (rows, offsets, order, values) = plan
            if rows.size:
                kernel = cpu.sparse_kernel(_variant.for_step(self.rule, c), job.used, job.has_wd)
                kernel(var, *_place(slots, job.used, var), rows, offsets, order, values, c, wd)
        else:
            _, slots, _, g = plan
            kernel = cpu.dense_kernel(_variant.for_step(self.rule, c), job.used, job.has_wd)
            kernel(var, g, *_place(slots, job.used, var), c, wd)

    def _validate(self, job, group):
        """Check one job's arrays with the core's checks; returns ``(var, slots, row slots,
        gradient)`` reshaped for the kernels (a sparse gradient as its plan)."""
        var = group[0]
        slots = group[1:1 + job.nslots]
        row_slots = group[1 + job.nslots:1 + job.nslots + job.nrowslots]
        _validation.check_host_variable(var, job.name)
        for s in slots:
            if s.shape != var.shape or s.dtype != var.dtype:
                raise errors.ShapeMismatchError(
                    f"{job.name!r}: a slot has shape {s.shape} and dtype {s.dtype}; the variable "
                    f"has {var.shape} and {var.dtype}")
        for s in row_slots:
            if s.shape != var.shape[:1] or s.dtype != var.dtype:
                raise errors.ShapeMismatchError(
                    f"{job.name!r}: a row slot has shape {s.shape} and dtype {s.dtype}; expected "
                    f"{var.shape[:1]} and {var.dtype}")
        num_rows = var.shape[0] if var.ndim else 1
        width = math.prod(var.shape[1:])
        if job.sparse:
            values, indices = _validation.sparse_gradient(IndexedSlices(group[-2], group[-1]), var, job.name)
            rows, offsets, order = _validation.plan(indices, num_rows, job.name)
            gradient = (rows, offsets, order, values)
        else:
            gradient = _validation.dense_gradient(group[-1], var, job.name)
        shape = (num_rows, width) if self.rowwise or job.sparse else (-1,)
        if not job.sparse:
            gradient = gradient.reshape(shape)
        rows1d = [r.reshape(num_rows) for r in row_slots]
        return var.reshape(shape), [s.reshape(shape) for s in slots], rows1d, gradient

    def _run_rowwise(self, job, plan, c, wd):
        """The core's row-reduction kernels (as ``sparseopt.optimizers._rowwise`` runs them)."""
        p, slots, row_slots, gradient = plan
        num_rows, width = p.shape
        rule = _variant.for_step(self.rule, c)
        placeholder = p[:, 0] if width else p.reshape(num_rows)
        rows_args = _place(row_slots, job.row_used, placeholder)
        width = type(wd)(width)
        if job.sparse:
            rows, offsets, order, values = gradient
            if rows.size:
                kernel = cpu.row_sparse_kernel(rule, job.used, job.row_used, job.has_wd)
                kernel(p, *_place(slots, job.used, p), *rows_args, rows, offsets, order, values,
                       c, wd, width)
        else:
            kernel = cpu.row_dense_kernel(rule, job.used, job.row_used, job.has_wd)
            kernel(p, gradient, *_place(slots, job.used, p), *rows_args, c, wd, width)


def _work(jobs, planned):
    """The elements the step's kernels touch (as ``sparseopt.optimizer._work`` counts them)."""
    work = 0
    for job, (var, _, _, gradient) in zip(jobs, planned):
        slots = 2 + 2 * (job.nslots + job.nrowslots)
        if job.sparse:
            rows, _, _, values = gradient
            n = values.shape[0]
            if n:
                work += values.size + slots * (values.size // n) * rows.size
        else:
            work += (1 + slots) * var.size
    return work


def _groups(jobs, arrays):
    """Each job's arrays: the variable, its slots, its row slots, then its gradient arrays."""
    pos = 0
    for job in jobs:
        yield arrays[pos:pos + job.num_arrays]
        pos += job.num_arrays


class _Update:
    """A validated job as :func:`sparseopt._exact.run` sees an update (``plan``: ``_validate``'s)."""

    __slots__ = ("job", "plan")

    def __init__(self, job, plan):
        self.job = job
        self.plan = plan

    @staticmethod
    def of(job, plan):
        return (_SparseUpdate if job.sparse else _Update)(job, plan)


class _SparseUpdate(_Update):
    """A sparse job: the de-duplication plan is the core's ``rows``, ``offsets``, ``order``, ``values``."""

    __slots__ = ()

    rows = property(lambda self: self.plan[3][0])
    offsets = property(lambda self: self.plan[3][1])
    order = property(lambda self: self.plan[3][2])
    values = property(lambda self: self.plan[3][3])


def _place(slots, used, placeholder):
    """The three slot arguments in ``SLOTS`` order: kept slots, ``placeholder`` for the others."""
    kept = iter(slots)
    return [next(kept) if u else placeholder for u in used]
