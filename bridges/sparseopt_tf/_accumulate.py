"""Keras 3's ``gradient_accumulation_steps`` at the cost of the touched rows.

Keras keeps one dense accumulator per variable and, for every micro-step, adds the
gradient to it (``acc + g``: an ``IndexedSlices`` is densified), then on the update step
applies ``(g + acc) / steps`` and zeroes every accumulator: every micro-step pays for
the whole table, and the update is dense. Here a variable whose gradient is an
``IndexedSlices`` touches only rows:

* a micro-step writes the gradient's rows (indices and values) to the variable's
  *buffer* for that micro-step (untracked variables of dynamic length, one pair per
  micro-step of a cycle): a sequential copy, no random access into a table-sized
  accumulator, and no copy of what earlier micro-steps buffered;
* the update step hands the buffered rows and its own, divided by ``steps``, to the
  kernels as one ``IndexedSlices`` (the kernels sum duplicate rows in a fixed order),
  then empties the buffer.

Keras' own accumulator stays what checkpoints and ``.keras`` files hold: before the
optimizer's state is saved or read (:func:`fold`: ``get_weights``, ``save_own_variables``,
``tf.train.Checkpoint``) the buffered rows are scatter-added into it, and the rows it then
holds are recorded; the next update step gathers those rows from it and zeroes them.
After a restore (or ``set_weights``) it is unknown which rows the restored accumulator
holds, so the next update step reads every row of it once (``rows_known`` is false until
then).

Under ``MirroredStrategy`` and ``MultiWorkerMirroredStrategy`` (where Keras' own
accumulation cannot run: it updates its accumulators by ``merge_call`` inside a ``cond``)
every micro-step's gradients are first summed across replicas, outside the ``cond``, as
a step without accumulation sums them (a sparse gradient by all-gathering its rows);
each replica then writes the same rows to its own copy of the buffers (and the same
dense sums to its copy of Keras' accumulators), and the update step runs the kernels on
each replica's copy of the variables, in the replica's context. The copies of every
variable and buffer stay identical, Keras' accumulators hold the global partial sums
(what a checkpoint saves), and the result is one device's with the same global batch.

Without a strategy, dense gradients take Keras' path unchanged. The result is Keras' dense accumulation
followed by our sparse step on the accumulated rows (rows no micro-step touched get a
zero gradient, as in the dense sum: lazy mode skips them, exact mode defers them); the
sum of a row's micro-step gradients may differ from Keras' in the last bits (each is
divided by ``steps`` when it is buffered, before they are added; a folded buffer is
multiplied back).
"""

import keras
import tensorflow as tf


def _untracked(value, shape, name):
    return tf.Variable(value, shape=shape, trainable=False, name=name)


class SparseAccumulators:
    """The untracked per-variable buffers and records (see the module docstring).

    Attributes:
        rows_known: whether ``held`` names every row that Keras' accumulator holds.
        indices, values: per variable (``None`` for a scalar), one buffer of rows per
            micro-step of a cycle (the update step's own rows are not buffered).
        held: per variable, the rows folded into Keras' accumulator since its last update.
    """

    def __init__(self, variables, steps):
        with tf.init_scope():
            self.rows_known = _untracked(True, [], "sparseopt_rows_known")
            self.indices, self.values, self.held = [], [], []
            for v in variables:
                shape = tuple(v.shape)
                if not shape:
                    self.indices.append(None)
                    self.values.append(None)
                    self.held.append(None)
                    continue
                self.indices.append([_untracked(tf.zeros([0], tf.int64), tf.TensorShape([None]),
                                                "sparseopt_buffered_rows") for _ in range(steps - 1)])
                self.values.append([_untracked(tf.zeros((0,) + shape[1:], v.dtype),
                                               tf.TensorShape((None,) + shape[1:]),
                                               "sparseopt_buffered_values") for _ in range(steps - 1)])
                self.held.append(_untracked(tf.zeros([0], tf.int64), tf.TensorShape([None]),
                                            "sparseopt_held_rows"))

    def forget(self):
        """After a restore: the accumulators hold rows no record names; nothing is buffered."""
        self.rows_known.assign(False)
        for i in range(len(self.indices)):
            if self.indices[i] is not None:
                self._empty(i)
                self.held[i].assign(tf.zeros([0], tf.int64))

    def _empty(self, i):
        return [op for indices, values in zip(self.indices[i], self.values[i]) for op in (
            _write(indices, tf.zeros([0], tf.int64)),
            _write(values, tf.zeros([0] + values.shape.as_list()[1:], values.dtype)))]

    def buffered(self, i):
        """Variable ``i``'s buffered rows: ``(indices, values)`` tensors."""
        return (tf.concat([b.read_value() for b in self.indices[i]], 0),
                tf.concat([b.read_value() for b in self.values[i]], 0))


def _tf_variable(v):
    if isinstance(v, keras.Variable):
        return v._value if getattr(v, "_value", None) is not None else v.value
    return v


def _in_replica(var):
    """Whether ``var`` is a distributed variable seen from a replica's context (where its
    ``assign`` would need a ``merge_call``, which cannot run inside a ``cond``)."""
    return (isinstance(var, tf.distribute.DistributedValues)
            and not tf.distribute.in_cross_replica_context())


def _write(var, value):
    """``var.assign(value)``; in a replica's context, of the replica's own copy of a
    mirrored variable (every replica writes the same value)."""
    var = _tf_variable(var)
    if _in_replica(var):
        return tf.raw_ops.AssignVariableOp(resource=var.handle, value=tf.cast(value, var.dtype))
    return var.assign(value)


def _scatter_update(var, slices):
    """``var.scatter_update(slices)``, in a replica's context of its own copy (see :func:`_write`)."""
    var = _tf_variable(var)
    if _in_replica(var):
        return tf.raw_ops.ResourceScatterUpdate(resource=var.handle, indices=slices.indices,
                                                updates=slices.values)
    return var.scatter_update(slices)


def fold(opt):
    """Scatter-add every buffered row into Keras' accumulators and record them as held,
    so that the accumulators hold exactly Keras' partial sums (before they are saved)."""
    acc = opt._untracked.accumulators
    if acc is None:
        return None
    ops = []
    for i, indices in enumerate(acc.indices):
        if indices is None:
            continue
        dense = _tf_variable(opt._accumulated_gradients[i])
        buffered_indices, buffered_values = acc.buffered(i)     # (buffered divided by steps)
        buffered_values = buffered_values * tf.cast(opt.gradient_accumulation_steps, dense.dtype)
        added = dense.scatter_add(tf.IndexedSlices(buffered_values, buffered_indices))
        with tf.control_dependencies([added]):
            rows, _ = tf.unique(tf.concat([acc.held[i].read_value(), buffered_indices], 0))
            ops.append(acc.held[i].assign(rows))
            with tf.control_dependencies([ops[-1]]):
                ops += acc._empty(i)
    return None if tf.executing_eagerly() else tf.group(ops)


def apply(opt, grads, trainable_variables):
    """Keras 3's ``_backend_apply_gradients`` with gradient accumulation, rows only for
    ``IndexedSlices`` gradients (EMA is left to the caller). In a replica's context of a
    strategy the gradients are all-reduced first and every write is to the replica's own
    copies (see the module docstring)."""
    steps = opt.gradient_accumulation_steps
    acc = opt._untracked.accumulators
    distributed = tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()
    if distributed:             # outside the cond: a collective (merge_call) cannot run in it
        grads = [g for g, _ in opt._all_reduce_sum_gradients(
            list(zip(grads, [_tf_variable(v) for v in trainable_variables])))]
    is_update_step = (opt._iterations + 1) % steps == 0
    index = [opt._get_variable_index(v) for v in trainable_variables]
    acc_grads = [opt._accumulated_gradients[i] for i in index]
    sparse = [isinstance(g, tf.IndexedSlices) and acc.indices[i] is not None
              for g, i in zip(grads, index)]

    def update():
        new_grads, held = [], []
        for g, dense, i, s in zip(grads, acc_grads, index, sparse):
            if not s:
                new_grads.append((g + dense) / steps)
                continue
            dense = _tf_variable(dense)
            rows = tf.cond(acc.rows_known, lambda i=i: acc.held[i].read_value(),
                           lambda dense=dense: tf.range(tf.shape(dense, out_type=tf.int64)[0]))
            buffered_indices, buffered_values = acc.buffered(i)
            indices = tf.concat([buffered_indices, tf.cast(g.indices, tf.int64), rows], 0)
            scale = tf.cast(steps, dense.dtype)
            values = tf.concat([buffered_values, tf.cast(g.values, dense.dtype) / scale,
                                tf.gather(dense, rows) / scale], 0)
            new_grads.append(tf.IndexedSlices(values, indices, tf.shape(dense, out_type=tf.int64)))
            held.append((dense, rows, i))
        new_grads = opt._clip_gradients(new_grads)
        opt._apply_weight_decay(trainable_variables)
        if distributed:                 # the gradients are summed already: this replica's copies
            opt._replica_update_step(new_grads, trainable_variables, opt.learning_rate)
        else:
            opt._backend_update_step(new_grads, trainable_variables, opt.learning_rate)
        # Keras' reset: every accumulator but those of this step's sparse gradients (whose
        # buffers and held rows are emptied below), including those of variables without a
        # gradient in this call (their partial sums are dropped, as Keras drops them).
        handled = {i for _, _, i in held}
        for k, dense in enumerate(opt._accumulated_gradients):
            if k in handled:
                continue
            _write(dense, keras.ops.zeros(dense.shape, dtype=dense.dtype))
            if acc.indices[k] is not None:
                acc._empty(k)
                _write(acc.held[k], tf.zeros([0], tf.int64))
        for dense, rows, i in held:                       # the rows folded into the others
            _scatter_update(dense, tf.IndexedSlices(
                tf.zeros([tf.shape(rows)[0]] + dense.shape.as_list()[1:], dense.dtype), rows))
            _write(acc.held[i], tf.zeros([0], tf.int64))
            acc._empty(i)
        if held:
            _write(acc.rows_known, True)

    def accumulate():
        micro_step = tf.cast(opt._iterations % steps, tf.int32)     # 0 .. steps - 2 here
        for g, dense, i, s in zip(grads, acc_grads, index, sparse):
            if not s:
                _write(dense, g + dense)
                continue

            def write(j, i=i, g=g):
                def branch():       # divided by steps here: the update step only concatenates
                    _write(acc.indices[i][j], tf.cast(g.indices, tf.int64))
                    values = acc.values[i][j]
                    _write(values, tf.cast(g.values, values.dtype) / tf.cast(steps, values.dtype))
                return branch

            tf.switch_case(micro_step, [write(j) for j in range(steps - 1)])

    keras.ops.cond(is_update_step, update, accumulate)
