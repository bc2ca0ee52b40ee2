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

The rule comes from :func:`sparseopt_tf._spec.rule_for` with ``legacy=True``.

``sparse_mode="exact"`` runs the core's exact-mode steps as the Keras 3 classes do (see
:mod:`sparseopt_tf.optimizers`), with :meth:`Optimizer.catch_up` (which
:class:`Embedding` and :func:`sparseopt_tf.embedding_lookup` run before their gather) and
:meth:`Optimizer.flush` (run by ``get_weights``, ``get_config`` (which ``model.save``
writes before the weights) and before ``tf.train.Checkpoint`` or a SavedModel reads the
variables). :class:`ExactFlush` is the ``tf_keras`` callback.
"""

import inspect

import tensorflow as tf
import tf_keras

from sparseopt_tf import _exact, _handover, _host, _spec
from sparseopt_tf.callbacks import FlushMixin
from sparseopt_tf.layers import _AttachedOptimizer
from sparseopt_tf.optimizers import _catch_up, _flush

_V2 = tf_keras.optimizers.legacy.Optimizer


class Optimizer(_V2):
    """Base class of ``sparseopt_tf.legacy.<Name>``.

    The constructor takes the core optimizer's arguments (positionally in its order,
    or by name; ``lr`` is accepted for ``learning_rate``) and ``OptimizerV2``'s keyword
    arguments (``name``, ``clipnorm``, ``clipvalue``, ``global_clipnorm``, ``decay``,
    ``gradient_aggregator``, ``gradient_transformers``). Float hyperparameters may be
    tensors, variables, callables or (``learning_rate``) schedules.

    ``sparse_mode="exact"`` and ``exact_history`` as in the core; not under a
    ``tf.distribute`` strategy (see :class:`sparseopt_tf.optimizers.Optimizer`).
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
        weight_decay = kwargs.pop("weight_decay", spec.default_weight_decay)
        core = spec.make_core(learning_rate, name, own, weight_decay=weight_decay, legacy=True,
                              sparse_mode=kwargs.pop("sparse_mode", "lazy"),
                              exact_history=kwargs.pop("exact_history", None))
        super().__init__(name, **kwargs)
        # OptimizerV2 has no weight decay; optimizers whose core class takes one (AdamW)
        # keep it here, decoupled and fused into the kernels as in Keras 3.
        self.weight_decay = core.weight_decay
        self._core = core
        self._set_hyper("learning_rate", learning_rate)
        self._set_hyper("decay", self._initial_decay)
        for arg, _ in spec.args:
            if arg in spec.hyper_names:
                self._set_hyper(arg, own[arg])
            else:
                setattr(self, arg, own[arg])
        self._own_args = own
        self.sparse_mode = core.sparse_mode
        self.exact_history = core.exact_history
        self._host = _host.HostStep(core, _spec.rule_for(core),
                                    ("learning_rate",) + spec.hyper_names)
        self._state_variables = None
        self._slotted = {}      # var key -> variable with slots (a plain dict: not tracked)

    def _create_slots(self, var_list):
        _handover.check_variables(self._name, var_list)
        _handover.check_strategy(self._name)
        if self._state_variables is None:
            self._state_variables = []
            for name, value in _spec.scalar_state(self._core):
                weight = self.add_weight(name, shape=[], dtype=tf.float64,
                                         initializer=tf_keras.initializers.Constant(value),
                                         trainable=False,
                                         aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                self._weights.append(weight)
                self._state_variables.append(weight)
        for var in var_list:
            self._slotted[_var_key(var)] = var
            for slot_name in _spec.kernel_slots(self._core)[0]:
                self.add_slot(var, slot_name,
                              tf_keras.initializers.Constant(self._core._slot_initial_value(slot_name)))
            for slot_name in _spec.row_slots(self._core)[0]:
                self.add_slot(var, slot_name,
                              tf_keras.initializers.Constant(self._core._slot_initial_value(slot_name)),
                              shape=var.shape[:1])

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
        result = super()._distributed_apply(distribution, grads_and_vars, apply_state, name)
        if not self._state_variables or not apply_state:
            return result
        # The host state is written once the updates (and iterations) are done, so a
        # rejected step leaves it as it was.
        next_state = next(iter(apply_state.values()))["sparseopt_next_state"]
        if tf.executing_eagerly() and not isinstance(result, tf.Operation):
            for i, var in enumerate(self._state_variables):
                var.assign(next_state[i])
            return result
        with tf.control_dependencies([result]):
            return tf.group([var.assign(next_state[i], read_value=False)
                             for i, var in enumerate(self._state_variables)])

    def _prepare_local(self, var_device, var_dtype, apply_state):
        super()._prepare_local(var_device, var_dtype, apply_state)
        step = tf.cast(self.iterations + 1, tf.float64)
        lr = tf.cast(apply_state[(var_device, var_dtype)]["lr_t"], tf.float64)
        hypers = [tf.cast(self._get_hyper(h, var_dtype), tf.float64) for h in self._spec.hyper_names]
        wd_lr = lr * float(self.weight_decay) if self.weight_decay else tf.zeros([], tf.float64)
        apply_state[(var_device, var_dtype)]["sparseopt_scalars"] = tf.stack([step, wd_lr, lr] + hypers)

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
        slot_names, used = _spec.kernel_slots(self._core)
        row_names, row_used = _spec.row_slots(self._core)
        ref = _handover.Ref(var)
        job = _host.Job(ref.name, sparse, len(slot_names), used, bool(self.weight_decay),
                        (_var_key(var), ref.device), len(row_names), row_used)
        refs = [ref] + [_handover.Ref(self.get_slot(var, n)) for n in slot_names + row_names]
        return job, refs

    def _resource_apply_dense(self, grad, var, apply_state=None):
        job, refs = self._job(var, False)
        return _handover.run_step(self._host, [job], [refs], [grad],
                                  self._scalars(var, apply_state), self._name)

    def _resource_apply_sparse_duplicate_indices(self, grad, handle, indices, **kwargs):
        # The row kernel sums duplicates in a fixed order: no TF de-duplication first.
        return self._resource_apply_sparse(grad, handle, indices, **kwargs)

    def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
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
        self._check_exact_mode_can_run()
        if _var_key(variable) not in self._slotted:
            if not tf.inside_function():
                return None                 # no step has updated it: every row is current
            with tf.init_scope():
                self._create_all_weights([variable])
        job, refs = self._job(variable, True)
        if not tf.inside_function() and not self._host.exact.pending(job.key):
            return None
        return _catch_up(self._host, job, refs, indices, self._name)

    def flush(self):
        """Exact mode: bring every row of every variable (and its slots) current.

        Returns:
            ``None`` eagerly and in lazy mode; in a ``tf.function``, an op.
        """
        if self.sparse_mode != "exact":
            return None
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
        config["decay"] = self._initial_decay
        if self._spec.explicit_weight_decay:
            config["weight_decay"] = self.weight_decay
        for arg, _ in self._spec.args:
            if arg in self._spec.hyper_names:
                config[arg] = self._serialize_hyperparameter(arg)
            else:
                config[arg] = getattr(self, arg)
        config["sparse_mode"] = self.sparse_mode
        if self.sparse_mode == "exact":
            config["exact_history"] = self.exact_history
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
        done = optimizer.catch_up(self.embeddings, ids)
        with tf.control_dependencies([done] if done is not None else []):
            return super().call(inputs)


class ExactFlush(FlushMixin, tf_keras.callbacks.Callback):
    """:class:`sparseopt_tf.ExactFlush` for ``tf_keras`` models (same hooks and argument)."""


def _var_key(var):
    if hasattr(var, "_distributed_container"):
        var = var._distributed_container()
    elif hasattr(var, "handle") and hasattr(var.handle, "_distributed_container"):
        var = var.handle._distributed_container()
    return var._unique_id


def _make_class(spec):
    doc = (f"{spec.name}, as ``tf_keras.optimizers.legacy.{spec.name}`` (Keras 2 ``OptimizerV2``), "
           "on sparseopt's Numba kernels.\n\nSparse gradients update the touched rows in place: lazily, or\n"
           "with ``sparse_mode=\"exact\"`` as dense training would (see ``Optimizer``).\n")
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=spec.default_learning_rate)]
    params += [inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for a, d in spec.args]
    params += [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    cls = type(spec.name, (Optimizer,), {"_spec": spec, "__doc__": doc, "__module__": __name__})

    def __init__(self, *args, **kwargs):
        Optimizer.__init__(self, *args, **kwargs)
    __init__.__signature__ = inspect.Signature(params)
    __init__.__qualname__ = f"{spec.name}.__init__"
    cls.__init__ = __init__
    return tf_keras.utils.register_keras_serializable(package="sparseopt_tf.legacy")(cls)


_SPECS = _spec.optimizer_specs()
__all__ = ["Embedding", "ExactFlush", "Optimizer"] + list(_SPECS)
for _name, _s in _SPECS.items():
    globals()[_name] = _make_class(_s)
del _name, _s
