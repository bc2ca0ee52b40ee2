"""The optimizer base class: everything that is not an optimizer's math.

A step (``apply_gradients``) runs, in order:

1. ``gradient_aggregator`` and ``gradient_transformers`` on the ``(gradient, variable)`` list;
2. validation of every pair, and the de-duplication plan of every sparse gradient
   (nothing is written before every check has passed);
3. the hyperparameters, resolved for this step (floats, callables, schedules) and
   checked to be finite, then the rule's per-step coefficients;
4. clipping (``clipvalue``, ``clipnorm``, ``global_clipnorm``) on the de-duplicated
   gradient, so a sparse gradient is clipped as its dense equivalent would be;
5. the kernels (:func:`sparseopt.engine.run_step`, which the TensorFlow bridge's host step
   runs too): decoupled weight decay and the rule in one pass. In lazy mode the sparse
   updates of NumPy variables that share a kernel configuration (rule, dtype, slots, weight
   decay, a 16-bit variable's rounding) run in one parallel region over all their tables'
   unique rows (:func:`sparseopt.backends.cpu.run_tables`; their plans were made together
   in step 2, :func:`sparseopt.backends.cpu.plan_sparse`); the other variables get one
   kernel call each;
6. constraints, then the host state (Nadam's ``u_product``) and ``iterations`` advance.

Each variable's arrays belong to a backend (:mod:`sparseopt.backends`: NumPy arrays to
the CPU's, CUDA arrays to the CUDA one's), which checks them, keeps their slots and runs
their updates. Subclasses (see :mod:`sparseopt.optimizers`) name their rule, their
hyperparameters and their slots; they hold no math.
"""

import math
import numbers
import struct
import threading

import numba
import numpy as np

from sparseopt import (_config, _exact, _hyperparameters, _rollback, _validation, backends, engine, errors,
                       schedules)
from sparseopt.backends import cpu
from sparseopt.indexed_slices import IndexedSlices
from sparseopt.kernels import lowp
from sparseopt.rules._floatx import f32
from sparseopt.slots import VariableState

_SPARSE_MODES = ("lazy", "exact")


class Optimizer:
    """Base class of sparseopt's optimizers (the Keras optimizer interface, on arrays).

    Variables are NumPy arrays (C-contiguous, writeable, float32 or float64, or
    16-bit: bfloat16 or float16), updated in place. Gradients are arrays of the
    variable's shape and dtype (float32 also for a 16-bit variable), or
    :class:`~sparseopt.IndexedSlices` whose rows are updated row-wise.

    A 16-bit variable (``ml_dtypes.bfloat16`` or ``np.float16``) keeps float32 slots;
    the rule's math runs in float32 and the new value is rounded to the variable's
    dtype, stochastically by default. The random bits are a hash of (``seed``, step,
    row, column) (:mod:`sparseopt.kernels.lowp`): the same for any number of threads,
    and a run resumed from a checkpoint (config and ``iterations``) continues bit for
    bit. In ``sparse_mode="exact"`` a row's idle steps are computed as for a float32
    variable and rounded once, with the bits of the window's last step.

    Args:
        learning_rate: a float, a no-argument callable, or a
            :class:`~sparseopt.schedules.LearningRateSchedule` called with ``iterations``.
        name: the optimizer's name.
        weight_decay: decoupled weight decay (Keras 3): before the update,
            ``p -= p * weight_decay * learning_rate``; on the touched rows only for a
            sparse gradient in lazy mode.
        clipnorm: clip each variable's gradient to this L2 norm.
        clipvalue: clip each gradient element to ``[-clipvalue, clipvalue]``.
        global_clipnorm: clip all gradients together to this global L2 norm.
        gradient_aggregator: function on the list of ``(gradient, variable)`` pairs,
            run first (identity by default: the core runs on one device).
        gradient_transformers: functions on that list, run after the aggregator.
        sparse_mode: ``"lazy"`` (touched rows only) or ``"exact"`` (the dense rule's
            results at sparse cost: skipped rows are caught up when next touched, by
            :meth:`catch_up`, or by :meth:`flush`; see :mod:`sparseopt._exact`).
        exact_history: steps of coefficients exact mode keeps (default 1024); every
            variable is flushed at least once per ``exact_history`` steps.
        stochastic_rounding: round the new values of 16-bit variables stochastically
            (unbiased: up with probability equal to the dropped fraction), the default;
            False rounds to nearest, ties to even. No effect on float32/float64 variables.
        slot_dtype: the slots of 16-bit variables: None or ``"float32"`` (the default), or
            ``"bfloat16"`` (half the memory; rounded like the variable, stochastically by
            default). Float32 and float64 variables keep slots of their own dtype, and
            row-wise state (``RowwiseAdagrad``) stays float32.
        seed: an integer in ``[0, 2**63)``, the seed of the stochastic rounding's random
            bits (part of the config). Defaults to 0: two runs with the same inputs are
            identical bit for bit unless given different seeds.
        _legacy: compute ``tf_keras.optimizers.legacy.<Name>``'s math (Keras 2's
            ``OptimizerV2``: its epsilon placements, float32 hyperparameters and
            schedules) instead of Keras 3's, for the optimizers that have one
            (``SGD``, ``Adam``, ``Adagrad``, ``RMSprop``, ``Adadelta``, ``Adamax``,
            ``Nadam``, ``Ftrl``). Private: the bridge's ``sparseopt_tf.legacy``
            classes build on it; see :mod:`sparseopt.rules` for each difference.
        **kwargs: other Keras arguments that do not apply are rejected by name.

    As in Keras 3, the learning rate is held in float32 (Keras' ``floatx``) even
    for float64 variables; the other hyperparameters keep full precision.

    Threads: an optimizer is thread compatible, not thread safe: do not call it from
    two threads at once (a step updates shared slots and ``iterations``). A cheap guard
    catches it: a step, ``flush``, ``catch_up`` or ``set_weights`` entered while another
    thread is inside one of them raises :class:`~sparseopt.errors.ConcurrentUseError`
    (and changes nothing). Different optimizers may step in different threads at once.
    """

    #: The rule module (:mod:`sparseopt.rules`) that holds the math.
    _rule = None
    #: Names of the float hyperparameters that may be callables or schedules.
    _hyper_names = ("learning_rate",)
    #: Other settings checked whenever they are set (construction and reassignment):
    #: ``{name: kind}``, kind ``"number"`` (a float in its range), ``"flag"`` (a bool),
    #: ``"optional_positive"`` or ``"optional_nonnegative"`` (None or such a float).
    _settings = {"weight_decay": "optional_nonnegative", "clipnorm": "optional_positive",
                 "clipvalue": "optional_positive", "global_clipnorm": "optional_positive",
                 "stochastic_rounding": "flag"}
    #: Ranges that differ from :data:`sparseopt._hyperparameters.DEFAULT_RANGES`.
    _ranges = {}
    #: Settings that decide which slots exist (SGD's ``momentum``, Adam's ``amsgrad``):
    #: once slots are built, a reassignment that would change the slot set is refused.
    _structural = ()
    #: Whether a step whose learning rate is 0 changes nothing (Ftrl, whose rule divides
    #: by the learning rate): the variables and slots stay as they are, ``iterations``
    #: advances.
    _zero_learning_rate_is_no_step = False
    #: Whether the rule carries tf_keras' legacy math (``_legacy=True`` is accepted).
    _has_legacy_math = False
    #: Names of 0-d float64 host state advanced once per step (Nadam's ``u_product``),
    #: listed by :meth:`variables` right after ``iterations``.
    _scalar_state_names = ()
    #: Whether the lazy sparse updates of NumPy variables in one step run together: their
    #: de-duplication plans in one call and each kernel configuration's tables in one
    #: parallel region (:func:`sparseopt.backends.cpu.run_tables`). Private: False runs them table by table
    #: (the tests' reference; the same bits).
    _batch_tables = not numba.config.DISABLE_JIT

    def __init__(self, learning_rate, name, *, weight_decay=None, clipnorm=None,
                 clipvalue=None, global_clipnorm=None, gradient_aggregator=None,
                 gradient_transformers=None, sparse_mode="lazy", exact_history=None,
                 stochastic_rounding=True, slot_dtype=None, seed=0, _legacy=False, **kwargs):
        if kwargs:
            raise TypeError(f"{type(self).__name__}: unexpected keyword arguments "
                            f"{sorted(kwargs)}")
        object.__setattr__(self, "_hyper", {})
        object.__setattr__(self, "_guard", _Guard())
        self.name = name
        self.learning_rate = learning_rate
        if clipnorm is not None and global_clipnorm is not None:
            raise errors.HyperparameterError(
                f"{name}: cannot set both clipnorm ({clipnorm}) and global_clipnorm ({global_clipnorm})")
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        self.global_clipnorm = global_clipnorm
        self.weight_decay = weight_decay
        if sparse_mode not in _SPARSE_MODES:
            raise errors.HyperparameterError(
                f"{name}: sparse_mode must be one of {_SPARSE_MODES}; got {sparse_mode!r}")
        self.sparse_mode = sparse_mode
        self.exact_history = _exact.check_history(name, exact_history)
        self._exact_states = {}    # id(var) -> _exact.ExactState (sparse_mode="exact")
        if _legacy and not type(self)._has_legacy_math:
            raise errors.HyperparameterError(
                f"{name}: {type(self).__name__} has no tf_keras legacy variant (_legacy=True)")
        self._legacy = bool(_legacy)
        self.gradient_aggregator = gradient_aggregator
        self.gradient_transformers = list(gradient_transformers or [])
        self.stochastic_rounding = stochastic_rounding
        self.seed = _check_seed(name, seed)
        self.slot_dtype = _check_slot_dtype(name, slot_dtype)
        self._iterations = np.zeros((), np.int64)
        self._converted_last = {}  # dtype -> (coefficients' key, the same as dtype scalars)
        self._states = {}          # id(var) -> VariableState, in build order
        self._markers = {}         # id(var) -> de-duplication scratch of a CUDA variable
        self._weights = []         # (state, slot name), in creation order
        self._exclude_ids = set()
        self._exclude_names = ()
        self._scalar_state = {key: np.array(self._scalar_state_initial_value(key), np.float64)
                              for key in type(self)._scalar_state_names}

    # ----------------------------------------------------------------- hyperparameters

    def __setattr__(self, key, value):
        cls = type(self)
        if key in cls._hyper_names:
            self._hyper[key] = _check_hyper(self.name, key, value, self._range(key))
        elif key in cls._settings:
            self._set_setting(key, cls._settings[key], value)
        else:
            object.__setattr__(self, key, value)

    def _range(self, key):
        """The range hyperparameter ``key`` must lie in (None: any finite float)."""
        return type(self)._ranges.get(key) or _hyperparameters.DEFAULT_RANGES.get(key)

    def _set_setting(self, key, kind, value):
        name = self.__dict__.get("name", type(self).__name__)
        if kind == "flag":
            value = bool(value)
        elif kind == "number":
            value = _hyperparameters.check_number(name, key, value, self._range(key))
        elif kind == "optional_positive":
            value = _check_optional_positive(name, key, value)
        else:
            value = _check_optional_nonnegative(name, key, value)
        if key in type(self)._structural and self.__dict__.get("_states"):
            missing = object()
            old = self.__dict__.get(key, missing)
            before = tuple(self._slot_names())
            object.__setattr__(self, key, value)
            after = tuple(self._slot_names())
            if after != before:
                object.__setattr__(self, key, old)
                raise errors.HyperparameterError(
                    f"{name}: {key} decides which slots exist ({list(before)} with {key}={old!r}, "
                    f"{list(after)} with {key}={value!r}); it cannot change once slots are built. "
                    f"Create a new optimizer with {key}={value!r} (or set it before the first step)")
            return
        object.__setattr__(self, key, value)

    def __getattr__(self, key):
        hyper = self.__dict__.get("_hyper")
        if hyper is not None and key in hyper:
            return hyper[key]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {key!r}")

    def _resolve(self, key, step=None):
        """The value of hyperparameter ``key`` for this step, checked to be finite."""
        value = self._hyper[key]
        if type(value) is float:  # a constant, checked when it was set (_check_hyper)
            return value
        if isinstance(value, schedules.LearningRateSchedule):
            value = value(self.iterations if step is None else step)
        elif callable(value):
            value = value()
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise errors.HyperparameterError(
                f"{self.name}: hyperparameter {key!r} must give a number; got {value!r}") from None
        # This step's value, checked as a constant is when it is set (range, float32).
        return _hyperparameters.check_value(self.name, key, value, self._range(key))

    def _resolved_hypers(self):
        hypers = {k: self._resolve(k) for k in type(self)._hyper_names}
        # Keras 3 holds the learning rate in a float32 variable (floatx), whatever the
        # variables' dtype; rounding it the same way reproduces Keras in float64 too
        # (checked to stay finite when it was set or resolved).
        hypers["learning_rate"] = f32(hypers["learning_rate"])
        return hypers

    @property
    def iterations(self):
        """The number of steps this optimizer has applied."""
        return int(self._iterations)

    @iterations.setter
    def iterations(self, value):
        value = int(value)
        if value < 0:
            raise errors.HyperparameterError(f"{self.name}: iterations must be >= 0; got {value}")
        self._iterations[()] = value

    # ---------------------------------------------------------- subclass interface

    def _slot_names(self):
        """The slots this configuration keeps: a subset of the rule's ``SLOTS``, in storage order."""
        return self._rule.SLOTS

    def _slot_initial_value(self, slot_name):
        return 0.0

    def _coefficients(self, hypers, step):
        """The rule's ``Coefficients`` for this step (``step = iterations + 1``).

        ``hypers`` holds the resolved hyperparameters and the host state after this
        step (:meth:`_next_scalar_state`).
        """
        raise NotImplementedError

    def _scalar_state_initial_value(self, key):
        return 0.0

    def _next_scalar_state(self, hypers, step):
        """The host state after this step, ``{name: float}``, from the current one.

        Pure: the base class writes it once the step has run, so a rejected step
        leaves it unchanged.
        """
        return {}

    # --------------------------------------------------------------------- building

    def build(self, var_list, names=None):
        """Create the slots of ``var_list`` (done by the first ``apply_gradients`` otherwise).

        Args:
            var_list: the variables (NumPy arrays) this optimizer will update.
            names: optional names for them, used in error messages and configs.
        """
        var_list = list(var_list)
        if names is not None and len(names) != len(var_list):
            raise ValueError(f"{self.name}: got {len(names)} names for {len(var_list)} variables")
        for i, var in enumerate(var_list):
            name = names[i] if names is not None else None
            self._check_variable(var, name or self._default_name(var))
        for i, var in enumerate(var_list):
            self._state_for(var, names[i] if names is not None else None)

    def _default_name(self, var, new_before=0):
        """The state's name, or ``variable N (shape, dtype)`` for the N-th variable seen."""
        state = self._states.get(id(var))
        if state is not None:
            return state.name
        return (f"variable {len(self._states) + new_before} "
                f"(shape {tuple(getattr(var, 'shape', ()))}, {getattr(var, 'dtype', type(var).__name__)})")

    def _state_for(self, var, name=None):
        state = self._states.get(id(var))  # the state holds var, so its id stays unique
        if state is None:
            state = VariableState(var, name or self._default_name(var), self._slot_names(),
                                  self._slot_initial_value, self._rule.SLOTS, slot_dtype=self.slot_dtype)
            self._states[id(var)] = state
            self._weights.extend((state, slot_name) for slot_name in self._slot_names())
        return state

    def add_slot(self, var, slot_name, initializer="zeros", shape=None):
        """Add slot ``slot_name`` for ``var`` and return it (the existing one if present).

        ``initializer`` is ``"zeros"``, ``"ones"``, a number, or a callable
        ``(shape, dtype) -> array``. Slots the optimizer's rule uses live in its
        contiguous storage; other slots are separate arrays.
        """
        state = self._state_for(var)
        if slot_name in state.slots:
            return state.slots[slot_name]
        state.add_extra_slot(slot_name, initializer, shape)
        self._weights.append((state, slot_name))
        return state.slots[slot_name]

    def get_slot(self, var, slot_name):
        """The slot ``slot_name`` of ``var``: a view into the optimizer's slot storage."""
        state = self._states.get(id(var))
        if state is None:
            raise errors.UnknownSlotError(
                f"{self.name}: variable of shape {getattr(var, 'shape', '?')} has no slots "
                f"(it was never built or updated by this optimizer)")
        try:
            return state.slots[slot_name]
        except KeyError:
            raise errors.UnknownSlotError(
                f"{self.name}: {state.name!r} has no slot {slot_name!r}; its slots are "
                f"{list(state.slots)}") from None

    def get_slot_names(self):
        """Names of the slots this optimizer creates for each variable."""
        names = list(self._slot_names())
        for state in self._states.values():
            for slot_name in state.slots:
                if slot_name not in names:
                    names.append(slot_name)
        return names

    # --------------------------------------------------------------------- weights

    def variables(self):
        """The optimizer's state arrays: ``iterations`` (0-d int64), the host state
        (0-d float64, e.g. Nadam's ``u_product``), then slots in creation order."""
        return ([self._iterations] + list(self._scalar_state.values())
                + [state.slots[name] for state, name in self._weights])

    @property
    def weights(self):
        return self.variables()

    def get_weights(self):
        """Copies of :meth:`variables` (in exact mode, after :meth:`flush`)."""
        if self.sparse_mode == "exact":
            self.flush()
        backend_for = backends.backend_for
        return [backend_for(w).to_host(w) for w in self.variables()]

    def set_weights(self, weights):
        """Set ``iterations`` and every slot; the optimizer must already be built.

        Every array is checked (count, shape, dtype kind) before any is written.
        """
        with self._guard.held(self, "set_weights"):
            self._set_weights(weights)

    def _set_weights(self, weights):
        current = self.variables()
        weights = list(weights)
        if len(weights) != len(current):
            raise errors.WeightsMismatchError(
                f"{self.name}: set_weights got {len(weights)} arrays; the optimizer has "
                f"{len(current)} (iterations + {len(current) - 1} slots; build it first)")
        labels = (["iterations"] + list(self._scalar_state)
                  + [f"{state.name!r} slot {name!r}" for state, name in self._weights])
        arrays = []
        for label, cur, new in zip(labels, current, weights):
            new = backends.host_array(new)
            if new.shape != cur.shape:
                raise errors.WeightsMismatchError(
                    f"{self.name}: {label} must have shape {cur.shape}; got {new.shape}")
            if not np.can_cast(new.dtype, cur.dtype, casting="same_kind"):
                raise errors.WeightsMismatchError(
                    f"{self.name}: {label} must have dtype {cur.dtype}; got {new.dtype}")
            arrays.append(new)
        if arrays[0].dtype.kind not in "iub" or int(arrays[0]) < 0:
            raise errors.WeightsMismatchError(
                f"{self.name}: iterations must be an integer >= 0; got {arrays[0]!r}")
        for cur, new in zip(current, arrays):
            backends.backend_for(cur).copy_from_host(cur, new)
        _exact.reset(self)

    # ---------------------------------------------------------------------- config

    def get_config(self):
        """A JSON-friendly dict: hyperparameters (schedules serialized, callables called)."""
        config = {"name": self.name}
        for key in type(self)._hyper_names:
            config[key] = _serialize_hyper(self._hyper[key])
        config.update(weight_decay=self.weight_decay, clipnorm=self.clipnorm,
                      global_clipnorm=self.global_clipnorm, clipvalue=self.clipvalue,
                      sparse_mode=self.sparse_mode)
        # The 16-bit settings where they are not the defaults (as exact_history, only where
        # it applies): a float32 user's config keeps Keras' keys, which other code may pass
        # on to a Keras optimizer.
        if not self.stochastic_rounding:
            config["stochastic_rounding"] = False
        if self.slot_dtype is not None:
            config["slot_dtype"] = self.slot_dtype
        if self.seed:
            config["seed"] = self.seed
        if self.sparse_mode == "exact":
            config["exact_history"] = self.exact_history
        if self._legacy:
            config["_legacy"] = True
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """The optimizer ``get_config`` describes (schedules deserialized)."""
        config = dict(config)
        for key in cls._hyper_names:
            value = config.get(key)
            if isinstance(value, dict) and "class_name" in value:
                config[key] = schedules.deserialize(value, custom_objects=custom_objects)
        return cls(**config)

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Exempt variables from ``weight_decay`` (by identity, or by a substring of their name)."""
        self._exclude_ids.update(id(v) for v in (var_list or ()))
        self._exclude_names = tuple(self._exclude_names) + tuple(var_names or ())

    def _uses_weight_decay(self, state):
        if not self.weight_decay:
            return False
        if id(state.var) in self._exclude_ids:
            return False
        return not any(n in state.name for n in self._exclude_names)

    # ------------------------------------------------------------------------ steps

    def minimize(self, loss_and_grads_fn, var_list):
        """One step from ``loss_and_grads_fn() -> (loss, grads)``; returns the loss.

        ``var_list`` may be a callable returning the variables (created lazily).
        """
        loss, grads = loss_and_grads_fn()
        if callable(var_list):
            var_list = var_list()
        self.apply_gradients(zip(grads, var_list))
        return loss

    def apply_gradients(self, grads_and_vars, constraints=None):
        """Apply one step of gradients; returns the new ``iterations``.

        Args:
            grads_and_vars: pairs ``(gradient, variable)``; a ``None`` gradient skips
                its variable.
            constraints: optional ``{id(variable): fn}`` or a list of ``(variable, fn)``
                pairs (NumPy arrays are not hashable); ``fn(array) -> array`` runs
                after the update, on the touched rows of a sparse one, and must return
                an array of the shape it got (NaN is fine: it propagates, as in Keras).

        A step is all or nothing. Every input is checked before anything is written;
        a constraint, which can only run on the updated values, runs on a step whose
        writes are kept (:mod:`sparseopt._rollback`): if it raises, or returns ``None``
        or another shape (:class:`~sparseopt.errors.ConstraintError`,
        :class:`~sparseopt.errors.ShapeMismatchError`), the step is undone, so the
        variables, every slot, ``iterations`` and the exact-mode state are as they were.

        Raises:
            GradientsError: ``grads_and_vars`` is empty, every gradient is ``None``, an
                item is not a ``(gradient, variable)`` pair, or a variable is listed twice.
            ConcurrentUseError: another thread is inside a step (or ``flush``,
                ``catch_up``, ``set_weights``) of this optimizer.
        """
        guard = self._guard
        guard.enter(self, "apply_gradients")
        try:
            return self._apply_gradients(grads_and_vars, constraints)
        finally:
            guard.leave()

    def _apply_gradients(self, grads_and_vars, constraints):
        pairs = _pairs(self.name, grads_and_vars)
        if not pairs:
            raise errors.GradientsError(f"{self.name}: apply_gradients got no (gradient, variable) pairs")
        if self.gradient_aggregator is not None:
            pairs = _pairs(self.name, self.gradient_aggregator(pairs))
        for transform in self.gradient_transformers:
            pairs = _pairs(self.name, transform(pairs))
        pairs = [(g, v) for g, v in pairs if g is not None]
        if not pairs:
            raise errors.GradientsError(f"{self.name}: every gradient is None")

        checked = self._validate(pairs)
        step = self.iterations + 1
        hypers = self._resolved_hypers()
        if self._zero_learning_rate_is_no_step and hypers["learning_rate"] == 0.0:
            for name, var, _ in checked:    # the slots exist after a step, as always
                self._state_for(var, name)
            self._iterations[()] = step
            return step
        scalar_state = self._next_scalar_state(hypers, step)
        coefficients = self._coefficients({**hypers, **scalar_state}, step)
        # Keras casts weight_decay through float32 (sparseopt.rules._floatx).
        wd = f32(self.weight_decay) * hypers["learning_rate"] if self.weight_decay else 0.0
        if not math.isfinite(wd):
            raise errors.HyperparameterError(f"{self.name}: weight_decay * learning_rate is {wd}")
        # Every input is valid: from here on the step runs to completion.
        updates = [(self._state_for(var, name), update) for name, var, update in checked]
        self._set_rounding(updates, step)
        # As many of Numba's threads as the step's work warrants (sparseopt._config).
        threads = _config.enter_step(cpu.work(updates, self._exact_states), self._guard.threads)
        try:
            self._clip(updates)
            if constraints:
                self._run_constrained(updates, coefficients, wd, constraints)
            else:
                self._run(updates, coefficients, wd)
        finally:
            _config.leave_step(threads)
        for key, value in scalar_state.items():
            self._scalar_state[key][()] = value
        # An item assignment: a 0-d in-place ``+= 1`` goes through NumPy's ufunc machinery,
        # about 50 us per step with cold caches.
        self._iterations[()] = step
        return step

    def _set_rounding(self, updates, step):
        """This step's rounding of each 16-bit variable (:mod:`sparseopt.kernels.lowp`)."""
        key = None
        for state, _ in updates:
            if state.kind is not None:
                if key is None:
                    key = lowp.step_key(self.seed, step)
                state.lowp = (state.kind, self.stochastic_rounding, state.slot_kind)
                state.rounding_key = key

    def _validate(self, pairs):
        """Check every pair and plan every sparse gradient (:func:`sparseopt.engine.validate`);
        writes nothing but scratch."""
        return engine.validate(self._checked_pairs(pairs), self._batch_tables and len(pairs) > 1, self._markers)

    def _checked_pairs(self, pairs):
        """``(name, variable, gradient, backend)`` of each pair, its variable checked and seen
        once (raising, as the pair's error, when it is not)."""
        seen = set()
        states = self._states
        backend_for = backends.backend_for
        new = 0  # variables without a state so far (their default names count them)
        for g, var in pairs:
            key = id(var)
            state = states.get(key)
            if state is not None:
                name = state.name
            else:
                name = self._default_name(var, new)
                if key not in seen:
                    new += 1
            self._check_variable(var, name)
            if key in seen:
                raise errors.GradientsError(f"{self.name}: {name!r} appears twice in grads_and_vars")
            seen.add(key)
            yield name, var, g, (state.backend if state is not None else backend_for(var))

    def step_config(self):
        """This optimizer's step for a host that keeps the variables, slots and host state
        itself (:class:`sparseopt.engine.StepConfig`; the TensorFlow bridge runs its steps
        so). Made anew on each call: it reflects the optimizer's structure (rule, kept
        slots) at that time."""
        return engine.StepConfig(self)

    def _check_variable(self, var, name):
        backend = backends.backend_for(var)
        if backend is None:
            raise errors.DtypeMismatchError(
                f"{name!r}: variables must be NumPy arrays; got {type(var).__name__}")
        backend.check_variable(var, name)

    def _clip(self, updates):
        if self.clipvalue is not None:
            for _, update in updates:
                update.map_values(_Elementwise("clip", self.clipvalue))
        if self.clipnorm is not None:
            for _, update in updates:
                norm = update.norm()
                if norm > self.clipnorm:
                    update.map_values(_Elementwise("scale", self.clipnorm / norm))
        if self.global_clipnorm is not None:
            total = math.sqrt(sum(update.norm() ** 2 for _, update in updates))
            if total > self.global_clipnorm:
                scale = _Elementwise("scale", self.global_clipnorm / total)
                for _, update in updates:
                    update.map_values(scale)

    def flush(self):
        """Exact mode: bring every row of every variable current (one pass over each
        table). Call it before reading or saving whole tables or slots; ``get_weights``
        calls it. A no-op in lazy mode."""
        with self._guard.held(self, "flush"):
            _exact.flush(self)

    def catch_up(self, var, indices):
        """Exact mode: bring rows ``indices`` of ``var`` current (parameter and slots),
        e.g. before a forward pass reads them. Indices are checked as a sparse
        gradient's (type, range); duplicates are fine. A no-op in lazy mode."""
        def rows(state, idx):
            _, idx = cpu.sparse_gradient(
                IndexedSlices(np.empty((np.shape(idx)[0] if np.ndim(idx) else 0,) + var.shape[1:],
                                       var.dtype), idx), var, state.name)
            return _validation.plan(idx, var.shape[0], state.name)[0]
        with self._guard.held(self, "catch_up"):
            _exact.catch_up(self, var, indices, rows)

    def _wrap_update(self, state, update):
        """The update a step runs for ``state``'s variable: ``update`` itself, or (a rule with
        stages of its own: row-wise, factored) a wrapper whose ``run`` runs that rule's
        kernels. Used by this optimizer's steps and by :meth:`sparseopt.engine.StepConfig.run`."""
        return update

    def _wraps_updates(self):
        """Whether this class wraps its updates (overrides :meth:`_wrap_update`)."""
        return type(self)._wrap_update is not Optimizer._wrap_update

    def _run(self, updates, coefficients, wd):
        if type(self)._wrap_update is not Optimizer._wrap_update:
            updates = [(state, self._wrap_update(state, update)) for state, update in updates]
        engine.run_step(self._rule, updates, coefficients, wd,
                        lambda state: wd != 0.0 and self._uses_weight_decay(state), self._batch_tables,
                        engine.exact_run(self) if self.sparse_mode == "exact" else None, self._converted)

    def _converted(self, coefficients, dtype):
        """``coefficients`` with each value as a ``dtype`` scalar, the kernels' argument.

        The last conversion per dtype is kept: with constant hyperparameters (SGD,
        Adagrad, RMSprop) the coefficients are the same every step.
        """
        try:  # their bytes: ``==`` would take -0.0 for 0.0
            key = (type(coefficients), struct.pack(f"{len(coefficients)}d", *coefficients))
        except (struct.error, TypeError, OverflowError):
            key = None
        last = self._converted_last.get(dtype)
        if key is not None and last is not None and last[0] == key:
            return last[1]
        c = type(coefficients)(*(dtype(x) for x in coefficients))
        self._converted_last[dtype] = (key, c)
        return c

    def _run_constrained(self, updates, coefficients, wd, constraints):
        """``_run``, then the constraints; undone if a constraint fails (see apply_gradients)."""
        items = constraints.items() if isinstance(constraints, dict) else constraints
        by_id = {(k if isinstance(k, int) else id(k)): fn for k, fn in items}
        snapshot = _rollback.Snapshot(
            self, updates, lambda u: isinstance(getattr(u, "update", u), cpu.SparseUpdate))
        try:
            self._run(updates, coefficients, wd)
            for state, update in updates:
                fn = by_id.get(id(state.var))
                if fn is not None:
                    try:
                        update.constrain(state.var, fn)
                    except (errors.ConstraintError, errors.ShapeMismatchError) as exc:
                        raise type(exc)(f"{self.name}: {state.name!r}: {exc}") from None
        except BaseException:
            snapshot.restore()
            raise

    def __repr__(self):
        return f"<sparseopt.{type(self).__name__} name={self.name!r} iterations={self.iterations}>"


class _Guard:
    """Which thread is inside a step (or ``flush``, ``catch_up``, ``set_weights``) of one
    optimizer: a non-blocking lock, so a second thread gets ConcurrentUseError at once
    (about 0.3 us per step) instead of corrupting the slots and ``iterations``. It also
    holds the optimizer's thread-count measurements (:class:`sparseopt._config.StepThreads`)."""

    __slots__ = ("_lock", "_owner", "_what", "threads")

    def __init__(self):
        self._lock = threading.Lock()
        self._owner = None
        self._what = None
        self.threads = _config.StepThreads()

    def enter(self, opt, what):
        if not self._lock.acquire(False):
            owner, inside = self._owner, self._what
            if owner == threading.get_ident():
                raise errors.ConcurrentUseError(
                    f"{opt.name}: {what} was called from inside {inside} of the same optimizer "
                    f"(a gradient transformer, aggregator, schedule or constraint calling back "
                    f"into it); a step cannot be nested in another")
            raise errors.ConcurrentUseError(
                f"{opt.name}: {what} was called while another thread is inside {inside} of this "
                f"optimizer. An optimizer is thread compatible, not thread safe: give each thread "
                f"its own optimizer, or hold a lock around its calls")
        self._owner = threading.get_ident()
        self._what = what

    def leave(self):
        self._owner = None
        self._lock.release()

    def held(self, opt, what):
        self.enter(opt, what)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.leave()

    def __deepcopy__(self, memo):  # a copy of an optimizer gets its own (a lock cannot be copied)
        return _Guard()

    def __reduce__(self):
        return (_Guard, ())


class _Elementwise:
    """A gradient map of ``_clip``: ``clip`` to ``[-arg, arg]`` or ``scale`` by ``arg``.

    Called on a NumPy array it returns the mapped array; the CUDA updates read
    ``op`` and ``arg`` and run the same map on the device.
    """

    __slots__ = ("op", "arg")

    def __init__(self, op, arg):
        self.op = op
        self.arg = arg

    def __call__(self, x):
        if self.op == "clip":
            return np.clip(x, -self.arg, self.arg)
        return x * x.dtype.type(self.arg)


def _pairs(opt_name, grads_and_vars):
    """``grads_and_vars`` as a list of pairs, or a :class:`~sparseopt.errors.GradientsError`."""
    try:
        return [(g, v) for g, v in grads_and_vars]
    except (TypeError, ValueError) as exc:
        raise errors.GradientsError(
            f"{opt_name}: grads_and_vars must be an iterable of (gradient, variable) pairs "
            f"({type(exc).__name__}: {exc})") from None


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_hyper(opt_name, key, value, rng=None):
    """A constant hyperparameter as a float, checked (finite, in ``rng``, also in float32);
    a callable or a schedule unchanged (its value is checked at each step)."""
    if isinstance(value, schedules.LearningRateSchedule) or callable(value):
        return value
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if not _is_number(value):
        raise errors.HyperparameterError(
            f"{opt_name}: hyperparameter {key!r} must be a float, a callable or a schedule; "
            f"got {value!r}")
    return _hyperparameters.check_value(opt_name, key, float(value), rng)


def _check_seed(opt_name, seed):
    """The rounding seed: an int in [0, 2**63)."""
    if isinstance(seed, np.integer):
        seed = int(seed)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        raise errors.HyperparameterError(f"{opt_name}: seed must be an integer in [0, 2**63); got {seed!r}")
    return seed


def _check_slot_dtype(opt_name, slot_dtype):
    """``slot_dtype`` as None (float32 slots for 16-bit variables) or ``"bfloat16"``."""
    name = None if slot_dtype is None else (slot_dtype if isinstance(slot_dtype, str) else
                                            getattr(slot_dtype, "__name__", str(slot_dtype)))
    if name is None or name == "float32":
        return None
    if name == "bfloat16" and lowp.BFLOAT16 is not None:
        return "bfloat16"
    raise errors.HyperparameterError(
        f"{opt_name}: slot_dtype must be None, 'float32' or 'bfloat16' (ml_dtypes installed); got {slot_dtype!r}")


def _check_optional_positive(opt_name, key, value):
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise errors.HyperparameterError(f"{opt_name}: {key} must be a positive finite float; got {value!r}")
    return float(value)


def _check_optional_nonnegative(opt_name, key, value):
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise errors.HyperparameterError(f"{opt_name}: {key} must be a finite float >= 0; got {value!r}")
    return float(value)


def _serialize_hyper(value):
    if isinstance(value, schedules.LearningRateSchedule):
        return schedules.serialize(value)
    if callable(value):
        return float(value())
    return value
