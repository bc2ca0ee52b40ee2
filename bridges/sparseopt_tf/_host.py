"""One optimizer step on host arrays: validate, plan, then run the kernels.

This is the part of a step that runs inside the hand-over (eagerly, or as the body of
a ``tf.numpy_function``). It sees only NumPy arrays that alias the TensorFlow
buffers; :mod:`sparseopt_tf._handover` guarantees that they do.

The step is the core's, through its public face for hosts that keep the variables
themselves (:class:`sparseopt.engine.StepConfig`, ``core.step_config()``): the same
checks, raising the same errors with the same messages, every input validated and every
sparse gradient planned (the plans of a step made together) before the first write, and
the kernels run by the core's own code (:func:`sparseopt.engine.run_step`: the lazy
sparse jobs of one kernel configuration in one parallel region; exact mode through a
:class:`sparseopt.engine.ExactBook`). Each job's arrays are shown to the core as a
:class:`sparseopt.engine.HostVariable`.
"""

import math
from dataclasses import dataclass

import numpy as np

from sparseopt import _config, engine, errors
from sparseopt.indexed_slices import IndexedSlices


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
        nrowslots: how many slot arrays of other shapes follow the element slots (a
            row-wise rule's ``(rows,)`` slots in ``ROW_SLOTS`` order; Adafactor's ``r``
            and ``c``).
        row_used: three booleans: which of the rule's ``ROW_SLOTS`` (``FACTORED_SLOTS``)
            those are (``None`` for an elementwise rule).

    A job's slots are those of its variable's :meth:`sparseopt.engine.StepConfig.slot_layout`.
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
    """Runs one step of a core optimizer for a list of :class:`Job`.

    Args:
        config: the core optimizer's :class:`sparseopt.engine.StepConfig`: its rule, slots,
            coefficients, host state (Nadam's ``u_product``, which the bridge keeps in
            TensorFlow variables), checks and step.
        hyper_names: names of the hyperparameters in the scalars vector (the learning
            rate first). The host state after this step follows them, named by the
            config's ``scalar_state``.

    In exact mode (the config's ``sparse_mode``) the validated step runs through
    :meth:`sparseopt.engine.ExactBook.step`, the core's own exact-mode step.
    """

    def __init__(self, config, hyper_names):
        self.config = config
        self.rule = config.rule
        self.hyper_names = tuple(hyper_names)
        self.state_names = tuple(name for name, _ in config.scalar_state)
        self._threads = _config.StepThreads()  # the thread count's measurements (sparseopt._config)
        #: ``sparse_mode="exact"``: the exact-mode states (:class:`sparseopt.engine.ExactBook`).
        self.exact = engine.ExactBook(config) if config.sparse_mode == "exact" else None
        self._layouts = {}  # id(Job) -> (Job, the SlotLayout of its variable)

    def _hypers(self, scalars, with_state):
        """``(step, weight_decay * lr, {name: value})`` from a scalars vector, checked finite."""
        scalars = np.asarray(scalars, np.float64)
        names = self.hyper_names + (self.state_names if with_state else ())
        if scalars.shape != (2 + len(names),):
            raise ValueError(f"{self.config.name}: internal error: {scalars.shape[0]} scalars for "
                             f"step, weight decay and {names}")
        step = int(scalars[0])
        wd_lr = float(scalars[1])
        hypers = dict(zip(names, (float(x) for x in scalars[2:])))
        for key, value in list(hypers.items()) + [("weight_decay * learning_rate", wd_lr)]:
            if not math.isfinite(value):
                raise errors.HyperparameterError(
                    f"{self.config.name}: hyperparameter {key!r} is {value}; it must be finite")
        return step, wd_lr, hypers

    def check_dtype(self, name, dtype):
        """The core's check of a variable's dtype (NumPy ``dtype``), raised when the slots
        are made, before anything is: float32, float64, bfloat16 or float16 (with the core's
        message)."""
        self.config.check_variable(np.empty((0,), dtype), name)

    def next_scalar_state(self, scalars, current):
        """The core's host state after this step, as a float64 vector.

        Args:
            scalars: float64 ``[step, weight_decay * lr, *hyperparameters]`` (no state).
            current: float64, the state before this step, in ``scalar_state`` order.
        """
        step, _, hypers = self._hypers(scalars, with_state=False)
        current = np.asarray(current, np.float64).reshape(-1)
        nxt = self.config.next_scalar_state(hypers, step, current.tolist())
        return np.array([nxt[name] for name in self.state_names], np.float64)

    def __call__(self, jobs, scalars, arrays):
        """``scalars``: float64 ``[step, weight_decay * lr, *hyperparameters, *state after this
        step]``; ``arrays``: per job, the variable, its slots, its row slots, then the gradient
        (dense) or values and indices (sparse)."""
        config = self.config
        step, wd_lr, hypers = self._hypers(scalars, with_state=True)
        if sum(job.num_arrays for job in jobs) != len(arrays):
            raise ValueError(f"{config.name}: internal error: {len(arrays)} arrays for "
                             f"{sum(job.num_arrays for job in jobs)} expected")
        # Each job's state is made (and checked) in order; the core checks the jobs before
        # the first bad state, which raises after them: the first bad job in order raises,
        # before anything is written.
        items = []
        slot_setting = config.slot_dtype
        try:
            for job, group in zip(jobs, _groups(jobs, arrays)):
                items.append((self._state(job, group, slot_setting),
                              IndexedSlices(group[-2], group[-1]) if job.sparse else group[-1]))
        except Exception as exc:  # raised by validate, after the jobs before it
            bad_state = exc
        else:
            bad_state = None
        updates = config.validate(items, bad_state)
        if config.zero_learning_rate_is_no_step and hypers["learning_rate"] == 0.0:
            # As in the core (Ftrl, whose rule divides by the learning rate): a valid step
            # at learning rate 0 writes nothing; the optimizer's iterations still advance.
            return np.int32(0)
        coefficients = config.coefficients(hypers, step)
        # 16-bit variables: this step's rounding (the core's: its seed, iterations, mode)
        config.set_rounding(updates, step)

        # Every input is valid: from here on the step runs to completion, with as many of
        # Numba's threads as its work warrants (sparseopt._config.enter_step).
        threads = _config.enter_step(config.work(updates), self._threads)
        try:
            config.run(updates, coefficients, wd_lr, _has_wd,
                       None if self.exact is None else self.exact.step)
            return np.int32(0)
        finally:
            _config.leave_step(threads)

    def exact_variable(self, job, group):
        """The :class:`sparseopt.engine.HostVariable` of a job's arrays (the variable and its
        element slots) for a catch-up or a flush."""
        names = self._layout(job, group[0]).names
        return engine.HostVariable(group[0], job.name, dict(zip(names, group[1:1 + job.nslots])),
                                   None, job.has_wd, self.config.slot_dtype, job.key)

    def _state(self, job, group, slot_setting):
        """One job's variable and slots, checked, as a :class:`sparseopt.engine.HostVariable`
        (``slot_setting``: the config's ``slot_dtype``, read once per step)."""
        config = self.config
        var = group[0]
        slots = group[1:1 + job.nslots]
        other = group[1 + job.nslots:1 + job.nslots + job.nrowslots]
        config.check_variable(var, job.name)   # the core's checks (dtype, layout)
        slot_dtype, row_dtype = config.slot_dtypes(var.dtype)
        layout = self._layout(job, var)
        for s in slots:
            if s.shape != var.shape or s.dtype != slot_dtype:
                raise errors.ShapeMismatchError(
                    f"{job.name!r}: a slot has shape {s.shape} and dtype {s.dtype}; expected "
                    f"{var.shape} and {slot_dtype}")
        for s, shape in zip(other, layout.other_shapes):
            if s.shape != shape or s.dtype != row_dtype:
                raise errors.ShapeMismatchError(
                    f"{job.name!r}: a row slot has shape {s.shape} and dtype {s.dtype}; expected "
                    f"{shape} and {row_dtype}")
        return engine.HostVariable(var, job.name, dict(zip(layout.names, slots)),
                                   dict(zip(layout.other_names, other)) if other else None,
                                   job.has_wd, slot_setting, job.key)

    def _layout(self, job, var):
        """The :class:`sparseopt.engine.SlotLayout` of a job's variable (kept per job)."""
        found = self._layouts.get(id(job))
        if found is None or found[0] is not job:
            found = self._layouts[id(job)] = (job, self.config.slot_layout(var.shape))
        return found[1]


def _has_wd(state):
    """Whether decoupled weight decay applies to a job's kernel (its ``Job.has_wd``)."""
    return state.has_wd


def _groups(jobs, arrays):
    """Each job's arrays: the variable, its slots, its row slots, then its gradient arrays."""
    pos = 0
    for job in jobs:
        yield arrays[pos:pos + job.num_arrays]
        pos += job.num_arrays
