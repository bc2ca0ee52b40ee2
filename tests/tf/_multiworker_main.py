"""One worker of the MultiWorkerMirroredStrategy test (``tests/tf/test_distribute.py``).

Run as ``python -m tests.tf._multiworker_main OUT_DIR`` with ``TF_CONFIG`` naming two
workers on 127.0.0.1 and this process's index. The worker

1. creates the strategy and runs one collective (prints ``READY`` once it succeeds, so
   the test can tell "the collective runtime cannot start here" from a real failure);
2. trains a small embedding model with a custom loop (``strategy.run``), each worker on
   its half of every global batch, with ``sparseopt_tf.Adam``, ``sparseopt_tf.Nadam``
   (host state under the strategy) and ``sparseopt_tf.legacy.Adam``, and the Adams again
   with ``sparse_mode="exact"`` (lookups through ``sparseopt_tf.embedding_lookup``, a
   flush at the end), and exact Adam with gradient accumulation over 4 steps and with EMA
   (also trained by Keras' Adam with the same feature on densified gradients, one device);
3. trains the same model on one device, without a strategy, on the whole global batches;
4. writes both results to ``OUT_DIR/worker<index>.npz`` and prints ``DONE``.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ROWS, DIM, GLOBAL_BATCH, STEPS = 40, 4, 16, 6


def data():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, ROWS // 2, size=(STEPS, GLOBAL_BATCH, 3)).astype(np.int32)   # duplicates
    y = rng.normal(size=(STEPS, GLOBAL_BATCH)).astype(np.float32)
    table = rng.normal(size=(ROWS, DIM)).astype(np.float32)
    w = rng.normal(size=(DIM,)).astype(np.float32)
    return ids, y, table, w


NAMES = ("Adam", "Nadam", "legacy.Adam", "exact.Adam", "exact.legacy.Adam", "exact.Adam+accumulation",
         "exact.Adam+ema")
#: Keras 3 features of the ``+feature`` names (also given to Keras' Adam, the reference).
FEATURES = {"accumulation": {"gradient_accumulation_steps": 4},
            "ema": {"use_ema": True, "ema_momentum": 0.5, "ema_overwrite_frequency": 4}}


def make_optimizer(name):
    """``[exact.]Name[+feature]``; ``keras.Name[+feature]``: Keras' own, the reference."""
    import keras
    import sparseopt_tf
    name, _, feature = name.partition("+")
    kwargs = dict(FEATURES.get(feature, {}))
    if name.startswith("keras."):
        return getattr(keras.optimizers, name.removeprefix("keras."))(0.05, **kwargs)
    if name.startswith("exact."):
        kwargs["sparse_mode"] = "exact"
    name = name.removeprefix("exact.")
    if name == "legacy.Adam":
        return sparseopt_tf.legacy.Adam(0.05, **kwargs)
    return getattr(sparseopt_tf, name)(0.05, **kwargs)


def train(name, strategy, shard):
    """Trained ``(table, w, extra)`` after STEPS steps (``extra``: the table's accumulator
    or moving average, by feature); ``shard`` selects this replica's rows of each batch."""
    import keras
    import sparseopt_tf
    ids, y, table0, w0 = data()
    with strategy.scope():
        table, w = tf.Variable(table0), tf.Variable(w0)
        opt = make_optimizer(name)
        if isinstance(opt, keras.optimizers.Optimizer):
            opt.build([table, w])              # the catch-up's slots exist before tracing

    def replica_step(ids, y):
        with tf.GradientTape() as tape:
            rows = sparseopt_tf.embedding_lookup(table, ids, opt)           # exact: caught up first
            emb = tf.reduce_sum(rows, axis=1)                             # IndexedSlices gradient
            loss = tf.reduce_sum(tf.square(tf.linalg.matvec(emb, w) - y)) / GLOBAL_BATCH
        grads = tape.gradient(loss, [table, w])
        assert isinstance(grads[0], tf.IndexedSlices)
        if name.startswith("keras."):                 # the reference: densified gradients
            grads = [tf.convert_to_tensor(g) for g in grads]
        opt.apply_gradients(zip(grads, [table, w]))

    @tf.function
    def step(ids, y):
        strategy.run(replica_step, args=(ids, y))

    for s in range(STEPS):
        step(tf.constant(ids[s][shard]), tf.constant(y[s][shard]))
    opt.flush() if hasattr(opt, "flush") else None
    extra = {}
    if "+accumulation" in name:     # mid-cycle: Keras' accumulators hold the partial sums
        if not name.startswith("keras."):
            opt.get_weights()       # ours: once the buffered rows are folded into them
        extra = {"acc": opt._accumulated_gradients[0].numpy()}
    elif "+ema" in name:
        extra = {"ema": opt._model_variables_moving_average[0].numpy()}
    return table.numpy(), w.numpy(), extra


def main():
    out_dir = sys.argv[1]
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    # One collective before anything else: proves that the workers can talk.
    total = strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
    assert float(total) == 2.0, float(total)
    print("READY", flush=True)
    half = GLOBAL_BATCH // 2
    results = {}
    for name in NAMES:
        table, w, extra = train(name, strategy, slice(index * half, (index + 1) * half))
        ref_table, ref_w, ref_extra = train(name, tf.distribute.get_strategy(), slice(None))
        results.update({f"{name}/table": table, f"{name}/w": w,
                        f"{name}/ref_table": ref_table, f"{name}/ref_w": ref_w})
        results.update({f"{name}/{k}": v for k, v in extra.items()})
        results.update({f"{name}/ref_{k}": v for k, v in ref_extra.items()})
        if "+" in name:             # Keras' Adam with the feature, densified, one device
            keras_table, keras_w, keras_extra = train("keras." + name.removeprefix("exact."),
                                                      tf.distribute.get_strategy(), slice(None))
            results.update({f"{name}/keras_table": keras_table, f"{name}/keras_w": keras_w})
            results.update({f"{name}/keras_{k}": v for k, v in keras_extra.items()})
    np.savez(os.path.join(out_dir, f"worker{index}.npz"), **results)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
