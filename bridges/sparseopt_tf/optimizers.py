"""Keras 3 optimizers (``keras.optimizers.Optimizer``, TensorFlow backend) on the Numba kernels.

One generic base class, :class:`Optimizer`, and one generated subclass per core
optimizer (``sparseopt_tf.Adam`` ...). Keras does the generic work (gradient
filtering, loss scaling, gradient accumulation, EMA, ``iterations``); this class
replaces the update: every variable of a step is handed to the kernels in one
:func:`sparseopt_tf._handover.run_step` call (one call per variable and device under a
``tf.distribute`` strategy). For a sparse (``tf.IndexedSlices``) gradient nothing
touches the whole table:

* decoupled weight decay is fused into the kernels' pass, on the touched rows;
* clipping (``clipnorm``, ``clipvalue``, ``global_clipnorm``) sees the de-duplicated
  rows (duplicates summed first, as the dense gradient has them; Keras would clip the
  raw rows), so a sparse gradient is clipped as its dense equivalent;
* a variable's ``constraint`` runs on the touched rows only (Keras would run it on
  the whole variable after every step); it must therefore act row by row. Keras' norm
  constraints taken across rows (``MaxNorm()``'s default ``axis=0`` on a table) are
  refused before anything is written (see :meth:`Optimizer.apply`).

Host state of the core optimizer (Nadam's ``u_product``) lives in 0-d float64
variables of the optimizer, advanced once per step by the core's own function.

``sparse_mode="exact"`` (see :mod:`sparseopt_tf._exact` and the "Exact mode in Keras"
page of the docs): the steps, :meth:`Optimizer.catch_up` and :meth:`Optimizer.flush` run
the core's exact-mode functions on the variables' buffers; every path that reads whole
variables to save or return them (``get_weights``, ``save_own_variables``,
``tf.train.Checkpoint``, the config written first by ``model.save``, the end of
``model.fit``) flushes first, and every path that sets them marks every row current.
"""

import json
import math

import keras
import numpy as np
import tensorflow as tf

from sparseopt import errors
from sparseopt_tf import _accumulate, _exact, _handover, _host, _spec


class _SlotTable:
    """Per-variable slots: ``{var_key: {slot name: keras.Variable}}`` (an untracked holder;
    the variables themselves are tracked by Keras, in creation order)."""

    def __init__(self):
        self.slots = {}
        self.names = {}


class _Untracked:
    """Python state of the optimizer that neither Keras nor tf.train.Checkpoint should track.

    Attributes:
        row_constraints: ``{var key: [constraint, count]}``: constraints lent by :meth:`Optimizer.apply`
            to the kernels' step, to run on the touched rows.
        restored_layout: a checkpoint's layout, restored before the optimizer was built.
        read: exact mode, the keys of the variables a ``catch_up`` was asked for (a lookup
            that reads caught-up rows), and of those warned about (:func:`_exact.warn_unread`).
        accumulators: with ``gradient_accumulation_steps``, the buffered rows of sparse
            gradients (:class:`sparseopt_tf._accumulate.SparseAccumulators`).
    """

    def __init__(self):
        self.row_constraints = {}
        self.restored_layout = None
        self.accumulators = None
        self.read = {"caught_up": set(), "warned": set()}


def _resolve_hyper(value, iterations):
    """A hyperparameter's value for this step, as a float64 tensor (a Python number exactly,
    as the core receives it: the rule's ``coefficients`` round where Keras does)."""
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        value = value(iterations)
    elif callable(value) and not isinstance(value, (tf.Variable, keras.Variable)):
        value = value()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return tf.constant(float(value), tf.float64)
    return tf.cast(tf.convert_to_tensor(value), tf.float64)


class Optimizer(keras.optimizers.Optimizer):
    """Base class of the Keras 3 optimizers of ``sparseopt_tf``.

    Subclasses set ``_spec`` (a :class:`sparseopt_tf._spec.OptimizerSpec`); their
    constructor takes the core optimizer's arguments (positionally in its order, or
    by name) and Keras 3's keyword arguments (``weight_decay``, ``clipnorm``,
    ``clipvalue``, ``global_clipnorm``, ``use_ema``, ``ema_momentum``,
    ``ema_overwrite_frequency``, ``loss_scale_factor``, ``gradient_accumulation_steps``,
    ``name``). Hyperparameters other than ``learning_rate`` may be floats, tensors,
    variables, no-argument callables or schedules (called with ``iterations``);
    ``weight_decay`` is a float (or ``None``). Without a ``name``, Keras' unique automatic
    name (``adam``, ``adam_1``, ...; ``adam_w`` for AdamW). Arguments that Keras rejects
    raise a ``ValueError`` with Keras' message.

    A sparsely updated variable's ``constraint`` is applied to the touched rows only, so
    it must be row-wise; Keras' norm constraints across rows (``MaxNorm()`` on a table:
    use ``axis=1``) are refused, other callables are trusted (see :meth:`apply`).

    Besides Keras 3's interface it has the seed's ``add_slot``, ``get_slot``,
    ``get_slot_names``, ``get_weights``, ``set_weights`` and
    ``minimize(loss, var_list, tape=None)``.

    Not XLA-compilable (the kernels run in ``tf.numpy_function``): compile models
    with ``jit_compile=False``; a step traced under XLA raises a clear error.

    ``sparse_mode="exact"`` (with ``exact_history``, as in the core): the results of
    dense training at the cost of sparse steps. Rows a step skips are caught up when
    next updated, by :meth:`catch_up` (which :class:`sparseopt_tf.Embedding` and
    :func:`sparseopt_tf.embedding_lookup` run before their gather), or by :meth:`flush`.
    With ``use_ema`` every step flushes before the moving average reads every row (a
    full pass, as the average's own).
    Under ``MirroredStrategy`` and ``MultiWorkerMirroredStrategy`` each replica's copy of a
    variable keeps its own record of rows behind, advanced identically by the same
    all-reduced steps, so the copies stay equal.
    """

    _spec = None

    def __init__(self, *args, **kwargs):
        spec = self._spec
        values = _spec.bind_arguments(type(self).__name__, spec, args, kwargs)
        learning_rate = values.pop("learning_rate", spec.default_learning_rate)
        if isinstance(learning_rate, int) and not isinstance(learning_rate, bool):
            learning_rate = float(learning_rate)
        name = kwargs.pop("name", None)     # None: Keras' unique automatic name (adam, adam_1, ...)
        sparse_mode = kwargs.pop("sparse_mode", "lazy")
        exact_history = kwargs.pop("exact_history", None)
        rounding = _spec.pop_rounding(kwargs)
        own = {arg: values.get(arg, default) for arg, default in spec.args}
        if spec.unsupported():
            raise NotImplementedError(f"sparseopt_tf.{spec.name}: {spec.unsupported()}")
        if spec.explicit_weight_decay:
            kwargs.setdefault("weight_decay", spec.default_weight_decay)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        _check_arguments_as_keras(spec.name, own)
        # The core validates the configuration (ranges, NaN) and owns slots and coefficients.
        self._core = spec.make_core(learning_rate, self.name, own, weight_decay=self.weight_decay,
                                    sparse_mode=sparse_mode, exact_history=exact_history,
                                    rounding=rounding)
        self._core.weight_decay = self.weight_decay        # the same value on both sides, always
        self.sparse_mode = self._core.sparse_mode
        self.exact_history = self._core.exact_history
        self._own_args = own
        for arg, _ in spec.args:
            setattr(self, arg, own[arg])
        self._slot_table = _SlotTable()
        # the core's step (sparseopt.engine.StepConfig), run by the host step
        self._host = _host.HostStep(self._core.step_config(), ("learning_rate",) + spec.hyper_names)
        self._state_variables = []
        self._untracked = _Untracked()

    @property
    def weight_decay(self):
        """Decoupled weight decay: a float, or ``None`` (none; AdamW needs a float).

        Setting it (in the constructor or later) checks it and sets the core optimizer's
        too, so that both sides always hold the same value. It must be a number: the
        kernels' coefficient is computed from it when a step is traced.
        """
        try:
            return self.__dict__["_sparseopt_weight_decay"]
        except KeyError:    # not set yet: Keras' __setattr__ must not skip the first setting
            raise AttributeError("weight_decay") from None

    @weight_decay.setter
    def weight_decay(self, value):
        value = _checked_weight_decay(self, value)
        core = self.__dict__.get("_core")
        if core is not None:
            core.weight_decay = value
        self.__dict__["_sparseopt_weight_decay"] = value

    @property
    def stochastic_rounding(self):
        """Whether 16-bit variables' new values are rounded stochastically (the default) or
        to nearest even (see :class:`sparseopt.Optimizer`)."""
        return self._core.stochastic_rounding

    @property
    def slot_dtype(self):
        """The slots' dtype for 16-bit variables: None (float32) or ``"bfloat16"``."""
        return self._core.slot_dtype

    @property
    def seed(self):
        """The seed of the stochastic rounding's random bits (saved in configs and in
        ``tf.train.Checkpoint`` checkpoints, with ``iterations``)."""
        return self._core.seed

    # ------------------------------------------------------------------- slots

    def __dir__(self):
        # tf.train.Checkpoint treats any object whose dir() lists ``get_slot_names`` as a
        # Keras 2 optimizer and saves its slots a second time as "slot variables", which
        # fails: Keras 3 already tracks them (in ``variables``, by position). The method
        # stays callable; it is only hidden from that duck-typing check.
        # The aliases of the host state (Nadam's ``_u_product``) are hidden too: the
        # variables are tracked once, in ``variables``.
        host = self.__dict__.get("_host")
        hidden = {"get_slot_names"} | {f"_{n}" for n, _ in (host.config.scalar_state if host else ())}
        return [n for n in super().__dir__() if n not in hidden]

    def build(self, variables):
        if self.built:
            return
        _handover.check_variables(self.name, variables)
        _handover.check_strategy(self.name)
        self._check_exact_mode_can_run()
        for var in variables:           # the core's dtype checks, before anything is made
            self._host.check_dtype(getattr(var, "path", None) or var.name, _numpy_dtype(var))
        if self._untracked.restored_layout is not None:   # restored before it was built: check first
            self._check_layout(self._untracked.restored_layout, variables)
        super().build(variables)
        if self.gradient_accumulation_steps:
            self._untracked.accumulators = _accumulate.SparseAccumulators(
                variables, self.gradient_accumulation_steps)
            if self._untracked.restored_layout is not None:   # accumulators about to be restored
                self._untracked.accumulators.forget()
        # The core's host state (Nadam's u_product): 0-d float64 variables, listed right
        # after iterations and learning_rate, advanced once per step (see _advance_state).
        self._state_variables = [
            self.add_variable(shape=(), initializer=keras.initializers.Constant(value),
                              dtype="float64", aggregation="only_first_replica", name=name)
            for name, value in self._host.config.scalar_state]
        for var in variables:
            self._create_kernel_slots(var)

    def _create_kernel_slots(self, var):
        step = self._host.config
        _, row_dtype = step.slot_dtypes(_numpy_dtype(var))
        layout = step.slot_layout(var.shape)
        for slot_name in layout.names:
            self.add_slot(var, slot_name, keras.initializers.Constant(step.slot_initial_values[slot_name]))
        # row-wise rules: one value per row; Adafactor: its row and column statistics
        for slot_name, shape in zip(layout.other_names, layout.other_shapes):
            self.add_slot(var, slot_name, keras.initializers.Constant(step.slot_initial_values[slot_name]),
                          shape=shape, dtype=row_dtype.name)

    def add_slot(self, var, slot_name, initializer="zeros", shape=None, dtype=None):
        """Add slot ``slot_name`` for ``var`` (a Keras or TF variable) and return it.

        Returns the existing slot if there is one. ``shape`` defaults to the variable's;
        ``dtype`` to that of the variable's slots, as in the core: the variable's, but
        float32 for a bfloat16 or float16 variable (its math's), or bfloat16 with
        ``slot_dtype="bfloat16"``.
        """
        key = self._var_key(var)
        slots = self._slot_table.slots.setdefault(key, {})
        if slot_name in slots:
            return slots[slot_name]
        if dtype is None:
            dtype = self._host.config.slot_dtypes(_numpy_dtype(var))[0].name
        if shape is None and dtype == _dtype_name(var):
            slot = self.add_variable_from_reference(var, name=slot_name, initializer=initializer)
        else:
            base = getattr(var, "path", None) or str(var.name)
            slot = self.add_variable(shape=tuple(var.shape if shape is None else shape),
                                     initializer=initializer, dtype=dtype,
                                     name=f"{base.replace('/', '_').replace(':', '_')}_{slot_name}")
        slots[slot_name] = slot
        self._slot_table.names[key] = getattr(var, "path", None) or var.name
        return slot

    def get_slot(self, var, slot_name):
        """The slot variable ``slot_name`` of ``var``."""
        key = self._var_key(var)
        slots = self._slot_table.slots.get(key)
        if slots is None:
            raise errors.UnknownSlotError(
                f"{self.name}: variable {getattr(var, 'name', var)!r} has no slots (this optimizer "
                "was not built with it)")
        if slot_name not in slots:
            raise errors.UnknownSlotError(
                f"{self.name}: {self._slot_table.names[key]!r} has no slot {slot_name!r}; its slots "
                f"are {list(slots)}")
        return slots[slot_name]

    def get_slot_names(self):
        """Names of the slots this optimizer keeps (the rule's, then any added)."""
        names = list(self._host.config.slot_names) + list(self._host.config.row_slot_names)
        for slots in self._slot_table.slots.values():
            names += [n for n in slots if n not in names]
        return names

    # ------------------------------------------------------------------ weights

    def get_weights(self):
        """NumPy copies of :attr:`variables` (``iterations``, ``learning_rate``, then slots);
        in exact mode after :meth:`flush`, so that they are the dense-training values, and
        with gradient accumulation after the buffered sparse rows were added to Keras'
        accumulators (:func:`sparseopt_tf._accumulate.fold`)."""
        self.flush()
        _accumulate.fold(self)
        return [np.array(v.numpy(), copy=True) for v in self.variables]

    def set_weights(self, weights):
        """Set every optimizer variable; all are checked (count, shapes) before any is written.

        In exact mode every row is current afterwards: the weights are taken as flushed
        state (as :meth:`get_weights` returns it), with the variables set alongside them.
        """
        if not self.built:                  # Keras' message
            raise errors.WeightsMismatchError(
                "You are calling `set_weights()` on an optimizer that has not yet been built. "
                "Please call `optimizer.build(trainable_variables)` to create the optimizer "
                f"weights before calling `set_weights()`. (Optimizer {self.name!r}.)")
        self._check_weights(weights, "set_weights")
        for variable, value in zip(self.variables, weights):
            variable.assign(value)
        self._exact_reset()

    def save_own_variables(self, store):
        """Save the state (``model.save``, ``save_weights``); in exact mode after :meth:`flush`,
        with gradient accumulation after the buffered sparse rows are in Keras' accumulators."""
        self.flush()
        _accumulate.fold(self)
        super().save_own_variables(store)

    def _check_weights(self, weights, what):
        variables = self.variables
        weights = list(weights)
        if len(weights) != len(variables):
            raise errors.WeightsMismatchError(
                f"{self.name}: {what} got {len(weights)} arrays; the optimizer has "
                f"{len(variables)} variables ({[v.path for v in variables]})")
        for variable, value in zip(variables, weights):
            if tuple(np.shape(value)) != tuple(variable.shape):
                raise errors.WeightsMismatchError(
                    f"{self.name}: {what}: {variable.path!r} has shape {tuple(variable.shape)}; "
                    f"got {tuple(np.shape(value))}")

    def load_own_variables(self, store):
        """Load saved state (``keras.models.load_model``); a mismatch raises before any write."""
        if not self.built or len(self.variables) <= 2:
            return super().load_own_variables(store)
        weights = [store[str(i)] for i in range(len(store.keys()))]
        self._check_weights(weights, "loading saved optimizer state")
        for variable, value in zip(self.variables, weights):
            variable.assign(value)
        self._exact_reset()

    # -------------------------------------------------------------- checkpoints
    #
    # tf.train.Checkpoint keeps Keras' format (each variable a child of the optimizer)
    # and adds one string attribute of the optimizer itself, its *layout*: which
    # optimizer, which slots, and the shape of every variable. TensorFlow restores an
    # object's own attributes before those of its children (one breadth-first batch),
    # so the layout is checked before any variable of the optimizer is written: a
    # checkpoint of another optimizer, or of other shapes, raises and changes nothing.

    def _identity(self):
        return {"class": f"sparseopt_tf.{type(self).__name__}",
                "slots": list(self._host.config.slot_names),
                "row_slots": list(self._host.config.row_slot_names),
                "state": [name for name, _ in self._host.config.scalar_state],
                "use_ema": bool(self.use_ema),
                "gradient_accumulation_steps": self.gradient_accumulation_steps or 0}

    def _layout(self):
        # The seed of the 16-bit rounding is state, as iterations: restoring adopts it, so
        # that a resumed run draws the random bits of the run it continues.
        return {**self._identity(), "seed": self._core.seed,
                "trainable": [[list(v.shape), _dtype_name(v)] for v in self._trainable_variables],
                "variables": [[v.path, list(v.shape), _dtype_name(v)] for v in self.variables]}

    def _serialize_to_tensors(self):
        # Exact mode: flush first. TensorFlow reads every variable of the checkpoint (the
        # tables of the model included) only after it has serialized every object, so the
        # checkpoint holds the flushed values. In a tf.function the flush is an op that the
        # later reads of the variables are ordered after (automatic control dependencies).
        # Gradient accumulation: the buffered sparse rows go into Keras' accumulators first.
        self.flush()
        _accumulate.fold(self)
        return {"sparseopt_layout": tf.constant(json.dumps(self._layout()))}

    def _restore_from_tensors(self, restored_tensors):
        layout = restored_tensors["sparseopt_layout"]
        if not tf.executing_eagerly():      # a TF1 graph restore: nothing to check in Python
            return tf.no_op()
        layout = json.loads(layout.numpy().decode())
        if self.built:
            self._check_layout(layout)
            self._exact_reset()             # the restored state is flushed state
        else:                               # the variables are restored when build creates them
            self._check_identity(layout)
            self._untracked.restored_layout = layout
        if "seed" in layout:                # (checkpoints written before 16-bit variables have none)
            self._core.seed = int(layout["seed"])
        return tf.no_op()

    def _check_identity(self, layout):
        mine = self._identity()
        theirs = {k: layout.get(k) for k in mine}
        if theirs != mine:
            raise errors.ConfigError(
                f"{self.name}: the checkpoint holds the state of another optimizer "
                f"({_describe(theirs)}); this one is {_describe(mine)}. Nothing was restored.")

    def _check_layout(self, layout, trainable=None):
        """Raise (before anything is restored) unless ``layout`` fits this optimizer."""
        self._check_identity(layout)
        if trainable is None:
            trainable = self._trainable_variables
        saved = layout["trainable"]
        if len(saved) != len(trainable):
            raise errors.WeightsMismatchError(
                f"{self.name}: the checkpoint's optimizer was built for {len(saved)} variables; "
                f"this one for {len(trainable)}. Nothing was restored.")
        for i, (v, (shape, dtype)) in enumerate(zip(trainable, saved)):
            if [list(v.shape), _dtype_name(v)] != [shape, dtype]:
                raise errors.WeightsMismatchError(
                    f"{self.name}: variable {i} ({getattr(v, 'path', v.name)!r}) has shape "
                    f"{tuple(v.shape)} and dtype {_dtype_name(v)}; the checkpoint's has {tuple(shape)} "
                    f"and {dtype}. Nothing was restored.")
        if self.built:
            mine = self._layout()["variables"]
            if [x[1:] for x in mine] != [x[1:] for x in layout["variables"]]:
                raise errors.WeightsMismatchError(
                    f"{self.name}: the checkpoint's optimizer variables {layout['variables']} do not "
                    f"fit this optimizer's {mine}. Nothing was restored.")

    # -------------------------------------------------------------------- steps

    def minimize(self, loss, var_list, tape=None):
        """Compute gradients of ``loss`` and apply them; returns ``iterations``.

        Args:
            loss: a no-argument callable returning the loss, or a tensor (then ``tape``
                must be the tape that recorded it).
            var_list: the variables, or a no-argument callable returning them (called
                after the loss, so that variables created by it exist).
            tape: a ``tf.GradientTape``.
        """
        if not callable(loss) and tape is None:
            raise ValueError(f"{self.name}: minimize needs a tape when loss is a tensor")
        tape = tape if tape is not None else tf.GradientTape()
        if callable(loss):
            with tape:
                if not callable(var_list):
                    tape.watch([_tf_variable(v) for v in var_list])
                loss = loss()
        if callable(var_list):
            var_list = var_list()
        var_list = list(var_list)
        grads = tape.gradient(loss, [_tf_variable(v) for v in var_list])
        return self.apply_gradients(zip(grads, var_list))

    def _apply_weight_decay(self, variables):
        """Weight decay is fused into the kernels (see :meth:`_run`)."""

    def _clip_gradients(self, grads):
        """Keras' clipping, on de-duplicated rows for an ``IndexedSlices`` gradient.

        The norm (and each element) of a sparse gradient is that of its dense
        equivalent, whose rows are the sums of the duplicates; Keras would clip the raw
        rows. Summing costs O(touched rows) (``tf.unique`` + ``unsorted_segment_sum``,
        which adds each row's duplicates in position order, as the kernels do).
        """
        if not (self.clipnorm or self.global_clipnorm or self.clipvalue):
            return grads
        grads = [_deduplicated(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        values = [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads]
        clipped = super()._clip_gradients(values)
        return [tf.IndexedSlices(c, g.indices, g.dense_shape) if isinstance(g, tf.IndexedSlices) else c
                for c, g in zip(clipped, grads)]

    def apply(self, grads, trainable_variables=None):
        """Keras 3's ``apply``, with each constraint of a sparsely updated variable run
        on the touched rows only (right after the kernels), not on the whole variable.

        Keras runs ``variable.assign(variable.constraint(variable))`` after every step,
        a full-table pass. For the variables whose gradient is an ``IndexedSlices``
        this method lends the constraint to :meth:`_run` and hides it from Keras for
        the duration of the call (with ``gradient_accumulation_steps`` Keras' own
        whole-variable handling stays: it runs at every micro-step).

        That equals Keras' result only for a row-wise constraint, one that maps each row
        by itself: ``keras.constraints.NonNeg``, and ``MaxNorm``, ``UnitNorm`` and
        ``MinMaxNorm`` with an ``axis`` that leaves out axis 0 (``axis=1`` on a 2-D table).
        Those norm constraints with axis 0 in their ``axis`` (``MaxNorm()``'s default)
        take norms across rows: they raise
        :class:`~sparseopt.errors.ConstraintNotRowWiseError` before anything is written.
        Any other callable is applied to the touched rows (a 2-D tensor of rows for a
        table) and is trusted to be row-wise; one that is not gives other results than
        Keras, silently.

        Raises:
            sparseopt.errors.ConstraintNotRowWiseError: a variable with a sparse gradient
                has a Keras norm constraint taken across rows.
        """
        grads = list(grads)
        if self.loss_scale_factor is not None:      # Keras divides every gradient by it
            grads = [_Unscalable(g.values, g.indices, g.dense_shape) if isinstance(g, tf.IndexedSlices)
                     else g for g in grads]
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
            _handover.check_variables(self.name, trainable_variables)
        variables = trainable_variables if trainable_variables is not None else (
            list(self._trainable_variables) if self.built else [])
        lent = []
        if not self.gradient_accumulation_steps:
            for g, v in zip(grads, variables):
                lent_already = self._var_key(v) in self._untracked.row_constraints
                if isinstance(g, tf.IndexedSlices) and (getattr(v, "_constraint", None) is not None
                                                        or lent_already):
                    lent.append(v)
        for v in lent:                      # all checked before any is lent or anything written
            if v._constraint is not None:
                _check_row_wise(self.name, v, v._constraint)
        for v in lent:                      # re-entrant: MirroredStrategy interleaves replicas
            entry = self._untracked.row_constraints.setdefault(self._var_key(v), [v._constraint, 0])
            entry[1] += 1
            v._constraint = None
        try:
            return super().apply(grads, trainable_variables)
        finally:
            for v in lent:
                key = self._var_key(v)
                entry = self._untracked.row_constraints[key]
                entry[1] -= 1
                if entry[1] == 0:
                    v._constraint = entry[0]
                    del self._untracked.row_constraints[key]

    def _update_model_variables_moving_average(self, trainable_variables):
        """Keras' EMA update, which reads every row: in exact mode after :meth:`flush`."""
        done = self.flush()
        with tf.control_dependencies([done] if done is not None else []):
            super()._update_model_variables_moving_average(trainable_variables)

    def _overwrite_model_variables_with_average_value(self, trainable_variables):
        """Keras' EMA overwrite; in a replica's context (``ema_overwrite_frequency`` under
        ``MirroredStrategy``, where Keras runs it in a ``cond``, which cannot hold the
        ``merge_call`` of Keras' own) each replica writes its own copy of every variable:
        the moving averages are the same on every replica."""
        variables = [_tf_variable(v) for v in trainable_variables]
        if not any(_accumulate._in_replica(v) for v in variables):
            return super()._overwrite_model_variables_with_average_value(trainable_variables)
        for var, average in zip(variables, self._model_variables_moving_average):
            _accumulate._write(var, tf.convert_to_tensor(_tf_variable(average)))
        return None

    def _backend_apply_gradients(self, grads, trainable_variables):
        """Keras' step; with ``gradient_accumulation_steps``, ``IndexedSlices`` gradients
        are accumulated row by row (:mod:`sparseopt_tf._accumulate`), never densified.

        Under a ``tf.distribute`` strategy (in a replica's context) every gradient takes
        that path (Keras' own accumulation cannot run there): the micro-steps' gradients
        are all-reduced, then accumulated on every replica alike.
        """
        distributed = tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()
        if not (self.gradient_accumulation_steps
                and (distributed or any(isinstance(g, tf.IndexedSlices) for g in grads))):
            return super()._backend_apply_gradients(grads, trainable_variables)
        _accumulate.apply(self, grads, trainable_variables)
        if self.use_ema:                                # as Keras' own step continues
            self._update_model_variables_moving_average(self._trainable_variables)
            if self.ema_overwrite_frequency:
                keras.ops.cond((self.iterations + 1) % self.ema_overwrite_frequency == 0,
                               lambda: self._overwrite_model_variables_with_average_value(
                                   self._trainable_variables),
                               lambda: None)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        self._check_exact_mode_can_run()
        trainable_variables = [_tf_variable(v) for v in trainable_variables]
        grads_and_vars = self._all_reduce_sum_gradients(list(zip(grads, trainable_variables)))
        scalars = self._step_scalars(learning_rate)
        next_state = None
        if self._state_variables:
            next_state = self._next_state(scalars)
            scalars = tf.concat([scalars, next_state], 0)
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._sparseopt_update_step, self._distribution_strategy, grads_and_vars, scalars,
            next_state)

    def _replica_update_step(self, grads, trainable_variables, learning_rate):
        """:meth:`_backend_update_step` on gradients already summed across replicas, in a
        replica's context (inside a ``cond``: no ``merge_call``): the kernels update this
        replica's copies (a distributed variable's handle is the replica's own here)."""
        self._check_exact_mode_can_run()
        pairs = [(g, _tf_variable(v)) for g, v in zip(grads, trainable_variables) if g is not None]
        scalars = self._step_scalars(learning_rate)
        next_state = None
        if self._state_variables:
            next_state = self._next_state(scalars)
            scalars = tf.concat([scalars, next_state], 0)
        done = self._run(pairs, scalars)
        with tf.control_dependencies([done] if done is not None else []):
            if done is not None:        # as _sparseopt_update_step: iterations after the kernels
                tf.raw_ops.DisableCopyOnRead(resource=_tf_variable(self._iterations).handle)
            if next_state is not None:
                for i, var in enumerate(self._state_variables):
                    _accumulate._write(var, next_state[i])

    def _sparseopt_update_step(self, distribution, grads_and_vars, scalars, next_state):
        pairs = [(g, v) for g, v in grads_and_vars if g is not None]
        if not tf.distribute.has_strategy():
            done = [self._run(pairs, scalars)]                    # one hand-over for all variables
        else:
            done = [distribution.extended.update(                # one per variable and device
                var, lambda v, g, s: self._run([(g, v)], s), args=(grad, scalars), group=False)
                for grad, var in pairs]
        deps = []
        if not tf.executing_eagerly():
            for d in done:
                for r in distribution.experimental_local_results(d) if d is not None else ():
                    deps += [x for x in tf.nest.flatten(r) if isinstance(x, (tf.Operation, tf.Tensor))]
        with tf.control_dependencies(deps):
            if deps:
                # Keras increments ``iterations`` after this method, ordered only after our
                # read of it: a resource op on it that waits for the kernels makes a rejected
                # step (an error in the kernels' numpy_function) leave it unchanged.
                for it in distribution.experimental_local_results(_tf_variable(self._iterations)):
                    tf.raw_ops.DisableCopyOnRead(resource=it.handle)
            if next_state is not None:
                self._assign_state(distribution, next_state)

    def _next_state(self, scalars):
        """The core's host state after this step (its own ``_next_scalar_state``), float64."""
        current = tf.stack([tf.cast(_tf_variable(v), tf.float64) for v in self._state_variables])
        state = tf.numpy_function(self._host.next_scalar_state, [scalars, current], tf.float64,
                                  stateful=False, name=f"{self.name}_sparseopt_state")
        state.set_shape([len(self._state_variables)])
        return state

    def _assign_state(self, distribution, next_state):
        """Write the host state (called once the kernels have run: a rejected step leaves it
        as it was)."""
        for i, var in enumerate(self._state_variables):
            var = _tf_variable(var)
            if tf.distribute.has_strategy():
                distribution.extended.update(var, lambda v, x, i=i: v.assign(x[i]), args=(next_state,),
                                             group=False)
            else:
                var.assign(next_state[i])

    def _step_scalars(self, learning_rate):
        iterations = self.iterations
        lr = tf.cast(tf.convert_to_tensor(learning_rate), tf.float64)
        step = tf.cast(tf.convert_to_tensor(iterations) + 1, tf.float64)
        # Keras casts weight_decay to float32 before multiplying by the learning rate.
        wd_lr = (lr * float(np.float32(self.weight_decay)) if self.weight_decay
                 else tf.zeros([], tf.float64))
        hypers = [_resolve_hyper(getattr(self, h), iterations) for h in self._spec.hyper_names]
        return tf.stack([step, wd_lr, lr] + hypers)

    def _job(self, var, sparse):
        """The host :class:`~sparseopt_tf._host.Job` of ``var`` (a ``tf.Variable``) and the
        :class:`~sparseopt_tf._handover.Ref` of it and of its slots (element, then the slots
        of other shapes: :meth:`sparseopt.engine.StepConfig.slot_layout`)."""
        slot_names, used, row_names, row_used, _ = self._host.config.slot_layout(var.shape)
        key = self._var_key(var)
        slots = self._slot_table.slots.get(key, {})
        missing = [n for n in slot_names + row_names if n not in slots]
        if missing:
            raise errors.UnknownSlotError(
                f"{self.name}: {var.name!r} has no slots {missing}; build the optimizer with it")
        ref = _handover.Ref(var)
        has_wd = bool(self.weight_decay) and self._use_weight_decay(var)
        job = _host.Job(ref.name, sparse, len(slot_names), used, has_wd, (key, ref.device),
                        len(row_names), row_used)
        return job, [ref] + [_handover.Ref(_tf_variable(slots[n])) for n in slot_names + row_names]

    def _run(self, pairs, scalars):
        """Hand ``pairs`` of (gradient, tf.Variable) to the kernels in one call, then run the
        lent constraints (see :meth:`apply`) on the touched rows."""
        jobs, refs, grads, constrained = [], [], [], []
        for grad, var in pairs:
            sparse = isinstance(grad, tf.IndexedSlices)
            job, job_refs = self._job(var, sparse)
            if sparse:
                dtype = _gradient_dtype(grad.values.dtype, var.dtype)
                if grad.values.dtype != dtype:
                    grad = tf.IndexedSlices(tf.cast(grad.values, dtype), grad.indices, grad.dense_shape)
                key = self._var_key(var)
                _exact.warn_unread(self, key, var, self._untracked.read)
                if key in self._untracked.row_constraints:
                    constrained.append((var, grad.indices, self._untracked.row_constraints[key][0]))
            else:
                grad = tf.convert_to_tensor(grad)
                grad = tf.cast(grad, _gradient_dtype(grad.dtype, var.dtype))
            jobs.append(job)
            refs.append(job_refs)
            grads.append(grad)
        if not jobs:
            return None
        done = _handover.run_step(self._host, jobs, refs, grads, scalars, self.name)
        if constrained:
            with tf.control_dependencies([done] if done is not None else []):
                done = tf.group([_handover.constrain_rows(_handover.Ref(var), indices, fn)
                                 for var, indices, fn in constrained])
            return None if tf.executing_eagerly() else done
        return done

    # --------------------------------------------------------------- exact mode

    def catch_up(self, variable, indices):
        """Exact mode: bring rows ``indices`` of ``variable`` current before they are read.

        The rows (and their slots) get the updates of the steps they skipped, so that a
        forward pass reads what dense training would have. Indices are checked as a
        sparse gradient's (type, range; duplicates are fine) before anything is written.
        :class:`sparseopt_tf.Embedding` and :func:`sparseopt_tf.embedding_lookup` call
        this before their gather; call it yourself before any other read of some rows.

        Args:
            variable: a variable this optimizer updates (Keras or ``tf.Variable``).
            indices: integer tensor of row indices, any shape.

        Returns:
            ``None`` eagerly (done) and in lazy mode; in a ``tf.function``, an op to
                order the reads after (``tf.control_dependencies``).

        Raises:
            sparseopt.errors.UnknownSlotError: ``variable`` is not one this optimizer was
                built with; or, in a ``tf.function``, the optimizer is not built yet (the
                slots that the catch-up updates do not exist when the function is traced).
        """
        if self.sparse_mode != "exact":
            return None
        variable = _tf_variable(variable)       # (a layer's call may autocast a Keras variable)
        self._untracked.read["caught_up"].add(self._var_key(variable))
        if not self.built:
            if tf.inside_function():
                raise errors.UnknownSlotError(
                    f"{self.name}: catch_up in a tf.function needs the optimizer built, so that "
                    "the slots it updates exist when the function is traced: call "
                    "optimizer.build(model.trainable_variables) first")
            return None                     # not built: no step has been deferred
        self._check_exact_mode_can_run()
        identity = tf.inside_function() and _exact.idle_always_identity(
            self._host.config, {h: getattr(self, h) for h in self._spec.hyper_names}, 0.0, variable.dtype)

        def catch_up(var):                  # one copy (of each, under a strategy)
            job, refs = self._job(var, True)
            if not tf.inside_function() and not self._host.exact.pending(job.key):
                return None                 # every row is current: nothing to hand over
            if identity and not job.has_wd and self._host.exact.assume_current(job.key):
                return None                 # the idle step is the identity: rows stay current
            return _catch_up(self._host, job, refs, indices, self.name)

        return _exact.group(_exact.on_each_copy(_tf_variable(variable), catch_up))

    def flush(self):
        """Exact mode: bring every row of every variable (and its slots) current.

        One pass over each variable that has rows behind. Call it before reading whole
        tables (``get_weights`` and the save paths call it; :class:`sparseopt_tf.ExactFlush`
        calls it before evaluation and prediction).

        Returns:
            ``None`` eagerly (done) and in lazy mode; in a ``tf.function``, an op.
        """
        if self.sparse_mode != "exact" or not self.built:
            return None
        self._check_exact_mode_can_run()
        variables = [_tf_variable(v) for v in self._trainable_variables]
        if any(isinstance(v, tf.distribute.DistributedValues) for v in variables):
            return _exact.group([op for v in variables for op in _exact.on_each_copy(  # each copy
                v, lambda local: _flush(self._host, [self._job(local, False)], self.name))])
        return _flush(self._host, [self._job(v, False) for v in variables], self.name)

    def finalize_variable_values(self, var_list):
        """End of ``model.fit``: Keras' finalization, after :meth:`flush` in exact mode."""
        self.flush()
        super().finalize_variable_values(var_list)

    def _exact_reset(self):
        """After the state was set (restored, loaded, ``set_weights``): in exact mode every
        row is current; with gradient accumulation the accumulators' rows are unknown."""
        if self._host.exact is not None:
            self._host.exact.reset()
        if self._untracked.accumulators is not None:
            self._untracked.accumulators.forget()

    def _check_exact_mode_can_run(self):
        _exact.check_can_run(self.name, self.sparse_mode)

    # ------------------------------------------------------------------- config

    def get_config(self):
        """Keras 3's config plus the optimizer's own arguments (and ``sparse_mode``).

        In exact mode (eagerly) this flushes first: ``model.save`` serializes the config
        before it writes any weights, so the tables it then saves are current whatever
        layer holds them.
        """
        if not tf.inside_function():
            self.flush()
        config = super().get_config()
        config["sparse_mode"] = self.sparse_mode
        if self.sparse_mode == "exact":
            config["exact_history"] = self.exact_history
        config.update(_spec.rounding_config(self._core))
        for arg, _ in self._spec.args:
            value = getattr(self, arg)
            if callable(value) and not isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
                value = value()
            if isinstance(value, (tf.Tensor, tf.Variable, keras.Variable)):
                value = float(np.asarray(value))
            elif isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
                value = keras.optimizers.schedules.serialize(value)
            config[arg] = value
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for arg in cls._spec.hyper_names:
            if isinstance(config.get(arg), dict):
                config[arg] = keras.optimizers.schedules.deserialize(config[arg], custom_objects=custom_objects)
        return super().from_config(config, custom_objects=custom_objects)


#: Keras' norm constraints: row-wise exactly when their ``axis`` leaves out axis 0.
_NORM_CONSTRAINTS = (keras.constraints.MaxNorm, keras.constraints.UnitNorm,
                     keras.constraints.MinMaxNorm)


def _check_row_wise(name, variable, constraint):
    """Raise :class:`~sparseopt.errors.ConstraintNotRowWiseError` if ``constraint`` (of a
    variable with a sparse gradient) is one of Keras' norm constraints taken across rows.

    A norm constraint is row-wise when its ``axis`` leaves out axis 0: each row's norm is
    taken over the row's own axes, so constraining the touched rows is what Keras'
    whole-variable pass does to them (and it leaves the other rows, which the step did not
    change and which already satisfy it, as they are). ``NonNeg`` is elementwise. Any other
    callable is trusted to be row-wise (see :meth:`Optimizer.apply`).
    """
    if not isinstance(constraint, _NORM_CONSTRAINTS):
        return
    rank = len(variable.shape)
    axes = constraint.axis if isinstance(constraint.axis, (list, tuple)) else [constraint.axis]
    if rank > 1 and all(int(a) % rank != 0 for a in axes):
        return
    path = getattr(variable, "path", None) or variable.name
    kind = f"keras.constraints.{type(constraint).__name__}(axis={constraint.axis!r})"
    fix = (f"use a row-wise constraint, e.g. {type(constraint).__name__}(axis="
           f"{1 if rank == 2 else list(range(1, rank))}), the norm of each row" if rank > 1 else
           "a 1-D variable has no row-wise norm: use a dense gradient, or no norm constraint")
    raise errors.ConstraintNotRowWiseError(
        f"{name}: the constraint of {path!r} (shape {tuple(variable.shape)}), {kind}, takes "
        "norms across rows (over axis 0), but a sparse (IndexedSlices) gradient updates and "
        "constrains only the touched rows, so the result would differ from Keras' whole-variable "
        f"constraint: {fix}. Nothing was written.")


def _checked_weight_decay(opt, value):
    """``value`` as the weight decay of ``opt`` (a float or None), or raise as Keras would."""
    if value is None:
        if opt._spec.explicit_weight_decay:         # AdamW, with keras.optimizers.AdamW's message
            raise errors.HyperparameterError(
                "Argument `weight_decay` must be a float. Received: weight_decay=None")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise errors.HyperparameterError(
            f"{opt.name}: weight_decay must be a float or None (the kernels' coefficient is "
            f"computed from it when a step is traced); got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise errors.HyperparameterError(f"{opt.name}: weight_decay must be a finite float >= 0; "
                                         f"got {value}")
    return value


#: Keras 3's own argument checks, with Keras' messages (its tests match them): ``{class:
#: ((argument, is invalid, message), ...)}``, run on plain numbers before the core's checks
#: (which cover the same ranges and NaN, with sparseopt's messages).
_KERAS_ARGUMENT_CHECKS = {
    "Ftrl": (
        ("initial_accumulator_value", lambda v: v < 0.0,
         "`initial_accumulator_value` needs to be positive or zero. Received: "
         "initial_accumulator_value={v}."),
        ("learning_rate_power", lambda v: v > 0.0,
         "`learning_rate_power` needs to be negative or zero. Received: learning_rate_power={v}."),
        ("l1_regularization_strength", lambda v: v < 0.0,
         "`l1_regularization_strength` needs to be positive or zero. Received: "
         "l1_regularization_strength={v}."),
        ("l2_regularization_strength", lambda v: v < 0.0,
         "`l2_regularization_strength` needs to be positive or zero. Received: "
         "l2_regularization_strength={v}."),
        ("l2_shrinkage_regularization_strength", lambda v: v < 0.0,
         "`l2_shrinkage_regularization_strength` needs to be positive or zero. Received: "
         "l2_shrinkage_regularization_strength={v}."),
    ),
    "Lion": (
        ("beta_1", lambda v: v <= 0 or v > 1,
         "Argument `beta_1` must be in the [0, 1] range. Otherwise, the optimizer degenerates "
         "to SignSGD. Received: beta_1={v}."),
    ),
    "SGD": (
        ("momentum", lambda v: v < 0 or v > 1,
         "`momentum` must be a float between [0, 1]. Received: momentum={v}."),
    ),
}


def _check_arguments_as_keras(class_name, values):
    """Raise :class:`~sparseopt.errors.HyperparameterError` (a ``ValueError``) with Keras'
    message for an argument that ``keras.optimizers.<class_name>`` rejects."""
    for arg, invalid, message in _KERAS_ARGUMENT_CHECKS.get(class_name, ()):
        value = values.get(arg)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and invalid(value):
            raise errors.HyperparameterError(message.format(v=value))


def _tf_variable(v):
    """The ``tf.Variable`` of ``v`` (a Keras or TF variable). Never ``keras.Variable.value``
    alone: in a layer's call under a mixed-precision policy that is an autocast (float16)
    copy, which has neither the variable's identity nor its buffer."""
    if isinstance(v, keras.Variable):
        return v._value if getattr(v, "_value", None) is not None else v.value
    return v


def _catch_up(host, job, refs, indices, name):
    """Hand a variable and its element slots to the exact book's catch-up of ``indices``
    (shared with :mod:`sparseopt_tf.legacy`)."""
    indices = tf.reshape(tf.convert_to_tensor(indices), [-1])

    def body(arrays):
        host.exact.catch_up(host.exact_variable(job, arrays[:-1]), arrays[-1])

    return _handover.run_on_host(body, refs[:1 + job.nslots] + [indices], name, "catch_up")


def _flush(host, jobs_and_refs, name):
    """Hand variables and their element slots to the exact book's flush (eagerly only
    those with rows behind; in a graph every one, as steps traced before it may defer
    rows of any). Shared with :mod:`sparseopt_tf.legacy`."""
    if not tf.inside_function():
        jobs_and_refs = [(job, refs) for job, refs in jobs_and_refs
                         if host.exact.pending(job.key)]
    if not jobs_and_refs:
        return None
    inputs = [ref for job, refs in jobs_and_refs for ref in refs[:1 + job.nslots]]

    def body(arrays):
        variables, pos = [], 0
        for job, _ in jobs_and_refs:
            variables.append(host.exact_variable(job, arrays[pos:pos + 1 + job.nslots]))
            pos += 1 + job.nslots
        host.exact.flush(variables)

    return _handover.run_on_host(body, inputs, name, "flush")


def _gradient_dtype(grad_dtype, var_dtype):
    """The dtype a gradient reaches the kernels in: the variable's, or float32 for a 16-bit
    variable whose gradient is float32 (the core takes both; float32 keeps its bits)."""
    var_dtype = tf.as_dtype(var_dtype)
    if var_dtype in (tf.bfloat16, tf.float16) and grad_dtype != var_dtype:
        return tf.float32
    return var_dtype


def _dtype_name(v):
    return tf.as_dtype(v.dtype).name


def _numpy_dtype(v):
    """The NumPy dtype of a variable (``ml_dtypes.bfloat16`` for ``tf.bfloat16``)."""
    return np.dtype(tf.as_dtype(v.dtype).as_numpy_dtype)


def _describe(identity):
    return (f"{identity['class']} with slots {identity['slots'] + identity['row_slots']}"
            + (f", host state {identity['state']}" if identity["state"] else "")
            + (", EMA" if identity["use_ema"] else "")
            + (f", gradient accumulation over {identity['gradient_accumulation_steps']} steps"
               if identity["gradient_accumulation_steps"] else ""))


class _Unscalable(tf.IndexedSlices):
    """An ``IndexedSlices`` that Keras' ``apply`` can divide by ``loss_scale_factor``
    (``tf.IndexedSlices`` has no ``/``): the values are divided, the rows stay sparse."""

    def __truediv__(self, scale):
        return tf.IndexedSlices(self.values / tf.cast(scale, self.values.dtype), self.indices,
                                self.dense_shape)


def _deduplicated(g):
    """``g`` with its duplicate indices summed (rows in order of first appearance)."""
    rows, position = tf.unique(g.indices)
    values = tf.math.unsorted_segment_sum(g.values, position, tf.shape(rows)[0])
    return tf.IndexedSlices(values, rows, g.dense_shape)


def _make_class(spec):
    doc = (f"{spec.name}, as ``keras.optimizers.{spec.name}`` (Keras 3), on sparseopt's Numba kernels.\n\n"
           f"Math: :mod:`{spec.core_class._rule.__name__}`; arguments as ``sparseopt.{spec.name}`` "
           f"({', '.join(f'{a}={d!r}' for a, d in spec.args) or 'none'}), plus Keras 3's.\n"
           "Sparse (``IndexedSlices``) gradients update the touched rows in place: lazily, or\n"
           "with ``sparse_mode=\"exact\"`` as dense training would (see ``Optimizer``).\n")
    namespace = {"_spec": spec, "__doc__": doc, "__module__": __name__}
    for index, state in enumerate(spec.core_class._scalar_state_names):
        namespace[f"_{state}"] = _state_alias(index, state)    # as Keras names it (Nadam's _u_product)
    cls = type(spec.name, (Optimizer,), namespace)
    cls.__init__ = _spec.signed_init(Optimizer.__init__, spec)
    return keras.saving.register_keras_serializable(package="sparseopt_tf")(cls)


def _state_alias(index, state):
    def get(self):
        if index >= len(self._state_variables):
            raise AttributeError(f"{self.name}: {state!r} exists once the optimizer is built")
        return self._state_variables[index]
    return property(get, doc=f"The host state variable {state!r} (0-d, float64), once built.")


_SPECS = _spec.optimizer_specs()
__all__ = ["Optimizer"] + list(_SPECS)
for _name, _s in _SPECS.items():
    globals()[_name] = _make_class(_s)
del _name, _s


def keras_optimizer(core_class):
    """The Keras 3 optimizer class of a core optimizer class (your own, for instance).

    Args:
        core_class: a subclass of :class:`sparseopt.Optimizer`, such as the class
            :meth:`sparseopt.Rule.optimizer_class` returns.

    Returns:
        A subclass of :class:`Optimizer` with ``core_class``'s name and arguments plus
        Keras 3's, registered for ``.keras`` files (package ``sparseopt_tf``), made as the
        built-in ``sparseopt_tf.<Name>`` classes are: ``model.compile(optimizer=cls())``.

    Example:
        >>> import math, sparseopt as so, sparseopt_tf
        >>> def coefficients(step, learning_rate=0.1):
        ...     return {"lr": learning_rate}
        >>> def update(p, g, c):
        ...     return (p - c.lr * g,)
        >>> Plain = so.Rule("plain_sgd", (), coefficients, update).optimizer_class("PlainSGD")
        >>> sparseopt_tf.keras_optimizer(Plain)(learning_rate=0.5).name
        'plain_sgd'
    """
    return _make_class(_spec.spec_of(_spec.checked_core_class(core_class, "sparseopt_tf.keras_optimizer")))
