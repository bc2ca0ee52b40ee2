"""A Keras recommender with a 1,000,000-row item table: Keras' results at sparse cost.

The model is user and item embedding tables whose dot product (plus, with `--mlp`, a
small MLP on both embeddings) scores a (user, item) pair; it learns to tell clicked
items from random ones with a binary cross-entropy loss. An embedding lookup's gradient
is a `tf.IndexedSlices` holding only the rows of the batch. `keras.optimizers.Adam`
densifies it and rewrites all 1,000,000 rows of the table and of both Adam slots at
every step; `sparseopt_tf.Adam` updates only the rows of the batch, in place.

It trains with `sparseopt_tf.Adam(sparse_mode="exact")` and `sparseopt_tf.Embedding` (the
one change to the model: its lookups bring the rows they read up to date), which gives
the results of `keras.optimizers.Adam` on the dense gradient: rows outside the batch
still get Adam's momentum and decaying moments, computed when they are next read or
updated. Then the same model, from the same initial weights, is trained for
`--compare-steps` steps on the same batches by `keras.optimizers.Adam`, by
`sparseopt_tf.Adam` in exact mode and in lazy mode (the default `sparse_mode`: only the
batch's rows move, as TF-Addons' LazyAdam, `torch.optim.SparseAdam` and FBGEMM do), and
their losses, held-out AUCs and step times are printed side by side.

Data: by default, seeded synthetic clicks: items with Zipf-distributed popularity, and
users who, among a few popular candidates, click the one closest to their hidden
taste (the negatives are popular items too, so popularity alone predicts nothing).
With `--ratings PATH`, a MovieLens ratings file (`ratings.csv` of ml-latest-small and
the other recent releases, `ratings.dat` of ml-1m, `u.data` of ml-100k, or the
downloaded directory or zip): a rating of 4 or more is a click, a random 10% of the
clicks is held out, negatives are uniformly random items (see `_movielens.py`).

With `--table-dtype bfloat16` the three embedding tables are bfloat16 variables (half the
memory of float32; Adam's slots stay float32), trained by `sparseopt_tf.Adam` in lazy mode
(the semantics of the comparison below): the math in float32, each new value rounded to
bfloat16 stochastically (`--no-stochastic-rounding`: to nearest even, where updates smaller
than half a bfloat16 step vanish). The side-by-side comparison then trains the same model
from the same initial weights on the same batches with float32 tables, bfloat16 tables with
stochastic rounding, bfloat16 tables rounded to nearest (all `sparseopt_tf.Adam`, lazy), and
`keras.optimizers.Adam` on the bfloat16 tables (Keras' own bfloat16 math, rounded to nearest;
its dense bfloat16 steps on the 1,000,000-row table take about 1.5 s each on 2 cores).

`model.evaluate` and `model.predict` right after `model.fit` read current rows with no
callback: `fit` flushes every row when it ends, and `sparseopt_tf.Embedding` catches up
the rows each evaluation (the validation inside `fit` too) reads. A callback that reads
whole tables at an epoch's end (`EarlyStopping(restore_best_weights=True)`, used with
`--ratings`) needs `sparseopt_tf.ExactFlush()` listed before it.

Run:  python examples/recommender_keras.py                       (about 1.5 minutes on 2 cores)
      python examples/recommender_keras.py --quick               (small, seconds)
      python examples/recommender_keras.py --compare-steps 732   (the README's loss table: 3 epochs)
      python examples/recommender_keras.py --ratings ml-latest-small.zip
      python examples/recommender_keras.py --table-dtype bfloat16 --compare-steps 732
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up notices quiet

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared loader beside this file
import _movielens  # noqa: E402
from _synthetic import ZipfClicks  # noqa: E402


def pointwise(users, pos, neg):
    """Triples as labelled pairs: (user, clicked item) -> 1, (user, other item) -> 0."""
    x = {"user": np.concatenate([users, users]), "item": np.concatenate([pos, neg])}
    y = np.concatenate([np.ones(users.size, np.float32), np.zeros(users.size, np.float32)])
    return x, y


def synthetic_data(args):
    data = ZipfClicks(args.users, args.items, seed=args.seed)
    rng = np.random.default_rng(args.seed + 1)
    train = data.batch(rng, args.clicks, np.int32)
    held_out = data.batch(np.random.default_rng(args.seed + 2), args.held_out, np.int32)
    return args.users, args.items, train, held_out


def movielens_data(args):
    ratings = _movielens.load_ratings(args.ratings)
    users, items = _movielens.clicks(ratings, min_rating=4.0)
    (tu, ti), (hu, hi) = _movielens.split(users, items, held_out_fraction=0.1, seed=args.seed)
    negatives = np.random.default_rng(args.seed + 1).integers(0, ratings.num_items, tu.size).astype(np.int32)
    held_out = _movielens.held_out_triples(hu, hi, ratings.num_items, seed=args.seed + 2)
    print(f"{args.ratings}: {len(ratings):,} ratings, {ratings.num_users:,} users, {ratings.num_items:,} "
          f"items; {users.size:,} clicks (rating >= 4), {hu.size:,} held out")
    return ratings.num_users, ratings.num_items, (tu, ti, negatives), held_out


def build_model(keras, embedding, num_users, num_items, dim, mlp, seed, table_dtype="float32"):
    """Embeddings -> dot product (+ MLP) -> one logit per (user, item) pair.

    ``embedding`` is the embedding layer class: ``sparseopt_tf.Embedding`` (for exact mode)
    or ``keras.layers.Embedding``; the same ``seed`` gives the same initial weights with both.
    ``table_dtype="bfloat16"``: the tables are bfloat16 variables (their initial values the
    float32 ones rounded), looked up in bfloat16; the layers after them compute in float32.
    """
    model = _build_model(keras, embedding, num_users, num_items, dim, mlp, seed, "float32")
    if table_dtype == "float32":
        return model
    low = _build_model(keras, embedding, num_users, num_items, dim, mlp, seed, table_dtype)
    low.set_weights([w.astype(v.numpy().dtype) for w, v in zip(model.get_weights(), low.weights)])
    return low


def _build_model(keras, embedding, num_users, num_items, dim, mlp, seed, table_dtype):
    keras.utils.set_random_seed(seed)
    user = keras.Input(shape=(), dtype="int32", name="user")
    item = keras.Input(shape=(), dtype="int32", name="item")
    u = embedding(num_users, dim, name="user_embedding", dtype=table_dtype)(user)
    v = embedding(num_items, dim, name="item_embedding", dtype=table_dtype)(item)
    item_bias = keras.layers.Flatten()(embedding(num_items, 1, embeddings_initializer="zeros",
                                                 name="item_bias", dtype=table_dtype)(item))
    logit = keras.layers.Add(name="score")([keras.layers.Dot(axes=1, name="dot")([u, v]), item_bias])
    if mlp:
        h = keras.layers.Dense(32, activation="relu", name="mlp_hidden")(keras.layers.Concatenate()([u, v]))
        logit = keras.layers.Add()([logit, keras.layers.Dense(1, name="mlp_out")(h)])
    return keras.Model({"user": user, "item": item}, logit, name="recommender")


def candidates(keras, sparseopt_tf, learning_rate, weight_decay, table_dtype="float32"):
    """The optimizers compared, each with the embedding layer its users would write and the
    tables' dtype: Keras' Adam and ours (exact and lazy) on float32 tables, or, with
    ``table_dtype="bfloat16"``, float32 against bfloat16 tables (see the module docstring)."""
    wd = weight_decay or None      # Keras' None skips its whole-table weight-decay pass
    if table_dtype == "bfloat16":
        def lazy(**rounding):
            return lambda: sparseopt_tf.Adam(learning_rate, weight_decay=weight_decay, **rounding)
        return {
            "sparseopt_tf.Adam, float32": (keras.layers.Embedding, "float32", lazy()),
            "sparseopt_tf.Adam, bf16 stochastic": (keras.layers.Embedding, "bfloat16",
                                                   lazy(stochastic_rounding=True)),
            "sparseopt_tf.Adam, bf16 nearest": (keras.layers.Embedding, "bfloat16",
                                                lazy(stochastic_rounding=False)),
            "keras.optimizers.Adam, bf16": (keras.layers.Embedding, "bfloat16",
                                            lambda: keras.optimizers.Adam(learning_rate, weight_decay=wd)),
        }
    return {
        "keras.optimizers.Adam": (keras.layers.Embedding, "float32",
                                  lambda: keras.optimizers.Adam(learning_rate, weight_decay=wd)),
        "sparseopt_tf.Adam exact": (sparseopt_tf.Embedding, "float32",
                                    lambda: sparseopt_tf.Adam(learning_rate, sparse_mode="exact",
                                                              weight_decay=weight_decay)),
        "sparseopt_tf.Adam lazy": (keras.layers.Embedding, "float32",
                                   lambda: sparseopt_tf.Adam(learning_rate, weight_decay=weight_decay)),
    }


def compile_model(keras, model, optimizer):
    model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=[keras.metrics.AUC(from_logits=True, name="auc")],
                  jit_compile=False)  # sparseopt's kernels run outside XLA


def make_callback(keras):
    class LossAndStepTime(keras.callbacks.Callback):
        """Records each batch's loss and wall time (Keras logs the epoch's running mean of the loss)."""

        def __init__(self):
            super().__init__()
            self.losses, self.step_times = [], []

        def on_epoch_begin(self, epoch, logs=None):
            self._count, self._mean = 0, 0.0

        def on_train_batch_begin(self, batch, logs=None):
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.step_times.append(time.perf_counter() - self._t0)
            mean = float(logs["loss"])        # batches are of equal size: undo the running mean
            self._count += 1
            self.losses.append(self._count * mean - (self._count - 1) * self._mean)
            self._mean = mean

    return LossAndStepTime()


def compare(keras, sparseopt_tf, model_args, x, y, val, args):
    """Each optimizer trains the same model, from the same initial weights, on the same batches.

    The batches are the first ``args.compare_steps`` of seeded shuffles of the training pairs
    (one shuffle per epoch). After training, each model is evaluated on 65,536 training pairs
    and on the held-out pairs; step times are ``model.fit``'s, the first two steps (tracing)
    left out.
    """
    steps_per_epoch = y.size // args.batch
    rng = np.random.default_rng(args.seed + 4)
    epochs = -(-args.compare_steps // steps_per_epoch)
    order = np.concatenate([rng.permutation(y.size)[:steps_per_epoch * args.batch]
                            for _ in range(epochs)])[:args.compare_steps * args.batch]
    xs, ys = {k: v[order] for k, v in x.items()}, y[order]
    sample = min(65_536, y.size)
    train_sample = ({k: v[:sample] for k, v in x.items()}, y[:sample])
    results = {}
    for label, (embedding, dtype, make_optimizer) in candidates(
            keras, sparseopt_tf, args.learning_rate, args.weight_decay, args.table_dtype).items():
        model = build_model(keras, embedding, *model_args, table_dtype=dtype)
        compile_model(keras, model, make_optimizer())
        recorder = make_callback(keras)
        model.fit(xs, ys, batch_size=args.batch, epochs=1, shuffle=False, verbose=0, callbacks=[recorder])
        train_loss, _ = model.evaluate(*train_sample, batch_size=8192, verbose=0)
        held_out_loss, auc = model.evaluate(*val, batch_size=8192, verbose=0)
        times = recorder.step_times[2:] or recorder.step_times
        results[label] = dict(train_loss=float(train_loss), held_out_loss=float(held_out_loss),
                              auc=float(auc), step_seconds=float(np.median(times)),
                              losses=recorder.losses, step_times=recorder.step_times)
        del model
    return results


def print_comparison(results, steps):
    lazy = results["sparseopt_tf.Adam lazy"]
    print(f"\nthe same model from the same initial weights, {steps} steps on the same batches:\n"
          f"  {'':24}  training loss  held-out loss  held-out AUC   ms per step")
    for label, r in results.items():
        print(f"  {label:24}  {r['train_loss']:13.4f}  {r['held_out_loss']:13.4f}  {r['auc']:12.4f}"
              f"  {1e3 * r['step_seconds']:8.1f} ({r['step_seconds'] / lazy['step_seconds']:.1f}x lazy)")
    keras_, exact = results["keras.optimizers.Adam"], results["sparseopt_tf.Adam exact"]
    ratio = keras_["step_seconds"] / exact["step_seconds"]
    speed = (f"{ratio:.1f}x less time per step than keras.optimizers.Adam" if ratio >= 1 else
             f"{1 / ratio:.1f}x the step time of keras.optimizers.Adam (small tables make dense steps cheap)")
    print(f"Exact mode is dense training (keras.optimizers.Adam on the densified gradient) in {speed}. "
          "Keras' Adam given the lookups' IndexedSlices squares each repeated id's gradient row before "
          "summing them, so it differs where batches repeat ids.\n"
          f"Pick lazy mode (the default) for the fastest steps "
          f"(exact takes {exact['step_seconds'] / lazy['step_seconds']:.1f}x their time here) and the semantics of "
          "TF-Addons' LazyAdam, torch.optim.SparseAdam and FBGEMM; "
          f"rows outside the batch do not move, which changes the model: here lazy mode ends at training loss "
          f"{lazy['train_loss']:.4f} (exact {exact['train_loss']:.4f}, Keras {keras_['train_loss']:.4f}) and "
          f"held-out AUC {lazy['auc']:.4f} (exact {exact['auc']:.4f}, Keras {keras_['auc']:.4f}).")


def print_precisions(results, steps):
    """The comparison of float32 and bfloat16 tables (``--table-dtype bfloat16``)."""
    base = results["sparseopt_tf.Adam, float32"]
    print(f"\nthe same model from the same initial weights, {steps} steps on the same batches, "
          "float32 against bfloat16 tables (lazy sparseopt_tf.Adam; Keras' Adam in bfloat16 math):\n"
          f"  {'':36}  training loss  held-out loss  held-out AUC  AUC - float32   ms per step")
    for label, r in results.items():
        print(f"  {label:36}  {r['train_loss']:13.4f}  {r['held_out_loss']:13.4f}  {r['auc']:12.4f}"
              f"  {r['auc'] - base['auc']:+13.4f}  {1e3 * r['step_seconds']:11.1f}")
    stochastic, nearest = (results[f"sparseopt_tf.Adam, bf16 {r}"] for r in ("stochastic", "nearest"))
    print(f"bfloat16 tables (half the bytes; float32 slots) end {stochastic['auc'] - base['auc']:+.4f} held-out "
          f"AUC from float32 tables with stochastic rounding, {nearest['auc'] - base['auc']:+.4f} rounded to "
          "nearest. Keras' Adam does its bfloat16 tables' math in bfloat16, where beta_2 = 0.999 rounds "
          "to 1.0: its bias correction sqrt(1 - beta_2**t) is 0, and so are its steps.")


def plot(path, results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    colors = {"keras.optimizers.Adam": "C3", "sparseopt_tf.Adam exact": "C0", "sparseopt_tf.Adam lazy": "C2",
              "sparseopt_tf.Adam, float32": "C2", "sparseopt_tf.Adam, bf16 stochastic": "C0",
              "sparseopt_tf.Adam, bf16 nearest": "C1", "keras.optimizers.Adam, bf16": "C3"}
    shown = []
    for label, r in results.items():
        losses = np.asarray(r["losses"])
        steps = np.arange(1, losses.size + 1)
        window = max(losses.size // 20, 1)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax_loss.plot(steps[window - 1:], smooth, lw=1.5, color=colors.get(label), label=label)
        times = 1e3 * np.asarray(r["step_times"][1:])
        shown.extend(times)
        ax_time.plot(steps[1:], times, lw=0.8, color=colors.get(label),
                     label=f"{label}: median {1e3 * r['step_seconds']:.1f} ms")
    ax_loss.set(xlabel="training step", ylabel="binary cross-entropy",
                title=f"Training loss (mean of {window} batches)")
    ax_loss.legend()
    ax_time.set(xlabel="training step (the first, which builds the graph, left out)", ylabel="ms per step",
                yscale="log", title="Step time (model.fit)", ylim=(min(shown) / 2, max(shown) * 6))
    ax_time.legend(fontsize=8, loc="upper right")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratings", metavar="PATH", help="a MovieLens ratings file, directory or zip "
                        "(default: synthetic Zipf clicks)")
    parser.add_argument("--items", type=int, default=1_000_000, help="synthetic data: item table rows")
    parser.add_argument("--users", type=int, default=10_000, help="synthetic data: user table rows")
    parser.add_argument("--clicks", type=int, default=1_000_000, help="synthetic data: training clicks")
    parser.add_argument("--held-out", type=int, default=20_000, help="synthetic data: held-out clicks")
    parser.add_argument("--dim", type=int, default=32, help="embedding width")
    parser.add_argument("--mlp", action="store_true", help="add a small MLP to the dot product")
    parser.add_argument("--batch", type=int, default=None,
                        help="pairs per step, half clicks (default: 8192 synthetic, 1024 --ratings)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: 3 (synthetic), 10 (--ratings, with early stopping)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="default: 0.01 synthetic, 0.002 --ratings")
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="decoupled weight decay (Keras 3's): every row in exact mode (as Keras), the "
                        "batch's rows in lazy mode")
    parser.add_argument("--compare-steps", type=int, default=None,
                        help="steps of each optimizer in the side-by-side comparison (0: skip it; "
                        "default 100 synthetic, 200 --ratings)")
    parser.add_argument("--plot", metavar="PATH", default="recommender_keras.png",
                        help="where to write the plot ('' for none)")
    parser.add_argument("--table-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the embedding tables' dtype (bfloat16: lazy mode, float32 slots)")
    parser.add_argument("--stochastic-rounding", action=argparse.BooleanOptionalAction, default=True,
                        help="bfloat16 tables: round new values stochastically (default) or to nearest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small, fast run (for tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.items, args.users, args.clicks, args.held_out = 50_000, 2_000, 60_000, 4_000
        args.batch, args.epochs = args.batch or 2048, args.epochs or 2
        args.compare_steps = 8 if args.compare_steps is None else args.compare_steps
    defaults = dict(epochs=10, batch=1024, learning_rate=0.002, compare_steps=200) if args.ratings else \
        dict(epochs=3, batch=8192, learning_rate=0.01, compare_steps=100)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import keras

    import sparseopt_tf

    num_users, num_items, train, held_out = movielens_data(args) if args.ratings else synthetic_data(args)
    x, y = pointwise(*train)
    n = (y.size // args.batch) * args.batch or y.size  # equal batches (see LossAndStepTime)
    keep = np.random.default_rng(args.seed + 3).permutation(y.size)[:n]
    x, y = {k: v[keep] for k, v in x.items()}, y[keep]
    val = pointwise(*held_out)

    model_args = (num_users, num_items, args.dim, args.mlp, args.seed)
    if args.table_dtype == "bfloat16":   # lazy mode, as the float32/bfloat16 comparison
        model = build_model(keras, keras.layers.Embedding, *model_args, table_dtype="bfloat16")
        compile_model(keras, model, sparseopt_tf.Adam(learning_rate=args.learning_rate,
                                                      weight_decay=args.weight_decay,
                                                      stochastic_rounding=args.stochastic_rounding))
        print(f"{num_items:,} x {args.dim} bfloat16 item table, {num_users:,} users, {y.size:,} training "
              f"pairs, batch {args.batch:,}, {args.epochs} epochs of sparseopt_tf.Adam(stochastic_rounding="
              f"{args.stochastic_rounding}) (lazy, float32 slots)")
    else:
        model = build_model(keras, sparseopt_tf.Embedding, *model_args)   # was keras.layers.Embedding
        compile_model(keras, model, sparseopt_tf.Adam(learning_rate=args.learning_rate, sparse_mode="exact",
                                                      weight_decay=args.weight_decay))
        print(f"{num_items:,} x {args.dim} item table, {num_users:,} users, {y.size:,} training pairs, "
              f"batch {args.batch:,}, {args.epochs} epochs of sparseopt_tf.Adam(sparse_mode=\"exact\") "
              "(keras.optimizers.Adam's results, sparse steps)")
    loss_before, auc_before = model.evaluate(*val, batch_size=8192, verbose=0)
    print(f"held-out before training: loss {loss_before:.4f}, AUC {auc_before:.3f} (chance = 0.5)")

    recorder = make_callback(keras)
    callbacks = [recorder]
    if args.ratings:  # a small real data set is soon memorized: keep the epoch with the best held-out AUC
        callbacks += [sparseopt_tf.ExactFlush(),      # every row current before EarlyStopping copies them
                      keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=2,
                                                    restore_best_weights=True, verbose=1)]
    t0 = time.perf_counter()
    history = model.fit(x, y, batch_size=args.batch, epochs=args.epochs, validation_data=val,
                        validation_batch_size=8192, callbacks=callbacks, verbose=2 if args.quick else "auto")
    train_seconds = time.perf_counter() - t0
    # No callback needed: fit flushed every row as it ended, and the lookups catch rows up.
    loss_after, auc_after = model.evaluate(*val, batch_size=8192, verbose=0)
    first_loss = history.history["loss"][0]
    last_loss = history.history["loss"][-1]
    print(f"\ntraining loss (epoch mean) {first_loss:.4f} -> {last_loss:.4f}; held-out loss "
          f"{loss_before:.4f} -> {loss_after:.4f}, AUC {auc_before:.3f} -> {auc_after:.3f}; "
          f"{train_seconds:.1f} s, median step {1e3 * np.median(recorder.step_times[1:]):.1f} ms")

    result = {"first_loss": float(first_loss), "last_loss": float(last_loss),
              "held_out_loss_before": float(loss_before), "held_out_loss": float(loss_after),
              "auc_before": float(auc_before), "auc": float(auc_after), "train_seconds": train_seconds,
              "fit_step_seconds": float(np.median(recorder.step_times[1:])),
              "table_dtype": str(model.get_layer("item_embedding").embeddings.dtype)}

    if args.compare_steps > 0:
        compared = compare(keras, sparseopt_tf, model_args, x, y, val, args)
        result["compared"] = {label: {k: v for k, v in r.items() if k not in ("losses", "step_times")}
                              for label, r in compared.items()}
        if args.table_dtype == "bfloat16":
            print_precisions(compared, args.compare_steps)
        else:
            print_comparison(compared, args.compare_steps)
            exact, keras_ = compared["sparseopt_tf.Adam exact"], compared["keras.optimizers.Adam"]
            result.update(step_seconds=exact["step_seconds"], keras_step_seconds=keras_["step_seconds"],
                          keras_over_sparseopt=keras_["step_seconds"] / exact["step_seconds"])
        if args.plot:
            try:
                plot(args.plot, compared)
                print(f"plot of the losses and step times: {args.plot}")
                result["plot"] = args.plot
            except ImportError:
                print("no plot: matplotlib is not installed (pip install matplotlib)")
    return result


if __name__ == "__main__":
    main()
