"""Hypothesis properties of the sparse pipeline, for every optimizer of the table."""

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseopt as so
from tests.optimizer_table import CASES, IDS

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def sparse_batches(draw, max_rows=40, max_k=30):
    rows = draw(st.integers(2, max_rows))
    width = draw(st.integers(1, 5))
    k = draw(st.integers(1, max_k))
    idx = np.array(draw(st.lists(st.integers(0, rows - 1), min_size=k, max_size=k)), np.int64)
    seed = draw(st.integers(0, 2**31))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(k, width)).astype(dtype)
    table = rng.normal(size=(rows, width)).astype(dtype)
    return table, values, idx


def run(case, table, steps, **extra):
    opt = case.make(**extra)
    for values, idx in steps:
        opt.apply_gradients([(so.IndexedSlices(values, idx, table.shape), table)])
    return opt


def snapshot(opt, table):
    return [table.copy()] + [w.copy() for w in opt.variables()]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@SETTINGS
@given(batch=sparse_batches())
def test_lazy_leaves_untouched_rows_bit_identical(case, batch):
    table, values, idx = batch
    opt = case.make()
    opt.build([table])
    before = {name: opt.get_slot(table, name).copy() for name in opt.get_slot_names()}
    table0 = table.copy()
    opt.apply_gradients([(so.IndexedSlices(values, idx), table)])
    untouched = np.setdiff1d(np.arange(table.shape[0]), idx)
    assert np.array_equal(table[untouched], table0[untouched])
    for name, slot in before.items():
        assert np.array_equal(opt.get_slot(table, name)[untouched], slot[untouched])


@pytest.mark.parametrize("case", CASES, ids=IDS)
@SETTINGS
@given(batch=sparse_batches())
def test_duplicates_equal_presummed_rows(case, batch):
    table, values, idx = batch
    a, b = table.copy(), table.copy()
    run(case, a, [(values, idx)])
    rows, inverse = np.unique(idx, return_inverse=True)
    summed = np.zeros((rows.size,) + values.shape[1:], values.dtype)
    np.add.at(summed, inverse, values)  # in position order, like the kernel
    run(case, b, [(summed, rows)])
    assert np.array_equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@SETTINGS
@given(batch=sparse_batches(max_rows=200, max_k=120))
def test_thread_count_changes_nothing_bit_for_bit(case, batch):
    table, values, idx = batch
    results = []
    saved = numba.get_num_threads()
    # Every thread for any step, however small (a step picks its thread count from its work).
    saved_work, so._config.MIN_WORK_PER_THREAD = so._config.MIN_WORK_PER_THREAD, 1
    saved_adaptive, so._config.ADAPTIVE = so._config.ADAPTIVE, False
    try:
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            t = table.copy()
            opt = run(case, t, [(values, idx), (values[::-1].copy(), idx)])
            dense = np.asarray(values[:1].repeat(t.shape[0], 0))
            opt.apply_gradients([(dense, t)])
            results.append(snapshot(opt, t))
    finally:
        numba.set_num_threads(saved)
        so._config.MIN_WORK_PER_THREAD = saved_work
        so._config.ADAPTIVE = saved_adaptive
    for x, y in zip(results[0], results[-1]):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@SETTINGS
@given(batch=sparse_batches(), perm_seed=st.integers(0, 1000))
def test_permuted_batch_changes_only_rounding(case, batch, perm_seed):
    table, values, idx = batch
    a, b = table.copy(), table.copy()
    run(case, a, [(values, idx)] * 3)
    perm = np.random.default_rng(perm_seed).permutation(idx.size)
    run(case, b, [(values[perm], idx[perm])] * 3)
    tol = 1e-4 if table.dtype == np.float32 else 1e-9
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


BAD_INPUTS = {
    "index_too_large": lambda t, v, i: (so.IndexedSlices(v, np.append(i, t.shape[0])[1:]), t),
    "negative_index": lambda t, v, i: (so.IndexedSlices(v, np.append(i, -1)[1:]), t),
    "float_indices": lambda t, v, i: (so.IndexedSlices(v, i.astype(np.float64)), t),
    "length_mismatch": lambda t, v, i: (so.IndexedSlices(v, i[:-1]), t),
    "row_shape": lambda t, v, i: (so.IndexedSlices(np.concatenate([v, v], 1), i), t),
    "dtype": lambda t, v, i: (so.IndexedSlices(v.astype(np.float16), i), t),
    "dense_shape": lambda t, v, i: (t[:1].copy(), t),
}


@pytest.mark.parametrize("case", CASES, ids=IDS)
@SETTINGS
@given(batch=sparse_batches(), bad=st.sampled_from(sorted(BAD_INPUTS)))
def test_rejected_input_changes_nothing(case, batch, bad):
    table, values, idx = batch
    other = np.random.default_rng(0).normal(size=(3, 2)).astype(table.dtype)
    opt = run(case, table, [(values, idx)])  # some state first
    opt.apply_gradients([(np.ones_like(other), other)])
    before = snapshot(opt, table) + [other.copy()]
    with pytest.raises(so.errors.SparseoptError):
        # The good pair comes first: it must not be written either.
        opt.apply_gradients([(np.ones_like(other), other), BAD_INPUTS[bad](table, values, idx)])
    after = snapshot(opt, table) + [other.copy()]
    assert len(before) == len(after)
    for x, y in zip(before, after):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@SETTINGS
@given(batch=sparse_batches())
def test_config_and_weights_round_trip_continues_identically(case, batch):
    table, values, idx = batch
    a = table.copy()
    opt = run(case, a, [(values, idx)] * 2)
    b = a.copy()
    clone = type(opt).from_config(opt.get_config())
    clone.build([b])
    clone.set_weights(opt.get_weights())
    steps = [(values * 0.5, idx), (values, idx[::-1].copy())]
    for values_i, idx_i in steps:
        opt.apply_gradients([(so.IndexedSlices(values_i, idx_i), a)])
        clone.apply_gradients([(so.IndexedSlices(values_i, idx_i), b)])
    assert np.array_equal(a, b)
    for x, y in zip(opt.get_weights(), clone.get_weights()):
        assert np.array_equal(x, y)


@given(counts=st.lists(st.integers(1, 2000), min_size=0, max_size=300),
       parts=st.integers(1, 300), row_cost=st.integers(0, 8))
@settings(max_examples=200, deadline=None)
def test_balanced_parts_cover_the_rows_in_runs_of_equal_cost(counts, parts, row_cost):
    """The sparse kernels' split of the unique rows into contiguous runs: every row in
    exactly one run, in order, and no run costs more than an equal share plus one row."""
    from sparseopt.kernels import cpu
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    bounds = cpu.balanced_parts(offsets, parts, row_cost)
    assert bounds.shape == (parts + 1,)
    assert bounds[0] == 0 and bounds[-1] == len(counts)
    assert np.all(np.diff(bounds) >= 0)
    cost = np.asarray(counts, np.int64) + row_cost
    share = cost.sum() / parts
    largest = cost.max(initial=0)
    for t in range(parts):
        assert cost[bounds[t]:bounds[t + 1]].sum() <= share + largest


def reference_plan(idx):
    """The plan from NumPy: unique rows (increasing) and a stable sort of the positions."""
    order = np.argsort(idx, kind="stable")
    rows, counts = np.unique(idx, return_counts=True)
    return rows, np.concatenate([[0], np.cumsum(counts)]), order


@given(bits=st.integers(0, 36), n=st.integers(0, 400), hot=st.floats(0, 0.9),
       dtype=st.sampled_from([np.int32, np.int64]), seed=st.integers(0, 2**31))
@settings(max_examples=150, deadline=None)
def test_plan_rows_groups_the_positions_of_each_row_in_order(bits, n, hot, dtype, seed):
    """The de-duplication plan (a counting sort up to 4096 rows, then one, two or three
    radix passes; the merge sort of tables of 2**31 rows or more) equals NumPy's: unique
    rows increasing, positions increasing."""
    from sparseopt.kernels import dedup
    num_rows = int(np.random.default_rng(seed).integers(1, 2**bits + 1)) if bits else 1
    if dtype is np.int32:
        num_rows = min(num_rows, 2**31 - 1)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num_rows, n).astype(dtype)
    idx[rng.random(n) < hot] = num_rows - 1  # a hot row with many duplicates
    rows, offsets, order, bad = dedup.plan_rows(idx, num_rows)
    assert bad == -1
    for got, want in zip((rows, offsets, order), reference_plan(idx)):
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


@st.composite
def table_indices(draw):
    """1-6 tables' index arrays of one dtype: row counts for the counting sort (up to 4096)
    and for the radix passes, 0-300 ids each (runs of the counting sort's lanes of any
    length), sometimes a hot row."""
    dtype = draw(st.sampled_from([np.int32, np.int64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    tables = []
    for _ in range(draw(st.integers(1, 6))):
        num_rows = draw(st.one_of(st.integers(1, 40), st.integers(1, 4097), st.integers(4097, 2**25)))
        n = draw(st.integers(0, 300))
        idx = rng.integers(0, num_rows, n).astype(dtype)
        idx[rng.random(n) < draw(st.floats(0, 0.9))] = rng.integers(0, num_rows)
        tables.append((idx, num_rows))
    return tables


@given(tables=table_indices(), bad=st.data())
@settings(max_examples=100, deadline=None)
def test_plan_tables_equals_each_tables_plan(tables, bad):
    """The plans of several tables made in one call (the table-batched step) are each
    table's NumPy plan, at the places ``ustart``/``ostart`` say; with indices out of range
    in some tables, the first such table is reported (every table's range is checked)."""
    from sparseopt.kernels import dedup
    indices = [idx for idx, _ in tables]
    num_rows = [m for _, m in tables]
    rows, offsets, order, ustart, ostart, failed = dedup.plan_tables(indices, num_rows)
    assert failed == -1
    assert ustart[-1] == rows.size and ostart[-1] == order.size == sum(i.size for i in indices)
    for t, idx in enumerate(indices):
        want = reference_plan(idx)
        np.testing.assert_array_equal(rows[ustart[t]:ustart[t + 1]], want[0])
        np.testing.assert_array_equal(offsets[ustart[t] + t:ustart[t + 1] + t + 1], want[1])
        np.testing.assert_array_equal(order[ostart[t]:ostart[t + 1]], want[2])
    spoilt = bad.draw(st.lists(st.integers(0, len(tables) - 1), min_size=1, max_size=3, unique=True))
    spoilt = [t for t in spoilt if indices[t].size]
    for t in spoilt:
        idx = indices[t]
        for _ in range(bad.draw(st.integers(1, 3))):  # a bad index anywhere, maybe several
            idx[bad.draw(st.integers(0, idx.size - 1))] = bad.draw(st.sampled_from([-1, num_rows[t]]))
    failed = dedup.plan_tables(indices, num_rows)[-1]
    assert failed == (min(spoilt) if spoilt else -1)
    for t in spoilt:  # and each bad table's own plan names its first bad position
        want = int(np.flatnonzero((indices[t] < 0) | (indices[t] >= num_rows[t]))[0])
        assert dedup.plan_rows(indices[t], num_rows[t])[-1] == want


@pytest.mark.parametrize("num_rows", [10, 5000, 2**31 + 7])
@pytest.mark.parametrize("bad_value", [-1, "num_rows"])
def test_plan_rows_reports_the_first_index_out_of_range(num_rows, bad_value):
    from sparseopt.kernels import dedup
    idx = np.array([3, 9, 1, 4, 9], np.int64)
    idx[2] = num_rows if bad_value == "num_rows" else bad_value
    idx[4] = -5
    rows, offsets, order, bad = dedup.plan_rows(idx, num_rows)
    assert bad == 2
    assert rows.size == 0 and order.size == 0 and offsets.tolist() == [0]


@given(x=st.one_of(st.floats(width=64), st.floats(3.4e38, 3.5e38), st.floats(-3.5e38, -3.4e38),
                   st.floats(-1e-44, 1e-44), st.integers(-2**80, 2**80)))
@settings(max_examples=500, deadline=None)
def test_f32_rounds_as_numpy(x):
    """``f32`` (through ``struct``) gives the bits of ``float(np.float32(x))``: rounding to
    nearest, subnormals, the values that round past float32's range (infinity), NaN."""
    from sparseopt.rules._floatx import f32
    with np.errstate(over="ignore"):
        want = float(np.float32(x))
    got = f32(x)
    assert np.float64(got).tobytes() == np.float64(want).tobytes()
