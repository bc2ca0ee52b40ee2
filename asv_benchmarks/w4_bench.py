"""W4 (issue 21, item 4): 26 Criteo-Kaggle-like tables in one step, side by side.

Run::

    python asv_benchmarks/w4_bench.py [--report asv_benchmarks/reports/w4.md]   # ~5 min
    python asv_benchmarks/w4_bench.py --quick        # fewer steps (a smoke run)
    python asv_benchmarks/w4_bench.py --quick --cap 3000 --lookups 64 --keras-batch 64   # tiny

**Core part.** 26 NumPy float32 tables of the Criteo Kaggle cardinalities (the 26 categorical
features of the Kaggle display-advertising set, as DLRM's preprocessing counts them), capped
at ``--cap`` rows (2,000,000), width 16; each step one Zipf(1.05) batch of ``--lookups`` (4,096)
ids per table. For each optimizer (Adam, Adagrad, SGD with momentum, RowwiseAdagrad and plain
SGD, all lazy, and Adam in exact mode, ``adam_exact``) these implementations are timed interleaved in one process, in a fresh random
order each step, each step cold (an untimed write of 3x the last-level cache first), with
:func:`peers.time_group`:

* ``sparseopt, 26 tables``: one ``apply_gradients`` call with the 26 (IndexedSlices, table) pairs;
* ``sparseopt, 26 tables, per-table path`` (with ``--before``, and always for ``adam_exact``): the
  same call with the optimizer's private ``_batch_tables = False``, the step before the
  table-batched region (one plan and one kernel call per table), for before/after figures in
  one process;
* ``sparseopt, 1 table (control)``: one table of the same total rows (the 26 tables stacked) and
  one gradient of the same 26 x 4,096 lookups (ids shifted by each table's offset), so the same
  unique rows, the same bytes; (26-table step - control) / 25 is the fixed cost of an extra table;
* ``memory-touch probe``: ``peers``' probe kernel (``benchmarks/probe.py``) over the same rows of
  all tables in one parallel region: the tables stacked (as in the control), the unique rows
  given (no de-duplication), trivial math, the optimizer's slots (full-width and per-row);
* ``FBGEMM CPU TBE``: one ``SplitTableBatchedEmbeddingBagsCodegen`` over the 26 tables (pooling
  NONE), timed ``backward()`` (fused de-duplication + row update; the forward is untimed), as
  ``peers.py`` does for one table: EXACT_ADAGRAD for Adagrad, EXACT_ROWWISE_ADAGRAD for
  RowwiseAdagrad, EXACT_SGD for plain SGD (same rules), and EXACT_SGD next to SGD with momentum
  (a different rule: for scale only).

After the timed steps every implementation has applied the same batches to the same initial
tables: the 26-table tables must equal the control's bit for bit and FBGEMM's (same rule) within
float32 rounding; both are checked and reported. A breakdown then times, on a few more cold
steps, sparseopt's de-duplication plans and its kernels inside the call.

**Keras part.** A DLRM-like model: 26 ``Embedding(cardinality, 16)`` tables (capped at
``--keras-cap``), a bottom MLP on 13 dense features, the 27 vectors concatenated, a top MLP,
BCE loss, batch ``--keras-batch`` (4,096) of Zipf ids; ``--mlps`` picks the MLP sizes (``small``:
13-64-16 and 432-64-1; ``dlrm``: DLRM's Criteo Kaggle sizes, 13-512-256-64-16 and 432-512-256-1;
both by default). Timed per ``train_on_batch`` call, all four alternating in a fresh random
order each step: ``sparseopt_tf.Adam`` and a *sink* optimizer (a Keras 3 optimizer whose
``apply`` reduces every gradient to one scalar and updates nothing: the model's floor) on the
Keras 3 model, ``sparseopt_tf.legacy.Adam`` and a tf_keras sink (an OptimizerV2 doing the same)
on the same model built with tf_keras. With ``--before`` the two sparseopt classes run a
second time with the host step's per-table path (the core's ``_batch_tables = False``: one plan
and one kernel call per table), alternating with the rest, and their tables are checked to equal
the batched ones' bit for bit. The time inside the bridge's host step is reported per call, split
into validation, de-duplication plans and kernels (:class:`HostParts`).

Needs torch and fbgemm-gpu-cpu for the FBGEMM rows (absent: skipped with the reason).
"""

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import peers  # noqa: E402  (puts this checkout's sparseopt first)
from benchmarks import common, probe  # noqa: E402
from benchmarks.bench_many_tables import CRITEO_KAGGLE  # noqa: E402  (the 26 cardinalities)

import sparseopt as so  # noqa: E402

#: optimizer -> (FBGEMM rule, same rule?)
FBGEMM_RULES = {"adagrad": ("EXACT_ADAGRAD", True), "rowwise_adagrad": ("EXACT_ROWWISE_ADAGRAD", True),
                "sgd": ("EXACT_SGD", True), "sgd_momentum": ("EXACT_SGD", False)}

#: Besides peers.make_optimizer's. ``adam_exact``: Adam with ``sparse_mode="exact"`` (every
#: step catches the touched rows up over their idle steps in the same pass); its 26-table step
#: is always timed next to its per-table path (``--before`` or not).
OPTIMIZERS = {"sgd": lambda: so.SGD(learning_rate=0.01),
              "adam_exact": lambda: so.Adam(learning_rate=1e-3, sparse_mode="exact")}

DEFAULT_OPTIMIZERS = ("adam", "adagrad", "sgd_momentum", "rowwise_adagrad", "sgd", "adam_exact")

TARGET_PROBE = 1.5        # W4 step / probe at most
TARGET_TABLE_US = 20.0    # fixed cost of an extra table below this
TARGET_SINK = 1.10        # Keras DLRM step with sparseopt_tf.Adam / sink at most
TARGET_LEGACY = 1.1       # legacy / Keras 3 class at most


def make_optimizer(name):
    return OPTIMIZERS[name]() if name in OPTIMIZERS else peers.make_optimizer(name)


def cardinalities(cap, tables):
    return [min(c, cap) for c in CRITEO_KAGGLE[:tables]]


# ------------------------------------------------------------------------- core part


class Data:
    """The 26 tables' initial values (stacked), the batches per table and their stacked form."""

    def __init__(self, cards, dim, lookups, nbatches, seed=0):
        self.cards = cards
        self.dim = dim
        self.offsets = np.concatenate([[0], np.cumsum(cards)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self.base = common.make_table(self.total, dim, np.float32, seed)
        # per_table[t][b] = (values, indices)
        self.per_table = [common.sparse_batches(c, dim, lookups, nbatches, np.float32, seed + 1 + t)
                          for t, c in enumerate(cards)]
        self.nbatches = nbatches
        self.stacked = []
        for b in range(nbatches):
            vals = np.concatenate([self.per_table[t][b][0] for t in range(len(cards))])
            ids = np.concatenate([self.per_table[t][b][1] + self.offsets[t] for t in range(len(cards))])
            self.stacked.append((vals, ids))
        self.unique = [common.unique_count(i) for _, i in self.stacked]
        self.lookups = lookups * len(cards)

    def tables(self):
        return [self.base[self.offsets[t]:self.offsets[t + 1]].copy() for t in range(len(self.cards))]


def make_w4(data, opt_name, batched=True):
    """The 26-table step; ``batched=False``: the per-table path (``_batch_tables = False``,
    the step before issue 21's table-batched region: one plan and one kernel call per table)."""
    tables = data.tables()
    opt = make_optimizer(opt_name)
    opt._batch_tables = batched and opt._batch_tables
    opt.build(tables)
    grads = [[(so.IndexedSlices(*data.per_table[t][b], tables[t].shape), tables[t])
              for t in range(len(tables))] for b in range(data.nbatches)]
    if not batched:
        return peers.Impl(f"sparseopt {opt.sparse_mode}, {len(tables)} tables, per-table path", "pertable",
                          lambda b: opt.apply_gradients(grads[b]), lambda: np.concatenate(tables),
                          note="the same call table by table (_batch_tables=False: the step before "
                               "the table-batched region)")
    return peers.Impl(f"sparseopt {opt.sparse_mode}, {len(tables)} tables, one apply_gradients", "sparseopt",
                      lambda b: opt.apply_gradients(grads[b]), lambda: np.concatenate(tables),
                      note=f"{len(tables)} (IndexedSlices, table) pairs per call, one parallel region")


def make_control(data, opt_name):
    table = data.base.copy()
    opt = make_optimizer(opt_name)
    opt.build([table])
    grads = [so.IndexedSlices(v, i, table.shape) for v, i in data.stacked]
    return peers.Impl(f"sparseopt {opt.sparse_mode}, 1 table (control)", "control",
                      lambda b: opt.apply_gradients([(grads[b], table)]), lambda: table,
                      note="the 26 tables stacked, the same lookups (ids + table offset)")


def make_probe(data, nslots, nrowslots):
    sparse, _ = probe.probe_kernels(nslots, nrowslots)
    table = data.base.copy()
    slots = np.full((nslots,) + table.shape, 0.1, table.dtype)
    row_slots = (np.full((nrowslots, table.shape[0]), 0.1, table.dtype) if nrowslots
                 else np.empty((0, 0), table.dtype))
    plans = [probe.plan(i, table.shape[0]) for _, i in data.stacked]
    vals = [v for v, _ in data.stacked]
    c = table.dtype.type(1e-3)
    return peers.Impl("memory-touch probe, all tables in one pass", "probe",
                      lambda b: sparse(table, slots, row_slots, *plans[b], vals[b], c), lambda: table,
                      note="the tables stacked, unique rows given (no de-duplication), trivial math",
                      rule_differs=True)


def make_fbgemm(data, opt_name, hyper):
    if opt_name not in FBGEMM_RULES:
        raise peers.Absent(f"FBGEMM's CPU TBE has no {opt_name}")
    rule, same = FBGEMM_RULES[opt_name]
    torch, EmbOptimType, Loc, Pool, Dev, TBE = peers._fbgemm()
    kw = dict(learning_rate=hyper("learning_rate"), pooling_mode=Pool.NONE)
    if rule in ("EXACT_ADAGRAD", "EXACT_ROWWISE_ADAGRAD"):
        kw["eps"] = hyper("epsilon")
    specs = [(c, data.dim, Loc.HOST, Dev.CPU) for c in data.cards]
    tbe = TBE(specs, optimizer=getattr(EmbOptimType, rule), **kw)
    with torch.no_grad():
        for t, w in enumerate(tbe.split_embedding_weights()):
            w.copy_(torch.from_numpy(data.base[data.offsets[t]:data.offsets[t + 1]]))
        init = hyper("initial_accumulator_value")
        if rule != "EXACT_SGD" and init is not None:
            for state in tbe.split_optimizer_states():
                state[0].fill_(init)
    n = data.lookups
    offsets = torch.arange(n + 1, dtype=torch.int64)
    inputs = [(torch.from_numpy(np.concatenate([data.per_table[t][b][1] for t in range(len(data.cards))])),
               torch.from_numpy(v)) for b, (v, _) in enumerate(data.stacked)]
    pending = {}

    def prepare(b):  # the forward pass builds the autograd graph; untimed
        pending["out"] = tbe(inputs[b][0], offsets)

    def step(b):
        pending.pop("out").backward(inputs[b][1])

    import fbgemm_gpu
    label = f"FBGEMM CPU TBE {rule} (fbgemm_gpu {getattr(fbgemm_gpu, '__version__', '?')}, torch {torch.__version__})"
    note = "timed: backward() of a pooling-NONE lookup of all tables (fused de-dup + update)"
    if not same:
        note += "; a different rule (no momentum): for scale only"
    return peers.Impl(label, "fbgemm", step,
                      lambda: np.concatenate([w.detach().numpy() for w in tbe.split_embedding_weights()]),
                      prepare=prepare, note=note, rule_differs=not same)


def breakdown(impls, data, steps, evict_buf):
    """sparseopt's validation, de-duplication plans and kernels inside the call, on ``steps``
    more cold steps (``validate`` is ``Optimizer._validate``, the plans included)."""
    from sparseopt import _exact, engine
    from sparseopt import optimizer as so_opt
    from sparseopt.backends import cpu
    from sparseopt.optimizers import _rowwise
    spent = {"plan": 0.0, "run": 0.0, "validate": 0.0}
    # (class or module, name) -> counter: RowwiseAdagrad's kernels run from _RowUpdate.run,
    # the table-batched step's from cpu.plan_sparse and engine._run_tables; exact mode's from
    # _exact._sparse_step (per table), cpu.run_exact_tables (batched) and _exact._tables (each
    # table's idle tables, a serial kernel per table and step)
    patched = {(cpu.SparseUpdate, "plan"): "plan", (cpu.SparseUpdate, "run"): "run",
               (_rowwise._RowUpdate, "run"): "run", (cpu, "plan_sparse"): "plan",
               (engine, "_run_tables"): "run", (cpu, "run_exact_tables"): "run",
               (_exact, "_sparse_step"): "run", (_exact, "_tables"): "run",
               (so_opt.Optimizer, "_validate"): "validate"}
    originals = {key: getattr(*key) for key in patched}

    def wrap(key):
        name, original = patched[key], originals[key]

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
        return timed

    out = {}
    for key in patched:
        setattr(*key, wrap(key))
    try:
        for impl in impls:
            rows = []
            for s in range(steps):
                b = s % data.nbatches
                common.evict(evict_buf)
                spent.update(plan=0.0, run=0.0, validate=0.0)
                t = time.perf_counter()
                impl.step(b)
                total = time.perf_counter() - t
                rows.append((total, spent["validate"] - spent["plan"], spent["plan"], spent["run"]))
            out[impl.family] = {k: statistics.median(r[i] for r in rows) * 1e3
                                for i, k in enumerate(("total", "validate", "plan", "kernel"))}
    finally:
        for key, original in originals.items():
            setattr(*key, original)
    return out


def run_core(args, data, opt_name, evict_buf, log):
    base = make_optimizer(opt_name)
    nslots, nrowslots = peers._slot_counts(make_optimizer(opt_name))
    config = base.get_config()

    def hyper(key):
        v = config.get(key)
        return float(v) if v is not None else None

    load0 = os.getloadavg()[0]
    impls, absent = [], []
    makers = [lambda: make_w4(data, opt_name)]
    if args.before or base.sparse_mode == "exact":
        makers.append(lambda: make_w4(data, opt_name, batched=False))
    for maker in (*makers, lambda: make_control(data, opt_name),
                  lambda: make_probe(data, nslots, nrowslots),
                  lambda: make_fbgemm(data, opt_name, hyper) if args.fbgemm else None):
        try:
            impl = maker()
        except peers.Absent as e:
            absent.append(str(e))
            continue
        except Exception as e:
            absent.append(f"FBGEMM failed to build: {type(e).__name__}: {peers._error_text(e)}")
            if args.verbose:
                traceback.print_exc()
            continue
        if impl is not None:
            impls.append(impl)
    log(f"  {opt_name}: timing {len(impls)} implementations x {args.steps} steps")
    ctx = types.SimpleNamespace(batches=range(data.nbatches))
    peers.time_group(ctx, impls, args.steps, args.warmup, evict_buf, log)
    failed = [f"{i.label}: {i.error}" for i in impls if i.error]
    impls = [i for i in impls if not i.error]
    by = {i.family: i for i in impls}
    # Every implementation applied the same batches (warm-up + timed) to the same tables.
    checks = {}
    ref = by["sparseopt"].read()
    if "control" in by:
        checks["26 tables vs control: max abs difference"] = float(np.max(np.abs(ref - by["control"].read())))
    if "pertable" in by:
        checks["26 tables vs per-table path: max abs difference"] = float(
            np.max(np.abs(ref - by["pertable"].read())))
    if "fbgemm" in by and not by["fbgemm"].rule_differs:
        moved = float(np.max(np.abs(ref - data.base)))
        diff = float(np.max(np.abs(ref - by["fbgemm"].read())))
        checks["FBGEMM vs sparseopt: max abs difference / max update"] = diff / moved if moved else diff
    parts = breakdown([by[f] for f in ("sparseopt", "pertable", "control") if f in by], data,
                      args.breakdown_steps, evict_buf) \
        if args.breakdown_steps else {}
    workload = peers.Workload("W4", data.total, data.dim, data.lookups)
    floor = statistics.mean(peers.floor_bytes(workload, nslots, k, nrowslots) for k in data.unique)
    res = {"optimizer": opt_name, "kind": type(base).__name__, "nslots": nslots, "nrowslots": nrowslots,
           "impls": [peers._summary(i) for i in impls], "absent": absent + failed, "checks": checks,
           "breakdown": parts, "floor_bytes": floor, "load": (load0, os.getloadavg()[0]),
           "tables": len(data.cards)}
    del impls, by, ref
    gc.collect()
    return res


# ------------------------------------------------------------------------ Keras part


#: MLP sizes: "small" (bottom 64, top 64) or DLRM's Criteo Kaggle configuration
#: (--arch-mlp-bot 13-512-256-64-16, --arch-mlp-top 512-256-1; here on the concatenation).
MLPS = {"small": ((64,), (64,)), "dlrm": ((512, 256, 64), (512, 256))}


def dlrm(k, cards, dim, mlp="small", n_dense=13):
    bottom_units, top_units = MLPS[mlp]
    ids = k.Input(shape=(len(cards),), dtype="int32", name="ids")
    dense = k.Input(shape=(n_dense,), name="features")
    embs = [k.layers.Embedding(c, dim, name=f"table{t}")(ids[:, t]) for t, c in enumerate(cards)]
    bottom = dense
    for u in bottom_units:
        bottom = k.layers.Dense(u, activation="relu")(bottom)
    bottom = k.layers.Dense(dim, activation="relu")(bottom)
    x = k.layers.Concatenate()(embs + [bottom])
    for u in top_units:
        x = k.layers.Dense(u, activation="relu")(x)
    return k.Model([ids, dense], k.layers.Dense(1)(x))


def sink_optimizer():
    """A Keras 3 optimizer that reads every gradient (reduces it to one scalar) and updates nothing."""
    import keras
    import tensorflow as tf

    class Sink(keras.optimizers.Optimizer):
        def __init__(self):
            super().__init__(learning_rate=0.0, name="sink")

        def build(self, variables):
            if self.built:
                return
            super().build(variables)
            self.total = self.add_variable(shape=(), dtype="float32", name="total")

        def apply(self, grads, trainable_variables=None):
            if not self.built:
                self.build(trainable_variables)
            parts = [tf.reduce_sum(g.values if isinstance(g, tf.IndexedSlices) else g)
                     for g in grads if g is not None]
            self.total.assign(tf.add_n(parts))
            self.iterations.assign_add(1)

    return Sink()


def legacy_sink_optimizer():
    """The sink for tf_keras: an OptimizerV2 whose ``apply_gradients`` reduces every gradient
    to one scalar and updates nothing (the tf_keras model's floor)."""
    import tensorflow as tf
    import tf_keras

    class LegacySink(tf_keras.optimizers.legacy.SGD):
        def __init__(self):
            super().__init__(learning_rate=0.0, name="legacy_sink")
            self.total = tf.Variable(0.0, trainable=False)

        def apply_gradients(self, grads_and_vars, name=None, **kwargs):
            parts = [tf.reduce_sum(g.values if isinstance(g, tf.IndexedSlices) else g)
                     for g, _ in grads_and_vars if g is not None]
            self.total.assign(tf.add_n(parts))
            return self.iterations.assign_add(1)

    return LegacySink()


KERAS3, SINK, LEGACY, LEGACY_SINK = ("sparseopt_tf.Adam (Keras 3)", "sink (Keras 3, updates nothing)",
                                     "sparseopt_tf.legacy.Adam (tf_keras)", "sink (tf_keras, updates nothing)")
KERAS3_PT, LEGACY_PT = ("sparseopt_tf.Adam (Keras 3), per-table host step",
                        "sparseopt_tf.legacy.Adam (tf_keras), per-table host step")

#: The parts of the bridge's host step timed per ``train_on_batch`` call (HostParts).
HOST_PARTS = ("host", "validate", "plan", "run")


class HostParts:
    """Seconds per ``train_on_batch`` call inside the bridge's host step (``host``: all of
    ``HostStep.__call__``), its validation (``validate``: ``StepConfig.validate``, the core's
    checks and the plans), the de-duplication plans (``plan``: ``backends.cpu.plan_sparse``, or
    ``SparseUpdate.plan`` table by table on the per-table path) and the kernels (``run``:
    ``engine.run_lazy``, with its Python), by wrapping those functions. The models run
    one at a time: :meth:`call` names the one that runs."""

    def __init__(self):
        from sparseopt_tf import _host

        from sparseopt import engine
        from sparseopt.backends import cpu
        self.calls = {}          # config name -> [{part: seconds}, one per call]
        self._now = None
        self._originals = []
        for owner, attr, part in ((_host.HostStep, "__call__", "host"),
                                  (engine.StepConfig, "validate", "validate"),
                                  (cpu, "plan_sparse", "plan"),
                                  (cpu.SparseUpdate, "plan", "plan"),
                                  (engine, "run_lazy", "run")):
            original = getattr(owner, attr)
            self._originals.append((owner, attr, original))
            setattr(owner, attr, self._wrap(original, part))

    def _wrap(self, original, part):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if self._now is not None:
                    self._now[part] = self._now.get(part, 0.0) + time.perf_counter() - t
        return timed

    def call(self, name):
        """Times from here on belong to a new call of ``name`` (``None``: to nobody)."""
        if name is None:
            self._now = None
            return
        self._now = {}
        self.calls.setdefault(name, []).append(self._now)

    def medians(self, name):
        """``{part: median ms per call}`` of ``name``'s calls, or None if it never ran a host step."""
        calls = self.calls.get(name) or []
        if not any(calls):
            return None
        return {part: statistics.median(c.get(part, 0.0) for c in calls) * 1e3 for part in HOST_PARTS}

    def restore(self):
        for owner, attr, original in self._originals:
            setattr(owner, attr, original)


def run_keras(args, mlp, log):
    import keras
    import tf_keras

    import sparseopt_tf
    cards = cardinalities(args.keras_cap, args.tables)
    batch, nb = args.keras_batch, 8
    rng = np.random.default_rng(7)
    ids = np.stack([common.zipf_indices(rng, c, batch * nb) for c in cards], 1).astype(np.int32)
    dense = rng.standard_normal((batch * nb, 13), dtype=np.float32)
    y = (rng.random(batch * nb) < 0.3).astype(np.float32)
    batches = [([ids[b * batch:(b + 1) * batch], dense[b * batch:(b + 1) * batch]],
                y[b * batch:(b + 1) * batch]) for b in range(nb)]
    configs = [(KERAS3, keras, lambda: sparseopt_tf.Adam(1e-3)),
               (SINK, keras, sink_optimizer),
               (LEGACY, tf_keras, lambda: sparseopt_tf.legacy.Adam(1e-3)),
               (LEGACY_SINK, tf_keras, legacy_sink_optimizer)]
    if args.before:  # the host step's per-table path (one plan and one kernel call per table)
        configs[1:1] = [(KERAS3_PT, keras, lambda: _per_table(sparseopt_tf.Adam(1e-3)))]
        configs[4:4] = [(LEGACY_PT, tf_keras, lambda: _per_table(sparseopt_tf.legacy.Adam(1e-3)))]
    made = {}
    for name, k, make in configs:
        log(f"  Keras ({mlp} MLP): building {name}")
        k.utils.set_random_seed(0)
        model = dlrm(k, cards, args.dim, mlp)
        opt = make()
        model.compile(optimizer=opt, loss=k.losses.BinaryCrossentropy(from_logits=True))
        for b in range(args.keras_warmup):
            model.train_on_batch(*batches[b % nb])
        made[name] = (model, opt, [])
    host = HostParts()
    loads = [os.getloadavg()[0]]
    order_rng = np.random.default_rng(54321)
    try:
        for s in range(args.keras_steps):
            xb, yb = batches[(args.keras_warmup + s) % nb]
            for i in order_rng.permutation(len(made)):
                name = list(made)[i]
                model, opt, times = made[name]
                host.call(name)
                t = time.perf_counter()
                model.train_on_batch(xb, yb)
                times.append(time.perf_counter() - t)
                host.call(None)
            loads.append(os.getloadavg()[0])
    finally:
        host.restore()
    out = {}
    for name, (model, opt, times) in made.items():
        out[name] = {"median": statistics.median(times) * 1e3, "min": min(times) * 1e3,
                     "max": max(times) * 1e3, "n": len(times), "parts": host.medians(name)}
        out[name]["host"] = out[name]["parts"]["host"] if out[name]["parts"] else None
    if args.before:  # the batched and per-table host steps gave the same tables
        out[KERAS3]["same_as_per_table"] = _same_tables(made[KERAS3][0], made[KERAS3_PT][0])
        out[LEGACY]["same_as_per_table"] = _same_tables(made[LEGACY][0], made[LEGACY_PT][0])
    del made
    gc.collect()
    return {"configs": out, "cards": cards, "batch": batch, "mlp": mlp, "load": (min(loads), max(loads))}


def _per_table(opt):
    """``opt`` with its host step on the per-table path (the core's ``_batch_tables = False``)."""
    opt._core._batch_tables = False
    return opt


def _same_tables(a, b):
    """Whether two models trained on the same batches hold the same weights, bit for bit."""
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))


# ---------------------------------------------------------------------------- report


def _med(res, family):
    for i in res["impls"]:
        if i["family"] == family:
            return i["median"]
    return None


def core_ratios(res):
    w4, ctl, prb, fb, before = (_med(res, f) for f in ("sparseopt", "control", "probe", "fbgemm", "pertable"))
    fb_same = next((not i["rule_differs"] for i in res["impls"] if i["family"] == "fbgemm"), False)
    extra = res.get("tables", 26) - 1
    return {"w4": w4, "control": ctl, "probe": prb, "fbgemm": fb, "fbgemm_same": fb_same, "before": before,
            "w4/probe": w4 / prb, "control/probe": ctl / prb,
            "before/probe": before / prb if before is not None else None,
            "per_table_us": (w4 - ctl) / extra * 1e3 if ctl is not None else None,
            "per_table_us_before": (before - ctl) / extra * 1e3 if ctl is not None and before is not None
            else None,
            "fbgemm/w4": fb / w4 if fb else None}


def report(args, argv, machine, bandwidth, data, core, keras_runs, elapsed):
    lines = []
    add = lines.append
    add("# W4: 26 Criteo-like tables, one step (issue 21, item 4)")
    add("")
    add(f"Generated by `python asv_benchmarks/w4_bench.py {' '.join(argv)}` on "
        f"{datetime.date.today().isoformat()} in {elapsed / 60:.1f} min.")
    add("")
    add("Machine: " + "; ".join(f"{k}: {v}" for k, v in machine.items()) + ".")
    if bandwidth:
        add(f"Bandwidth (this run): copyto {bandwidth['copyto']['max']:.1f} GB/s, "
            f"triad {bandwidth['triad']['max']:.1f} GB/s.")
    add("")
    if data is not None:
        add(f"Tables: {len(data.cards)}, {data.total:,} rows in all (cardinalities capped at "
            f"{args.cap:,}: {', '.join(f'{c:,}' for c in data.cards)}), width {data.dim}, float32; "
            f"{args.lookups:,} Zipf(1.05) ids per table per step ({data.lookups:,} in all, "
            f"{statistics.mean(data.unique):,.0f} unique rows on average); {data.nbatches} distinct "
            f"batches cycled; {args.warmup} warm-up and {args.steps} timed cold-cache steps per "
            f"implementation, interleaved in a fresh random order each step; times in ms.")
        add("")
        add("| optimizer | implementation | median | min | max | x probe | x byte floor | semantics / note |")
        add("|---|---|---:|---:|---:|---:|---:|---|")
        bw = bandwidth["triad"]["max"] if bandwidth else None
        for res in core:
            prb = _med(res, "probe")
            floor_ms = res["floor_bytes"] / (bw * 1e9) * 1e3 if bw else None
            for i in res["impls"]:
                add(f"| {res['optimizer']} | {i['label']} | {i['median']:.2f} | {i['min']:.2f} | "
                    f"{i['max']:.2f} | {i['median'] / prb:.2f} | "
                    f"{i['median'] / floor_ms:.1f} | {i['note']} |" if floor_ms else
                    f"| {res['optimizer']} | {i['label']} | {i['median']:.2f} | {i['min']:.2f} | "
                    f"{i['max']:.2f} | {i['median'] / prb:.2f} | - | {i['note']} |")
            for a in res["absent"]:
                add(f"| {res['optimizer']} | absent: {a} | | | | | | |")
        add("")
        add("| optimizer | 26 tables / probe | control / probe | per extra table, us | FBGEMM / 26 tables "
            "| checks | load (start, end) |")
        add("|---|---:|---:|---:|---:|---|---|")
        for res in core:
            r = core_ratios(res)
            fb = (f"{r['fbgemm/w4']:.2f}" + ("" if r["fbgemm_same"] else " (other rule)")) if r["fbgemm/w4"] else "-"
            checks = "; ".join(f"{k}: {v:.2e}" for k, v in res["checks"].items())
            add(f"| {res['optimizer']} | {r['w4/probe']:.2f} | {r['control/probe']:.2f} | "
                f"{r['per_table_us']:.1f} | {fb} | {checks} | {res['load'][0]:.2f}, {res['load'][1]:.2f} |")
        add("")
        if any(core_ratios(res)["before"] is not None for res in core):
            add("Before / after (the per-table path, `_batch_tables=False`, timed interleaved with the rest):")
            add("")
            add("| optimizer | per-table path / probe | batched / probe | per extra table, us: per-table path "
                "| batched | batched / per-table path |")
            add("|---|---:|---:|---:|---:|---:|")
            for res in core:
                r = core_ratios(res)
                if r["before"] is not None:
                    add(f"| {res['optimizer']} | {r['before/probe']:.2f} | {r['w4/probe']:.2f} | "
                        f"{r['per_table_us_before']:.1f} | {r['per_table_us']:.1f} | {r['w4'] / r['before']:.3f} |")
            add("")
        if any(res["breakdown"] for res in core):
            add(f"Breakdown inside `apply_gradients` ({args.breakdown_steps} more cold steps, medians, ms; "
                "`validate` = the checks of every pair, `plan` = range check + de-duplication plan of "
                "each table, `kernel` = the row kernels, `rest` = slots, coefficients, thread setup, Python):")
            add("")
            add("| optimizer | step | total | validate | plan | kernel | rest |")
            add("|---|---|---:|---:|---:|---:|---:|")
            for res in core:
                for fam, b in res["breakdown"].items():
                    step = {"sparseopt": "26 tables", "pertable": "26 tables, per-table path"}.get(fam, "1 table")
                    add(f"| {res['optimizer']} | {step} | "
                        f"{b['total']:.2f} | {b['validate']:.2f} | {b['plan']:.2f} | {b['kernel']:.2f} | "
                        f"{b['total'] - b['validate'] - b['plan'] - b['kernel']:.2f} |")
            add("")
    for keras_res in keras_runs:
        c = keras_res["configs"]
        bottom, top = MLPS[keras_res["mlp"]]
        add(f"Keras DLRM, {keras_res['mlp']} MLP (bottom 13-{'-'.join(map(str, bottom))}-{args.dim}, "
            f"top {(len(keras_res['cards']) + 1) * args.dim}-{'-'.join(map(str, top))}-1): "
            f"{len(keras_res['cards'])} tables (capped at {args.keras_cap:,}) x {args.dim}, "
            f"batch {keras_res['batch']:,}, {args.keras_warmup} warm-up and {args.keras_steps} timed "
            f"`train_on_batch` calls per optimizer, alternating in a fresh random order each step; "
            f"1-minute load {keras_res['load'][0]:.2f} to {keras_res['load'][1]:.2f}.")
        add("")
        sink = {name: c[LEGACY_SINK if "tf_keras" in name else SINK]["median"] for name in c}
        add("| optimizer | median step | min | max | / its sink | host step per call | validate "
            "(incl. plan) | plan | kernels (run_lazy) | step - sink - host step |")
        add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, v in c.items():
            p = v["parts"]
            parts = (f"{p['host']:.2f} | {p['validate']:.2f} | {p['plan']:.2f} | {p['run']:.2f} | "
                     f"{v['median'] - sink[name] - p['host']:.2f}" if p else "- | - | - | - | -")
            add(f"| {name} | {v['median']:.1f} | {v['min']:.1f} | {v['max']:.1f} | "
                f"{v['median'] / sink[name]:.3f} | {parts} |")
        add("")
        add("Times in ms; the host step's parts are medians per call (`validate` includes `plan`).")
        same = {n: v["same_as_per_table"] for n, v in c.items() if "same_as_per_table" in v}
        if same:
            add("Batched and per-table host steps, same tables after the run: "
                + ", ".join(f"{n}: {'bit for bit' if ok else 'DIFFERENT'}" for n, ok in same.items()) + ".")
        add("")
    add("## Targets (issue 21)")
    add("")
    add("| target | measured | met? |")
    add("|---|---|---|")
    for name, value, ok in targets(core, keras_runs):
        add(f"| {name} | {value} | {'met' if ok else 'missed'} |")
    add("")
    return "\n".join(lines)


def targets(core, keras_runs):
    out = []
    if core:
        rs = [(res["optimizer"], core_ratios(res)) for res in core]
        worst = max(r["w4/probe"] for _, r in rs)
        out.append((f"W4 core step within {TARGET_PROBE}x of the probe",
                    ", ".join(f"{n} {r['w4/probe']:.2f}x" for n, r in rs), worst <= TARGET_PROBE))
        worst = max(r["per_table_us"] for _, r in rs)
        out.append((f"fixed cost of an extra table below {TARGET_TABLE_US:.0f} us",
                    ", ".join(f"{n} {r['per_table_us']:.1f} us" for n, r in rs), worst < TARGET_TABLE_US))
        same = [(n, r) for n, r in rs if r["fbgemm/w4"] and r["fbgemm_same"]]
        if same:
            out.append(("faster than FBGEMM's CPU TBE (same rule)",
                        ", ".join(f"{n}: FBGEMM {r['fbgemm/w4']:.2f}x sparseopt" for n, r in same),
                        all(r["fbgemm/w4"] > 1 for _, r in same)))
    for keras_res in keras_runs:
        c = keras_res["configs"]
        k3, sink, leg, lsink = (c[n]["median"] for n in (KERAS3, SINK, LEGACY, LEGACY_SINK))
        mlp = keras_res["mlp"]
        out.append((f"Keras DLRM step within {TARGET_SINK}x of the sink ({mlp} MLP)",
                    f"{k3 / sink:.3f}x ({k3:.1f} / {sink:.1f} ms)", k3 / sink <= TARGET_SINK))
        out.append((f"legacy within {TARGET_LEGACY}x of the Keras 3 class ({mlp} MLP)",
                    f"{leg / k3:.3f}x ({leg:.1f} / {k3:.1f} ms; legacy / tf_keras sink {leg / lsink:.3f}x, "
                    f"tf_keras sink / Keras 3 sink {lsink / sink:.3f}x)", leg / k3 <= TARGET_LEGACY))
    return out


# ------------------------------------------------------------------------------ main


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--cap", type=int, default=2_000_000, help="rows per table at most (core part)")
    ap.add_argument("--keras-cap", type=int, default=None, help="rows per table at most (Keras; default --cap)")
    ap.add_argument("--tables", type=int, default=26)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--lookups", type=int, default=4096, help="ids per table per step (core part)")
    ap.add_argument("--keras-batch", type=int, default=4096)
    ap.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per implementation (core)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batches", type=int, default=None, help="distinct batches cycled (core)")
    ap.add_argument("--breakdown-steps", type=int, default=None)
    ap.add_argument("--keras-steps", type=int, default=None)
    ap.add_argument("--keras-warmup", type=int, default=None)
    ap.add_argument("--parts", default="core,keras", help="core, keras or both")
    ap.add_argument("--mlps", default="small,dlrm", help="the Keras models' MLP sizes (see MLPS)")
    ap.add_argument("--no-fbgemm", dest="fbgemm", action="store_false")
    ap.add_argument("--before", action="store_true",
                    help="also time the per-table path (the step before the table-batched region; "
                         "in the Keras part, the bridge's host step on that path)")
    ap.add_argument("--report", help="write the Markdown report to this path")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    q = args.quick
    for name, full, quick in (("steps", 40, 6), ("warmup", 3, 2), ("batches", 6, 3), ("breakdown_steps", 15, 3),
                              ("keras_steps", 20, 3), ("keras_warmup", 5, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    if args.keras_cap is None:
        args.keras_cap = args.cap
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    t0 = time.perf_counter()
    parts = set(args.parts.split(","))

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    machine = peers.machine_description()
    data, core, bandwidth = None, [], None
    if "core" in parts:
        tiny = args.cap * args.tables < 1_000_000
        bandwidth = probe.measure_bandwidth(*((4 << 20, 1) if tiny else (256 << 20, 5)))
        log("core: building tables and batches")
        data = Data(cardinalities(args.cap, args.tables), args.dim, args.lookups, args.batches)
        evict_buf = common.evict_buffer(1 << 20 if tiny else None)
        for name in args.optimizers.split(","):
            core.append(run_core(args, data, name, evict_buf, log))
            r = core_ratios(core[-1])
            log(f"  {name}: 26 tables {r['w4']:.2f} ms, control {r['control']:.2f}, probe {r['probe']:.2f} "
                f"-> x{r['w4/probe']:.2f} probe, {r['per_table_us']:.1f} us per extra table"
                + (f", FBGEMM {r['fbgemm']:.2f} ms" if r["fbgemm"] else "")
                + (f"; per-table path {r['before']:.2f} ms, {r['per_table_us_before']:.1f} us per extra table"
                   if r["before"] is not None else ""))
        del evict_buf
        gc.collect()
    keras_runs = []
    if "keras" in parts:
        if data is not None:
            data.base = data.per_table = None  # free the core part's arrays before the models
        gc.collect()
        for mlp in args.mlps.split(","):
            keras_runs.append(run_keras(args, mlp, log))
            gc.collect()
    text = report(args, argv, machine, bandwidth, data, core, keras_runs, time.perf_counter() - t0)
    print(text, flush=True)
    if args.report:
        Path(args.report).write_text(text + "\n")


if __name__ == "__main__":
    main()
