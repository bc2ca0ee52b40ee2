"""bfloat16 and float16 variables: float32 math, then stochastic rounding or round-to-nearest.

Every expected value here comes from a NumPy/Python reference written in this file from
the definitions (:mod:`sparseopt.kernels.lowp` states them):

* the random bits of element ``i`` (flat index ``row * width + column``) in step ``t`` of
  an optimizer with ``seed`` are splitmix64's output ``mix(key + (i + 1) * GOLDEN)``
  with ``key = mix(mix(seed) + t)`` (:func:`element_bits`);
* stochastic rounding of a float32 ``x`` to a 16-bit format whose neighbours of ``|x|`` are
  ``a <= |x| < b`` drops ``n`` bits of the float32 (``n = log2((b - a) / float32's step at x)``)
  and rounds away from zero iff ``frac * 2**n + (bits mod 2**n) >= 2**n``, ``frac =
  (|x| - a) / (b - a)``: up with probability ``frac`` (:func:`stochastic_reference`, in
  float64 from the values, not from bit patterns);
* round-to-nearest-even is NumPy's (float16) or ml_dtypes' (bfloat16) cast.

The per-optimizer tests run one optimizer per distinct configuration of the 16-bit element
code (``KERNEL_CASES``), not the whole table: each compiles its own kernels cold (about
15 s in CI), and the rule's float32 math is the same on both sides of the comparison
(tested per optimizer elsewhere). What differs is which slots the load and store widen
and round: none (sgd), one (sgd_momentum), two (adam), three (adam_amsgrad: bfloat16
slots 0, 1 and 2 each draw their own 16 bits), slots 0 and 2 without 1 (rmsprop_centered:
a slot's bits follow its place in the rule); decoupled weight decay in the pass (adamw);
per-step host state (nadam); every Ftrl term (ftrl_regularized); and the row-reduction
family, whose row slot stays float32 (rowwise_adagrad).
"""

import numpy as np
import pytest

import sparseopt as so
from sparseopt import errors
from tests.optimizer_table import CASES, IDS

ml_dtypes = pytest.importorskip("ml_dtypes")
# NaN and Inf are among the values cast on purpose
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
KINDS = [BF16, F16]
KIND_IDS = ["bfloat16", "float16"]
KERNEL_CASES = [CASES[IDS.index(name)] for name in (
    "sgd", "sgd_momentum", "adam", "adam_amsgrad", "rmsprop_centered", "adamw", "nadam", "ftrl_regularized",
    "rowwise_adagrad")]

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def mix(z):
    """splitmix64's finalizer (Steele, Lea & Flood 2014; Vigna's reference code)."""
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def element_bits(seed, step, index):
    key = mix(mix(seed) + step)
    return mix(key + (index + 1) * GOLDEN)


def neighbours(x, dtype):
    """The 16-bit values ``a <= |x| < b`` (float64), by the format's own casting and nextafter.

    Past the largest finite value ``b`` is where the next value would be (one step on),
    and rounding up there gives infinity."""
    ax = np.abs(np.float32(x))
    c = np.array(ax).astype(dtype)
    if np.float64(c) > np.float64(ax):
        c = np.nextafter(c, np.array(0, dtype))
    b = np.nextafter(c, np.array(np.inf, dtype))
    a, b = np.float64(c), np.float64(b)
    if np.isinf(b):
        b = a + (a - np.float64(np.nextafter(c, np.array(0, dtype))))
    return a, b


def stochastic_reference(x, bits, dtype):
    """float32 ``x`` stochastically rounded to ``dtype`` with 64 random ``bits`` (float64 result)."""
    x = np.float32(x)
    if np.isnan(x) or np.isinf(x):
        return np.float64(x)
    a, b = neighbours(x, dtype)
    ax = np.float64(abs(x))
    if ax >= b:  # beyond the format's range
        out = np.inf
    elif ax == a:
        out = a
    else:
        exponent = int(np.frexp(ax)[1]) - 1                       # ax = 1.m * 2**exponent
        spacing = np.ldexp(1.0, max(exponent, -126) - 23)          # float32's step at ax
        n = int(round(np.log2((b - a) / spacing)))   # bits dropped
        k = int((ax - a) / spacing)                    # frac * 2**n, an integer (exact)
        up = k + (bits & ((1 << n) - 1)) >= 1 << n
        out = (np.inf if np.isinf(np.array(b).astype(dtype)) else b) if up else a
    return -out if np.signbit(x) else out


def rounded_reference(x32, dtype, seed, step, stochastic, flat_offset=0):
    """A float32 array rounded to ``dtype`` elementwise (flat indices from ``flat_offset``)."""
    x32 = np.asarray(x32, np.float32)
    if not stochastic:
        return x32.astype(dtype)
    out = np.empty(x32.size, np.float64)
    for i, x in enumerate(x32.reshape(-1)):
        out[i] = stochastic_reference(x, element_bits(seed, step, flat_offset + i), dtype)
    return out.astype(dtype).reshape(x32.shape)  # exact: every value is a 16-bit value


def bits16(a):
    return np.asarray(a).view(np.uint16)


def same16(a, b):
    """Bit-identical 16-bit arrays, NaNs compared as NaN."""
    a, b = np.asarray(a), np.asarray(b)
    nan = np.isnan(a.astype(np.float32))
    return np.array_equal(nan, np.isnan(b.astype(np.float32))) and np.array_equal(bits16(a)[~nan],
                                                                                 bits16(b)[~nan])


def round_through_sgd(x32, dtype, stochastic, seed=7):
    """``x32`` rounded by the kernels: SGD(learning_rate=1) on a zero table with gradient -x."""
    table = np.zeros(x32.shape, dtype)
    opt = so.SGD(learning_rate=1.0, stochastic_rounding=stochastic, seed=seed)
    opt.apply_gradients([(-np.asarray(x32, np.float32), table)])
    return table


def special_values():
    """Float32 bit patterns over the whole range: random ones (normal, subnormal, Inf, NaN),
    ties, and the edges of both 16-bit formats: as SGD computes them from a zero table
    (``0 - 1 * (-x)``, which is ``x`` but for -0.0, which becomes 0.0)."""
    rng = np.random.default_rng(1)
    patterns = rng.integers(0, 2 ** 32, size=4000, dtype=np.uint64).astype(np.uint32)
    x = patterns.view(np.float32)
    edges = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.996, 65520.0, 65536.0, 6.0e-5,
                      6.1035156e-05, 5.96e-08, 2.98e-08, 2.9802322e-08, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8,
                      1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 3.3895314e38, 3.4028235e38, 1e-40, -1e-45],
                     np.float32)
    small = (rng.normal(size=2000) * 10.0 ** rng.integers(-9, 6, size=2000)).astype(np.float32)
    x = np.concatenate([x, edges, small])
    return np.float32(0) - np.float32(1) * -x


# ----------------------------------------------------------------------- rounding itself

@pytest.mark.parametrize("dtype", KINDS, ids=KIND_IDS)
def test_round_to_nearest_equals_the_cast(dtype):
    x = special_values()
    assert same16(round_through_sgd(x, dtype, stochastic=False), x.astype(dtype))


@pytest.mark.parametrize("dtype", KINDS, ids=KIND_IDS)
def test_stochastic_rounding_equals_the_reference(dtype):
    x = special_values()
    got = round_through_sgd(x, dtype, stochastic=True, seed=11)
    assert same16(got, rounded_reference(x, dtype, seed=11, step=1, stochastic=True))


@pytest.mark.parametrize("dtype, value", [(BF16, 1.0 + 2 ** -10), (BF16, -3.1e-3), (BF16, 1e-39),
                                          (F16, 1.0 + 0.3 * 2 ** -10), (F16, -2.1e-6), (F16, 0.1)],
                         ids=["bf16_one", "bf16_negative", "bf16_subnormal", "f16_one", "f16_subnormal",
                              "f16_tenth"])
def test_stochastic_rounding_is_unbiased_and_lands_on_the_neighbours(dtype, value):
    n = 20000
    x = np.full(n, value, np.float32)
    got = round_through_sgd(x, dtype, stochastic=True, seed=5).astype(np.float64)
    a, b = neighbours(x[0], dtype)
    if x[0] < 0:
        a, b = -a, -b
    assert set(np.unique(got)) <= {a, b}
    frac = (np.float64(x[0]) - a) / (b - a)         # exact: dyadic
    assert 0.05 < frac < 0.95          # a value the two neighbours share, not a tie of one
    se = abs(b - a) * np.sqrt(frac * (1 - frac) / n)
    assert abs(got.mean() - np.float64(x[0])) < 4 * se
    # round-to-nearest of the same values is biased by a whole fraction of a step
    assert abs(round_through_sgd(x, dtype, stochastic=False).astype(np.float64).mean() - x[0]) > 10 * se


def test_small_updates_accumulate_in_expectation_only_with_stochastic_rounding():
    """A step smaller than half a bfloat16 step: round-to-nearest never moves, stochastic
    rounding moves by the right amount on average (FBGEMM's reason for the default)."""
    steps = 40
    table = {sr: np.ones(4000, BF16) for sr in (True, False)}
    for sr, t in table.items():
        opt = so.SGD(learning_rate=1.0, stochastic_rounding=sr, seed=3)
        for _ in range(steps):
            opt.apply_gradients([(np.full(t.shape, 2 ** -11, np.float32), t)])
    assert np.all(table[False].astype(np.float32) == 1.0)
    moved = 1.0 - table[True].astype(np.float64)
    assert abs(moved.mean() - steps * 2 ** -11) < 0.1 * steps * 2 ** -11


# ----------------------------------------------------------------- every optimizer's step

def _inputs(rng, rows=9, width=3):
    table = (rng.normal(size=(rows, width)) * 0.5).astype(np.float32)
    idx = np.array([4, 1, 4, 7, 4])
    values = rng.normal(size=(idx.size, width)).astype(np.float32)
    dense = rng.normal(size=(rows, width)).astype(np.float32)
    return table, idx, values, dense


@pytest.mark.parametrize("dtype", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.id)
def test_every_optimizer_16_bit_step_is_its_float32_step_rounded(case, dtype):
    """Step 1 sparse (duplicates), step 2 dense, step 3 sparse: each time the 16-bit step
    equals the float32 step on a float32 table holding the 16-bit values, rounded with
    the step's bits; the float32 slots are the float32 run's, bit for bit; untouched rows
    and their slots keep their bits."""
    rng = np.random.default_rng(0)
    table32, idx, values, dense = _inputs(rng)
    seed = 1234
    t16 = table32.astype(dtype)
    opt16 = case.make(seed=seed)
    opt32 = case.make()
    t32 = t16.astype(np.float32)
    grads = [so.IndexedSlices(values, idx), dense, so.IndexedSlices(values[::-1].copy(), idx[::-1].copy())]
    for step, g in enumerate(grads, start=1):
        t32[...] = t16.astype(np.float32)        # the float32 table holding the 16-bit values
        before16 = t16.copy()
        opt32.apply_gradients([(g, t32)])
        opt16.apply_gradients([(g, t16)])
        expected = rounded_reference(t32, dtype, seed, step, stochastic=True)
        if isinstance(g, so.IndexedSlices):
            untouched = np.setdiff1d(np.arange(t16.shape[0]), g.indices)
            assert same16(t16[untouched], before16[untouched])
            expected[untouched] = before16[untouched]
        assert same16(t16, expected), f"step {step}"
        for name in opt32.get_slot_names():
            s16, s32 = opt16.get_slot(t16, name), opt32.get_slot(t32, name)
            assert s16.dtype == np.float32
            assert np.array_equal(s16, s32, equal_nan=True), (step, name)
    assert opt16.iterations == 3


@pytest.mark.parametrize("dtype", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("adam", "sgd_momentum", "rowwise_adagrad")],
                         ids=lambda c: c.id)
def test_round_to_nearest_step_is_the_float32_step_cast(case, dtype):
    rng = np.random.default_rng(2)
    table32, idx, values, dense = _inputs(rng)
    t16 = table32.astype(dtype)
    t32 = t16.astype(np.float32)
    opt16, opt32 = case.make(stochastic_rounding=False), case.make()
    for g in (so.IndexedSlices(values, idx), dense):
        t32[...] = t16.astype(np.float32)
        opt32.apply_gradients([(g, t32)])
        opt16.apply_gradients([(g, t16)])
        if isinstance(g, so.IndexedSlices):
            touched = np.unique(idx)
            assert same16(t16[touched], t32[touched].astype(dtype))
        else:
            assert same16(t16, t32.astype(dtype))


@pytest.mark.parametrize("dtype", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("name, options", [
    ("adam", {}), ("rowwise_adagrad", {}), ("adam", {"clipnorm": 0.5}),
    ("adamw", {"sparse_mode": "exact"})], ids=["adam", "rowwise_adagrad", "adam_clipnorm", "adamw_exact"])
def test_16_bit_gradients_equal_float32_gradients_of_the_same_values(dtype, name, options):
    """A 16-bit gradient gives the bits of the float32 gradient of the same values: the
    sparse kernels widen its rows as they read them (elementwise and row-wise rules; a row
    with duplicates is summed in float32), clipping and exact mode widen it first."""
    rng = np.random.default_rng(3)
    table32, idx, values, dense = _inputs(rng)
    values16, dense16 = values.astype(dtype), dense.astype(dtype)
    case = CASES[IDS.index(name)]
    tables = []
    for vals, dns in ((values16, dense16), (values16.astype(np.float32), dense16.astype(np.float32))):
        t = table32.astype(dtype)
        opt = case.make(seed=9, **options)
        for _ in range(2):
            opt.apply_gradients([(so.IndexedSlices(vals, idx), t)])
            opt.apply_gradients([(so.IndexedSlices(vals[:2], idx[1:3]), t)])  # row 7 idle (exact: caught up)
        opt.apply_gradients([(dns, t)])
        tables.append((t, [v.copy() for v in opt.variables()]))
    (a, slots_a), (b, slots_b) = tables
    assert same16(a, b) and not same16(a, table32.astype(dtype))
    assert all(np.array_equal(x, y) for x, y in zip(slots_a, slots_b))


def test_dense_and_sparse_steps_draw_the_same_bits():
    """The bits depend on (seed, step, row, column) only: a sparse step over every row, in
    any order, equals the dense step."""
    rng = np.random.default_rng(4)
    table32, _, _, dense = _inputs(rng)
    out = []
    for g in (dense, so.IndexedSlices(dense[::-1].copy(), np.arange(dense.shape[0])[::-1].copy())):
        t = table32.astype(BF16)
        so.Adam(0.01, seed=21).apply_gradients([(g, t)])
        out.append(t)
    assert same16(out[0], out[1])


# ------------------------------------------------------------ reproducibility, state, config

def _train(opt, table, batches):
    for values, idx in batches:
        opt.apply_gradients([(so.IndexedSlices(values, idx, table.shape), table)])


def _batches(rng, rows, width, steps=4, k=300):
    return [(rng.normal(size=(k, width)).astype(np.float32), rng.integers(0, rows, size=k)) for _ in range(steps)]


@pytest.mark.parametrize("dtype", KINDS, ids=KIND_IDS)
def test_bit_identical_for_any_thread_count(dtype):
    rng = np.random.default_rng(5)
    rows, width = 2000, 16
    table0 = rng.normal(size=(rows, width)).astype(dtype)
    batches = _batches(rng, rows, width)
    dense = rng.normal(size=table0.shape).astype(np.float32)
    previous = so.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            so.set_num_threads(threads)
            t = table0.copy()
            opt = so.Adam(0.01, seed=77)
            _train(opt, t, batches)
            t2 = table0.copy()
            so.Adagrad(0.1, seed=77).apply_gradients([(dense, t2)])
            results.append((t, opt.get_slot(t, "m").copy(), t2))
    finally:
        so.set_num_threads(previous)
    (a, ma, da), (b, mb, db) = results
    assert same16(a, b) and np.array_equal(ma, mb) and same16(da, db)


@pytest.mark.parametrize("dtype", KINDS, ids=KIND_IDS)
def test_a_resumed_run_continues_bit_for_bit(dtype, tmp_path):
    rng = np.random.default_rng(8)
    rows, width = 300, 8
    table0 = rng.normal(size=(rows, width)).astype(dtype)
    batches = _batches(rng, rows, width, steps=4, k=50)
    straight = table0.copy()
    _train(so.Adam(0.01, seed=99), straight, batches)

    resumed = table0.copy()
    first = so.Adam(0.01, seed=99)
    _train(first, resumed, batches[:2])
    second = so.Adam.from_config(first.get_config())
    assert second.get_config()["seed"] == 99
    second.build([resumed])
    second.set_weights(first.get_weights())
    _train(second, resumed, batches[2:])
    assert same16(resumed, straight)
    # another seed draws other bits
    other = table0.copy()
    _train(so.Adam(0.01, seed=100), other, batches)
    assert not same16(other, straight)


def test_config_holds_seed_and_rounding():
    opt = so.Adam(0.01, seed=5, stochastic_rounding=False)
    config = opt.get_config()
    assert config["seed"] == 5 and config["stochastic_rounding"] is False
    assert so.SGD(0.1).seed == 0                                    # the default: reproducible runs
    assert not {"seed", "stochastic_rounding", "slot_dtype"} & set(so.SGD(0.1).get_config())  # defaults
    assert so.SGD.from_config(so.SGD(0.1, seed=2 ** 63 - 1).get_config()).seed == 2 ** 63 - 1


# ------------------------------------------------------------------------------ errors

def test_unsupported_dtypes_and_modes_are_refused_clearly():
    opt = so.Adam(0.01)
    with pytest.raises(errors.DtypeMismatchError, match=r"'variable 0 .*must be float32, float64, bfloat16"):
        opt.apply_gradients([(np.ones(3, np.int16), np.zeros(3, np.int16))])
    t = np.zeros((4, 2), BF16)
    with pytest.raises(errors.DtypeMismatchError, match=r"gradient dtype float64 differs from the variable's "
                                                        r"bfloat16 \(a bfloat16 variable takes bfloat16 or float32"):
        opt.apply_gradients([(np.ones((4, 2)), t)])
    with pytest.raises(errors.DtypeMismatchError, match="gradient dtype float16 differs"):
        opt.apply_gradients([(so.IndexedSlices(np.ones((1, 2), np.float16), np.array([0])), t)])
    with pytest.raises(errors.DtypeMismatchError, match="gradient dtype bfloat16 differs from the variable's float32$"):
        opt.apply_gradients([(np.ones(2, BF16), np.zeros(2, np.float32))])
    with pytest.raises(errors.HyperparameterError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        so.Adam(0.01, seed=-1)
    assert opt.iterations == 0 and not np.any(t.astype(np.float32))


# ------------------------------------------------------------------------------ saving

@pytest.mark.parametrize("dtype", KINDS, ids=KIND_IDS)
def test_save_and_load_keep_16_bit_variables_and_continue_bit_for_bit(dtype, tmp_path):
    rng = np.random.default_rng(10)
    rows, width = 200, 8
    table0 = rng.normal(size=(rows, width)).astype(dtype)
    batches = _batches(rng, rows, width, steps=4, k=40)
    straight = table0.copy()
    _train(so.Adam(0.01, seed=42), straight, batches)

    table = table0.copy()
    opt = so.Adam(0.01, seed=42)
    _train(opt, table, batches[:2])
    path = tmp_path / "run.npz"
    so.save(path, opt, variables={"table": table})
    loaded, variables = so.load(path)
    assert variables["table"].dtype == dtype and same16(variables["table"], table)
    assert loaded.seed == 42
    _train(loaded, variables["table"], batches[2:])
    assert same16(variables["table"], straight)
    # a mismatched dtype is refused by name, before anything is written
    target = np.zeros((rows, width), np.float32)
    with pytest.raises(errors.WeightsMismatchError,
                       match=rf"variable 'table' was saved as {dtype} \(200, 8\); got float32"):
        so.load(path, variables={"table": target})
    assert not target.any()


def test_constraints_run_on_16_bit_rows_and_a_failing_one_undoes_the_step():
    rng = np.random.default_rng(12)
    table = rng.normal(size=(6, 4)).astype(BF16)
    opt = so.SGD(1.0, seed=1)
    g = so.IndexedSlices(rng.normal(size=(2, 4)).astype(np.float32) * 5, np.array([1, 3]))
    unconstrained = table.copy()
    so.SGD(1.0, seed=1).apply_gradients([(g, unconstrained)])
    opt.apply_gradients([(g, table)], constraints=[(table, lambda rows: np.clip(rows, -1, 1))])
    # the constraint's result is cast back to bfloat16 (to nearest even): clipping to +-1 is exact
    expected = unconstrained.copy()
    expected[[1, 3]] = np.clip(unconstrained[[1, 3]].astype(np.float32), -1, 1).astype(BF16)
    assert same16(table, expected) and not same16(table, unconstrained)
    before = table.copy()
    with pytest.raises(errors.ConstraintError):
        opt.apply_gradients([(g, table)], constraints=[(table, lambda rows: None)])
    assert same16(table, before) and opt.iterations == 1


def test_the_benchmark_script_runs_tiny():
    """asv_benchmarks/lowp_bench.py (W1 lazy Adam, 16-bit against float32 tables) on a tiny table."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "asv_benchmarks", "lowp_bench.py"), "--rows", "2000",
                           "--lookups", "64", "--steps", "2"], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| float", "| bfloat"))]
    assert len(rows) == 8 and rows[0].startswith("| float32 table | ")


def test_a_custom_rule_runs_on_16_bit_variables():
    """sparseopt.Rule's optimizers get the same 16-bit path: the float32 step, rounded."""
    def coefficients(step, learning_rate=0.1, decay=0.5):
        return {"lr": learning_rate, "decay": decay}

    def update(p, g, m, c):
        m = m * c.decay + g
        return p - c.lr * m, m

    Momentum = so.Rule("momentum16", ("m",), coefficients, update).optimizer_class("Momentum16")
    rng = np.random.default_rng(13)
    t16 = rng.normal(size=(5, 3)).astype(BF16)
    t32 = t16.astype(np.float32)
    g = so.IndexedSlices(rng.normal(size=(2, 3)).astype(np.float32), np.array([0, 2]))
    Momentum(seed=4).apply_gradients([(g, t16)])
    Momentum().apply_gradients([(g, t32)])
    expected = t32.astype(BF16)      # untouched rows: the 16-bit values they held (exact)
    expected[[0, 2]] = rounded_reference(t32, BF16, seed=4, step=1, stochastic=True)[[0, 2]]
    assert same16(t16, expected)


# ------------------------------------------------------------------- bfloat16 slots

def slot_bits(seed, step, index, k):
    """The bits of slot ``k`` of element ``index``: bits 16 (k + 1).. of the parameter's 64
    (one hash per element; the parameter's bfloat16 rounding reads bits 0-15)."""
    return element_bits(seed, step, index) >> (16 * (k + 1))


def test_slot_storage_starts_on_a_cache_line():
    """Slot storage is 64-byte aligned (backends.cpu.aligned_empty): a 256-byte float32 or 128-byte
    bfloat16 row lies on 4 or 2 whole lines; the slots are ordinary zeroed, writable views."""
    for dtype, slot_dtype in ((np.float32, None), (BF16, None), (BF16, "bfloat16")):
        for _ in range(3):  # other allocations in between: a fresh address each time
            table = np.zeros((10, 64), dtype)
            opt = so.Adam(0.01, slot_dtype=slot_dtype)
            opt.build([table])
            for name in ("m", "v"):
                slot = opt.get_slot(table, name)
                assert slot.ctypes.data % 64 == 0 and slot.flags.c_contiguous and slot.flags.writeable
                assert slot.dtype == (BF16 if slot_dtype else np.float32) and not np.any(slot.astype(np.float32))


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.id)
def test_bfloat16_slots_are_the_float32_step_rounded(case):
    """slot_dtype="bfloat16" on a bfloat16 table: each step (sparse, dense, sparse) equals
    the float32 step from the widened table and slots, the table and each slot rounded
    stochastically with their own bits; row-wise state stays float32, bit for bit."""
    rng = np.random.default_rng(14)
    table32, idx, values, dense = _inputs(rng)
    seed = 31
    t16 = table32.astype(BF16)
    opt16 = case.make(seed=seed, slot_dtype="bfloat16")
    opt32 = case.make()
    t32 = t16.astype(np.float32)
    opt16.build([t16])
    opt32.build([t32])
    names = opt32.get_slot_names()
    elementwise = [n for n in names if opt16.get_slot(t16, n).shape == t16.shape]
    assert all(opt16.get_slot(t16, n).dtype == BF16 for n in elementwise)
    grads = [so.IndexedSlices(values, idx), dense, so.IndexedSlices(values[::-1].copy(), idx[::-1].copy())]
    for step, g in enumerate(grads, start=1):
        t32[...] = t16.astype(np.float32)
        for n in names:
            opt32.get_slot(t32, n)[...] = opt16.get_slot(t16, n).astype(np.float32)
        before = [t16.copy()] + [opt16.get_slot(t16, n).copy() for n in names]
        opt32.apply_gradients([(g, t32)])
        opt16.apply_gradients([(g, t16)])
        touched = np.unique(g.indices) if isinstance(g, so.IndexedSlices) else np.arange(t16.shape[0])
        untouched = np.setdiff1d(np.arange(t16.shape[0]), touched)
        expected = rounded_reference(t32, BF16, seed, step, stochastic=True)
        expected[untouched] = before[0][untouched]
        assert same16(t16, expected), f"step {step}"
        for n, old in zip(names, before[1:]):
            got, s32 = opt16.get_slot(t16, n), opt32.get_slot(t32, n)
            if n not in elementwise:                 # per-row state: float32, as the float32 run's
                assert got.dtype == np.float32 and np.array_equal(got, s32), (step, n)
                continue
            k = opt16._rule.SLOTS.index(n)           # the kernel's slot position
            flat = s32.reshape(-1)
            want = np.array([stochastic_reference(flat[i], slot_bits(seed, step, i, k), BF16)
                             for i in range(flat.size)]).astype(BF16).reshape(s32.shape)
            want[untouched] = old[untouched]
            assert same16(got, want), (step, n)


def test_bfloat16_slots_round_to_nearest_save_and_load(tmp_path):
    rng = np.random.default_rng(15)
    table32, idx, values, dense = _inputs(rng)
    t16, t32 = table32.astype(BF16), table32.astype(BF16).astype(np.float32)
    opt16 = so.Adam(0.01, slot_dtype="bfloat16", stochastic_rounding=False)
    opt32 = so.Adam(0.01)
    opt16.apply_gradients([(so.IndexedSlices(values, idx), t16)])
    opt32.apply_gradients([(so.IndexedSlices(values, idx), t32)])
    assert same16(t16, t32.astype(BF16))
    for n in ("m", "v"):
        assert same16(opt16.get_slot(t16, n), opt32.get_slot(t32, n).astype(BF16))
    so.save(tmp_path / "s.npz", opt16, variables=[t16])
    loaded, (table,) = so.load(tmp_path / "s.npz")
    assert loaded.get_config()["slot_dtype"] == "bfloat16"
    assert loaded.get_slot(table, "m").dtype == BF16 and same16(loaded.get_slot(table, "m"), opt16.get_slot(t16, "m"))
    with pytest.raises(errors.HyperparameterError, match="slot_dtype must be None, 'float32' or 'bfloat16'"):
        so.Adam(0.01, slot_dtype="float16")


def test_16_bit_tables_in_a_step_with_other_tables_equal_their_own_steps():
    """Several tables in one apply_gradients (float32 ones may run table-batched): each
    16-bit table gets the bits of its own step, as when stepped alone."""
    rng = np.random.default_rng(16)
    tables = {"a": rng.normal(size=(50, 4)).astype(BF16), "b": rng.normal(size=(30, 8)).astype(F16),
              "c": rng.normal(size=(40, 4)).astype(np.float32), "d": rng.normal(size=(20, 8)).astype(np.float32)}
    grads = {k: so.IndexedSlices(rng.normal(size=(12,) + t.shape[1:]).astype(np.float32),
                                 rng.integers(0, t.shape[0], 12)) for k, t in tables.items()}
    together = {k: t.copy() for k, t in tables.items()}
    so.Adam(0.01, seed=8).apply_gradients([(grads[k], together[k]) for k in tables])
    for k, t in tables.items():
        alone = t.copy()
        so.Adam(0.01, seed=8).apply_gradients([(grads[k], alone)])
        assert np.array_equal(alone.view(np.uint8), together[k].view(np.uint8)), k
