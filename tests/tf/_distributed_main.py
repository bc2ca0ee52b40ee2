"""Run in a subprocess by test_distribute.py: ``python -m tests.tf._distributed_main MODE Name...``.

Trains the same embedding model on one device and under MirroredStrategy over two
logical CPU devices (same global batch), with sparseopt_tf.<Name> in Keras 3 and
sparseopt_tf.legacy.<Name> in tf_keras; prints ``OK <max relative difference>``.

MODE ``mirrored``: lazy mode. MODE ``exact``: ``sparse_mode="exact"`` with the
``Embedding`` layers that catch rows up; it also checks that the two replicas' copies of
every variable are bit-identical, and prints ``DENSE <max relative difference>`` against
the optimizer's Keras class given densified gradients on one device (dense training).
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


def main():
    global EXACT, KW
    import tf_keras
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
