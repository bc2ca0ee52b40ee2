"""Keras 2 optimizers (``tf_keras.optimizers.legacy.Optimizer``, the seed's ``OptimizerV2``).

One generic base class and one generated subclass per core optimizer. The
``OptimizerV2`` base does the generic work of the seed interface (slots,
hyperparameters as tensors, callables or schedules, ``decay``, ``clipnorm``,
``clipvalue``, ``global_clipnorm``, ``gradient_aggregator``, ``gradient_transformers``,
constraints, ``experimental_aggregate_gradients``, ``get_gradients`` /
``get_updates``, ``tf.distribute``); this class supplies the slots and
``_resource_apply_dense`` / ``_resource_apply_sparse``, which hand the variable and
its slots to the kernels (:func:`sparseopt_tf._handover.run_step`). Duplicate
indices are not summed in TensorFlow first: the row kernel sums them itself.

Host state of the core optimizer (Nadam's ``u_product``, which tf_keras' Nadam keeps
as ``momentum_cache``) is a 0-d float64 weight of the optimizer (in ``weights``,
checkpointed by name), advanced once per step by the core's own function and written
after the step's updates. Row-wise rules (``RowwiseAdagrad``) keep their per-row slots
as slot variables of shape ``(rows,)``.

The core is made with ``legacy=True`` (:meth:`sparseopt_tf._spec.OptimizerSpec.make_core`):
its rule computes tf_keras' legacy coefficients.

``sparse_mode="exact"`` runs the core's exact-mode steps as the Keras 3 classes do (see
:mod:`sparseopt_tf.optimizers`), with :meth:`Optimizer.catch_up` (which
:class:`Embedding` and :func:`sparseopt_tf.embedding_lookup` run before their gather) and
:meth:`Optimizer.flush` (run by ``get_weights``, ``get_config`` (which ``model.save``
writes before the weights) and before ``tf.train.Checkpoint`` or a SavedModel reads the
variables). :class:`ExactFlush` is the ``tf_keras`` callback.
"""

import contextlib
import copy
import functools

import numpy as np
import tensorflow as tf
import tf_keras

from sparseopt import errors, rules
from sparseopt_tf import _exact, _handover, _host, _spec
from sparseopt_tf.callbacks import FlushMixin
from sparseopt_tf.layers import _AttachedOptimizer
from sparseopt_tf.optimizers import _catch_up, _flush

_V2 = tf_keras.optimizers.legacy.Optimizer

#: tf_keras' names of the core's slots and host state, where they differ (so that a
#: ``tf.train.Checkpoint`` written by the tf_keras optimizer restores into ours).
_TF_KERAS_NAMES = {"accumulated_grad": "accum_grad", "accumulated_delta": "accum_var",
                   "u_product": "momentum_cache"}
_CORE_NAMES = {v: k for k, v in _TF_KERAS_NAMES.items()}

#: Arguments that tf_keras treats as hyperparameters (tensors, callables) but that decide
#: the core's slots: the slot exists when the value is a tensor, a callable or > 0, as in
#: tf_keras, and the step reads the value (0 when there is no slot).
_STRUCTURAL_HYPERS = ("momentum",)

#: Hyperparameters that tf_keras keeps as plain attributes (floats or tensors), not as
#: hyperparameter variables: ours neither, so that a checkpoint's objects match tf_keras'.
_ATTRIBUTE_HYPERS = ("epsilon", "l2_shrinkage_regularization_strength")

#: tf_keras optimizers that create a variable's slots together (the others create each
#: slot for every variable in turn, which fixes the order of ``weights``).
_VAR_MAJOR_SLOTS = ("Ftrl",)


class Optimizer(_V2):
    """Base class of ``sparseopt_tf.legacy.<Name>``.

    The constructor takes the core optimizer's arguments (positionally in its order,
    or by name; ``lr`` is accepted for ``learning_rate``) and ``OptimizerV2``'s keyword
    arguments (``name``, ``clipnorm``, ``clipvalue``, ``global_clipnorm``, ``decay``,
    ``gradient_aggregator``, ``gradient_transformers``). Float hyperparameters may be
    tensors, variables, callables or (``learning_rate``) schedules; ``momentum`` (SGD,
    RMSprop) too, as in tf_keras, and ``epsilon=None`` is the backend's epsilon. Nadam's
    ``decay`` (alias ``schedule_decay``) is its momentum schedule's constant, as in tf_keras.
    Slots and weights carry tf_keras' names and order, so tf_keras' checkpoints restore
    (``docs/src/legacy_tf.md``, with which ``sparse_mode`` reproduces each tf_keras optimizer
    on sparse gradients).

    ``sparse_mode="exact"`` and ``exact_history`` as in the core; not under a
    ``tf.distribute`` strategy (see :class:`sparseopt_tf.optimizers.Optimizer`).

    ``tf.half`` (float16) and ``tf.bfloat16`` variables: the math in float32 from float32
    hyperparameters, float32 slots (``slot_dtype="bfloat16"`` for bfloat16 ones), the new
    values rounded to 16 bits **to nearest even by default** (``stochastic_rounding=False``,
    unlike the core and the Keras 3 classes): tf_keras rounds its half math to nearest, and
    code ported from it keeps the results its tests expect within tf_keras' half tolerances.
    ``stochastic_rounding=True`` (with ``seed``) rounds stochastically, as the core does.
    """

    _spec = None
    _HAS_AGGREGATE_GRAD = True

    def __init__(self, *args, **kwargs):
        spec = self._spec
        values = _spec.bind_arguments(type(self).__name__, spec, args, kwargs)
        learning_rate = kwargs.pop("lr", None)
        if learning_rate is None:
            learning_rate = values.get("learning_rate", spec.default_learning_rate)
        name = kwargs.pop("name", None) or spec.name
        own = {arg: values.get(arg, default) for arg, default in spec.args}
        if spec.unsupported():
            raise NotImplementedError(f"sparseopt_tf.legacy.{spec.name}: {spec.unsupported()}")
        if rules.kind(spec.core_class._rule) == rules.FACTORED:
            raise NotImplementedError(
                f"sparseopt_tf.legacy.{spec.name}: tf_keras has no legacy {spec.name}, and the "
                f"legacy classes keep no slots of other shapes; use sparseopt_tf.{spec.name}")
        if "epsilon" in own and _builtin(spec) and (own["epsilon"] is None or (
                _spec._is_plain_number(own["epsilon"]) and not own["epsilon"])):
            # tf_keras: ``epsilon or backend.epsilon()`` (None and 0 mean the backend's 1e-7).
            own["epsilon"] = tf_keras.backend.epsilon()
        structural = {}         # core's value of _STRUCTURAL_HYPERS: it decides the slots
        for arg in self._structural_hypers():
            value = own[arg]
            if _spec._is_plain_number(value):
                if not 0 <= value <= 1:           # tf_keras' check and wording
                    raise errors.HyperparameterError(
                        f"{name}: `{arg}` must be between [0, 1]. Received: {arg}={value} "
                        f"(of type {type(value)}).")
                structural[arg] = value
            else:
                has_slot = isinstance(value, tf.Tensor) or callable(value) or bool(value > 0)
                structural[arg] = 0.5 if has_slot else 0.0
        schedule_decay = None
        if getattr(spec.core_class, "_legacy_schedule_decay", None) is not None:
            # tf_keras' Nadam: ``decay`` (alias ``schedule_decay``) is the momentum
            # schedule's constant, and the learning rate does not decay.
            schedule_decay = kwargs.pop("schedule_decay", None)
            decay = kwargs.pop("decay", None)
            if schedule_decay is None:
                schedule_decay = spec.core_class._legacy_schedule_decay if decay is None else decay
            if not _spec._is_plain_number(schedule_decay) or schedule_decay < 0:
                raise ValueError(f"{spec.name}: decay (schedule_decay) must be a float >= 0; "
                                 f"got {schedule_decay!r}")
            schedule_decay = float(schedule_decay)
        weight_decay = kwargs.pop("weight_decay", spec.default_weight_decay)
        core = spec.make_core(learning_rate, name, {**own, **structural}, weight_decay=weight_decay,
                              legacy=True, sparse_mode=kwargs.pop("sparse_mode", "lazy"),
                              exact_history=kwargs.pop("exact_history", None),
                              rounding={"stochastic_rounding": False, **_spec.pop_rounding(kwargs)})
        if schedule_decay is not None:
            core._schedule_decay = schedule_decay
        if structural:
            # The step's value of a structural hyperparameter comes with the others.
            core._coefficients = functools.partial(_structural_coefficients, core)
        super().__init__(name, **kwargs)
        # OptimizerV2 has no weight decay; a given one (or AdamW's default) is kept here,
        # decoupled and fused into the kernels as in Keras 3.
        self.weight_decay = core.weight_decay
        self._core = core
        self._schedule_decay = schedule_decay
        self._set_hyper("learning_rate", learning_rate)
        self._set_hyper("decay", self._initial_decay if schedule_decay is None else schedule_decay)
        for arg, _ in spec.args:
            if arg in self._hyper_names() and arg not in _ATTRIBUTE_HYPERS:
                self._set_hyper(arg, own[arg])
            else:
                setattr(self, arg, own[arg])
        self._own_args = own
        self.sparse_mode = core.sparse_mode
        self.exact_history = core.exact_history
        self._host = _host.HostStep(core.step_config(), ("learning_rate",) + self._hyper_names())
        self._state_variables = None
        self._slotted = {}      # var key -> variable with slots (a plain dict: not tracked)
        self._read = {"caught_up": set(), "warned": set()}   # see _exact.warn_unread

    @property
    def stochastic_rounding(self):
        """Whether 16-bit variables' new values are rounded stochastically, or to nearest
        even (the default here, as tf_keras rounds its half math; see the class docstring)."""
        return self._core.stochastic_rounding

    @property
    def slot_dtype(self):
        """The slots' dtype for 16-bit variables: None (float32) or ``"bfloat16"``."""
        return self._core.slot_dtype

    @property
    def seed(self):
        """The seed of the stochastic rounding's random bits (in the config)."""
        return self._core.seed

    @classmethod
    def _structural_hypers(cls):
        return tuple(a for a in _STRUCTURAL_HYPERS
                     if a in dict(cls._spec.args) and a not in cls._spec.hyper_names)

    @classmethod
    def _hyper_names(cls):
        """The core's float hyperparameters and :data:`_STRUCTURAL_HYPERS` (as tf_keras)."""
        return cls._spec.hyper_names + cls._structural_hypers()

    def _create_slots(self, var_list):
        _handover.check_variables(self._name, var_list)
        _handover.check_strategy(self._name)
        for var in var_list:            # the core's dtype checks, before anything is made
            self._host.check_dtype(var.name, var.dtype.base_dtype.as_numpy_dtype)
        if self._state_variables is None:
            self._state_variables = []
            # tf_keras keeps its state (Nadam's momentum_cache) in the first variable's dtype.
            dtype = var_list[0].dtype.base_dtype if var_list else tf.float32
            dtype = dtype if dtype in (tf.float32, tf.float64) else tf.float32
            for name, value in self._host.config.scalar_state:
                weight = self.add_weight(_TF_KERAS_NAMES.get(name, name), shape=[], dtype=dtype,
                                         initializer=tf_keras.initializers.Constant(value),
                                         trainable=False,
                                         aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                self._weights.append(weight)
                self._state_variables.append(weight)
        step = self._host.config
        slot_names = step.slot_names
        # In tf_keras' order (which fixes that of ``weights``) and under its names.
        order = ([(var, n) for var in var_list for n in slot_names] if self._spec.name in _VAR_MAJOR_SLOTS
                 else [(var, n) for n in slot_names for var in var_list])
        for var, slot_name in order:
            dtype = step.slot_dtypes(var.dtype.base_dtype.as_numpy_dtype)[0]
            with _slot_dtype(var, dtype):
                self.add_slot(var, _TF_KERAS_NAMES.get(slot_name, slot_name),
                              tf_keras.initializers.Constant(step.slot_initial_values[slot_name]))
        for var in var_list:
            self._slotted[_var_key(var)] = var
            row_dtype = step.slot_dtypes(var.dtype.base_dtype.as_numpy_dtype)[1]
            for slot_name in step.row_slot_names:
                initial = tf_keras.initializers.Constant(step.slot_initial_values[slot_name])
                with _slot_dtype(var, row_dtype):
                    self.add_slot(var, slot_name, initial, shape=var.shape[:1])

    def _prepare(self, var_list):
        apply_state = super()._prepare(var_list)
        if self._state_variables and apply_state:
            # The state after this step, computed once (the same for every device and dtype).
            scalars = next(iter(apply_state.values()))["sparseopt_scalars"]
            next_state = self._next_state(scalars)
            for coefficients in apply_state.values():
                scalars = coefficients["sparseopt_scalars"]
                coefficients["sparseopt_scalars"] = tf.concat([scalars, next_state], 0)
                coefficients["sparseopt_next_state"] = next_state
        return apply_state

    def _next_state(self, scalars):
        current = tf.stack([tf.cast(v, tf.float64) for v in self._state_variables])
        state = tf.numpy_function(self._host.next_scalar_state, [scalars, current], tf.float64,
                                  stateful=False, name=f"{self._name}_sparseopt_state")
        state.set_shape([len(self._state_variables)])
        return state

    def _distributed_apply(self, distribution, grads_and_vars, apply_state, name):
        self._check_exact_mode_can_run()
        if self._batches_steps():
            result = self._batched_apply(grads_and_vars, apply_state, name)
        else:
            result = super()._distributed_apply(distribution, grads_and_vars, apply_state, name)
        if not self._state_variables or not apply_state:
            return result
        # The host state is written once the updates (and iterations) are done, so a
        # rejected step leaves it as it was.
        next_state = next(iter(apply_state.values()))["sparseopt_next_state"]
        if tf.executing_eagerly() and not isinstance(result, tf.Operation):
            for i, var in enumerate(self._state_variables):
                var.assign(tf.cast(next_state[i], var.dtype))
            return result
        with tf.control_dependencies([result]):
            return tf.group([var.assign(tf.cast(next_state[i], var.dtype), read_value=False)
                             for i, var in enumerate(self._state_variables)])

    def _batches_steps(self):
        """Whether a step's variables go to the kernels in one hand-over per device and dtype
        (:meth:`_batched_apply`): without a ``tf.distribute`` strategy, and unless a subclass
        overrides ``_resource_apply_dense`` / ``_resource_apply_sparse`` (OptimizerV2's hooks,
        then called per variable as tf_keras does)."""
        cls = type(self)
        return (not tf.distribute.has_strategy()
                and cls._resource_apply_dense is Optimizer._resource_apply_dense
                and cls._resource_apply_sparse is Optimizer._resource_apply_sparse
                and (cls._resource_apply_sparse_duplicate_indices
                     is Optimizer._resource_apply_sparse_duplicate_indices))

    def _batched_apply(self, grads_and_vars, apply_state, name):
        """``OptimizerV2._distributed_apply`` with one kernel hand-over for all the variables of
        a device and dtype (tf_keras makes one update op per variable: here one
        ``numpy_function`` per step instead of one per variable). Constraints and
        ``iterations`` as tf_keras: a dense variable's constraint runs after the update, a
        sparse one's is refused, and ``iterations`` advances once the updates are done."""
        groups = {}                 # (device, dtype) -> (jobs, refs, grads, a variable of them)
        constrained = []
        for grad, var in grads_and_vars:
            sparse = isinstance(grad, tf.IndexedSlices)
            if sparse:
                _exact.warn_unread(self, _var_key(var), var, self._read)
            if sparse and var.constraint is not None:
                raise RuntimeError(
                    "Cannot use a constraint function on a sparse variable. "
                    f"Received: grad={grad}, var.constraint={var.constraint}.")
            job, refs = self._job(var, sparse)
            group = groups.setdefault((var.device, var.dtype.base_dtype), ([], [], [], var))
            group[0].append(job)
            group[1].append(refs)
            group[2].append(tf.IndexedSlices(grad.values, grad.indices) if sparse else grad)
            if not sparse and var.constraint is not None:
                constrained.append(var)
        update_ops = []
        with tf.name_scope(name or self._name) if not tf.executing_eagerly() else _no_scope():
            for jobs, refs, grads, var in groups.values():
                done = _handover.run_step(self._host, jobs, refs, grads, self._scalars(var, apply_state),
                                          self._name)
                if done is not None:
                    update_ops.append(done)
            with tf.control_dependencies(update_ops):
                update_ops += [var.assign(var.constraint(var)) for var in constrained]
        if not tf.executing_eagerly():
            with tf.control_dependencies([tf.group(update_ops)]):
                return self.iterations.assign_add(1, read_value=False)
        return self.iterations.assign_add(1)

    def _prepare_local(self, var_device, var_dtype, apply_state):
        # A 16-bit variable's math is float32 (sparseopt.kernels.lowp): its hyperparameters are
        # taken in float32, as for a float32 variable, not rounded to 16 bits as tf_keras'
        # half math takes them.
        math_dtype = tf.float32 if var_dtype in (tf.float16, tf.bfloat16) else var_dtype
        coefficients = apply_state[(var_device, var_dtype)]
        super()._prepare_local(var_device, math_dtype, {(var_device, math_dtype): coefficients})
        step = tf.cast(self.iterations + 1, tf.float64)
        lr = tf.cast(coefficients["lr_t"], tf.float64)
        hypers = [tf.cast(self._hyper_value(h, math_dtype), tf.float64) for h in self._hyper_names()]
        # Keras casts weight_decay through float32, as the core does (sparseopt.rules._floatx)
        wd_lr = lr * float(np.float32(self.weight_decay)) if self.weight_decay else tf.zeros([], tf.float64)
        coefficients["sparseopt_scalars"] = tf.stack([step, wd_lr, lr] + hypers)

    def _hyper_value(self, name, var_dtype):
        if name not in _ATTRIBUTE_HYPERS:
            return self._get_hyper(name, var_dtype)
        value = getattr(self, name)
        value = value() if callable(value) else value
        # As tf_keras: the attribute converted to the variable's dtype.
        if isinstance(value, (int, float)):
            return tf.constant(value, var_dtype)
        return tf.cast(value, var_dtype)

    def _scalars(self, var, apply_state):
        key = (var.device, var.dtype.base_dtype)
        coefficients = (apply_state or {}).get(key)
        if coefficients is None:   # called without apply_state: the state is not advanced
            coefficients = self._fallback_apply_state(*key)
            if self._state_variables:
                scalars = coefficients["sparseopt_scalars"]
                return tf.concat([scalars, self._next_state(scalars)], 0)
        return coefficients["sparseopt_scalars"]

    def _job(self, var, sparse):
        step = self._host.config
        slot_names, used = step.slot_names, step.slot_used
        row_names, row_used = step.row_slot_names, step.row_slot_used
        ref = _handover.Ref(var)
        job = _host.Job(ref.name, sparse, len(slot_names), used, bool(self.weight_decay),
                        (_var_key(var), ref.device), len(row_names), row_used)
        refs = [ref] + [_handover.Ref(self.get_slot(var, n)) for n in slot_names + row_names]
        return job, refs

    def get_slot(self, var, slot_name):
        """``OptimizerV2.get_slot``; tf_keras' slot names, or the core's where they differ
        (Adadelta's ``accum_grad`` / ``accum_var`` are the core's ``accumulated_grad`` /
        ``accumulated_delta``)."""
        return super().get_slot(var, _TF_KERAS_NAMES.get(slot_name, slot_name))

    def __deepcopy__(self, memo):
        # The host step holds the rule module (which cannot be copied); the copy gets its
        # own, over a copy of the core. Exact mode: the rows behind are caught up first,
        # so that the copy (whose book of pending rows starts empty) is current.
        if not tf.inside_function():
            self.flush()
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_host":
                continue
            # The variables trained stay the user's (their keys name the copied slots).
            new.__dict__[key] = dict(value) if key == "_slotted" else copy.deepcopy(value, memo)
        new.__dict__["_host"] = _host.HostStep(new._core.step_config(), self._host.hyper_names)
        return new

    def _resource_apply_dense(self, grad, var, apply_state=None):
        job, refs = self._job(var, False)
        return _handover.run_step(self._host, [job], [refs], [grad],
                                  self._scalars(var, apply_state), self._name)

    def _resource_apply_sparse_duplicate_indices(self, grad, handle, indices, **kwargs):
        # The row kernel sums duplicates in a fixed order: no TF de-duplication first.
        return self._resource_apply_sparse(grad, handle, indices, **kwargs)

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
        _exact.warn_unread(self, _var_key(var), var, self._read)
        job, refs = self._job(var, True)
        return _handover.run_step(self._host, [job], [refs],
                                  [tf.IndexedSlices(grad, indices)],
                                  self._scalars(var, apply_state), self._name)

    # --------------------------------------------------------------- exact mode

    def catch_up(self, variable, indices):
        """Exact mode: bring rows ``indices`` of ``variable`` (and their slots) current
        before they are read; as :meth:`sparseopt_tf.optimizers.Optimizer.catch_up`.

        In a ``tf.function`` a variable without slots gets them first (as its first
        ``apply_gradients`` would), so that the traced catch-up can update them.

        Returns:
            ``None`` eagerly and in lazy mode; in a ``tf.function``, an op.
        """
        if self.sparse_mode != "exact":
            return None
        self._read["caught_up"].add(_var_key(variable))
        self._check_exact_mode_can_run()
        if _var_key(variable) not in self._slotted:
            if not tf.inside_function():
                return None                 # no step has updated it: every row is current
            with tf.init_scope():
                self._create_all_weights([variable])

        identity = tf.inside_function() and not self.weight_decay and _exact.idle_always_identity(
            self._host.config, {h: getattr(self, h) if h in _ATTRIBUTE_HYPERS else self._hyper.get(h)
                         for h in self._spec.hyper_names}, 0.0, variable.dtype)

        def catch_up(var):                  # one copy (of each, under a strategy)
            job, refs = self._job(var, True)
            if not tf.inside_function() and not self._host.exact.pending(job.key):
                return None
            if identity and self._host.exact.assume_current(job.key):
                return None                 # the idle step is the identity: rows stay current
            return _catch_up(self._host, job, refs, indices, self._name)

        return _exact.group(_exact.on_each_copy(variable, catch_up))

    def flush(self):
        """Exact mode: bring every row of every variable (and its slots) current.

        Returns:
            ``None`` eagerly and in lazy mode; in a ``tf.function``, an op.
        """
        if self.sparse_mode != "exact":
            return None
        self._check_exact_mode_can_run()
        if any(isinstance(v, tf.distribute.DistributedValues) for v in self._slotted.values()):
            return _exact.group([op for v in self._slotted.values() for op in _exact.on_each_copy(  # each copy
                v, lambda local: _flush(self._host, [self._job(local, False)], self._name))])
        return _flush(self._host, [self._job(v, False) for v in self._slotted.values()], self._name)

    def get_weights(self):
        """``OptimizerV2.get_weights``, after :meth:`flush` in exact mode."""
        self.flush()
        return super().get_weights()

    def set_weights(self, weights):
        """``OptimizerV2.set_weights``; in exact mode every row is current afterwards."""
        super().set_weights(weights)
        if self._host.exact is not None:
            self._host.exact.reset()

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        # tf.train.Checkpoint and SavedModel list every object before they read any
        # variable: flushing here saves current tables and slots. A restore, too, lists
        # every object before it writes any variable: the rows behind are caught up first,
        # then the restored (flushed) values replace them, and every row is current.
        if save_type == "checkpoint" and not tf.inside_function():
            self.flush()
        return super()._trackable_children(save_type, **kwargs)

    def _check_exact_mode_can_run(self):
        _exact.check_can_run(self._name, self.sparse_mode)

    def get_config(self):
        # Exact mode, eagerly: flush first. tf_keras' model.save writes the config (with the
        # optimizer's) before any weight, so the tables it saves are current.
        if not tf.inside_function():
            self.flush()
        config = super().get_config()
        config["learning_rate"] = self._serialize_hyperparameter("learning_rate")
        config["decay"] = self._initial_decay if self._schedule_decay is None else self._schedule_decay
        if self._spec.explicit_weight_decay or self.weight_decay is not None:
            config["weight_decay"] = self.weight_decay
        for arg, _ in self._spec.args:
            if arg in self._hyper_names() and arg not in _ATTRIBUTE_HYPERS:
                config[arg] = self._serialize_hyperparameter(arg)
            elif arg in _ATTRIBUTE_HYPERS:
                value = getattr(self, arg)
                value = value() if callable(value) else value
                config[arg] = float(value) if tf.is_tensor(value) else value
            else:
                config[arg] = getattr(self, arg)
        config["sparse_mode"] = self.sparse_mode
        if self.sparse_mode == "exact":
            config["exact_history"] = self.exact_history
        # (the legacy classes round to nearest by default, as tf_keras: only True is written)
        config.update({k: v for k, v in _spec.rounding_config(self._core).items()
                       if k != "stochastic_rounding"})
        if self._core.stochastic_rounding:
            config["stochastic_rounding"] = True
        return config


@tf_keras.utils.register_keras_serializable(package="sparseopt_tf.legacy")
class Embedding(_AttachedOptimizer, tf_keras.layers.Embedding):
    """``tf_keras.layers.Embedding`` whose lookups read caught-up rows in exact mode.

    As :class:`sparseopt_tf.Embedding`, for ``tf_keras`` models trained by a
    ``sparseopt_tf.legacy`` optimizer, which is given here (tf_keras does not tell a
    layer which model calls it): before its gather the layer runs the optimizer's
    :meth:`Optimizer.catch_up` on the looked-up rows. Without an exact-mode optimizer it
    is ``tf_keras.layers.Embedding``.

    Args:
        input_dim: number of rows.
        output_dim: width of a row.
        optimizer: the ``sparseopt_tf.legacy`` optimizer that trains the table (not part
            of the config; may also be assigned to ``layer.optimizer`` later).
        **kwargs: ``tf_keras.layers.Embedding``'s other arguments.
    """

    def call(self, inputs):
        optimizer = self._attached.optimizer
        if getattr(optimizer, "sparse_mode", None) != "exact" or not self.trainable:
            return super().call(inputs)
        ids = inputs.values if isinstance(inputs, tf.SparseTensor) else inputs
        ids = ids.flat_values if isinstance(ids, tf.RaggedTensor) else ids
        if ids.dtype not in (tf.int32, tf.int64):      # tf_keras' Embedding casts its ids too
            ids = tf.cast(ids, tf.int32)
        done = optimizer.catch_up(self.embeddings, ids)
        with tf.control_dependencies([done] if done is not None else []):
            return super().call(inputs)


class ExactFlush(FlushMixin, tf_keras.callbacks.Callback):
    """:class:`sparseopt_tf.ExactFlush` for ``tf_keras`` models (same hooks and argument)."""


@contextlib.contextmanager
def _no_scope():
    yield


@contextlib.contextmanager
def _slot_dtype(var, dtype):
    """``OptimizerV2.add_slot`` makes slots of ``var.true_dtype`` where a variable has one (a
    mixed-precision variable's own dtype): a 16-bit variable lends it the dtype of its slots
    (float32, or bfloat16 with ``slot_dtype="bfloat16"``) while its slots are made."""
    dtype = tf.as_dtype(dtype)
    if dtype == var.dtype.base_dtype or hasattr(var, "true_dtype"):
        yield
        return
    var.true_dtype = dtype
    try:
        yield
    finally:
        del var.true_dtype


def _structural_coefficients(core, hypers, step):
    """``core._coefficients`` with the step's value of :data:`_STRUCTURAL_HYPERS`
    (``momentum``), 0 where the core keeps no slot for it (as tf_keras ignores it)."""
    shadow = copy.copy(core)
    for arg in _STRUCTURAL_HYPERS:
        if arg in hypers:
            setattr(shadow, arg, hypers[arg] if getattr(core, arg) else 0.0)
    return type(core)._coefficients(shadow, hypers, step)


def _var_key(var):
    if isinstance(var, tf.distribute.DistributedValues):
        pass                        # the container itself (its handle exists only per replica)
    elif hasattr(var, "_distributed_container"):
        var = var._distributed_container()
    elif hasattr(var, "handle") and hasattr(var.handle, "_distributed_container"):
        var = var.handle._distributed_container()
    return var._unique_id


def _builtin(spec):
    """Whether ``spec`` is a built-in optimizer's (whose tf_keras conventions the class follows),
    not a user's (:func:`keras_optimizer`)."""
    return getattr(_spec.core_optimizers, spec.name, None) is spec.core_class


def keras_optimizer(core_class):
    """The tf_keras (Keras 2 ``OptimizerV2``) class of a core optimizer class (your own, for
    instance): :func:`sparseopt_tf.keras_optimizer`'s legacy twin.

    Args:
        core_class: a subclass of :class:`sparseopt.Optimizer`, such as the class
            :meth:`sparseopt.Rule.optimizer_class` returns.

    Returns:
        A subclass of :class:`Optimizer` (``tf_keras.optimizers.legacy.Optimizer``) with
        ``core_class``'s name (also the default optimizer name, as in tf_keras) and arguments
        plus OptimizerV2's, registered for tf_keras' model files (package
        ``sparseopt_tf.legacy``), made as the built-in ``sparseopt_tf.legacy.<Name>`` classes
        are. The rule's math as it is (a user's rule has no tf_keras variant), on each
        hyperparameter as OptimizerV2 keeps it: a float32 variable.

    Example:
        >>> import sparseopt as so, sparseopt_tf
        >>> def coefficients(step, learning_rate=0.1):
        ...     return {"lr": learning_rate}
        >>> def update(p, g, c):
        ...     return (p - c.lr * g,)
        >>> Plain = so.Rule("plain_sgd", (), coefficients, update).optimizer_class("PlainSGD")
        >>> opt = sparseopt_tf.legacy.keras_optimizer(Plain)(learning_rate=0.5)
        >>> import tf_keras
        >>> isinstance(opt, tf_keras.optimizers.legacy.Optimizer), opt.get_config()["name"]
        (True, 'PlainSGD')
    """
    return _make_class(_spec.spec_of(_spec.checked_core_class(core_class, "sparseopt_tf.legacy.keras_optimizer")))


def _make_class(spec):
    doc = (f"{spec.name}, as ``tf_keras.optimizers.legacy.{spec.name}`` (Keras 2 ``OptimizerV2``), "
           "on sparseopt's Numba kernels.\n\nSparse gradients update the touched rows in place: lazily, or\n"
           "with ``sparse_mode=\"exact\"`` as dense training would (see ``Optimizer``).\n")
    cls = type(spec.name, (Optimizer,), {"_spec": spec, "__doc__": doc, "__module__": __name__})
    cls.__init__ = _spec.signed_init(Optimizer.__init__, spec)
    return tf_keras.utils.register_keras_serializable(package="sparseopt_tf.legacy")(cls)


_SPECS = _spec.optimizer_specs()
__all__ = ["Embedding", "ExactFlush", "Optimizer", "keras_optimizer"] + list(_SPECS)
for _name, _s in _SPECS.items():
    globals()[_name] = _make_class(_s)
del _name, _s
