"""Peer comparison of the TensorFlow bridge: model.fit train-step time, side by side.

Run: ``python asv_benchmarks/bridge_bench.py [--steps N] [--rounds R] [--small]
[--quiet-load X] [--only peers|issue16] [--report PATH]``. Prints (and with ``--report`` writes as Markdown)
the median train-step time of each optimizer and the ratios the issues set targets for.

Models:
* recommender: item table 1,000,000 x 64, user table 100,000 x 64, score = dot(user,
  item) + MLP(concat) (64 -> 1), batch 8,192 synthetic Zipf-distributed clicks, BCE loss;
* dense: an MLP of 6 Dense(512) layers on 512 features, batch 8,192 (no sparse gradient).

Optimizers: ``sparseopt_tf.Adam`` and ``keras.optimizers.Adam`` on a Keras 3 model,
``sparseopt_tf.legacy.Adam`` and ``tf_keras.optimizers.legacy.Adam`` on the same model
built with tf_keras. Every run is ``model.fit`` with its defaults (graph mode).

Method: every (model, optimizer) pair is built and warmed up first (two steps: tracing,
JIT compilation, first touch of the tables). Then ``--rounds`` rounds each time
``--steps`` steps of every pair, in alternating order, so that a change of machine load
(the machine may be shared) falls on every optimizer alike; the median over all timed
steps is reported, with the load average seen. ``--quiet-load X`` waits (up to 5 min)
before each round until the 1-minute load average is below X.

Issue 16's section (``--only issue16`` runs it alone) times ``train_on_batch`` on the
recommender with ``sparseopt_tf.Embedding`` tables: exact vs lazy mode (Adam; Adagrad, whose
idle step is the identity) and ``gradient_accumulation_steps=4`` vs none, all configurations
alternating in one process, with the time spent in the host step and in exact-mode catch-ups.

A second section times the optimizer step alone on the dense MLP's 14 variables
(``apply_gradients`` in a ``tf.function``, fixed gradients) and splits sparseopt_tf's into
the hand-over (the same step with a host step that runs no kernel) and the kernels.
"""

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


class StepTimer:
    def __init__(self):
        self.times = []
        self._t = None

    def callback(self, keras_module):
        timer = self

        class _CB(keras_module.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                timer._t = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                timer.times.append(time.perf_counter() - timer._t)
        return _CB()


def clicks(n_items, n_users, batch, steps, seed=0):
    rng = np.random.default_rng(seed)
    n = batch * steps
    items = np.minimum(rng.zipf(1.2, n) - 1, n_items - 1).astype(np.int32)
    users = rng.integers(0, n_users, n).astype(np.int32)
    y = (rng.random(n) < 0.3).astype(np.float32)
    return np.stack([users, items], 1), y


def recommender(k, n_items, n_users, dim, embedding=None):
    """``embedding``: the layer class of both tables (``k.layers.Embedding`` if ``None``)."""
    embedding = embedding or k.layers.Embedding
    ids = k.Input(shape=(2,), dtype="int32")
    user = embedding(n_users, dim)(ids[:, 0])
    item = embedding(n_items, dim)(ids[:, 1])
    dot = k.layers.Dot(axes=1)([user, item])
    h = k.layers.Dense(64, activation="relu")(k.layers.Concatenate()([user, item]))
    out = k.layers.Add()([dot, k.layers.Dense(1)(h)])
    return k.Model(ids, out)


def dense_mlp(k, width=512, depth=6):
    x = inp = k.Input(shape=(width,))
    for _ in range(depth):
        x = k.layers.Dense(width, activation="relu")(x)
    return k.Model(inp, k.layers.Dense(1)(x))


class Run:
    """One compiled (model, optimizer) pair, warmed up; :meth:`timed` fits more steps."""

    def __init__(self, k, model, optimizer, x, y, batch):
        self.k, self.model, self.x, self.y, self.batch = k, model, x, y, batch
        model.compile(optimizer=optimizer, loss=k.losses.BinaryCrossentropy(from_logits=True)
                      if x.ndim == 2 and x.shape[1] == 2 else "mse")
        model.fit(x[:batch * 2], y[:batch * 2], batch_size=batch, epochs=1, verbose=0)   # warm-up
        self.times = []

    def timed(self, steps):
        timer = StepTimer()
        n = self.batch * steps
        self.model.fit(self.x[:n], self.y[:n], batch_size=self.batch, epochs=1, verbose=0,
                       shuffle=False, callbacks=[timer.callback(self.k)])
        self.times += timer.times


def wait_for_quiet(limit, max_wait=300):
    waited = 0
    while limit and os.getloadavg()[0] > limit and waited < max_wait:
        time.sleep(10)
        waited += 10


def time_models(args, runs, title, build, data, batch):
    made = {}
    for name, k, make in runs:
        k.utils.set_random_seed(0)
        made[name] = Run(k, build(k), make(), *data, batch)
    loads = []
    for r in range(args.rounds):
        wait_for_quiet(args.quiet_load)
        order = list(made) if r % 2 == 0 else list(reversed(made))
        for name in order:
            loads.append(os.getloadavg()[0])
            made[name].timed(args.steps)
    result = {name: float(np.median(run.times)) for name, run in made.items()}
    counts = {name: len(run.times) for name, run in made.items()}
    del made
    return {"title": title, "median": result, "count": counts, "load": (min(loads), max(loads))}


def profile_dense_optimizer(repeats=60):
    """Optimizer step alone on the dense MLP's variables: medians in ms."""
    import keras
    import tf_keras

    import sparseopt_tf
    from sparseopt_tf import _host
    shapes = [(512, 512)] * 6 + [(512, 1)] + [(512,)] * 6 + [(1,)]
    rng = np.random.default_rng(0)
    inits = [rng.normal(size=s).astype(np.float32) * 0.01 for s in shapes]
    grads = [tf.constant(rng.normal(size=s).astype(np.float32)) for s in shapes]

    def bench(opt):
        variables = [tf.Variable(i) for i in inits]

        @tf.function
        def step():
            opt.apply_gradients(zip(grads, variables))
        for _ in range(5):
            step()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        return float(np.median(times)) * 1e3

    out = {"keras.optimizers.Adam": bench(keras.optimizers.Adam(1e-3)),
           "sparseopt_tf.Adam": bench(sparseopt_tf.Adam(1e-3)),
           "tf_keras.optimizers.legacy.Adam": bench(tf_keras.optimizers.legacy.Adam(1e-3)),
           "sparseopt_tf.legacy.Adam": bench(sparseopt_tf.legacy.Adam(1e-3))}
    original = _host.HostStep.__call__
    _host.HostStep.__call__ = lambda self, jobs, scalars, arrays: np.int32(0)
    try:
        out["sparseopt_tf.Adam, hand-over only (no kernel)"] = bench(sparseopt_tf.Adam(1e-3))
        out["sparseopt_tf.legacy.Adam, hand-over only (no kernel)"] = bench(sparseopt_tf.legacy.Adam(1e-3))
    finally:
        _host.HostStep.__call__ = original
    return out


class HostTimes:
    """Seconds spent in the bridge's host step and in its exact-mode catch-ups (lookups
    of ``sparseopt_tf.Embedding``), per optimizer, by wrapping both methods."""

    def __init__(self):
        from sparseopt import engine
        from sparseopt_tf import _host
        self.step, self.catch_up = {}, {}
        self._patched = [(_host.HostStep, "__call__", self.step, lambda obj: id(obj.config)),
                         (engine.ExactBook, "catch_up", self.catch_up, lambda obj: obj.owner)]
        self._originals = []
        for cls, name, store, key in self._patched:
            original = getattr(cls, name)
            self._originals.append((cls, name, original))
            setattr(cls, name, self._wrap(original, store, key))

    @staticmethod
    def _wrap(original, store, key):
        def timed(obj, *args, **kwargs):
            t = time.perf_counter()
            try:
                return original(obj, *args, **kwargs)
            finally:
                k = key(obj)
                store[k] = store.get(k, 0.0) + time.perf_counter() - t
        return timed

    def restore(self):
        for cls, name, original in self._originals:
            setattr(cls, name, original)


def time_issue16(args, n_items, n_users, dim, batch):
    """Issue 16's ratios: exact vs lazy mode (Adam, Adagrad) and gradient accumulation
    (k = 4) vs none, on the recommender with ``sparseopt_tf.Embedding`` tables (lookups
    catch rows up in exact mode), timed per ``train_on_batch`` call, all configurations
    alternating in one process. With accumulation, a call applies the optimizer every
    4th time: the figure per call is the mean over each group of 4 calls (median over groups)."""
    import keras

    import sparseopt_tf
    from sparseopt import engine
    configs = [
        ("Adam lazy", lambda: sparseopt_tf.Adam(1e-3)),
        ("Adam exact", lambda: sparseopt_tf.Adam(1e-3, sparse_mode="exact")),
        ("Adagrad lazy", lambda: sparseopt_tf.Adagrad(0.05)),
        ("Adagrad exact", lambda: sparseopt_tf.Adagrad(0.05, sparse_mode="exact")),
        ("Adam lazy, accumulation 4", lambda: sparseopt_tf.Adam(1e-3, gradient_accumulation_steps=4)),
        ("Adam exact, accumulation 4",
         lambda: sparseopt_tf.Adam(1e-3, sparse_mode="exact", gradient_accumulation_steps=4)),
    ]
    steps = max(4, args.steps - args.steps % 4)
    x, y = clicks(n_items, n_users, batch, 8 * steps, seed=3)
    batches = [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(8 * steps)]
    # ExactBook.catch_up gets no optimizer: file each book under its optimizer's name.
    original_init = engine.ExactBook.__init__

    def init(book, config):
        original_init(book, config)
        book.owner = id(config)
    engine.ExactBook.__init__ = init
    made, cursor = {}, 0
    try:
        for name, make in configs:
            keras.utils.set_random_seed(0)
            model = recommender(keras, n_items, n_users, dim, sparseopt_tf.Embedding)
            opt = make()
            model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True))
            for xb, yb in batches[:8]:                       # trace, compile, touch the tables
                model.train_on_batch(xb, yb)
            made[name] = (model, opt, [])
    finally:
        engine.ExactBook.__init__ = original_init
    host = HostTimes()
    loads = []
    try:
        for r in range(args.rounds):
            wait_for_quiet(args.quiet_load)
            order = list(made) if r % 2 == 0 else list(reversed(made))
            start = cursor
            for name in order:
                model, opt, times = made[name]
                loads.append(os.getloadavg()[0])
                for i in range(steps):
                    xb, yb = batches[8 + (start + i) % (len(batches) - 8)]
                    t = time.perf_counter()
                    model.train_on_batch(xb, yb)
                    times.append(time.perf_counter() - t)
            cursor += steps
    finally:
        host.restore()
    out = {}
    for name, (model, opt, times) in made.items():
        core = id(opt._host.config) if getattr(opt, "_host", None) is not None else None
        groups = np.asarray(times).reshape(-1, 4).mean(axis=1)
        out[name] = dict(median=float(np.median(times)), per_call=float(np.median(groups)),
                         host=host.step.get(core, 0.0) / len(times),
                         catch_up=host.catch_up.get(core, 0.0) / len(times), count=len(times))
    del made
    return {"configs": out, "load": (min(loads), max(loads))}


def issue16_report(sec):
    c = sec["configs"]
    lines = ["### Exact mode and gradient accumulation (issue 16): recommender, train_on_batch", "",
             f"{min(v['count'] for v in c.values())} timed calls per configuration; 1-minute load "
             f"average {sec['load'][0]:.2f} to {sec['load'][1]:.2f} during the runs.", "",
             "| configuration | median call | per call, groups of 4 | host step per call | "
             "exact catch-ups per call |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {v['median'] * 1e3:.1f} ms | {v['per_call'] * 1e3:.1f} ms | "
              f"{v['host'] * 1e3:.2f} ms | {v['catch_up'] * 1e3:.2f} ms |" for n, v in c.items()]
    per = {n: v["per_call"] for n, v in c.items()}
    ratios = [
        ("exact Adagrad / lazy Adagrad (target <= 1.05)", per["Adagrad exact"] / per["Adagrad lazy"]),
        ("exact Adam / lazy Adam (target <= 1.4)", per["Adam exact"] / per["Adam lazy"]),
        ("lazy Adam, accumulation 4 / none (target <= 1.1)",
         per["Adam lazy, accumulation 4"] / per["Adam lazy"]),
        ("exact Adam, accumulation 4 / none (target <= 1.1)",
         per["Adam exact, accumulation 4"] / per["Adam exact"]),
    ]
    lines += ["", "| ratio (per call, groups of 4) | value |", "|---|---:|"]
    lines += [f"| {n} | {v:.3f} |" for n, v in ratios]
    return "\n".join(lines) + "\n", ratios


def machine():
    import keras
    import numba
    import tf_keras
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs; Python {platform.python_version()}, TensorFlow {tf.__version__}, "
            f"Keras {keras.__version__}, tf_keras {tf_keras.__version__}, NumPy {np.__version__}, "
            f"Numba {numba.__version__}")


def report(args, header, sections, profile):
    lines = [header, ""]
    for sec in sections:
        med = sec["median"]
        base = med["sparseopt_tf.Adam"]
        lines += [f"### {sec['title']}: median train step", "",
                  f"{min(sec['count'].values())} timed steps per optimizer; 1-minute load average "
                  f"{sec['load'][0]:.2f} to {sec['load'][1]:.2f} during the runs.", "",
                  "| optimizer | median step | ratio to sparseopt_tf.Adam |", "|---|---:|---:|"]
        lines += [f"| {name} | {t * 1e3:.1f} ms | {t / base:.2f} |" for name, t in med.items()]
        lines.append("")
    if profile:
        lines += ["### Optimizer step alone, dense MLP variables (14 variables, 1.58 M parameters)", "",
                  "| step | median |", "|---|---:|"]
        lines += [f"| {name} | {t:.2f} ms |" for name, t in profile.items()]
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="10x smaller tables (a smoke run)")
    parser.add_argument("--quiet-load", type=float, default=None,
                        help="before each round, wait until the 1-minute load average is below this")
    parser.add_argument("--no-profile", action="store_true", help="skip the optimizer-only section")
    parser.add_argument("--report", help="also write the results as Markdown to this path")
    parser.add_argument("--only", choices=("peers", "issue16"),
                        help="run one part: the peer comparison, or issue 16's exact-mode and "
                             "gradient-accumulation ratios (default: both)")
    args = parser.parse_args()
    import keras
    import tf_keras

    import sparseopt_tf
    n_items, n_users = (100_000, 10_000) if args.small else (1_000_000, 100_000)
    batch, dim = 8192, 64
    issue16 = ""
    if args.only != "peers":
        issue16, _ = issue16_report(time_issue16(args, n_items, n_users, dim, batch))
        print(f"{machine()}\n\n{issue16}", flush=True)
        if args.only == "issue16":
            if args.report:
                with open(args.report, "w") as f:
                    f.write(f"{machine()}\n\n{issue16}")
            return
    x, y = clicks(n_items, n_users, batch, args.steps)
    xd = np.random.default_rng(1).normal(size=(batch * args.steps, 512)).astype(np.float32)
    yd = np.random.default_rng(2).normal(size=(batch * args.steps, 1)).astype(np.float32)
    runs = [
        ("sparseopt_tf.Adam", keras, lambda: sparseopt_tf.Adam(1e-3)),
        ("keras.optimizers.Adam", keras, lambda: keras.optimizers.Adam(1e-3)),
        ("sparseopt_tf.legacy.Adam", tf_keras, lambda: sparseopt_tf.legacy.Adam(1e-3)),
        ("tf_keras.optimizers.legacy.Adam", tf_keras, lambda: tf_keras.optimizers.legacy.Adam(1e-3)),
    ]
    header = (f"{machine()}\n\nbatch {batch}; tables {n_items:,} and {n_users:,} x {dim}; "
              f"{args.rounds} rounds of {args.steps} timed steps per optimizer, after 2 warm-up steps")
    print(header, flush=True)
    sections = []
    for title, build, data in (("recommender", lambda k: recommender(k, n_items, n_users, dim), (x, y)),
                               ("dense MLP 6x512", lambda k: dense_mlp(k), (xd, yd))):
        sections.append(time_models(args, runs, title, build, data, batch))
        print(report(args, "", sections[-1:], None), flush=True)
    profile = None if args.no_profile else profile_dense_optimizer()
    if profile:
        print(report(args, "", [], profile), flush=True)
    rec, dense = (s["median"] for s in sections)
    ratios = [
        ("recommender: keras.optimizers.Adam / sparseopt_tf.Adam (target >= 5)",
         rec["keras.optimizers.Adam"] / rec["sparseopt_tf.Adam"]),
        ("recommender: tf_keras.optimizers.legacy.Adam / sparseopt_tf.Adam (target >= 2)",
         rec["tf_keras.optimizers.legacy.Adam"] / rec["sparseopt_tf.Adam"]),
        ("recommender: tf_keras.optimizers.legacy.Adam / sparseopt_tf.legacy.Adam",
         rec["tf_keras.optimizers.legacy.Adam"] / rec["sparseopt_tf.legacy.Adam"]),
        ("dense MLP: sparseopt_tf.Adam / keras.optimizers.Adam (target <= 1.25)",
         dense["sparseopt_tf.Adam"] / dense["keras.optimizers.Adam"]),
        ("dense MLP: sparseopt_tf.legacy.Adam / tf_keras.optimizers.legacy.Adam",
         dense["sparseopt_tf.legacy.Adam"] / dense["tf_keras.optimizers.legacy.Adam"]),
    ]
    summary = "### Ratios\n\n| ratio | value |\n|---|---:|\n" + "\n".join(f"| {n} | {v:.2f} |" for n, v in ratios)
    print(summary, flush=True)
    if args.report:
        with open(args.report, "w") as f:
            f.write(report(args, header, sections, profile) + "\n" + summary + "\n\n" + issue16)


if __name__ == "__main__":
    main()
