"""Embedding lookups that read caught-up rows, for ``sparse_mode="exact"``.

In exact mode a sparse step writes only the rows of its batch; every other row is
brought up to date (caught up) when it is next touched. A forward pass must therefore
catch up the rows it is about to read, or it would read values that dense training
would already have moved. Both tools here do that, then gather:

* :class:`Embedding`, a drop-in for ``keras.layers.Embedding``: it finds the optimizer
  itself (the one compiled into the model that calls it, or one given as ``optimizer=``);
* :func:`embedding_lookup`, ``tf.gather`` for custom loops, with the optimizer given.

The catch-up runs through the same hand-over as the optimizer's steps (eagerly, or as
a ``tf.numpy_function`` in a ``tf.function``), and the gather is ordered after it by a
control dependency. The gather reads the variable as Keras' ``Embedding`` does, so the
table's gradient is still a ``tf.IndexedSlices`` and the step stays sparse. With a
lazy-mode optimizer, or any other optimizer, nothing is deferred and both are a plain
gather.
"""

import keras
import tensorflow as tf

from sparseopt import errors
from sparseopt_tf import optimizers


def embedding_lookup(table, ids, optimizer=None):
    """``tf.gather(table, ids)``, with rows ``ids`` first caught up by ``optimizer``.

    Args:
        table: the embedding table, a ``tf.Variable`` or ``keras.Variable`` that
            ``optimizer`` updates.
        ids: integer tensor of row indices, any shape (duplicates are fine).
        optimizer: a ``sparseopt_tf`` optimizer (Keras 3 or ``legacy``); in exact mode
            it catches up the rows ``ids`` (values and slots) before the gather. ``None``,
            a lazy-mode optimizer or another Keras optimizer: a plain gather.

    Returns:
        The rows, shape ``ids.shape + table.shape[1:]``; the gradient of ``table``
            through them is a ``tf.IndexedSlices``.

    In a custom training step:


        opt = sparseopt_tf.Adam(1e-3, sparse_mode="exact")
        opt.build([table, w])                       # before tracing: the slots must exist

        @tf.function
        def step(ids, y):
            with tf.GradientTape() as tape:
                rows = sparseopt_tf.embedding_lookup(table, ids, opt)
                loss = tf.reduce_mean((tf.reduce_sum(rows, 1) @ w - y) ** 2)
            opt.apply_gradients(zip(tape.gradient(loss, [table, w]), [table, w]))
    """
    variable = optimizers._tf_variable(table)
    catch_up = getattr(optimizer, "catch_up", None)
    done = catch_up(variable, ids) if catch_up is not None else None
    with tf.control_dependencies([done] if done is not None else []):
        return tf.gather(tf.convert_to_tensor(variable), ids)


class _Attached:
    """Holds a layer's optimizer out of sight of Keras' and TensorFlow's tracking: the
    model owns (and saves) its optimizer, the layer only uses it.

    Attributes:
        optimizer: the optimizer given to the layer, or ``None``.
        last: the exact-mode optimizer the layer's last call used (the one to flush
            before the layer saves its table, when no model call tells which).
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.last = None


class _AttachedOptimizer:
    """The ``optimizer=`` argument and attribute of the Embedding layers (Keras 3 and
    legacy): kept in an :class:`_Attached`, out of the layer's tracking."""

    def __init__(self, input_dim, output_dim, *args, optimizer=None, **kwargs):
        super().__init__(input_dim, output_dim, *args, **kwargs)
        self._attached = _Attached(optimizer)

    @property
    def optimizer(self):
        """The optimizer given to the layer (``None``: for the Keras 3 layer, the calling model's)."""
        return self._attached.optimizer

    def __setattr__(self, name, value):
        if name == "optimizer":           # not a tracked child of the layer (see _Attached)
            self._attached.optimizer = value
            return
        super().__setattr__(name, value)


@keras.saving.register_keras_serializable(package="sparseopt_tf")
class Embedding(_AttachedOptimizer, keras.layers.Embedding):
    """``keras.layers.Embedding`` whose lookups read caught-up rows in exact mode.

    A drop-in: same arguments, weights and config. Before its gather, the layer has its
    optimizer catch up the looked-up rows (:meth:`sparseopt_tf.Optimizer.catch_up`),
    so training with ``sparse_mode="exact"`` equals dense training:

        emb = sparseopt_tf.Embedding(1_000_000, 16)
        model = keras.Sequential([keras.Input((5,), dtype="int32"), emb, ...])
        model.compile(optimizer=sparseopt_tf.Adam(1e-3, sparse_mode="exact"), loss="mse")
        model.fit(x, y)

    The optimizer is ``optimizer=`` if given (or assigned to ``layer.optimizer``), else
    the optimizer compiled into the model whose call runs the layer. A ``tf.function``
    (``model.fit``, ``evaluate``, ``predict``) traced before that optimizer is built
    builds it with the model's trainable variables, as ``fit`` would a moment later,
    so that the traced catch-up can update its slots. With no exact-mode optimizer the
    layer is ``keras.layers.Embedding``.

    Before the layer saves its table (``model.save``, ``save_weights``) its optimizer
    (the given one, else the one its last call used) flushes, so that the saved table
    is current.

    Args:
        input_dim: number of rows.
        output_dim: width of a row.
        optimizer: the ``sparseopt_tf`` optimizer that trains the table (optional; not
            part of the config).
        **kwargs: ``keras.layers.Embedding``'s other arguments.
    """

    def call(self, inputs):
        table = getattr(self, "_embeddings", None)     # absent when quantized to integers
        trained = isinstance(table, keras.Variable) and table.trainable
        optimizer = self._exact_optimizer() if trained else None
        if optimizer is None:
            return super().call(inputs)
        ids = inputs
        if isinstance(ids, tf.RaggedTensor):
            ids = ids.flat_values
        elif isinstance(ids, tf.SparseTensor):
            ids = ids.values
        done = optimizer.catch_up(table, ids)
        with tf.control_dependencies([done] if done is not None else []):
            return super().call(inputs)

    def save_own_variables(self, store):
        """Save the table, after the optimizer's flush in exact mode (current rows)."""
        optimizer = self._attached.optimizer or self._attached.last
        if getattr(optimizer, "sparse_mode", None) == "exact" and not tf.inside_function():
            optimizer.flush()
        super().save_own_variables(store)

    def _exact_optimizer(self):
        """The exact-mode optimizer of this layer's table, or ``None``.

        Called while tracing, an unbuilt Keras optimizer is built with the calling
        model's trainable variables (Keras' own order, as ``fit`` builds it).
        """
        if _in_symbolic_call():
            return None                     # Keras computing shapes: nothing runs
        model = _calling_model(self)
        optimizer = builder = self._attached.optimizer
        if optimizer is None and model is not None:
            optimizer = getattr(model, "optimizer", None)
            optimizer = builder = getattr(optimizer, "inner_optimizer", optimizer)   # LossScaleOptimizer
            if isinstance(optimizer, _MULTI_OPTIMIZER):
                # Keras' MultiOptimizer: the sub-optimizer of this table (built by the outer one).
                optimizer = optimizer._optimizer_map(self._embeddings)
        if getattr(optimizer, "sparse_mode", None) != "exact":
            return None
        if (isinstance(optimizer, keras.optimizers.Optimizer) and not optimizer.built
                and tf.inside_function()):
            if model is None or not model.built:
                raise errors.UnknownSlotError(
                    f"Embedding {self.name!r}: its exact-mode optimizer {optimizer.name!r} is not "
                    "built, and no built model calls the layer, so the rows cannot be caught up "
                    "in this tf.function: call optimizer.build(model.trainable_variables) first")
            with tf.init_scope(), _no_autocast():    # the variables, not float16 copies
                builder.build(model.trainable_variables)
        self._attached.last = optimizer
        return optimizer


def _no_autocast():
    """A scope in which Keras variables read as themselves: under a mixed-precision policy
    a layer's call reads them autocast (float16 copies), and building the optimizer there
    would key it by those copies."""
    try:
        from keras.src.backend import AutocastScope
    except ImportError:                 # pragma: no cover -- another Keras layout
        import contextlib
        return contextlib.nullcontext()
    return AutocastScope(None)


#: Keras' ``MultiOptimizer`` (Keras 3.15 and later), or nothing to match.
_MULTI_OPTIMIZER = getattr(keras.optimizers, "MultiOptimizer", ())


def _calling_model(layer):
    """The outermost Keras model whose call is running ``layer``'s, if any.

    Keras keeps it in its call context (``entry_layer``), which has no public accessor;
    without it (another Keras version) the layer needs ``optimizer=``.
    """
    try:
        from keras.src.backend.common import global_state
    except ImportError:  # pragma: no cover
        return None
    entry = getattr(global_state.get_global_attribute("current_call_ctx"), "entry_layer", None)
    return entry if isinstance(entry, keras.Model) and entry is not layer else None


def _in_symbolic_call():
    """Whether Keras runs the call only to infer shapes (a scratch graph, never executed)."""
    try:
        from keras.src.backend import in_stateless_scope, in_symbolic_scope
    except ImportError:  # pragma: no cover
        return False
    return in_symbolic_scope() or in_stateless_scope()
