"""Run in a subprocess by test_distribute.py: ``python -m tests.tf._distributed_main MODE Name...``.

Trains the same embedding model on one device and under MirroredStrategy over two
logical CPU devices (same global batch), with sparseopt_tf.<Name> in Keras 3 and
sparseopt_tf.legacy.<Name> in tf_keras; prints ``OK <max relative difference>``.

MODE ``mirrored``: lazy mode. MODE ``exact``: ``sparse_mode="exact"`` with the
``Embedding`` layers that catch rows up; it also checks that the two replicas' copies of
every variable are bit-identical, and prints ``DENSE <max relative difference>`` against
the optimizer's Keras class given densified gradients on one device (dense training).

MODE ``features``: exact mode with each of Keras 3's optimizer features (``FEATURES``:
EMA, ``LossScaleOptimizer``, ``MultiOptimizer``, gradient accumulation over 4 steps) for
each Name (Adam, SGD with momentum, RMSprop by default), on a Keras 3 model. Each
combination checks that the replicas' copies of every model and optimizer variable are
bit-identical and prints ``CASE <name> <feature> <mirrored vs one device> <mirrored vs
dense Keras>``, the reference being the optimizer's Keras class with the same feature
given densified gradients on one device; a combination that raises prints ``FAIL``. In
float16 (``mixed_float16``: ``LossScaleOptimizer`` under that policy) half batches round
otherwise than whole ones, in Keras' own training too: there both numbers are ours vs
Keras under the same strategy (mirrored, then one device). With accumulation it also
checks that the table's micro-steps go to row buffers, never to a table-sized accumulator.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

import sparseopt_tf  # noqa: E402


def data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 40, size=(64, 3)).astype(np.int32)
    y = rng.normal(size=(64, 1)).astype(np.float32)
    return x, y


EXACT = False          # set by main() from MODE; the module is import-safe (no argv, no TF setup)
KW = {}


def _copies(weights):
    """Every variable's value (replica 0's), after checking that every replica's copy equals it."""
    out = []
    for w in weights:
        w = w.value if isinstance(w, keras.Variable) else w
        copies = [np.asarray(c.numpy()) for c in
                  (w.values if isinstance(w, tf.distribute.DistributedValues) else [w])]
        for c in copies[1:]:
            assert np.array_equal(c, copies[0]), f"the replicas' copies of {w.name} differ"
        out.append(copies[0])
    return out


def keras3_weights(name, strategy, optimizer=None):
    """``optimizer``: the class to train with (default ``sparseopt_tf.<name>``)."""
    with strategy.scope():
        keras.utils.set_random_seed(0)
        ids = keras.Input(shape=(3,), dtype="int32")
        embedding = sparseopt_tf.Embedding if EXACT else keras.layers.Embedding
        x = embedding(80, 4)(ids)
        out = keras.layers.Dense(1)(keras.layers.Flatten()(x))
        model = keras.Model(ids, out)
        model.compile(optimizer=(optimizer or getattr(sparseopt_tf, name))(0.05, **KW), loss="mse")
    model.fit(*data(), batch_size=16, epochs=2, shuffle=False, verbose=0)
    return _copies(model.trainable_weights)


def legacy_weights(name, strategy, optimizer=None):
    import tf_keras
    with strategy.scope():
        tf_keras.utils.set_random_seed(0)
        opt = (optimizer or getattr(sparseopt_tf.legacy, name))(0.05, **KW)
        embedding = (sparseopt_tf.legacy.Embedding(80, 4, input_length=3, optimizer=opt) if EXACT
                     else tf_keras.layers.Embedding(80, 4, input_length=3))
        model = tf_keras.Sequential([embedding, tf_keras.layers.Flatten(), tf_keras.layers.Dense(1)])
        model.build((None, 3))
        model.compile(optimizer=opt, loss="mse")
    model.fit(*data(), batch_size=16, epochs=2, shuffle=False, verbose=0)
    if EXACT and hasattr(opt, "flush"):
        opt.flush()
    return _copies(model.trainable_weights)


def _dense(base):
    """``base`` given densified gradients (dense training); ``sparse_mode`` is ignored."""
    def init(self, learning_rate, sparse_mode=None):
        base.__init__(self, learning_rate)

    def apply(self, grads, variables=None):
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        return base.apply(self, grads, variables)
    return type(f"Dense{base.__name__}", (base,), {"__init__": init, "apply": apply})


def _dense_legacy(base):
    def init(self, learning_rate, sparse_mode=None):
        base.__init__(self, learning_rate)

    def apply_gradients(self, grads_and_vars, *args, **kwargs):
        pairs = [(tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g, v)
                 for g, v in grads_and_vars]
        return base.apply_gradients(self, pairs, *args, **kwargs)
    return type(f"Dense{base.__name__}", (base,), {"__init__": init, "apply_gradients": apply_gradients})


def _relative(a, b):
    return max(float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)) for x, y in zip(a, b))


# ----------------------------------------------------------------- MODE features

#: Hyperparameters of the optimizers of MODE ``features`` (SGD: with momentum).
HYPER = {"Adam": {}, "SGD": {"momentum": 0.9}, "RMSprop": {}}
#: Each feature: the keyword arguments of the optimizer (``ema``, ``accumulation``) or how
#: the model is compiled (``loss_scale``: in ``LossScaleOptimizer``; ``multi``: ours for the
#: table inside ``MultiOptimizer``, Keras' same optimizer for the dense layer).
FEATURES = {"ema": {"use_ema": True, "ema_momentum": 0.5, "ema_overwrite_frequency": 3},
            "loss_scale": {}, "mixed_float16": {}, "multi": {},
            "accumulation": {"gradient_accumulation_steps": 4}}


def _dense_keras(base):
    """``base`` (a Keras 3 optimizer class) given densified gradients; ``sparse_mode`` is
    ignored. Keras' own optimizer is the reference of every combination."""
    def init(self, *args, sparse_mode=None, **kwargs):
        base.__init__(self, *args, **kwargs)

    def apply(self, grads, trainable_variables=None):
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        return base.apply(self, grads, trainable_variables)
    return type(f"Dense{base.__name__}", (base,), {"__init__": init, "apply": apply})


def feature_weights(name, feature, strategy, reference=False):
    """The trained model's and optimizer's variables (each checked equal on every replica):
    ``sparseopt_tf.<name>(sparse_mode="exact")`` with ``feature``, or (``reference``) Keras'
    ``<name>`` with it on densified gradients."""
    cls = _dense_keras(getattr(keras.optimizers, name)) if reference else getattr(sparseopt_tf, name)
    kwargs = dict(HYPER[name], **FEATURES[feature])
    policy = "mixed_float16" if feature == "mixed_float16" else "float32"
    with strategy.scope():
        keras.utils.set_random_seed(0)
        ids = keras.Input(shape=(3,), dtype="int32")
        embedding = sparseopt_tf.Embedding(80, 4, dtype=policy)
        x = keras.layers.Flatten(dtype=policy)(embedding(ids))
        out = keras.layers.Dense(1, dtype=policy)(x)
        model = keras.Model(ids, out)
        optimizer = cls(0.05, sparse_mode="exact", **kwargs)
        if feature in ("loss_scale", "mixed_float16"):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        elif feature == "multi" and not reference:
            optimizer = keras.optimizers.MultiOptimizer(keras.optimizers.OptimizerMap(
                default_optimizer=getattr(keras.optimizers, name)(0.05, **kwargs),
                optimizer_map={embedding.embeddings.path: optimizer}))
        model.compile(optimizer=optimizer, loss="mse", jit_compile=False)
    if feature == "accumulation" and not reference:
        with _recorded_writes() as written:
            model.fit(*data(), batch_size=16, epochs=3, shuffle=False, verbose=0)
        _check_rows_only(optimizer, embedding.embeddings, written)
    else:
        model.fit(*data(), batch_size=16, epochs=3, shuffle=False, verbose=0)
    return _copies(list(model.trainable_weights) + list(model.optimizer.variables))


class _recorded_writes:
    """Records (while ``fit`` traces its step) the variables that the sparse accumulation
    writes whole (``sparseopt_tf._accumulate._write``)."""

    def __enter__(self):
        from sparseopt_tf import _accumulate
        self.module, self.original, written = _accumulate, _accumulate._write, []

        def write(var, value):
            written.append(_accumulate._tf_variable(var))
            return self.original(var, value)
        _accumulate._write = write
        return written

    def __exit__(self, *exc):
        self.module._write = self.original


def _check_rows_only(optimizer, table, written):
    """The table's gradients went to the row buffers (the sparse path), and nothing wrote
    its table-sized Keras accumulator whole."""
    from sparseopt_tf import _accumulate
    i = optimizer._get_variable_index(table)
    dense = _accumulate._tf_variable(optimizer._accumulated_gradients[i])
    buffers = optimizer._untracked.accumulators.indices[i]
    assert any(w is b for w in written for b in buffers), "the table's rows were not buffered"
    assert not any(w is dense for w in written), "the table's whole accumulator was written"


def features_main(names, features, mirrored, single):
    """``CASE name feature a b``: for a float32 feature, ``a`` mirrored vs one device and
    ``b`` mirrored vs Keras on one device; for ``mixed_float16`` (where float16 sums over
    half batches round otherwise, in Keras' own training too) ``a`` and ``b`` are ours vs
    Keras under the same strategy, mirrored and on one device."""
    for name in names:
        for feature in features:
            try:
                b = feature_weights(name, feature, mirrored)
                a = feature_weights(name, feature, single)
                # Keras' reference: the model's variables (its optimizer's differ in kind).
                ref = feature_weights(name, feature, single, reference=True)
                n = 3                           # table, kernel, bias
                if feature == "mixed_float16":
                    ref_mirrored = feature_weights(name, feature, mirrored, reference=True)
                    first, second = _relative(b[:n], ref_mirrored[:n]), _relative(a[:n], ref[:n])
                else:
                    first, second = _relative(b, a), _relative(b[:n], ref[:n])
            except Exception as e:          # noqa: BLE001 -- reported, then the next combination
                print("FAIL", name, feature, f"{type(e).__name__}: {e}".replace("\n", " ")[:2000],
                      flush=True)
                continue
            print("CASE", name, feature, first, second, flush=True)


def main():
    global EXACT, KW
    import tf_keras
    if sys.argv[1] == "features":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        names = [a for a in sys.argv[2:] if a in HYPER] or list(HYPER)
        features = [a for a in sys.argv[2:] if a in FEATURES] or list(FEATURES)
        return features_main(names, features, tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
                             tf.distribute.OneDeviceStrategy("/cpu:0"))
    EXACT = sys.argv[1] == "exact"
    KW = {"sparse_mode": "exact"} if EXACT else {}
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    worst = dense = 0.0
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = tf.distribute.OneDeviceStrategy("/cpu:0")
    for fn in (keras3_weights, legacy_weights):
        for name in sys.argv[2:] or ["Adam"]:
            a, b = fn(name, single), fn(name, mirrored)
            worst = max(worst, _relative(b, a))
            if EXACT and name != "Nadam":      # tf_keras' legacy Nadam is another method
                module = keras.optimizers if fn is keras3_weights else tf_keras.optimizers.legacy
                make = _dense if fn is keras3_weights else _dense_legacy
                dense = max(dense, _relative(b, fn(name, single, optimizer=make(getattr(module, name)))))
    print("OK", worst)
    if EXACT:
        print("DENSE", dense)


if __name__ == "__main__":
    main()
