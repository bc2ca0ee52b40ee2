"""The table-batched step (issue 21): the lazy sparse updates of one call in one parallel
region give the same bits as the per-table path (``_batch_tables = False``).

The generic test runs one optimizer per distinct kernel configuration the batched region
handles, not the whole table (each compiles its own kernels cold, about 15 s in CI; the
rules' math is tested per optimizer elsewhere, and here both paths inline the same rule):
``KERNEL_CASES``: no slot (sgd), one (sgd_momentum), two (adam), three (adam_amsgrad),
slots 0 and 2 kept without 1 (rmsprop_centered: a kept slot's place in ``meta`` is its
place in the rule), decoupled weight decay in the pass (adamw), coefficients from
per-step state (nadam's ``u_product``), every Ftrl term (ftrl_regularized) and the
row-reduction family with a row slot (rowwise_adagrad). 16-bit tables run batched too, a
region per rounding configuration (``TABLES16``: Adam with stochastic rounding and float32
slots, with round-to-nearest and bfloat16 slots, and RowwiseAdagrad).
"""

import numpy as np
import pytest

import sparseopt as so
from sparseopt import _config, errors
from sparseopt import engine
from sparseopt.kernels import cpu, dedup
from tests.optimizer_table import CASES, IDS

KERNEL_CASES = [CASES[IDS.index(name)] for name in (
    "sgd", "sgd_momentum", "adam", "adam_amsgrad", "rmsprop_centered", "adamw", "nadam", "ftrl_regularized",
    "rowwise_adagrad")]

#: (rows, trailing shape, dtype, index dtype, gradient rows): widths 1-16, both dtypes,
#: a 1-D and a 3-D variable, int32 and int64 indices, an empty gradient, a single row.
TABLES = [
    (40, (4,), np.float32, np.int64, 30),
    (300, (7,), np.float32, np.int32, 50),
    (20, (4,), np.float64, np.int64, 25),
    (1000, (16,), np.float32, np.int64, 200),
    (8, (3,), np.float64, np.int32, 40),
    (50, (), np.float32, np.int64, 20),
    (30, (2, 3), np.float64, np.int64, 15),
    (60, (5,), np.float32, np.int64, 0),
    (5, (1,), np.float32, np.int64, 1),
    (2000, (9,), np.float32, np.int64, 300),
    (12, (6,), np.float64, np.int64, 12),
]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    """Steps on 1 thread, or on 2 (each step big enough for several, not measured)."""
    monkeypatch.setattr(_config, "MIN_WORK_PER_THREAD", 1)
    monkeypatch.setattr(_config, "ADAPTIVE", False)
    so.set_num_threads(request.param)
    yield request.param
    so.set_num_threads(None)


def make_tables(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(rows,) + shape).astype(dtype) for rows, shape, dtype, _, _ in TABLES]


def make_steps(steps=3, seed=1):
    """Gradients per step: Zipf-like ids (many duplicates), every table; a dense one too."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        grads = []
        for rows, shape, dtype, idx_dtype, n in TABLES:
            idx = np.minimum(rng.zipf(1.3, n) - 1, rows - 1).astype(idx_dtype)
            grads.append((rng.normal(size=(n,) + shape).astype(dtype), idx))
        out.append((grads, rng.normal(size=(6, 5)).astype(np.float32)))
    return out


def run(case, batched, steps, **extra):
    tables = make_tables()
    dense = np.random.default_rng(2).normal(size=(6, 5)).astype(np.float32)
    opt = case.make(**extra)
    opt._batch_tables = batched
    for grads, g_dense in steps:
        pairs = [(so.IndexedSlices(v, i, t.shape), t) for (v, i), t in zip(grads, tables)]
        pairs.insert(3, (g_dense, dense))
        opt.apply_gradients(pairs)
    return [dense] + tables + list(opt.variables())


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y, equal_nan=True)


@pytest.fixture
def batched_calls(monkeypatch):
    """Counts the table-batched kernel calls (so a test knows the batched path ran)."""
    calls = []
    original = engine._run_tables

    def counted(rule, group, *args):
        calls.append(len(group))
        return original(rule, group, *args)
    monkeypatch.setattr(engine, "_run_tables", counted)
    return calls


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: c.id)
def test_batched_step_is_bit_identical_to_the_per_table_path(case, threads, batched_calls):
    steps = make_steps()
    reference = run(case, False, steps)
    assert not batched_calls
    assert_same(run(case, True, steps), reference)
    # float32 and float64 tables: two regions per step (one per dtype)
    assert sorted(batched_calls[:2]) == [4, 6]  # the empty gradient runs no kernel


@pytest.mark.parametrize("extra", [dict(clipvalue=0.1), dict(clipnorm=0.5), dict(global_clipnorm=1.0),
                                   dict(weight_decay=0.05)],
                         ids=["clipvalue", "clipnorm", "global_clipnorm", "weight_decay"])
@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "rowwise_adagrad"])
def test_batched_step_with_clipping_and_weight_decay(name, extra, threads, batched_calls):
    case = CASES[IDS.index(name)]
    steps = make_steps(2)
    assert_same(run(case, True, steps, **extra), run(case, False, steps, **extra))
    assert batched_calls


def test_weight_decay_exclusions_split_the_region(batched_calls):
    steps = make_steps(2)

    def go(batched):
        tables = make_tables()
        opt = so.AdamW(learning_rate=0.01, weight_decay=0.1)
        opt._batch_tables = batched
        opt.build(tables, names=[f"t{i}" + ("_bias" if i % 3 == 0 else "") for i in range(len(tables))])
        opt.exclude_from_weight_decay(var_names=["_bias"])
        for grads, _ in steps:
            opt.apply_gradients([(so.IndexedSlices(v, i, t.shape), t) for (v, i), t in zip(grads, tables)])
        return tables + list(opt.variables())
    assert_same(go(True), go(False))
    assert len(batched_calls) >= 3


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "rowwise_adagrad"])
def test_exact_mode_plans_together_same_bits(name):
    case = CASES[IDS.index(name)]
    steps = make_steps(3)

    def go(batched):
        out = run(case, batched, steps, sparse_mode="exact")
        return out
    assert_same(go(True), go(False))


def test_constraints_on_batched_tables():
    case = CASES[IDS.index("adam")]
    steps = make_steps(2)

    def go(batched):
        tables = make_tables()
        opt = case.make()
        opt._batch_tables = batched
        for grads, _ in steps:
            opt.apply_gradients([(so.IndexedSlices(v, i, t.shape), t) for (v, i), t in zip(grads, tables)],
                                constraints=[(tables[1], lambda x: np.clip(x, -0.5, 0.5)),
                                             (tables[9], lambda x: x * 0.5)])
        return tables + list(opt.variables())
    assert_same(go(True), go(False))


def snapshot(opt, tables):
    return [t.copy() for t in tables] + [w.copy() for w in opt.variables()]


@pytest.mark.parametrize("name", ["adam", "rowwise_adagrad"])
def test_bad_index_in_the_tenth_table_changes_nothing(name, batched_calls):
    case = CASES[IDS.index(name)]
    tables = make_tables()
    steps = make_steps(2)
    opt = case.make()
    opt.apply_gradients([(so.IndexedSlices(v, i, t.shape), t) for (v, i), t in zip(steps[0][0], tables)])
    before = snapshot(opt, tables)
    grads = [(v, i.copy()) for v, i in steps[1][0]]
    grads[9][1][7] = TABLES[9][0]  # one past the end, in the 10th table
    pairs = [(so.IndexedSlices(v, i, t.shape), t) for (v, i), t in zip(grads, tables)]
    with pytest.raises(errors.IndexOutOfRangeError) as batched_error:
        opt.apply_gradients(pairs)
    assert_same(snapshot(opt, tables), before)
    assert opt.iterations == 1
    opt._batch_tables = False
    with pytest.raises(errors.IndexOutOfRangeError) as reference_error:
        opt.apply_gradients(pairs)
    assert str(batched_error.value) == str(reference_error.value)
    assert "position 7" in str(batched_error.value)
    assert_same(snapshot(opt, tables), before)


@pytest.mark.parametrize("bad_index_at, bad_shape_at, expected", [
    (9, 10, errors.IndexOutOfRangeError), (10, 9, errors.ShapeMismatchError),
    (3, 5, errors.IndexOutOfRangeError), (5, 3, errors.ShapeMismatchError)])
def test_the_first_bad_pair_in_order_raises(bad_index_at, bad_shape_at, expected):
    tables = make_tables()
    grads = [(v, i.copy()) for v, i in make_steps(1)[0][0]]
    grads[bad_index_at][1][0] = -1
    messages = []
    for batched in (True, False):
        opt = so.Adam(0.01)
        opt._batch_tables = batched
        pairs = [(so.IndexedSlices(v, i, t.shape), t) for (v, i), t in zip(grads, tables)]
        pairs[bad_shape_at] = (so.IndexedSlices(grads[bad_shape_at][0][:, None], grads[bad_shape_at][1]),
                               tables[bad_shape_at])
        before = [t.copy() for t in tables]
        with pytest.raises(expected) as error:
            opt.apply_gradients(pairs)
        assert_same(tables, before)
        assert opt.iterations == 0
        messages.append(str(error.value))
    assert messages[0] == messages[1]


#: A bad sparse gradient of a table: (what, (values, indices, table) -> gradient, error)
BAD_SPARSE = [
    ("float indices", lambda v, i, t: so.IndexedSlices(v, i.astype(np.float64), t.shape), errors.IndicesTypeError),
    ("2-D indices", lambda v, i, t: so.IndexedSlices(v, i[:, None], t.shape), errors.IndicesTypeError),
    ("a value row short", lambda v, i, t: so.IndexedSlices(v[1:], i, t.shape), errors.ShapeMismatchError),
    ("float64 values", lambda v, i, t: so.IndexedSlices(v.astype(np.float64), i, t.shape),
     errors.DtypeMismatchError),
    ("dense_shape", lambda v, i, t: so.IndexedSlices(v, i, (t.shape[0] + 1, t.shape[1])), errors.ShapeMismatchError),
]


@pytest.mark.parametrize("bad", BAD_SPARSE, ids=[b[0] for b in BAD_SPARSE])
@pytest.mark.parametrize("bad_dense_at", [None, 1, 8], ids=["no_bad_dense", "bad_dense_before", "bad_dense_after"])
def test_batched_validation_raises_for_the_first_bad_pair(bad, bad_dense_at):
    """The sparse gradients of a step are checked in one pass after the other pairs
    (``_validation.sparse_gradients``): the error is the per-pair checks' (the per-table
    path's), for the first bad pair in order, naming its variable; nothing is written."""
    _, spoil, error_type = bad
    tables = make_tables()
    dense = np.zeros((6, 5), np.float32)
    grads, g_dense = make_steps(1)[0]
    messages = []
    for batched in (True, False):
        opt = so.Adam(0.01)
        opt._batch_tables = batched
        opt.build(tables + [dense], names=[f"t{i}" for i in range(len(tables))] + ["dense"])
        pairs = [(so.IndexedSlices(v, i, t.shape), t) for (v, i), t in zip(grads, tables)]
        pairs[3] = (spoil(*grads[3], tables[3]), tables[3])
        if bad_dense_at is not None:
            pairs.insert(bad_dense_at, (g_dense[:, :4], dense))  # a gradient of the wrong shape
        before = snapshot(opt, tables + [dense])
        with pytest.raises(errors.SparseoptError) as error:
            opt.apply_gradients(pairs)
        assert_same(snapshot(opt, tables + [dense]), before)
        assert opt.iterations == 0
        if bad_dense_at == 1:
            assert type(error.value) is errors.ShapeMismatchError and str(error.value).startswith("'dense'")
        else:
            assert type(error.value) is error_type and str(error.value).startswith("'t3'")
        messages.append(str(error.value))
    assert messages[0] == messages[1]


def test_batched_plans_equal_the_per_table_plans():
    rng = np.random.default_rng(3)
    for idx_dtype in (np.int32, np.int64):
        sizes = [(10, 50), (5000, 300), (3, 0), (20000, 1000), (1, 7), (300_000, 64)]
        indices = [rng.integers(0, n, m).astype(idx_dtype) for n, m in sizes]
        rows, offsets, order, ustart, ostart, bad = dedup.plan_tables(indices, [n for n, _ in sizes])
        assert bad == -1
        for t, (idx, (n, _)) in enumerate(zip(indices, sizes)):
            r, o, od, b = dedup.plan_rows(idx, n)
            assert np.array_equal(rows[ustart[t]:ustart[t + 1]], r)
            assert np.array_equal(offsets[ustart[t] + t:ustart[t + 1] + t + 1], o)
            assert np.array_equal(order[ostart[t]:ostart[t + 1]], od)
        indices[3][11] = 20000
        assert dedup.plan_tables(indices, [n for n, _ in sizes])[-1] == 3


def test_batched_kernels_are_cached_under_the_source_key():
    from sparseopt.kernels._specialize import SOURCE_KEY
    from sparseopt.rules import adam
    kernel = cpu.batched_sparse_kernel(adam, (True, True, False), False)
    kernel = getattr(kernel, "kernel", kernel)  # under the workqueue layer: serialized
    assert SOURCE_KEY in kernel.py_func.__name__  # it inlines dedup.py's pointer and cpu.py's steps
    assert type(kernel._cache).__name__ == ("FunctionCache" if _config.CACHE else "NullCache")


def test_a_custom_rule_runs_batched(batched_calls):
    """A user's ``sparseopt.Rule`` (the example's AdaBelief) takes the table-batched path too."""
    import importlib.util
    import pathlib
    spec = importlib.util.spec_from_file_location(
        "custom_optimizer", pathlib.Path(__file__).resolve().parent.parent / "examples" / "custom_optimizer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    class Custom:
        def make(self, **extra):
            return example.AdaBelief(learning_rate=0.01, **extra)
    steps = make_steps(2)
    assert_same(run(Custom(), True, steps), run(Custom(), False, steps))
    assert batched_calls


# ------------------------------------------------------------------- 16-bit tables

#: bfloat16, float16 and float32 tables in one call (rows, trailing shape, dtype, gradient
#: rows): three regions per step, one per dtype (issue 21 item 1).
TABLES16 = [(300, (7,), "bfloat16", 50), (40, (4,), np.float16, 30), (1000, (16,), "bfloat16", 200),
            (50, (), "bfloat16", 20), (60, (5,), np.float16, 25), (30, (2, 3), np.float32, 15),
            (20, (4,), np.float32, 12), (12, (3,), "bfloat16", 40)]


def run16(case, batched, steps=2, grads="float32", **options):
    """``steps`` sparse steps (Zipf ids) of the TABLES16 tables in one call each. ``grads``:
    ``"float32"`` gradients, each table's ``"own"`` dtype, or those values as ``"widened"`` float32."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(7)
    dtypes = [np.dtype(ml_dtypes.bfloat16) if d == "bfloat16" else np.dtype(d) for _, _, d, _ in TABLES16]
    tables = [rng.normal(size=(rows,) + shape).astype(dtype) for (rows, shape, _, _), dtype in zip(TABLES16, dtypes)]
    opt = case.make(seed=11, **options)
    opt._batch_tables = batched
    for _ in range(steps):
        pairs = []
        for (rows, shape, _, n), t in zip(TABLES16, tables):
            idx = np.minimum(rng.zipf(1.3, n) - 1, rows - 1)
            values = rng.normal(size=(n,) + shape).astype(np.float32)
            if grads != "float32":
                values = values.astype(t.dtype)
                values = values.astype(np.float32) if grads == "widened" else values
            pairs.append((so.IndexedSlices(values, idx, t.shape), t))
        opt.apply_gradients(pairs)
    return tables + list(opt.variables())


@pytest.mark.parametrize("name, options", [
    ("adam", {}), ("adam", dict(stochastic_rounding=False, slot_dtype="bfloat16")), ("rowwise_adagrad", {})],
    ids=["adam", "adam_rne_bfloat16_slots", "rowwise_adagrad"])
def test_16_bit_tables_run_batched_with_the_per_table_bits(name, options, threads, batched_calls):
    """Each dtype's tables in a region of their own (16-bit ones rounded with the step's
    bits by their own flat indices), bit-identical to the per-table kernels."""
    case = CASES[IDS.index(name)]
    reference = run16(case, False, **options)
    assert not batched_calls
    got = run16(case, True, **options)
    assert sorted(batched_calls[:3]) == [2, 2, 4] and len(batched_calls) == 6
    assert len(got) == len(reference)
    for x, y in zip(got, reference):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))


@pytest.mark.parametrize("name", ["adam", "rowwise_adagrad"])
def test_16_bit_gradients_run_batched_with_the_bits_of_float32_gradients(name, threads, batched_calls):
    """Tables with gradients of their own 16-bit dtype, read as bits and widened row by row
    in the region: bit-identical to the per-table kernels, and to float32 gradients of the
    same values."""
    case = CASES[IDS.index(name)]
    reference = run16(case, False, grads="widened")
    assert not batched_calls
    got = run16(case, True, grads="own")
    assert sorted(batched_calls[:3]) == [2, 2, 4] and len(batched_calls) == 6
    for x, y in zip(got, reference):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))
