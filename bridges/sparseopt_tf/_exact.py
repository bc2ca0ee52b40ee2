"""``sparse_mode="exact"`` in the bridge: the core's bookkeeping, on TensorFlow buffers.

The core keeps the exact-mode states of a host's variables (each row's last step, the
ring of past coefficients) in a :class:`sparseopt.engine.ExactBook`, keyed by the host's
key of each variable (here: the key of the variable's de-duplication scratch, its key
and device), since each hand-over (:func:`sparseopt_tf._handover.run_on_host`) makes
fresh NumPy views of the buffers. The book runs every exact-mode operation: the fused
catch-up + update of a step, the catch-up of given rows, the flush of every row.

This module adds what TensorFlow needs around it: which strategies exact mode runs
under, a lookup's catch-up on every copy of a mirrored variable, and whether a traced
lookup needs a catch-up at all.

None of this is saved: exact mode saves flushed state (every row current), and a
restored optimizer starts with every row current (``ExactBook.reset``).
"""

import warnings

import numpy as np
import tensorflow as tf

from sparseopt import errors


class ExactModeNotSupportedError(errors.SparseoptError, ValueError):
    """``sparse_mode="exact"`` asked for where it cannot give dense training's results
    (a ``tf.distribute`` strategy other than ``MirroredStrategy`` and
    ``MultiWorkerMirroredStrategy``); raised before anything is written."""


#: Strategies whose replicas each keep a whole copy of every variable and apply the same
#: all-reduced update to it: each copy keeps its own record of rows behind (the book's key
#: holds the copy's device), advanced identically on every replica.
_MIRRORING_STRATEGIES = (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy,
                         tf.distribute.OneDeviceStrategy)


def check_can_run(name, sparse_mode):
    """Exact mode under a ``tf.distribute`` strategy other than the mirroring ones: raise,
    before anything is written (both bridge families call this before a step, a catch-up
    or a flush)."""
    if sparse_mode == "exact" and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
        if not isinstance(strategy, _MIRRORING_STRATEGIES):
            raise ExactModeNotSupportedError(
                f"{name}: sparse_mode='exact' cannot run under {type(strategy).__name__}: it "
                "runs under MirroredStrategy, MultiWorkerMirroredStrategy and OneDeviceStrategy, "
                "whose replicas each keep a whole copy of every table. Use sparse_mode='lazy'.")


def warn_unread(opt, key, variable, read):
    """Warn once per variable when an exact-mode sparse step updates a variable for which
    no ``catch_up`` was ever asked: a forward pass that reads it without one (a plain
    ``keras.layers.Embedding``) reads rows that dense training would already have moved.
    ``read``: ``{"caught_up": keys, "warned": keys}``; ``key`` is ``variable``'s."""
    if opt.sparse_mode != "exact" or key in read["caught_up"] or key in read["warned"]:
        return
    read["warned"].add(key)
    warnings.warn(
        f"{getattr(opt, 'name', None) or opt._name}: sparse_mode='exact' updates "
        f"{getattr(variable, 'name', 'a variable')!r} sparsely, but nothing has asked for its rows "
        "to be caught up before they are read: a plain keras.layers.Embedding (or tf.gather) "
        "reads rows that dense training would already have moved, so the model trains as "
        "neither dense nor lazy training would. Read the table through sparseopt_tf.Embedding "
        "or sparseopt_tf.embedding_lookup (or call optimizer.catch_up(table, ids) before the "
        "read), or use sparse_mode='lazy'. (A table read only after optimizer.flush() is "
        "current: then ignore this.)", stacklevel=3)


def on_each_copy(variable, fn):
    """``fn(copy)`` for each local copy of ``variable``: for a distributed variable, in
    cross-replica context (its strategy's scope is entered if none is), once per component
    (in its update context, so that its slots resolve to the same device); otherwise
    (in a replica's context: its own copy) once, for ``variable``. Returns the results that are not ``None``.
    """
    if isinstance(variable, tf.distribute.DistributedValues):
        strategy = variable.distribute_strategy
        if not tf.distribute.has_strategy():        # e.g. the end of model.fit, outside the scope
            with strategy.scope():
                return on_each_copy(variable, fn)
        if tf.distribute.in_cross_replica_context():
            results = strategy.extended.update(variable, fn, group=False)
            # (each copy's result, None where it had nothing to do: flattened, so that a
            # list of Nones is no result)
            return [r for r in tf.nest.flatten(strategy.experimental_local_results(results))
                    if r is not None]
    result = fn(variable)
    return [] if result is None else [result]


def group(ops):
    """``None`` for no ops (eagerly, or nothing to do), else one op."""
    return tf.group(ops) if ops else None


def idle_always_identity(config, hypers, weight_decay, dtype):
    """Whether, in a function being traced now, every step's idle step of a variable of
    ``dtype`` is the identity, so that its lookups need no catch-up (decided while tracing
    the lookup's ``catch_up``).

    True where the rule declares it (``config.idle_is_identity``, see
    :mod:`sparseopt.rules._idle`: it depends on the hyperparameters other than the learning
    rate and on the weight decay only) for the values a traced step bakes in: ``hypers``
    (``{name: value}``, every float hyperparameter but the learning rate) all plain
    numbers, and ``weight_decay`` (the variable's: 0 where it does not apply; the caller
    checks the variable's ``has_wd``), which the step's graph takes as it was when traced.
    A tensor, variable, callable or schedule among ``hypers``, or host state (Nadam), and
    the answer is False: the catch-up stays.
    """
    values = {}
    for name, value in hypers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            return False
        values[name] = float(value)
    return config.idle_is_identity(values, weight_decay, np.float64 if dtype == tf.float64 else np.float32)
