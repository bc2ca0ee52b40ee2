"""Side-by-side comparison of sparseopt with its peers, as PERF.md describes.

One command regenerates ``asv_benchmarks/reports/cpu.md`` and ``cpu_ratios.png``::

    python asv_benchmarks/peers.py            # W1, W2, W3, 30 timed steps per implementation
    python asv_benchmarks/peers.py --quick    # fewer steps, fewer repeats (a few minutes)
    python asv_benchmarks/peers.py --family   # + the family rows: W1 of every optimizer (merged)

``--family`` times the W1 lazy step of every optimizer (``common.OPTIMIZERS`` and
:data:`EXTRA_OPTIMIZERS`) against the probe (with that optimizer's slots) and its peers,
and merges those groups into the ``cpu_results.json`` of ``--out``: ``cpu.md`` then has
both the W1-W3 rows and a "Family, W1" table (and ``cpu_family_ratios.png``). A later
plain run keeps the family rows; ``--family --optimizers ftrl,rmsprop`` re-times some.

Every implementation of one (workload, optimizer) group lives in the same process and
is timed interleaved, step by step, in a fresh random order: each step takes the next of
several distinct seeded batches, and an untimed write of a buffer three times the
last-level cache comes before each timed step, so every step starts with a cold cache
as in training. Reported: median, min and max over the timed steps; multiples of the
byte floor (bytes / measured bandwidth) and of the memory-touch probe (a Numba kernel
that touches exactly the bytes a lazy step must touch, with trivial math and the
unique rows given to it); the ratio to sparseopt. Each implementation's semantics
(lazy, dense-equivalent, or neither) is *checked* on a small table against
sparseopt's lazy and dense updates, not assumed.

TensorFlow, tf_keras, torch and fbgemm_gpu are optional: an implementation whose
library is missing is listed with the reason and the rest still runs.
"""

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numba  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from benchmarks import common, probe  # noqa: E402  (common puts this checkout's sparseopt first)

import sparseopt as so  # noqa: E402

# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    rows: int
    width: int
    lookups: int | None          # None: a dense gradient
    description: str = ""

    @property
    def dense(self):
        return self.lookups is None


WORKLOADS = {
    "W1": Workload("W1", 1_000_000, 64, 16_384, "1,000,000 x 64 float32, 16,384 Zipf(1.05) lookups"),
    "W2": Workload("W2", 4_000_000, 32, 65_536, "4,000,000 x 32 float32, 65,536 Zipf(1.05) lookups"),
    "W3": Workload("W3", 4096, 4096, None, "dense 4096 x 4096 float32"),
}
TINY_WORKLOADS = {
    "W1": Workload("W1", 2_000, 8, 256, "tiny W1"),
    "W2": Workload("W2", 4_000, 4, 512, "tiny W2"),
    "W3": Workload("W3", 64, 64, None, "tiny W3"),
}

DTYPE = np.float32
ITEMSIZE = np.dtype(DTYPE).itemsize
INDEX_PASSES = 3  # PERF.md: "8 bytes per index, a few passes"

# ------------------------------------------------------------------ bandwidth and floor


def floor_bytes(workload, nslots, unique_rows, nrowslots=0):
    """PERF.md's byte count of one step (``nrowslots``: per-row slots, one value per row)."""
    d, b = workload.width, ITEMSIZE
    if workload.dense:
        n = k = workload.rows
        index = 0
    else:
        n, k = workload.lookups, unique_rows
        index = 8 * n * INDEX_PASSES
    return n * d * b + k * d * b * 2 * (1 + nslots) + k * b * 2 * nrowslots + index


# -------------------------------------------------------------------- the optimizers

#: Optimizers of the family rows (``--family``, ``--optimizers all``) besides
#: ``common.OPTIMIZERS``: configurations with their own TF kernels (RMSprop with momentum,
#: centered) and RowwiseAdagrad (per-row slots, FBGEMM's EXACT_ROWWISE_ADAGRAD). An entry
#: that ``common.OPTIMIZERS`` also has is taken from there.
EXTRA_OPTIMIZERS = {
    "rmsprop_momentum": lambda **kw: so.RMSprop(learning_rate=1e-3, momentum=0.9, **kw),
    "rmsprop_centered": lambda **kw: so.RMSprop(learning_rate=1e-3, centered=True, **kw),
    "rowwise_adagrad": lambda **kw: so.RowwiseAdagrad(**kw),  # FBGEMM's defaults (lr 0.01, eps 1e-8)
}

#: PERF.md's three: the default ``--optimizers``.
DEFAULT_OPTIMIZERS = ("sgd_momentum", "adam", "adagrad")


def optimizer_names():
    """Every optimizer of the family: ``common.OPTIMIZERS``, then :data:`EXTRA_OPTIMIZERS`."""
    return list(common.OPTIMIZERS) + [n for n in EXTRA_OPTIMIZERS if n not in common.OPTIMIZERS]


def make_optimizer(name, **kw):
    """A fresh sparseopt optimizer of the family registry."""
    if name in common.OPTIMIZERS:
        return common.make_optimizer(name, **kw)
    if name in EXTRA_OPTIMIZERS:
        return EXTRA_OPTIMIZERS[name](**kw)
    raise KeyError(f"unknown optimizer {name!r}; known: {', '.join(optimizer_names())}")


#: Hyperparameters the semantics check also runs with (besides the benchmark's own), where
#: the benchmark's values would hide a difference below the 2 % tolerance: an epsilon of
#: 1e-7 hides where a peer puts it (inside or outside a square root), and Ftrl's zero
#: strengths hide how a peer maps l1, l2, beta, the shrinkage and the power.
STRESS = {
    "epsilon": 0.1,
    "Ftrl": {"l1_regularization_strength": 1.0, "l2_regularization_strength": 0.1,
             "l2_shrinkage_regularization_strength": 5.0, "beta": 0.1, "learning_rate_power": -0.6},
}


def stress_overrides(config, kind):
    out = {}
    if config.get("epsilon") is not None:
        out["epsilon"] = STRESS["epsilon"]
    out.update({k: v for k, v in STRESS.get(kind, {}).items() if k in config})
    return out


# ------------------------------------------------------------------------------ probe

# ----------------------------------------------------------------------- the context


class Context:
    """One (workload, optimizer) group: the initial table, the batches, converted once per library."""

    def __init__(self, workload, opt_name, nbatches, seed=0, overrides=None):
        self.workload = workload
        self.opt_name = opt_name
        base = make_optimizer(opt_name)
        self.cls = type(base)
        self.kind = self.cls.__name__              # "RMSprop": which peer counterpart
        self.config = {**base.get_config(), **(overrides or {})}
        self.overrides = dict(overrides or {})
        self.nslots, self.nrowslots = _slot_counts(self.new_optimizer())
        w = workload
        self.table = common.make_table(w.rows, w.width, DTYPE, seed)
        if w.dense:
            self.batches = common.dense_batches((w.rows, w.width), nbatches, DTYPE, seed + 1)
            self.unique = [w.rows] * nbatches
        else:
            self.batches = common.sparse_batches(w.rows, w.width, w.lookups, nbatches, DTYPE, seed + 1)
            self.unique = [common.unique_count(i) for _, i in self.batches]
        self._cache = {}
        self.shared = {}
        self.timing = False  # True for the full-size context of the timing run

    def converted(self, key, fn):
        """``fn(batch)`` for every batch, computed once per key (tf tensors, torch tensors ...)."""
        if key not in self._cache:
            self._cache[key] = [fn(b) for b in self.batches]
        return self._cache[key]

    def hyper(self, key, default=None):
        value = self.config.get(key, default)
        return float(value) if value is not None else default

    def new_optimizer(self, legacy=False):
        """A fresh sparseopt optimizer of this context's configuration (``legacy``: tf_keras' math)."""
        config = dict(self.config)
        if legacy:
            config["_legacy"] = True
        return self.cls.from_config(config)


def _slot_counts(opt):
    """(full-shape slots, per-row slots) that ``opt`` keeps for a table."""
    table = np.zeros((2, 1), np.float32)
    opt.build([table])
    shapes = [w.shape for w in opt.variables()[1:]]
    return sum(1 for sh in shapes if sh == table.shape), sum(1 for sh in shapes if sh == table.shape[:1])


class Absent(Exception):
    """An implementation that cannot run here (missing library, unsupported feature)."""


@dataclass
class Impl:
    """One implementation under test."""

    label: str
    family: str
    step: object                      # step(batch_index): the timed call
    read: object                      # read() -> the parameter as a NumPy array
    prepare: object = None            # prepare(batch_index): untimed, before the cache eviction
    note: str = ""
    rule_differs: bool = False        # a different update rule: never "same semantics"
    semantics: str = "?"
    times: list = field(default_factory=list)
    error: str = ""
    traces: object = None             # tf.function: () -> tracing count (checked: no retrace while timed)


# --------------------------------------------------------------- sparseopt and probe


def make_sparseopt(ctx, share=False):
    """sparseopt's step; with ``share`` (timing only), the table and optimizer of an earlier one."""
    parts = ctx.shared.get("sparseopt") if share else None
    if parts is None:
        table = ctx.table.copy()
        opt = ctx.new_optimizer()
        opt.build([table])
        if ctx.workload.dense:
            grads = ctx.batches
        else:
            grads = [so.IndexedSlices(v, i, table.shape) for v, i in ctx.batches]
        parts = ctx.shared["sparseopt"] = (table, opt, grads)
    table, opt, grads = parts
    mode = "dense" if ctx.workload.dense else opt.sparse_mode
    return Impl(f"sparseopt {mode}", "sparseopt",
                lambda b: opt.apply_gradients([(grads[b], table)]), lambda: table)


def _one_thread(step):
    """``step`` with Numba's parallel regions limited to one thread (no fork/join wait)."""
    def wrapped(b):
        n = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            step(b)
        finally:
            numba.set_num_threads(n)
    return wrapped


def make_sparseopt_1thread(ctx):
    # When timing, share sparseopt's table and state (memory: W2 Adam is 1.5 GB per copy).
    impl = make_sparseopt(ctx, share=ctx.timing)
    impl.step = _one_thread(impl.step)
    impl.label += ", 1 thread"
    impl.family = "sparseopt_1thread"
    impl.note = "numba.set_num_threads(1) around the step: no parallel fork/join"
    return impl


def make_sparseopt_legacy(ctx):
    """sparseopt with tf_keras' legacy math (``_legacy=True``): timed only where a peer matches it alone."""
    if not getattr(ctx.cls, "_has_legacy_math", False):
        raise Absent(f"{ctx.kind} has no tf_keras legacy variant")
    table = ctx.table.copy()
    opt = ctx.new_optimizer(legacy=True)
    opt.build([table])
    if ctx.workload.dense:
        grads = ctx.batches
    else:
        grads = [so.IndexedSlices(v, i, table.shape) for v, i in ctx.batches]
    mode = "dense" if ctx.workload.dense else opt.sparse_mode
    return Impl(f"sparseopt {mode}, tf_keras legacy math (_legacy=True)", "sparseopt_legacy",
                lambda b: opt.apply_gradients([(grads[b], table)]), lambda: table,
                note="the reference of the peers that match tf_keras' legacy math only")


def make_probe(ctx):
    sparse, dense = probe.probe_kernels(ctx.nslots, ctx.nrowslots)
    table = ctx.table.copy()
    slots = np.full((ctx.nslots,) + table.shape, 0.1, table.dtype)  # touched: no page faults later
    c = table.dtype.type(1e-3)
    note = "unique rows given (no de-duplication), trivial math"
    if ctx.nrowslots:  # per-row slots (RowwiseAdagrad): one value per row, not a row of them
        row_slots = np.full((ctx.nrowslots, table.shape[0]), 0.1, table.dtype)
        note += f"; {ctx.nslots} full-width slot(s) and {ctx.nrowslots} per-row slot(s) (one value per row)"
        if ctx.workload.dense:
            step = lambda b: dense(table, slots, row_slots, ctx.batches[b], c)  # noqa: E731
        else:
            plans = ctx.converted("plan", lambda vb: probe.plan(vb[1], table.shape[0]))
            vals = [v for v, _ in ctx.batches]
            step = lambda b: sparse(table, slots, row_slots, *plans[b], vals[b], c)  # noqa: E731
    elif ctx.workload.dense:
        flat_p, flat_s = table.reshape(-1), slots.reshape(ctx.nslots, -1)
        flat_g = [g.reshape(-1) for g in ctx.batches]
        step = lambda b: dense(flat_p, flat_s, flat_g[b], c)  # noqa: E731
    else:
        plans = ctx.converted("plan", lambda vb: probe.plan(vb[1], table.shape[0]))
        vals = [v for v, _ in ctx.batches]
        no_row_slots = np.empty((0, 0), table.dtype)
        step = lambda b: sparse(table, slots, no_row_slots, *plans[b], vals[b], c)  # noqa: E731
    return Impl("memory-touch probe", "probe", step, lambda: table, note=note, rule_differs=True)


# ------------------------------------------------------------------------- TensorFlow


def _tf():
    try:
        import tensorflow as tf
    except Exception as e:  # pragma: no cover - depends on the machine
        raise Absent(f"tensorflow not importable ({type(e).__name__}: {e})") from None
    tf.get_logger().setLevel("ERROR")  # a new tf.function per implementation is not a retrace
    return tf


def _tf_batches(ctx):
    tf = _tf()
    if ctx.workload.dense:
        return ctx.converted("tf", lambda g: (tf.constant(g),))
    return ctx.converted("tf", lambda vb: (tf.constant(vb[0]), tf.constant(vb[1])))


#: sparseopt config keys that are not the Keras class's own arguments.
_NOT_KERAS_ARGS = ("name", "sparse_mode", "exact_history", "_legacy")


def _keras_optimizer(module, ctx):
    """The Keras optimizer of the same class name (Keras 3 ``tf.keras.optimizers`` or tf_keras
    legacy), with sparseopt's configuration (its keys are the Keras arguments; unset ones left out)."""
    cls = getattr(module, ctx.kind, None)
    if cls is None:
        raise Absent(f"{module.__name__} has no {ctx.kind}")
    kw = {k: v for k, v in ctx.config.items() if k not in _NOT_KERAS_ARGS and v is not None}
    return cls(**kw)


def _keras_impl(ctx, module, label, family):
    tf = _tf()
    batches = _tf_batches(ctx)
    var = tf.Variable(ctx.table)
    opt = _keras_optimizer(module, ctx)
    shape = tf.constant(ctx.table.shape, tf.int64)
    if ctx.workload.dense:
        @tf.function
        def fn(g):
            opt.apply_gradients([(g, var)])
    else:
        @tf.function
        def fn(values, indices):
            opt.apply_gradients([(tf.IndexedSlices(values, indices, shape), var)])
    return Impl(label, family, lambda b: fn(*batches[b]), lambda: var.numpy(),
                note="tf.function, tf.IndexedSlices gradient" if not ctx.workload.dense else "tf.function",
                traces=fn.experimental_get_tracing_count)


def make_keras3(ctx):
    tf = _tf()
    return _keras_impl(ctx, tf.keras.optimizers, f"Keras 3 tf.keras.optimizers ({_keras3_version()})", "keras3")


def _keras3_version():
    try:
        import keras
        return f"keras {keras.__version__}"
    except Exception:  # pragma: no cover
        return "keras ?"


def make_tf_keras_legacy(ctx):
    _tf()
    try:
        import tf_keras
    except Exception as e:
        raise Absent(f"tf_keras not importable ({type(e).__name__})") from None
    return _keras_impl(ctx, tf_keras.optimizers.legacy, "tf_keras.optimizers.legacy", "tf_keras_legacy")


def _dedup(tf, values, indices):
    unique, position = tf.unique(indices)
    return tf.math.unsorted_segment_sum(values, position, tf.shape(unique)[0]), unique


def make_tf_raw(ctx):
    """TensorFlow's fused C++ kernels through ``tf.raw_ops`` (sparse ones after tf.unique de-duplication).

    Each op gets sparseopt's configuration, mapped onto the op's arguments (checked by the
    semantics check, with the benchmark's hyperparameters and with :data:`STRESS`'s).
    """
    tf = _tf()
    batches = _tf_batches(ctx)
    var = tf.Variable(ctx.table)
    f32 = tf.float32
    lr = tf.constant(ctx.hyper("learning_rate"), f32)
    dense = ctx.workload.dense
    kind, cfg = ctx.kind, ctx.config
    shape = ctx.table.shape

    def const(key):
        return tf.constant(ctx.hyper(key), f32)

    def slot(value=0.0):
        return tf.Variable(tf.fill(shape, tf.constant(value, f32)))

    extra = ""
    if kind == "Adagrad":
        acc = slot(ctx.hyper("initial_accumulator_value"))
        eps = const("epsilon")
        args = dict(var=var, accum=acc, lr=lr, epsilon=eps)
        op = "ResourceApplyAdagradV2" if dense else "ResourceSparseApplyAdagradV2"
    elif kind == "SGD" and ctx.hyper("momentum", 0.0) > 0 and not cfg.get("nesterov"):
        acc = slot()
        args = dict(var=var, accum=acc, lr=lr, momentum=const("momentum"))
        op = "ResourceApplyKerasMomentum" if dense else "ResourceSparseApplyKerasMomentum"
    elif kind == "RMSprop":
        # The op's rule: ms = rho ms + (1 - rho) g^2; mom = momentum mom + lr g / sqrt(ms + eps)
        # (centered: sqrt(ms - mg^2 + eps)); var -= mom. With momentum 0 that is Keras 3's
        # momentum-free step (the op still keeps and writes a momentum slot).
        ms, mom = slot(), slot()
        args = dict(var=var, ms=ms, mom=mom, lr=lr, rho=const("rho"),
                    momentum=tf.constant(float(cfg.get("momentum") or 0.0), f32), epsilon=const("epsilon"))
        if cfg.get("centered"):
            mg = slot()
            args["mg"] = mg
            op = "ResourceApplyCenteredRMSProp" if dense else "ResourceSparseApplyCenteredRMSProp"
        else:
            op = "ResourceApplyRMSProp" if dense else "ResourceSparseApplyRMSProp"
        if not float(cfg.get("momentum") or 0.0):
            extra = "momentum=0: the op still reads and writes its momentum slot; "
    elif kind == "Adadelta":
        acc, acc_update = slot(), slot()
        args = dict(var=var, accum=acc, accum_update=acc_update, lr=lr,
                    rho=const("rho"), epsilon=const("epsilon"))
        op = "ResourceApplyAdadelta" if dense else "ResourceSparseApplyAdadelta"
    elif kind == "Ftrl":
        # Keras' mapping: the op's l2 is l2 + beta / (2 lr); the accumulator starts at
        # initial_accumulator_value (Keras 3 rounds it to float32, so does this float32 slot).
        acc, linear = slot(ctx.hyper("initial_accumulator_value")), slot()
        l2 = ctx.hyper("l2_regularization_strength") + ctx.hyper("beta", 0.0) / (2.0 * ctx.hyper("learning_rate"))
        args = dict(var=var, accum=acc, linear=linear, lr=lr,
                    l1=const("l1_regularization_strength"), l2=tf.constant(l2, f32),
                    l2_shrinkage=const("l2_shrinkage_regularization_strength"),
                    lr_power=const("learning_rate_power"))
        op = "ResourceApplyFtrlV2" if dense else "ResourceSparseApplyFtrlV2"
    elif kind == "Adam" and dense and not cfg.get("amsgrad"):
        op = "ResourceApplyAdam"
        m, v = slot(), slot()
        step = tf.Variable(0.0)
        b1, b2 = const("beta_1"), const("beta_2")
        eps = const("epsilon")

        @tf.function
        def adam(g):
            t = step.assign_add(1.0)
            tf.raw_ops.ResourceApplyAdam(var=var.handle, m=m.handle, v=v.handle, beta1_power=b1 ** t,
                                         beta2_power=b2 ** t, lr=lr, beta1=b1, beta2=b2, epsilon=eps, grad=g)
        args, fn = None, adam
    else:
        raise Absent(f"TensorFlow has no fused {'dense' if dense else 'sparse'} kernel for {ctx.opt_name!r}"
                     + (" (see the TF-scatter LazyAdam)" if kind == "Adam" else ""))
    if args is not None:
        fn = _raw_op_step(tf, getattr(tf.raw_ops, op), args, dense)
    dedup = "" if dense else "tf.unique + unsorted_segment_sum, then "
    return Impl(f"tf.raw_ops.{op}", "tf_raw", lambda b: fn(*batches[b]), lambda: var.numpy(),
                note=f"{extra}{dedup}the fused C++ kernel, in tf.function", traces=fn.experimental_get_tracing_count)


def _raw_op_step(tf, raw, args, dense):
    """A tf.function step calling ``raw(**args, grad=...)`` (sparse: after de-duplication)."""
    def call(**kw):  # variables passed as their resource handles, read inside the function
        raw(**{k: (a.handle if isinstance(a, tf.Variable) else a) for k, a in args.items()}, **kw)

    if dense:
        @tf.function
        def fn(g):
            call(grad=g)
    else:
        @tf.function
        def fn(values, indices):
            g, rows = _dedup(tf, values, indices)
            call(grad=g, indices=rows)
    return fn


def make_tf_lazy_adam(ctx):
    """LazyAdam as tensorflow-addons built it: de-duplicate, gather m and v rows, update, scatter back."""
    if ctx.opt_name != "adam" or ctx.workload.dense:
        raise Absent("LazyAdam is a sparse Adam")
    tf = _tf()
    batches = _tf_batches(ctx)
    var = tf.Variable(ctx.table)
    m = tf.Variable(tf.zeros(ctx.table.shape, tf.float32))
    v = tf.Variable(tf.zeros(ctx.table.shape, tf.float32))
    step = tf.Variable(0.0)
    lr = ctx.hyper("learning_rate")
    b1, b2, eps = ctx.hyper("beta_1"), ctx.hyper("beta_2"), ctx.hyper("epsilon")

    @tf.function
    def fn(values, indices):
        g, rows = _dedup(tf, values, indices)
        t = step.assign_add(1.0)
        alpha = lr * tf.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        m_rows = b1 * m.sparse_read(rows) + (1.0 - b1) * g
        v_rows = b2 * v.sparse_read(rows) + (1.0 - b2) * tf.square(g)
        m.scatter_update(tf.IndexedSlices(m_rows, rows))
        v.scatter_update(tf.IndexedSlices(v_rows, rows))
        var.scatter_sub(tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + eps), rows))

    return Impl("LazyAdam with TF scatter ops (tensorflow-addons style)", "tf_scatter",
                lambda b: fn(*batches[b]), lambda: var.numpy(),
                note="tf.unique + segment sum, gather, scatter_update/scatter_sub, in tf.function",
                traces=fn.experimental_get_tracing_count)


# ------------------------------------------------------------------------------ torch


def _torch():
    try:
        import torch
    except Exception as e:  # pragma: no cover
        raise Absent(f"torch not importable ({type(e).__name__}: {e})") from None
    return torch


def _torch_version():
    try:
        import torch
        return torch.__version__
    except Exception:  # pragma: no cover
        return "?"


def make_torch(ctx):
    torch = _torch()
    param = torch.nn.Parameter(torch.from_numpy(ctx.table.copy()))
    lr = ctx.hyper("learning_rate")
    name, dense = ctx.opt_name, ctx.workload.dense
    note = ""
    if dense:
        cls = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad,
               "sgd_momentum": torch.optim.SGD}.get(name, torch.optim.Adam)
        try:
            trial = torch.nn.Parameter(torch.zeros(4))
            trial.grad = torch.ones(4)
            cls([trial], lr=0.1, fused=True).step()
            kw, flavor = {"fused": True}, "fused=True"
        except Exception as e:
            kw, flavor = {"foreach": True}, "foreach"
            note = f"fused=True unsupported on this CPU torch ({type(e).__name__}); foreach instead"
        grads = ctx.converted("torch", lambda g: torch.from_numpy(g))
    else:
        flavor = "sparse COO gradient"
        shape = ctx.table.shape
        grads = ctx.converted("torch", lambda vb: torch.sparse_coo_tensor(
            torch.from_numpy(vb[1])[None], torch.from_numpy(vb[0]), shape, check_invariants=False))
    if name == "adam":
        if dense:
            opt = torch.optim.Adam([param], lr=lr, betas=(ctx.hyper("beta_1"), ctx.hyper("beta_2")),
                                   eps=ctx.hyper("epsilon"), **kw)
            label = f"torch.optim.Adam({flavor})"
        else:
            opt = torch.optim.SparseAdam([param], lr=lr, betas=(ctx.hyper("beta_1"), ctx.hyper("beta_2")),
                                         eps=ctx.hyper("epsilon"))
            label = "torch.optim.SparseAdam"
    elif name == "adagrad":
        opt = torch.optim.Adagrad([param], lr=lr, eps=ctx.hyper("epsilon"),
                                  initial_accumulator_value=ctx.hyper("initial_accumulator_value"),
                                  **(kw if dense else {}))
        label = "torch.optim.Adagrad" + (f"({flavor})" if dense else "")
    elif name == "sgd_momentum":
        opt = torch.optim.SGD([param], lr=lr, momentum=ctx.hyper("momentum"), **(kw if dense else {}))
        label = "torch.optim.SGD(momentum)" + (f"({flavor})" if dense else "")
        if not dense:
            note = ("momentum buffer is a sparse tensor that accumulates every row ever touched "
                    "(uncoalesced): its cost grows with the step count")
    elif not dense:
        torch_name = {"Nadam": "NAdam", "SGD": "SGD"}.get(ctx.kind, ctx.kind)
        raise Absent(f"torch.optim.{torch_name} does not take sparse gradients (only SparseAdam, Adagrad "
                     f"and SGD do)" if hasattr(torch.optim, torch_name) else f"torch.optim has no {ctx.kind}")
    else:
        raise Absent(f"no torch counterpart of {name!r} in this script")
    if not dense:
        label += ", sparse COO grad"
        note = (note + "; " if note else "") + "coalesce() inside step()"

    def step(b):
        param.grad = grads[b]
        opt.step()

    return Impl(f"{label} (torch {_torch_version()})", "torch", step, lambda: param.detach().numpy(),
                note=note)


# ----------------------------------------------------------------------------- FBGEMM


def _fbgemm():
    torch = _torch()
    try:
        import fbgemm_gpu  # noqa: F401
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
    except Exception as e:
        raise Absent(f"fbgemm_gpu not usable ({type(e).__name__}: {str(e)[:160]}); "
                     f"see the report's FBGEMM note") from None
    return torch, EmbOptimType, EmbeddingLocation, PoolingMode, ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen


def _make_fbgemm(ctx, rule, rule_differs):
    if ctx.workload.dense:
        raise Absent("FBGEMM table-batched embeddings are sparse only")
    torch, EmbOptimType, Loc, Pool, Dev, TBE = _fbgemm()
    rows, width = ctx.table.shape
    kw = dict(learning_rate=ctx.hyper("learning_rate"), pooling_mode=Pool.NONE)
    if rule in ("EXACT_ADAGRAD", "EXACT_ROWWISE_ADAGRAD"):
        kw["eps"] = ctx.hyper("epsilon")
    tbe = TBE([(rows, width, Loc.HOST, Dev.CPU)], optimizer=getattr(EmbOptimType, rule), **kw)
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(torch.from_numpy(ctx.table))
        if rule in ("EXACT_ADAGRAD", "EXACT_ROWWISE_ADAGRAD") and not rule_differs:
            # the accumulator (EXACT_ROWWISE_ADAGRAD: one per row, shape (rows,)); FBGEMM starts at 0
            tbe.split_optimizer_states()[0][0].fill_(ctx.hyper("initial_accumulator_value"))
    inputs = ctx.converted("fbgemm", lambda vb: (torch.from_numpy(vb[1]),
                                                 torch.arange(vb[1].size + 1, dtype=torch.int64),
                                                 torch.from_numpy(vb[0])))
    pending = {}

    def prepare(b):  # the forward pass builds the autograd graph; untimed
        indices, offsets, _ = inputs[b]
        pending["out"] = tbe(indices, offsets)

    def step(b):  # backward = sort-based de-duplication + fused row update
        pending.pop("out").backward(inputs[b][2])

    import fbgemm_gpu
    version = getattr(fbgemm_gpu, "__version__", "?")
    return Impl(f"FBGEMM CPU TBE {rule} (fbgemm_gpu {version})", "fbgemm", step,
                lambda: tbe.split_embedding_weights()[0].detach().numpy().copy(), prepare=prepare,
                note="timed: backward() of a pooling-NONE lookup (fused de-dup + update); forward untimed",
                rule_differs=rule_differs)


def make_fbgemm(ctx):
    rule = {"Adagrad": "EXACT_ADAGRAD", "RowwiseAdagrad": "EXACT_ROWWISE_ADAGRAD"}.get(ctx.kind)
    if rule is None:
        raise Absent(f"FBGEMM CPU has no {ctx.opt_name} (CPU TBE: EXACT_ADAGRAD, "
                     f"EXACT_ROWWISE_ADAGRAD, EXACT_SGD, ...)")
    return _make_fbgemm(ctx, rule, rule_differs=False)


def make_fbgemm_reference(ctx):
    """FBGEMM's nearest rule where it has no exact counterpart (a different rule: for scale only)."""
    rule = {"adagrad": "EXACT_ROWWISE_ADAGRAD", "sgd_momentum": "EXACT_SGD"}.get(ctx.opt_name)
    if rule is None:
        raise Absent("no nearby FBGEMM rule" + (" (its own rule is the FBGEMM row)" if ctx.kind == "RowwiseAdagrad" else ""))
    impl = _make_fbgemm(ctx, rule, rule_differs=True)
    impl.note += ("; different rule: one accumulator per row" if rule == "EXACT_ROWWISE_ADAGRAD"
                  else "; different rule: plain SGD, no momentum")
    return impl


#: The implementations timed for every (workload, optimizer), in this order. A new
#: optimizer in ``common.OPTIMIZERS`` gets sparseopt and the probe; peers that know no
#: counterpart say so and are listed as absent.
IMPLEMENTATIONS = [make_sparseopt, make_sparseopt_1thread, make_sparseopt_legacy, make_probe, make_keras3,
                   make_tf_keras_legacy, make_tf_raw, make_tf_lazy_adam, make_torch, make_fbgemm,
                   make_fbgemm_reference]

#: Left out of the family rows (``--family``) unless ``--families`` names them.
FAMILY_SKIP = ("make_sparseopt_1thread",)

# ------------------------------------------------------------------ semantics check


LEGACY_TAG = " (tf_keras legacy math)"
TOLERANCE = 0.02


def check_semantics(workload, opt_name, makers, steps=3, keep=False, stress=True):
    """Label each implementation: which of sparseopt's lazy / dense updates it reproduces.

    Every implementation runs ``steps`` steps on a small table with many duplicates
    and untouched rows. ``err = max|p - ref| / max|ref - p0|``; below 2 % it matches.
    An implementation that matches neither is run again on batches without duplicate
    indices, to tell a different duplicate handling from a different rule. Where the
    optimizer has tf_keras' legacy math (``_legacy=True``), an implementation that matches
    neither of the current updates is also compared with the legacy lazy and dense ones
    (label ``... (tf_keras legacy math)``).

    With ``stress``, the whole check runs a second time with :func:`stress_overrides`
    (an epsilon of 0.1; Ftrl's strengths and power): where the two labels differ, the
    label reads ``<stress label> with <overrides>; <label> with the benchmark's hyperparameters``.

    With ``keep``, also returns the small context and the implementations built on it,
    with the benchmark's hyperparameters (``--tiny`` times those instead of building
    everything twice).
    """
    if workload.dense:
        small = Workload(workload.name, 48, 8, None)
    else:
        small = Workload(workload.name, 64, 4, 48)
    labels, ctx, built = _semantics_with_retry(small, opt_name, makers, steps, None)
    overrides = stress_overrides(ctx.config, ctx.kind) if stress else {}
    if overrides:
        stressed = _semantics_with_retry(small, opt_name, makers, steps, overrides)[0]
        what = ", ".join(f"{k}={v:g}" for k, v in overrides.items())
        for name, label in stressed.items():
            if name not in labels or label == labels[name]:
                continue
            if label == labels[name] + LEGACY_TAG:  # only the stress values tell the two maths apart
                labels[name] = f"{label}: told apart with {what} (the benchmark's values match both)"
            else:
                labels[name] = f"{label} with {what}; {labels[name]} with the benchmark's hyperparameters"
    return (labels, ctx, built) if keep else labels


def _semantics_with_retry(small, opt_name, makers, steps, overrides):
    labels, ctx, built = _semantics(small, opt_name, makers, steps, unique=False, overrides=overrides)
    if not small.dense:
        retry = [m for m in makers if labels.get(m.__name__, "").startswith("differs")]
        if retry:
            again = _semantics(small, opt_name, retry, steps, unique=True, overrides=overrides)[0]
            for name, label in again.items():
                if not label.startswith("differs"):
                    labels[name] = (f"{label} for unique indices; differs with duplicate indices "
                                    f"({labels[name].split('(')[-1].rstrip(')')})")
    return labels, ctx, built


def _semantics(small, opt_name, makers, steps, unique, overrides=None):
    ctx = Context(small, opt_name, steps, seed=7, overrides=overrides)
    if unique:
        rng = np.random.default_rng(11)
        ctx.batches = [(v, rng.permutation(small.rows)[:small.lookups].astype(np.int64))
                       for v, _ in ctx.batches]
    p0 = ctx.table.copy()

    def reference(legacy):
        lazy, dense = ctx.table.copy(), ctx.table.copy()
        opt_lazy, opt_dense = ctx.new_optimizer(legacy), ctx.new_optimizer(legacy)
        for batch in ctx.batches:
            if small.dense:
                opt_lazy.apply_gradients([(batch, lazy)])
                opt_dense.apply_gradients([(batch, dense)])
            else:
                g = so.IndexedSlices(batch[0], batch[1], lazy.shape)
                opt_lazy.apply_gradients([(g, lazy)])
                opt_dense.apply_gradients([(g.to_dense(), dense)])
        return lazy, dense

    def err(p, ref):
        scale = np.max(np.abs(ref - p0))
        return float(np.max(np.abs(p - ref)) / scale) if scale > 0 else float(np.max(np.abs(p - ref)))

    refs = {"": reference(False)}
    if getattr(ctx.cls, "_has_legacy_math", False):
        refs[LEGACY_TAG] = reference(True)

    def label(p):
        for tag, (lazy, dense) in refs.items():  # the current math first
            e_lazy, e_dense = err(p, lazy), err(p, dense)
            if small.dense:
                if e_dense < TOLERANCE:
                    return "dense" + tag
            elif e_lazy < TOLERANCE and err(lazy, dense) < TOLERANCE:
                return "lazy = dense-equivalent (same for this rule)" + tag
            elif e_lazy < TOLERANCE:
                return "lazy" + tag
            elif e_dense < TOLERANCE:
                return "dense-equivalent" + tag
        lazy, dense = refs[""]
        if small.dense:
            return f"differs (err {err(p, dense):.2g})"
        return f"differs from both (err {min(err(p, lazy), err(p, dense)):.2g})"

    labels, built = {}, {}
    for maker in makers:
        try:
            impl = maker(ctx)
            for b in range(steps):
                if impl.prepare:
                    impl.prepare(b)
                impl.step(b)
            p = np.asarray(impl.read()).reshape(p0.shape)
        except Absent as e:
            built[maker.__name__] = e
            continue
        except Exception as e:
            labels[maker.__name__] = f"check failed ({type(e).__name__}: {_error_text(e, 120)})"
            built[maker.__name__] = e
            continue
        built[maker.__name__] = impl
        labels[maker.__name__] = label(p)
    return labels, ctx, built


# ----------------------------------------------------------------------- the timing


def _error_text(e, limit=200):
    """One line for a table cell: a TF graph error's own message is its last line, not its first."""
    lines = [" ".join(line.split()) for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Graph execution error"):
        lines = [lines[-1]]  # "indices[5961] = 16574 is not in [0, 16385) [[{{node ...}}]]"
    return " ".join(lines)[:limit].replace("|", "/")


def time_group(ctx, impls, steps, warmup, evict_buf, log, collect=True):
    """Interleaved cold-cache timing: each step, every implementation, in a fresh seeded
    random order. (A rotation would give every implementation the same predecessor at
    almost every step; what one leaves behind, such as another library's thread pool
    still spinning or Numba's workers put to sleep by the 1-thread variant, then biases
    its successor the same way each time.)

    An implementation (other than sparseopt) that raises is dropped from the group and
    gets ``impl.error``; the others go on.
    """
    nb = len(ctx.batches)
    live = list(impls)

    def call(impl, b, timed):
        try:
            if impl.prepare:
                impl.prepare(b)
            if not timed:
                impl.step(b)
                return
            common.evict(evict_buf)
            gc.disable()
            try:
                t0 = time.perf_counter()
                impl.step(b)
                impl.times.append((time.perf_counter() - t0) * 1e3)
            finally:
                gc.enable()
        except Exception as e:
            if impl.family == "sparseopt":
                raise
            impl.error = f"failed while running: {type(e).__name__}: {_error_text(e)}"
            live.remove(impl)

    for impl in list(live):
        for w in range(warmup):
            if impl in live:
                call(impl, w % nb, False)
    if collect:
        gc.collect()
    traced = {id(i): i.traces() for i in live if i.traces}
    order_rng = np.random.default_rng(12345)
    for s in range(steps):
        b = (warmup + s) % nb
        for impl in [live[i] for i in order_rng.permutation(len(live))]:
            if impl in live:  # an implementation that failed has left
                call(impl, b, True)
        if log and (s + 1) % 10 == 0:
            log(f"    step {s + 1}/{steps}")
    for impl in live:
        if impl.traces and impl.traces() != traced[id(impl)]:
            impl.note += "; RETRACED while timed (times include tracing)"


def _wait_for_quiet(args, log):
    """With ``--quiet-load X``: wait (up to ``--max-wait`` s) until the 1-minute load is below X."""
    if not args.quiet_load:
        return
    waited = 0
    while os.getloadavg()[0] > args.quiet_load and waited < args.max_wait:
        if waited == 0:
            log(f"  load {os.getloadavg()[0]:.2f} > {args.quiet_load}: waiting")
        time.sleep(15)
        waited += 15


def run_group(workload, opt_name, args, evict_buf, log):
    _wait_for_quiet(args, log)
    load_start = os.getloadavg()[0]
    bw_size, bw_reps = ((4 << 20), 1) if args.tiny else ((256 << 20), 5)
    bandwidths = [probe.measure_bandwidth(bw_size, bw_reps)]
    makers = [m for m in IMPLEMENTATIONS if _family_selected(m, args.families)]
    if getattr(args, "family", False) and not args.families:
        makers = [m for m in makers if m.__name__ not in FAMILY_SKIP]
    log(f"  {workload.name} {opt_name}: semantics check")
    semantics, small_ctx, built = check_semantics(workload, opt_name, makers, keep=True)
    # sparseopt's legacy math is timed only as the reference of a peer that matches it alone
    if not any(label.startswith("lazy") and LEGACY_TAG in label for name, label in semantics.items()
               if not name.startswith("make_sparseopt")):
        makers = [m for m in makers if m is not make_sparseopt_legacy]
    if args.tiny:  # time the small implementations of the check: each peer is built once
        ctx = small_ctx
        workload = small_ctx.workload
    else:
        ctx = Context(workload, opt_name, args.batches)
        ctx.timing = True
        built = None
    impls, absent = [], []
    need = 2.5 * ctx.table.nbytes * (1 + ctx.nslots)
    for maker in makers:
        try:
            if built is None and _available_memory() < need:
                raise Absent(f"skipped: less than {need / 2**30:.1f} GiB of memory available")
            impl = built[maker.__name__] if built is not None else maker(ctx)
            if isinstance(impl, Exception):
                raise impl
        except Absent as e:
            if maker is not make_sparseopt_legacy:
                absent.append((maker.__name__, str(e)))
            continue
        except Exception as e:
            absent.append((maker.__name__, f"failed to build: {type(e).__name__}: {_error_text(e)}"))
            if args.verbose:
                traceback.print_exc()
            continue
        impl.semantics = semantics.get(maker.__name__, "?")
        if impl.family == "probe":
            impl.semantics = "n/a: touches the lazy step's bytes, no optimizer math"
        impls.append(impl)
    log(f"  {workload.name} {opt_name}: timing {len(impls)} implementations x {args.steps} steps")
    time_group(ctx, impls, args.steps, args.warmup, evict_buf, log, collect=not args.tiny)
    bandwidths.append(probe.measure_bandwidth(bw_size, bw_reps))
    failed = [(i.label, i.error) for i in impls if i.error]
    impls = [i for i in impls if not i.error]
    nbytes = statistics.mean(floor_bytes(workload, ctx.nslots, k, ctx.nrowslots) for k in ctx.unique)
    result = {
        "workload": workload.name, "optimizer": opt_name, "kind": ctx.kind, "nslots": ctx.nslots,
        "nrowslots": ctx.nrowslots,
        "semantics_stress": stress_overrides(ctx.config, ctx.kind),
        "unique_rows": statistics.mean(ctx.unique), "floor_bytes": nbytes,
        "impls": [_summary(i) for i in impls], "absent": absent + failed,
        "load": (load_start, os.getloadavg()[0]),
        "bandwidth": {k: max(b[k]["max"] for b in bandwidths) for k in ("copyto", "triad")},
    }
    del impls, ctx
    if not args.tiny:
        gc.collect()
    return result


def _available_memory():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return float("inf")


def _family_selected(maker, families):
    if not families:
        return True
    name = maker.__name__.replace("make_", "")
    return any(name.startswith(f) for f in families)


def _summary(impl):
    t = impl.times
    third = max(1, len(t) // 3)
    return {"label": impl.label, "family": impl.family, "semantics": impl.semantics,
            "note": impl.note, "rule_differs": impl.rule_differs,
            "median": statistics.median(t), "min": min(t), "max": max(t),
            "p10": float(np.percentile(t, 10)),
            "trend": statistics.median(t[-third:]) / statistics.median(t[:third]), "n": len(t)}


# --------------------------------------------------------------- sparseopt breakdown


def breakdown(workload, opt_name, args, evict_buf):
    """Where a sparseopt lazy step goes: plan_rows, the row kernel, and the rest (Python).

    Cold-cache, interleaved like the peers. The plan and the kernel are timed with the
    very arguments ``apply_gradients`` passed them (captured by wrapping
    ``sparseopt.kernels.dedup.plan_rows`` and ``sparseopt.kernels.cpu.sparse_kernel``
    for one step per batch), so this follows the library's internals as they change;
    returns None if they no longer fit.
    """
    try:
        from sparseopt.kernels import cpu, dedup
    except Exception:
        return None
    ctx = Context(workload, opt_name, args.batches)
    table = ctx.table.copy()
    opt = make_optimizer(opt_name)
    opt.build([table])
    grads = [so.IndexedSlices(v, i, table.shape) for v, i in ctx.batches]
    plans, kernels = [], []
    real_plan, real_factory = dedup.plan_rows, cpu.sparse_kernel

    def plan_spy(*a):
        plans.append(a)
        return real_plan(*a)

    def factory_spy(*fa, **fk):
        kernel = real_factory(*fa, **fk)

        def kernel_spy(*a):
            kernels.append((kernel, a))
            return kernel(*a)
        return kernel_spy

    dedup.plan_rows, cpu.sparse_kernel = plan_spy, factory_spy
    try:
        for g in grads:
            opt.apply_gradients([(g, table)])
    except Exception:
        return None
    finally:
        dedup.plan_rows, cpu.sparse_kernel = real_plan, real_factory
    if len(plans) != len(grads) or len(kernels) != len(grads):
        return None
    parts = {
        "apply_gradients (whole step)": lambda b: opt.apply_gradients([(grads[b], table)]),
        "dedup.plan_rows alone": lambda b: real_plan(*plans[b]),
        "row kernel alone (plan given)": lambda b: kernels[b][0](*kernels[b][1]),
    }
    impls = [Impl(k, "part", v, lambda: None) for k, v in parts.items()]
    time_group(ctx, impls, args.steps, args.warmup, evict_buf, None, collect=not args.tiny)
    out = {i.label: _summary(i) for i in impls}
    rest = (out["apply_gradients (whole step)"]["median"] - out["dedup.plan_rows alone"]["median"]
            - out["row kernel alone (plan given)"]["median"])
    # The fixed Python cost, warm: a step whose gradient has a single row.
    one = so.IndexedSlices(ctx.batches[0][0][:1], ctx.batches[0][1][:1], table.shape)
    samples = []
    for _ in range(10 if args.tiny else 200):
        t0 = time.perf_counter()
        opt.apply_gradients([(one, table)])
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"workload": workload.name, "optimizer": opt_name, "parts": out, "rest": rest,
            "one_row_step": statistics.median(samples)}


# ------------------------------------------------------------------------ compile time


def compile_times(opt_names, repeats, log):
    """Fresh interpreters: import, first sparse step with an empty cache, then with a filled one.

    A measurement that fails is reported with its error instead of a time.
    """
    import shutil
    import tempfile

    def child(code):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=dict(os.environ), timeout=600)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"exit {proc.returncode}; stdout {proc.stdout[-300:]!r}; "
                               f"stderr {proc.stderr[-600:]!r}")
        return float(lines[-1])

    timed = "import time\n_t0 = time.perf_counter()\n{stmt}\nprint(time.perf_counter() - _t0)\n"
    out, errors = {}, {}

    def measure(key, fn):
        try:
            value = fn()
        except Exception as e:
            errors[key] = f"{type(e).__name__}: {str(e)[:400]}"
            return
        out.setdefault(key, []).append(value)

    for _ in range(repeats):
        measure("import numpy + numba + sparseopt",
                lambda: child(common.python_prelude() + timed.format(stmt="import sparseopt")))
        measure("import sparseopt (numpy, numba loaded)",
                lambda: child(common.python_prelude() + "import numpy, numba\n" + timed.format(stmt="import sparseopt")))
    for name in opt_names:
        for _ in range(repeats):
            stmt, setup = common.first_step_code(name, "sparse")
            measure(f"first sparse step, {name}, cold cache", lambda: child(setup + timed.format(stmt=stmt)))
            cache = tempfile.mkdtemp(prefix="sparseopt-warm-")
            try:
                stmt_w, setup_w = common.first_step_code(name, "sparse", cache_dir=cache)

                def warm():
                    child(setup_w + timed.format(stmt=stmt_w))  # fill the cache
                    return child(setup_w + timed.format(stmt=stmt_w))
                measure(f"first sparse step, {name}, warm cache", warm)
                stmt_n, setup_n = common.first_step_code(name, "sparse", cache_dir=cache,
                                                         hide_scipy=True)
                measure(f"first sparse step, {name}, warm cache, SciPy not installed",
                        lambda: child(setup_n + timed.format(stmt=stmt_n)))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
        cold = out.get(f"first sparse step, {name}, cold cache")
        warm_t = out.get(f"first sparse step, {name}, warm cache")
        if cold and warm_t:
            log(f"  compile {name}: cold {statistics.median(cold):.2f} s, warm {statistics.median(warm_t):.3f} s")
    result = {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
              for k, v in out.items()}
    for k, e in errors.items():
        result.setdefault(k, {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0})
        result[k]["error"] = e
    return result


# --------------------------------------------------------------------------- machine


def machine_description():
    info = {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        info["nproc (affinity)"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        pass
    try:
        out = subprocess.run(["nproc"], capture_output=True, text=True, timeout=10)
        info["nproc"] = int(out.stdout.strip())
    except Exception:
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
        fields = {}
        for line in text.splitlines():
            if ":" in line:
                k, v = (s.strip() for s in line.split(":", 1))
                fields.setdefault(k, v)
        for k in ("model name", "cpu family", "model", "cpu MHz", "cache size", "cpu cores", "siblings"):
            if k in fields:
                info[f"cpuinfo {k}"] = fields[k]
        flags = fields.get("flags", "").split()
        info["cpuinfo flags (SIMD)"] = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512bw") if f in flags)
    except OSError:
        pass
    info["last-level cache"] = f"{common.last_level_cache_bytes() >> 20} MiB"
    try:
        info["memory"] = Path("/proc/meminfo").read_text().splitlines()[0].split(":")[1].strip()
        info["transparent hugepages"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    try:
        info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    try:
        head = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "sparseopt"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["sparseopt checkout"] = f"{head}{' + uncommitted changes under sparseopt/' if dirty else ''}"
    except Exception:
        pass
    info["numpy"] = np.__version__
    info["numba"] = f"{numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads"
    for mod in ("tensorflow", "keras", "tf_keras", "torch", "fbgemm_gpu"):
        info[mod] = _version_of(mod)
    return info


def _version_of(mod):
    import importlib.metadata as md
    dist = {"fbgemm_gpu": "fbgemm-gpu-cpu", "tf_keras": "tf-keras"}.get(mod, mod)
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------- report


def _same_semantics(impl, sparseopt):
    """Whether a peer computes what the sparseopt row ``sparseopt`` computes (checked labels).

    A peer that matches tf_keras' legacy math only pairs with sparseopt's legacy row.
    """
    if impl["rule_differs"] or impl["family"].startswith(("sparseopt", "probe")):
        return False
    a, b = impl["semantics"], sparseopt["semantics"]
    if (LEGACY_TAG in a) != (LEGACY_TAG in b):
        return False
    return a == b or (a.startswith("lazy") and b.startswith("lazy"))


def summarize(group, bandwidth_gbs):
    """The group's sparseopt, probe, fastest same-semantics peer and the sparseopt row it compares with."""
    impls = group["impls"]
    floor_ms = group["floor_bytes"] / (bandwidth_gbs * 1e9) * 1e3
    ours = next((i for i in impls if i["family"] == "sparseopt"), None)
    legacy = next((i for i in impls if i["family"] == "sparseopt_legacy"), None)
    probe = next((i for i in impls if i["family"] == "probe"), None)
    pairs = []
    for i in impls:
        ref = next((r for r in (ours, legacy) if r and _same_semantics(i, r)), None)
        if ref:
            pairs.append((i, ref))
    best, ref = min(pairs, key=lambda pr: pr[0]["median"]) if pairs else (None, None)
    others = [i for i in impls if not i["family"].startswith(("sparseopt", "probe")) and not i["rule_differs"]]
    fastest_any = min(others, key=lambda i: i["median"]) if others else None
    return {"floor_ms": floor_ms, "ours": ours, "probe": probe, "best_peer": best, "best_ref": ref,
            "fastest_any": fastest_any}


#: Sections of cpu.md written by other scripts (asv_benchmarks/cold_start.py, contention.py,
#: lowp_bench.py), which a rewrite of cpu.md keeps as they are, before the notes on the peers.
KEPT_SECTIONS = ("## Cold first step", "## Contention", "## Low-precision tables")


def _kept_sections(path):
    """The :data:`KEPT_SECTIONS` of the cpu.md at ``path``, each as its lines."""
    try:
        lines = Path(path).read_text().split("\n")
    except OSError:
        return []
    sections, current = [], None
    for line in lines:
        if line.startswith("## "):
            current = [] if line.startswith(KEPT_SECTIONS) else None
            if current is not None:
                sections.append(current)
        if current is not None:
            current.append(line)
    return sections


def write_report(out_dir, results, bandwidth, machine, compile_info, breakdowns, args, elapsed, family=None):
    """cpu.md and the charts; ``family``: the family rows (``--family``), a table and sections of their own."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family_groups = (family or {}).get("results") or []
    bw = max([bandwidth["copyto"]["max"], bandwidth["triad"]["max"]]
             + [v for g in results + family_groups for v in g.get("bandwidth", {}).values()])
    lines = []
    add = lines.append
    add("# sparseopt on the CPU: side by side with its peers")
    add("")
    if not results:
        add("This file holds only the family rows (`--family`): no W1-W3 run of PERF.md's three "
            "optimizers has written into this folder's cpu_results.json yet.")
    else:
        generated = getattr(args, "generated", None) or "a date cpu_results.json does not record"
        add(f"{'Main rows (W1-W3) g' if family_groups else 'G'}enerated by `python asv_benchmarks/peers.py"
            f"{' --quick' if args.quick else ''}{' --tiny' if args.tiny else ''}` on {generated} "
            f"({elapsed / 60:.1f} min). Method: PERF.md. {args.steps} timed cold-cache steps per "
            f"implementation after {args.warmup} warm-up steps, {args.batches} distinct seeded batches "
            f"cycled, all implementations of a group interleaved step by step in one process (a fresh "
            f"seeded random order each step), an untimed {evict_mib(args)} MiB write before every timed step.")
    add("")
    add("**Noise.** This is a shared 2-core machine: other processes (test suites) ran at the same "
        "time. A parallel region that needs both cores waits for a scheduler slice (~4 ms) when "
        "another process holds one, so single steps jump by multiples of a few ms; max columns show "
        "it. Medians of interleaved steps are comparable within a group; across runs, expect "
        "10-30 % drift.")
    add("")
    add("## Machine")
    add("")
    add("| | |")
    add("|---|---|")
    for k, v in machine.items():
        add(f"| {k} | {v} |")
    add("")
    add("## Memory bandwidth (measured in this run)")
    add("")
    add("| kernel | median GB/s | best GB/s |")
    add("|---|---|---|")
    mib = bandwidth.get("nbytes", 256 << 20) >> 20
    add(f"| numpy.copyto, {mib} MiB (1 thread, read + write) | {bandwidth['copyto']['median']:.1f} | "
        f"{bandwidth['copyto']['max']:.1f} |")
    add(f"| triad a = b + s*c, Numba parallel, 3 x {mib} MiB | {bandwidth['triad']['median']:.1f} | "
        f"{bandwidth['triad']['max']:.1f} |")
    for g in results:
        if g.get("bandwidth"):
            add(f"| best of copyto / triad around group {g['workload']} {g['optimizer']} | | "
                f"{g['bandwidth']['copyto']:.1f} / {g['bandwidth']['triad']:.1f} |")
    if family_groups:
        add(f"| best of copyto / triad around the {len(family_groups)} family groups | | "
            f"{max(g['bandwidth']['copyto'] for g in family_groups):.1f} / "
            f"{max(g['bandwidth']['triad'] for g in family_groups):.1f} |")
    add("")
    add("Other processes share the memory bus and the cores, so bandwidth is measured at the start "
        "and around every group and the floor uses the best figure of the run (the lowest floor). "
        "A step faster than this floor (x floor < 1) means the bandwidth runs themselves were slowed.")
    add("")
    add(f"The byte floor uses the best figure, **{bw:.1f} GB/s**: bytes = n*d*4 (gradient) + "
        f"k*d*4*2*(1+s) (parameter and s slots, read and write) + {8 * INDEX_PASSES}*n (indices), "
        "with k the mean number of unique rows of the batches.")
    add("")
    if results:
        add("## Summary")
        add("")
        add("Ratios of medians (x > 1: slower than the reference); *(of p10)*: the same ratio of the "
            "10th percentiles, the steps least disturbed by other processes taking a core. *Fastest "
            "peer*: the fastest (by median) other library whose semantics (checked) equals sparseopt's "
            "(a peer that matches tf_keras' legacy math only is compared with sparseopt's legacy "
            "variant, `_legacy=True`, timed in the same group).")
        add("")
        add("| workload | optimizer | sparseopt ms | probe ms | floor ms | sparseopt / probe | "
            "(of p10) | sparseopt / floor | fastest peer, same semantics | peer ms | peer / sparseopt | "
            "(of p10) |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for g in results:
        s = summarize(g, bw)
        ours, probe, best = s["ours"], s["probe"], s["best_peer"]
        if ours is None:
            continue
        add(f"| {g['workload']} | {g['optimizer']} | {ours['median']:.3g} | "
            f"{_fmt(probe and probe['median'])} | {s['floor_ms']:.3g} | "
            f"{_ratio(ours, probe)} | {_ratio(ours, probe, 'p10')} | {ours['median'] / s['floor_ms']:.2f} | "
            f"{_peer_name(best, s['best_ref'])} | {_fmt(best and best['median'])} | "
            f"{_ratio(best, s['best_ref'])} | {_ratio(best, s['best_ref'], 'p10')} |")
    add("")
    if family and family.get("results"):
        _family_table(add, family, bw)
    for g in results:
        _group_section(add, g, bw, args.tiny)
    if family and family.get("results"):
        add("## Family rows in detail")
        add("")
        add("Every implementation of each family group, as in the sections above (same columns). "
            "Semantics were checked with the benchmark's hyperparameters and again with the "
            "stress values the group names (a wider epsilon; Ftrl's strengths), on a 64-row table.")
        add("")
        for g in family["results"]:
            _group_section(add, g, bw, family.get("args", {}).get("tiny"), level="###")
    if breakdowns:
        add("## Where a sparseopt lazy step goes")
        add("")
        add("Cold-cache medians, the three timed interleaved: the whole `apply_gradients`, "
            "`sparseopt.kernels.dedup.plan_rows` alone on the same indices, and the row kernel "
            "alone, each called with the arguments `apply_gradients` gave it. *Rest* = whole - plan - "
            "kernel (validation, hyperparameters, coefficients, dispatch, scratch allocation). "
            "*1-row step*: a warm `apply_gradients` of a one-row gradient, back to back (the fixed "
            "per-call cost, mostly Python and Numba dispatch).")
        add("")
        add("| workload | optimizer | statistic | whole ms | plan_rows ms | kernel ms | rest ms | 1-row step ms |")
        add("|---|---|---|---|---|---|---|---|")
        for b in breakdowns:
            p = b["parts"]
            for stat in ("median", "p10"):
                whole = p["apply_gradients (whole step)"].get(stat)
                plan = p["dedup.plan_rows alone"].get(stat)
                kern = p["row kernel alone (plan given)"].get(stat)
                if whole is None:
                    continue
                add(f"| {b['workload']} | {b['optimizer']} | {stat} | {whole:.3g} | {plan:.3g} | {kern:.3g} | "
                    f"{whole - plan - kern:.3g} | {b['one_row_step']:.3g} |")
        add("")
    if compile_info:
        add("## Compile time (fresh interpreters)")
        add("")
        add("First sparse step on a 100,000 x 64 table with 4,096 lookups; *cold*: an empty "
            "`NUMBA_CACHE_DIR` (compile and write the cache), *warm*: a cache filled by an earlier "
            "process; *SciPy not installed*: the same warm cache in an interpreter that cannot import "
            "SciPy, as after the README's install (no requirement of sparseopt pulls SciPy in; when "
            "SciPy is there, Numba's CPU target imports its BLAS module on start-up, about 0.2 s). "
            "The step itself is well under 1 ms of these figures.")
        add("")
        add("| what | median s | min | max | runs |")
        add("|---|---|---|---|---|")
        for k, v in compile_info.items():
            if v.get("error"):
                add(f"| {k} | failed: {v['error'][:300]} | | | {v['n']} |")
            else:
                add(f"| {k} | {v['median']:.3f} | {v['min']:.3f} | {v['max']:.3f} | {v['n']} |")
        add("")
    for section in _kept_sections(out_dir / "cpu.md"):
        lines.extend(section)
    add("## Notes on the peers")
    add("")
    for line in PEER_NOTES:
        add(f"- {line}")
    add("")
    (out_dir / "cpu.md").write_text("\n".join(lines))
    plot(out_dir / "cpu_ratios.png", results, bw)
    if family_groups:
        plot_family(out_dir / "cpu_family_ratios.png", family, bw)


def _group_section(add, g, bw, tiny, level="##"):
    """One (workload, optimizer) group: every implementation, its checked semantics and times."""
    s = summarize(g, bw)
    ours, probe = s["ours"], s["probe"]
    w = (TINY_WORKLOADS if tiny else WORKLOADS)[g["workload"]]
    add(f"{level} {g['workload']} ({w.description}), {g['optimizer']}")
    add("")
    rows = f" full-width + {g['nrowslots']} per-row (one value per row)" if g.get("nrowslots") else ""
    stress = g.get("semantics_stress")
    stress = ("; semantics also checked with " + ", ".join(f"{k}={v:g}" for k, v in stress.items())
              if stress else "")
    add(f"Slots: {g['nslots']}{rows}; unique rows per step (mean): {g['unique_rows']:.0f}; "
        f"bytes per step: {g['floor_bytes'] / 1e6:.2f} MB; byte floor {s['floor_ms']:.3g} ms. "
        f"1-minute load average (2 cores) at the start and end of this group: "
        f"{g['load'][0]:.2f}, {g['load'][1]:.2f}{stress}.")
    add("")
    add("| implementation | semantics (checked) | median ms | p10 | min | max | x floor | x probe | "
        "ratio to sparseopt | notes |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    for i in sorted(g["impls"], key=lambda i: i["median"]):
        note = i["note"]
        if i["trend"] > 1.5:
            note = (note + "; " if note else "") + f"last third of the steps {i['trend']:.1f}x the first"
        add(f"| {i['label']} | {i['semantics']} | {i['median']:.3g} | {i.get('p10', i['min']):.3g} | {i['min']:.3g} | "
            f"{i['max']:.3g} | {i['median'] / s['floor_ms']:.1f} | {_ratio(i, probe)} | "
            f"{_ratio(i, ours)} | {note} |")
    for name, why in g["absent"]:
        add(f"| {name.replace('make_', '')}: absent | | | | | | | | | {' '.join(why.split())} |")
    add("")


#: Issue 3's speed targets for the family rows.
TARGET_PROBE = 2.0   # sparseopt / probe at most this
TARGET_PEER = 1.0    # fastest same-semantics peer / sparseopt above this


def _peer_name(best, ref):
    if not best:
        return "(none here)"
    vs = " (vs sparseopt's legacy math)" if ref and ref["family"] == "sparseopt_legacy" else ""
    return f"{best['label']}{vs}"


def family_rows(family, bw):
    """The family table's rows: one dict per group (ratios of medians and of p10s, targets met)."""
    out = []
    for g in family["results"]:
        s = summarize(g, bw)
        ours, probe, best, ref, anyp = s["ours"], s["probe"], s["best_peer"], s["best_ref"], s["fastest_any"]
        if ours is None:
            continue
        row = {"workload": g["workload"], "optimizer": g["optimizer"], "kind": g.get("kind", ""),
               "slots": (g["nslots"], g.get("nrowslots", 0)), "ours": ours["median"],
               "probe": probe and probe["median"], "floor": s["floor_ms"],
               "over_probe": probe and ours["median"] / probe["median"],
               "over_probe_p10": probe and ours["p10"] / probe["p10"],
               "peer": best and best["label"], "peer_name": _peer_name(best, ref), "peer_ms": best and best["median"],
               "peer_ratio": best and best["median"] / ref["median"],
               "peer_ratio_p10": best and best["p10"] / ref["p10"],
               "any": anyp, "any_ratio": anyp and anyp["median"] / ours["median"]}
        row["probe_met"] = None if row["over_probe"] is None else row["over_probe"] <= TARGET_PROBE
        row["peer_met"] = None if row["peer_ratio"] is None else row["peer_ratio"] > TARGET_PEER
        out.append(row)
    return out


def _family_table(add, family, bw):
    fargs = family.get("args", {})
    for wname in dict.fromkeys(g["workload"] for g in family["results"]):
        rows = [r for r in family_rows(family, bw) if r["workload"] == wname]
        w = (TINY_WORKLOADS if fargs.get("tiny") else WORKLOADS)[wname]
        add(f"## Family, {wname}: the lazy sparse step of every optimizer")
        add("")
        add(f"{w.description}. Generated by `{family.get('command', 'python asv_benchmarks/peers.py --family')}` "
            f"on {family.get('generated', '?')} ({family.get('elapsed', 0) / 60:.1f} min; "
            f"{fargs.get('steps', '?')} timed cold-cache steps per implementation, interleaved as above; "
            f"1-minute load {family.get('load', '?')}). Targets (issue 3): sparseopt within "
            f"{TARGET_PROBE:g}x of the memory-touch probe (*sparseopt / probe* <= {TARGET_PROBE:g}) and "
            "faster than the fastest peer that computes the same update (*peer / sparseopt* > 1; "
            "semantics checked, see the detail sections). The probe touches the optimizer's own slots: "
            "full-width slot rows, and for per-row slots (RowwiseAdagrad) one value per touched row. "
            "*Fastest peer, any semantics*: for scale (Keras 3 mostly updates the whole table).")
        add("")
        add("| optimizer | slots (full + per-row) | sparseopt ms | probe ms | sparseopt / probe | (of p10) | "
            f"<= {TARGET_PROBE:g}x probe | fastest peer, same semantics | peer ms | peer / sparseopt | "
            "(of p10) | faster than the peer | fastest peer, any semantics | its ms | / sparseopt |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

        def yes(x):
            return "-" if x is None else ("yes" if x else "**no**")

        def num(x, fmt=".2f"):
            return "-" if x is None else format(x, fmt)
        for r in rows:
            anyp = r["any"]
            add(f"| {r['optimizer']} | {r['slots'][0]} + {r['slots'][1]} | {r['ours']:.3g} | {num(r['probe'], '.3g')} | "
                f"{num(r['over_probe'])} | {num(r['over_probe_p10'])} | {yes(r['probe_met'])} | "
                f"{r['peer_name']} | {num(r['peer_ms'], '.3g')} | {num(r['peer_ratio'])} | "
                f"{num(r['peer_ratio_p10'])} | {yes(r['peer_met'])} | "
                f"{(anyp['label'] + ' [' + _short(anyp).split('[')[-1]) if anyp else '-'} | "
                f"{num(anyp and anyp['median'], '.3g')} | {num(r['any_ratio'])} |")
        add("")
        met_probe = sum(1 for r in rows if r["probe_met"])
        with_peer = [r for r in rows if r["peer_met"] is not None]
        add(f"Within {TARGET_PROBE:g}x of the probe: {met_probe} of {len(rows)}. Faster than the fastest "
            f"same-semantics peer: {sum(1 for r in with_peer if r['peer_met'])} of the {len(with_peer)} "
            f"optimizers that have one. Family chart: `cpu_family_ratios.png`.")
        add("")


def evict_mib(args):
    return max(64 << 20, 3 * common.last_level_cache_bytes()) >> 20 if not args.tiny else 1


PEER_NOTES = [
    "Semantics are checked, not assumed: every implementation runs 3 steps on a 64-row table "
    "(48 lookups with duplicates, some rows untouched) and is compared with sparseopt's lazy "
    "update and with its dense update of the densified gradient (match: max error under 2 % "
    "of the update). For Adagrad (and plain SGD) lazy and dense-equivalent coincide.",
    "Keras 3 (`tf.keras.optimizers`) turns an `IndexedSlices` gradient into whole-table "
    "arithmetic (every row of the variable and slots is written), and it does not sum duplicate "
    "indices before its nonlinear terms: its Adam and Adagrad match the dense update only when "
    "the indices are unique (the check says 'differs with duplicate indices'); momentum SGD, "
    "linear in g, matches.",
    "tf_keras legacy: Adam's sparse path decays m and v over the whole table and writes the "
    "whole variable (dense-equivalent); Adagrad and momentum SGD call TF's fused sparse kernels "
    "after de-duplication (lazy).",
    "The TF raw-op rows show TF's best sparse path: tf.unique + unsorted_segment_sum, then the "
    "fused C++ kernel (ResourceSparseApplyAdagradV2, ResourceSparseApplyKerasMomentum); TF has "
    "no fused sparse Adam, hence the LazyAdam written with gather/scatter ops (tensorflow-addons).",
    "torch: `SparseAdam` and `Adagrad` coalesce the sparse gradient inside `step()`. `SGD` with "
    "momentum accepts sparse gradients, but its momentum buffer is a sparse tensor holding every "
    "row ever touched, and it is uncoalesced: the update is dense-equivalent and its cost grows "
    "with every step (see the trend note). Dense W3: `fused=True` where this torch supports it.",
    "FBGEMM: `fbgemm-gpu-cpu` 1.9.0 (newest) does not load with torch 2.13.0 (undefined symbol "
    "`torch::autograd::_wrap_outputs(...)`: built for another torch ABI); 1.8.0 loads and runs "
    "CPU TBE training, so it is installed (`pip install --no-deps fbgemm-gpu-cpu==1.8.0`, torch "
    "unchanged). CPU TBE has no Adam and no momentum SGD; EXACT_ROWWISE_ADAGRAD and EXACT_SGD are "
    "shown for scale as different rules. Timed: the backward of a pooling-NONE lookup (its sort-"
    "based de-duplication and fused row update); the forward runs untimed before the eviction.",
    "The memory-touch probe gets the de-duplication plan precomputed, so sparseopt / probe "
    "includes sparseopt's de-duplication, its arithmetic and its Python overhead. It touches the "
    "optimizer's own state: its full-width slots, and for per-row slots (RowwiseAdagrad's "
    "accumulator) one 4-byte value per touched row.",
    "Semantics at two settings: with the benchmark's hyperparameters, and again with a wider "
    "epsilon (0.1) and, for Ftrl, nonzero l1, l2, beta, shrinkage and a power of -0.6 (the "
    "benchmark's epsilon of 1e-7 hides, under the 2 % tolerance, whether a peer puts it inside or "
    "outside the square root). Where they disagree the label says so. A peer that matches only "
    "tf_keras' legacy math (label '(tf_keras legacy math)') is compared with sparseopt's legacy "
    "variant (`_legacy=True`), timed in the same group: TF's `ResourceSparseApplyAdagradV2`, torch "
    "and FBGEMM's Adagrad put epsilon outside the root like tf_keras; Keras 3 (sparseopt's "
    "default) puts it inside.",
    "Family rows, TF raw ops (after tf.unique + unsorted_segment_sum): RMSprop -> "
    "`ResourceSparseApplyRMSProp` (rho, momentum, epsilon as in Keras; the op keeps a momentum "
    "slot even at momentum 0, and puts epsilon inside the root as Keras 3 does), centered -> "
    "`ResourceSparseApplyCenteredRMSProp`; Adadelta -> `ResourceSparseApplyAdadelta`; Ftrl -> "
    "`ResourceSparseApplyFtrlV2` with Keras' mapping l2 + beta / (2 lr). TF has no fused sparse "
    "kernel for AdamW, Adamax, Nadam or Lion, and torch no sparse-gradient AdamW, RMSprop, "
    "Adadelta, Adamax, NAdam or Lion (torch sparse gradients: SparseAdam, Adagrad, SGD only). "
    "RowwiseAdagrad's peer is FBGEMM CPU's EXACT_ROWWISE_ADAGRAD (the same rule).",
    "Keras 3.15.1's centered RMSprop fails on the W1 `IndexedSlices` gradient from its second "
    "step (`indices[...] = ... is not in [0, 16385)` in keras' `indexed_slices_union_indices_and_values`; "
    "fine on the 64-row check table and with 1,000 lookups): its row says so, untimed.",
]


def _fmt(x):
    return "-" if x is None else f"{x:.3g}"


def _ratio(a, b, key="median"):
    if not a or not b:
        return "-"
    return f"{a[key] / b[key]:.2f}"


def plot(path, results, bw):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except Exception:
        Path(path).with_suffix(".txt").write_text("matplotlib is not installed: pip install matplotlib\n")
        return
    groups = [g for g in results if any(i["family"] == "sparseopt" for i in g["impls"])]
    if not groups:
        return
    cols = 3
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 0.5 + 3.4 * rows), squeeze=False)
    colors = {"sparseopt": "tab:blue", "sparseopt_1thread": "tab:cyan", "probe": "tab:gray", "keras3": "tab:red", "tf_keras_legacy": "tab:orange",
              "tf_raw": "tab:olive", "tf_scatter": "tab:brown", "torch": "tab:purple", "fbgemm": "tab:green"}
    for ax, g in zip(axes.flat, groups):
        ours = next(i for i in g["impls"] if i["family"] == "sparseopt")
        impls = sorted(g["impls"], key=lambda i: i["median"])
        floor_ms = g["floor_bytes"] / (bw * 1e9) * 1e3
        labels = ["byte floor"] + [_short(i) for i in impls]
        ratios = [floor_ms / ours["median"]] + [i["median"] / ours["median"] for i in impls]
        cs = ["lightgray"] + [colors.get(i["family"], "black") for i in impls]
        y = np.arange(len(labels))
        ax.barh(y, ratios, color=cs)
        p10 = [floor_ms / ours.get("p10", ours["median"])] + [
            i.get("p10", i["median"]) / ours.get("p10", ours["median"]) for i in impls]
        ax.plot(p10, y, "k|", markersize=9, label="ratio of 10th percentiles")
        ax.set_yticks(y, labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axvline(1.0, color="k", lw=0.8)
        for yi, r in zip(y, ratios):
            ax.text(r, yi, f" {r:.2g}", va="center", fontsize=7)
        ax.set_title(f"{g['workload']} {g['optimizer']} (sparseopt {ours['median']:.3g} ms)", fontsize=9)
        ax.set_xlabel("median time / sparseopt's (log)", fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle("CPU step time relative to sparseopt (cold cache, interleaved; bars: medians, "
                 "| marks: 10th percentiles; <1 is faster)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_family(path, family, bw):
    """The family rows: sparseopt / probe (target <= 2) and fastest same-semantics peer / sparseopt (target > 1)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except Exception:
        Path(path).with_suffix(".txt").write_text("matplotlib is not installed: pip install matplotlib\n")
        return
    rows = family_rows(family, bw)
    if not rows:
        return
    labels = [f"{r['workload']} {r['optimizer']}" for r in rows]
    y = np.arange(len(rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 0.8 + 0.36 * len(rows)), sharey=True)
    probe_ratio = [r["over_probe"] or 0.0 for r in rows]
    a1.barh(y, probe_ratio, color=["tab:blue" if r["probe_met"] else "tab:red" for r in rows])
    a1.plot([r["over_probe_p10"] or np.nan for r in rows], y, "k|", markersize=9, label="of p10")
    a1.axvline(TARGET_PROBE, color="k", ls="--", lw=0.8)
    for yi, v, r in zip(y, probe_ratio, rows):
        a1.text(max(v, r["over_probe_p10"] or 0.0), yi, f" {v:.2f}", va="center", fontsize=7)
    a1.set_xlabel(f"sparseopt / memory-touch probe (target <= {TARGET_PROBE:g})", fontsize=8)
    a1.set_yticks(y, labels, fontsize=8)
    a1.invert_yaxis()
    peer_ratio = [r["peer_ratio"] for r in rows]
    a2.barh(y, [v or 0.0 for v in peer_ratio],
            color=["tab:green" if r["peer_met"] else "tab:red" for r in rows])
    a2.plot([r["peer_ratio_p10"] or np.nan for r in rows], y, "k|", markersize=9)
    a2.axvline(TARGET_PEER, color="k", ls="--", lw=0.8)
    a2.set_xscale("log")
    a2.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    for yi, v, r in zip(y, peer_ratio, rows):
        text = f" {v:.2f} {(r['peer'] or '').split(' (')[0][:38]}" if v else " no peer with the same semantics"
        a2.text(max(v or 1.0, r["peer_ratio_p10"] or 0.0), yi, text, va="center", fontsize=7)
    a2.set_xlabel("fastest same-semantics peer / sparseopt (log; target > 1)", fontsize=8)
    fig.suptitle("Family rows: medians of interleaved cold-cache steps (| marks: 10th percentiles)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(impl):
    label = impl["label"].split(" (")[0]
    sem = impl["semantics"]
    tag = "lazy" if sem.startswith("lazy") else ("dense" if sem.startswith("dense") else "other")
    if "differs" in sem:
        tag = "differs with duplicates" if "unique indices" in sem else "other"
    if impl["rule_differs"] and impl["family"] != "probe":
        tag = "other rule"
    return f"{label[:44]} [{tag}]" if impl["family"] != "probe" else "touch probe"


# ------------------------------------------------------------------------------ main


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    ap.add_argument("--tiny", action="store_true", help="tiny tables (a smoke test of this script)")
    ap.add_argument("--out", default=str(HERE / "reports"), help="folder for cpu.md and cpu_ratios.png")
    ap.add_argument("--workloads", default=None, help="default W1,W2,W3 (with --family: W1)")
    ap.add_argument("--optimizers", default=None,
                    help="comma-separated names of common.OPTIMIZERS / EXTRA_OPTIMIZERS, or 'all' "
                         f"(every one); default {','.join(DEFAULT_OPTIMIZERS)} (with --family: all)")
    ap.add_argument("--family", action="store_true",
                    help="the family rows: the W1 lazy step of every optimizer (--optimizers all unless "
                         "given) against the probe and its peers, merged into the cpu_results.json and "
                         "cpu.md of --out (the W1-W3 rows there are kept; family groups of the same "
                         "workload and optimizer are replaced); no compile section, no breakdown, no "
                         "1-thread sparseopt row")
    ap.add_argument("--families", default="",
                    help="comma-separated implementation prefixes to run (sparseopt,probe,keras3,"
                         "tf_keras_legacy,tf_raw,tf_lazy_adam,torch,fbgemm); default all")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batches", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-time section")
    ap.add_argument("--no-breakdown", action="store_true", help="skip the sparseopt breakdown")
    ap.add_argument("--quiet-load", type=float, default=None,
                    help="before each group, wait until the 1-minute load average is below this")
    ap.add_argument("--max-wait", type=float, default=300, help="seconds to wait for --quiet-load")
    ap.add_argument("--compile-only", action="store_true",
                    help="measure the compile-time section into the cpu_results.json of --out")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite cpu.md and cpu_ratios.png from the cpu_results.json of --out")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.workloads = args.workloads or ("W1" if args.family else "W1,W2,W3")
    optimizers = args.optimizers or ("all" if args.family else ",".join(DEFAULT_OPTIMIZERS))
    args.optimizers = ",".join(optimizer_names() if optimizers == "all" else
                               [o for o in optimizers.split(",") if o])
    unknown = [o for o in args.optimizers.split(",") if o not in optimizer_names()]
    if unknown:
        ap.error(f"unknown optimizer(s) {', '.join(unknown)}; known: {', '.join(optimizer_names())}, all")
    if args.family:
        args.no_compile = args.no_breakdown = True
    quick_or_tiny = args.quick or args.tiny
    args.steps = args.steps or (2 if args.tiny else 10 if args.quick else 40)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    args.batches = args.batches or (2 if args.tiny else 8)
    args.compile_repeats = 1 if quick_or_tiny else 3
    args.families = [f for f in args.families.split(",") if f]
    return args


def _now():
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


def _load_state(raw):
    try:
        return json.loads(Path(raw).read_text())
    except (OSError, ValueError):
        return None


def run_family(args, argv, out, raw, log):
    """The family rows: every (workload, optimizer) group of ``args``, merged into ``raw``'s ``family``."""
    t_start = time.perf_counter()
    state = _load_state(raw)
    if state is None:  # a fresh folder: the family rows alone
        log("machine and bandwidth")
        state = {"args": {k: getattr(args, k) for k in ("quick", "tiny", "steps", "warmup", "batches")},
                 "machine": machine_description(), "results": [], "breakdowns": [], "compile": None,
                 "bandwidth": probe.measure_bandwidth(nbytes=(4 << 20) if args.tiny else (256 << 20),
                                                      repeats=2 if args.tiny else 7), "elapsed": 0.0}
        state["args"]["generated"] = _now()
    workloads = TINY_WORKLOADS if args.tiny else WORKLOADS
    names = [w for w in args.workloads.split(",") if w]
    opt_names = [o for o in args.optimizers.split(",") if o]
    old = (state.get("family") or {}).get("results") or []
    if old and bool((state.get("family") or {}).get("args", {}).get("tiny")) != bool(args.tiny):
        old = []  # tiny and full-size rows do not mix
    groups = {(g["workload"], g["optimizer"]): g for g in old}
    order = {n: i for i, n in enumerate(optimizer_names())}
    load_start = os.getloadavg()[0]
    family = {"args": {k: getattr(args, k) for k in ("quick", "tiny", "steps", "warmup", "batches")},
              "command": " ".join(["python asv_benchmarks/peers.py"] + list(argv)),
              "generated": _now(), "load": f"{load_start:.2f}"}
    state["family"] = family
    evict_buf = common.evict_buffer(1 << 20 if args.tiny else None)

    def save():
        family["elapsed"] = time.perf_counter() - t_start
        family["load"] = f"{load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
        family["results"] = sorted(groups.values(), key=lambda g: (g["workload"], order.get(g["optimizer"], 99)))
        raw.write_text(json.dumps(state, indent=1))

    for wname in names:
        for opt_name in opt_names:
            group = run_group(workloads[wname], opt_name, args, evict_buf, log)
            group["generated"] = family["generated"]
            groups[(wname, opt_name)] = group
            save()
    save()
    saved = argparse.Namespace(**state["args"])
    write_report(out, state["results"], state["bandwidth"], state["machine"], state["compile"],
                 state["breakdowns"], saved, state.get("elapsed", 0.0), family=family)
    for r in family_rows(family, max([state["bandwidth"]["copyto"]["max"], state["bandwidth"]["triad"]["max"]]
                                     + [v for g in family["results"] for v in g["bandwidth"].values()])):
        log(f"  {r['workload']} {r['optimizer']}: sparseopt / probe "
            f"{'-' if r['over_probe'] is None else format(r['over_probe'], '.2f')}, fastest same-semantics peer "
            f"{r['peer'] or '(none)'} / sparseopt {'-' if r['peer_ratio'] is None else format(r['peer_ratio'], '.2f')}")
    log(f"wrote the family rows into {out / 'cpu.md'}, {out / 'cpu_family_ratios.png'} and {raw}")
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    log = (lambda msg: print(msg, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "cpu_results.json"
    if args.compile_only:  # measure compile times into an existing cpu_results.json
        state = json.loads(raw.read_text())
        log("compile times")
        state["compile"] = compile_times([o for o in args.optimizers.split(",") if o],
                                         args.compile_repeats, log)
        raw.write_text(json.dumps(state, indent=1))
        args.report_only = True
    if args.report_only:
        state = json.loads(raw.read_text())
        saved = argparse.Namespace(**state["args"])
        write_report(out, state["results"], state["bandwidth"], state["machine"], state["compile"],
                     state["breakdowns"], saved, state["elapsed"], family=state.get("family"))
        log(f"wrote {out / 'cpu.md'} and {out / 'cpu_ratios.png'} from {raw}")
        return 0
    if args.family:
        return run_family(args, argv, out, raw, log)
    previous = _load_state(raw)  # its family rows (--family) stay in the report
    t_start = time.perf_counter()
    workloads = TINY_WORKLOADS if args.tiny else WORKLOADS
    names = [w for w in args.workloads.split(",") if w]
    opt_names = [o for o in args.optimizers.split(",") if o]
    log("machine and bandwidth")
    state = {"args": {k: getattr(args, k) for k in ("quick", "tiny", "steps", "warmup", "batches")},
             "machine": machine_description(), "results": [], "breakdowns": [], "compile": None,
             "bandwidth": probe.measure_bandwidth(nbytes=(4 << 20) if args.tiny else (256 << 20),
                                                  repeats=2 if args.tiny else 7)}
    state["args"]["generated"] = _now()
    if previous and previous.get("family") and bool(previous["family"].get("args", {}).get("tiny")) == bool(args.tiny):
        state["family"] = previous["family"]  # tiny and full-size rows do not mix

    def save():
        state["elapsed"] = time.perf_counter() - t_start
        raw.write_text(json.dumps(state, indent=1))  # after every group: a crash loses one group

    evict_buf = common.evict_buffer(1 << 20 if args.tiny else None)
    for wname in names:
        workload = workloads[wname]
        for opt_name in opt_names:
            state["results"].append(run_group(workload, opt_name, args, evict_buf, log))
            if not workload.dense and not args.no_breakdown:
                b = breakdown(workload, opt_name, args, evict_buf)
                if b:
                    state["breakdowns"].append(b)
            save()
    if not args.no_compile:
        log("compile times")
        in_common = [o for o in opt_names if o in common.OPTIMIZERS]  # fresh interpreters build from common
        state["compile"] = compile_times(in_common if not args.quick else in_common[:1],
                                         args.compile_repeats, log)
    machine = state["machine"]
    machine["numba threading layer"] = _threading_layer()
    try:
        machine["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    save()
    args.generated = state["args"]["generated"]
    write_report(out, state["results"], state["bandwidth"], machine, state["compile"],
                 state["breakdowns"], args, state["elapsed"], family=state.get("family"))
    log(f"wrote {out / 'cpu.md'}, {out / 'cpu_ratios.png'} and {raw}")
    return 0


def _threading_layer():
    try:
        return numba.threading_layer()
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
