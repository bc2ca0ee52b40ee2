"""Keras 3's ``gradient_accumulation_steps`` at the cost of the touched rows.

Keras keeps one dense accumulator per variable and, for every micro-step, adds the
gradient to it (``acc + g``: an ``IndexedSlices`` is densified), then on the update step
applies ``(g + acc) / steps`` and zeroes every accumulator: every micro-step pays for
the whole table, and the update is dense. Here a variable whose gradient is an
``IndexedSlices`` keeps Keras' own accumulator (so checkpoints and ``.keras`` files hold
exactly what Keras would save) but touches only rows:

* a micro-step scatter-adds the gradient's rows into the accumulator and appends its
  indices to the variable's *row record* (an untracked int64 variable of dynamic length,
  de-duplicated as it grows);
* the update step scatter-adds its own rows, gathers the recorded rows of the
  accumulator, divides by ``steps`` and hands them to the kernels as an
  ``IndexedSlices``, then zeroes those rows and empties the record.

Dense gradients take Keras' path unchanged. The result is Keras' dense accumulation
followed by our sparse step on the accumulated rows (rows no micro-step touched get a
zero gradient, as in the dense sum: lazy mode skips them, exact mode defers them).

The row record is not saved: after a restore (or ``set_weights``) it is unknown which
rows the restored accumulator holds, so the next update step reads every row once
(``rows_known`` is false until then).
"""

import keras
import tensorflow as tf
from keras import ops


class RowRecords:
    """The untracked row record of every variable, and whether they are known."""

    def __init__(self, variables):
        with tf.init_scope():
            self.rows_known = tf.Variable(True, trainable=False, name="sparseopt_rows_known")
            self.records = [
                tf.Variable(tf.zeros([0], tf.int64), shape=tf.TensorShape([None]), trainable=False,
                            name="sparseopt_accumulated_rows") if len(v.shape) else None
                for v in variables]

    def forget(self):
        """After a restore: the accumulators hold rows no record names."""
        self.rows_known.assign(False)
        for r in self.records:
            if r is not None:
                r.assign(tf.zeros([0], tf.int64))


def _tf_variable(v):
    return v.value if isinstance(v, keras.Variable) else v


def _scatter_add(acc, g):
    values = tf.cast(g.values, acc.dtype)
    return acc.scatter_add(tf.IndexedSlices(values, tf.cast(g.indices, tf.int64)))


def _record(record, g):
    rows, _ = tf.unique(tf.concat([record.read_value(), tf.cast(tf.reshape(g.indices, [-1]), tf.int64)], 0))
    return record.assign(rows)


def apply(opt, grads, trainable_variables):
    """Keras 3's ``_backend_apply_gradients`` with gradient accumulation, rows only for
    ``IndexedSlices`` gradients (EMA is left to the caller)."""
    steps = opt.gradient_accumulation_steps
    records = opt._untracked.row_records
    is_update_step = (opt._iterations + 1) % steps == 0
    index = [opt._get_variable_index(v) for v in trainable_variables]
    acc_grads = [opt._accumulated_gradients[i] for i in index]

    def update():
        new_grads, sparse = [], []
        for g, v, acc, i in zip(grads, trainable_variables, acc_grads, index):
            if isinstance(g, tf.IndexedSlices) and records.records[i] is not None:
                acc = _tf_variable(acc)
                with tf.control_dependencies([_scatter_add(acc, g)]):
                    recorded = _record(records.records[i], g)
                rows = tf.cond(records.rows_known, lambda r=recorded: tf.identity(r),
                               lambda acc=acc: tf.range(tf.shape(acc, out_type=tf.int64)[0]))
                values = tf.gather(acc, rows) / tf.cast(steps, acc.dtype)
                new_grads.append(tf.IndexedSlices(values, rows, tf.shape(acc, out_type=tf.int64)))
                sparse.append((acc, rows, i))
            else:
                new_grads.append((g + acc) / steps)
        new_grads = opt._clip_gradients(new_grads)
        opt._apply_weight_decay(trainable_variables)
        opt._backend_update_step(new_grads, trainable_variables, opt.learning_rate)
        sparse_keys = {i for _, _, i in sparse}
        for acc, i in zip(acc_grads, index):           # Keras' reset, dense accumulators only
            if i not in sparse_keys:
                acc.assign(ops.zeros(acc.shape, dtype=acc.dtype))
        for acc, rows, i in sparse:                    # the recorded rows of the others
            acc.scatter_update(tf.IndexedSlices(tf.zeros([tf.shape(rows)[0], *acc.shape[1:]], acc.dtype),
                                                rows))
            records.records[i].assign(tf.zeros([0], tf.int64))
        if sparse:
            records.rows_known.assign(True)

    def accumulate():
        for g, acc, i in zip(grads, acc_grads, index):
            if isinstance(g, tf.IndexedSlices) and records.records[i] is not None:
                _scatter_add(_tf_variable(acc), g)
                _record(records.records[i], g)
            else:
                acc.assign(g + acc)

    ops.cond(is_update_step, update, accumulate)
