"""The de-duplication plans of many tables planned on several threads (issue 21): the same
plan as the serial ``_plan_tables`` and as NumPy's stable sort per table, for any split of
the tables into runs, and the same first bad table."""

import numba
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseopt import _config
from sparseopt.kernels import dedup

# 1-70,000 rows: the counting sort (at most 4,096 rows) and two radix passes; 2**25 rows
# (indices drawn below 70,000) takes three.
ROWS = st.one_of(st.sampled_from([1, 2, 4096, 4097, 70_000, 1 << 25]), st.integers(1, 70_000))


@st.composite
def tables(draw):
    dtype = draw(st.sampled_from([np.int32, np.int64]))
    count = draw(st.integers(1, 7))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    num_rows, indices = [], []
    for _ in range(count):
        rows = draw(ROWS)
        n = draw(st.sampled_from([0, 1, 5, 300, 3000]))
        # skewed toward low rows: many duplicates, as under a Zipf batch
        idx = (min(rows, 70_000) * rng.random(n) ** 3).astype(dtype)
        num_rows.append(rows)
        indices.append(idx)
    for t in draw(st.lists(st.integers(0, count - 1), max_size=2)):  # bad indices
        if indices[t].size:
            indices[t][rng.integers(indices[t].size)] = draw(st.sampled_from([-1, num_rows[t]]))
    # a split of the tables into runs (the threads' shares): any split gives the same plan
    cuts = sorted(draw(st.lists(st.integers(0, count), max_size=4)))
    bounds = np.array([0] + cuts + [count], np.int64)
    return indices, num_rows, bounds


def serial(indices, num_rows):
    addresses = np.array([dedup.address(i) for i in indices], np.int64)
    sizes = np.array([i.size for i in indices], np.int64)
    return dedup._plan_tables(addresses, sizes, np.asarray(num_rows, np.int64), indices[0])


def first_bad(indices, num_rows):
    for t, (idx, n) in enumerate(zip(indices, num_rows)):
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            return t
    return -1


@settings(max_examples=60, deadline=None)
@given(case=tables())
def test_parallel_plan_equals_the_serial_plan_and_numpy(case):
    indices, num_rows, bounds = case
    addresses = np.array([dedup.address(i) for i in indices], np.int64)
    sizes = np.array([i.size for i in indices], np.int64)
    got = dedup._plan_tables_parallel(addresses, sizes, np.asarray(num_rows, np.int64), indices[0], bounds)
    want = serial(indices, num_rows)
    bad = first_bad(indices, num_rows)
    assert got[5] == want[5] == bad
    if bad >= 0:
        assert got[0].size == got[2].size == 0
        return
    for x, y in zip(got[:5], want[:5]):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    rows, offsets, order, ustart, ostart, _ = got
    for t, (idx, n) in enumerate(zip(indices, num_rows)):
        r, o, od, b = dedup._plan_rows_numpy(idx, n)
        assert b == -1
        assert np.array_equal(rows[ustart[t]:ustart[t + 1]], r)
        assert np.array_equal(offsets[ustart[t] + t:ustart[t + 1] + t + 1], o)
        assert np.array_equal(order[ostart[t]:ostart[t + 1]], od)


def test_plan_tables_uses_the_threads_past_its_threshold(monkeypatch):
    """Past ``MIN_IDS_PER_THREAD`` indices per thread, ``plan_tables`` plans in parallel
    (where Numba has several threads), with the serial plan's result and error."""
    calls = []
    monkeypatch.setattr(dedup, "MIN_IDS_PER_THREAD", 64)
    monkeypatch.setattr(_config, "ADAPTIVE", False)
    kernel = dedup._plan_tables_parallel

    def counted(*args):
        calls.append(args[-1])
        return kernel(*args)
    monkeypatch.setattr(dedup, "_plan_tables_parallel_run", counted)
    rng = np.random.default_rng(5)
    sizes = [(10, 40), (5000, 300), (3, 0), (20000, 500), (70_000, 64)]
    threads = numba.get_num_threads()
    for dtype in (np.int32, np.int64):
        indices = [rng.integers(0, n, m).astype(dtype) for n, m in sizes]
        num_rows = [n for n, _ in sizes]
        for x, y in zip(dedup.plan_tables(indices, num_rows), serial(indices, num_rows)):
            assert np.array_equal(x, y)
        indices[3][7] = -1
        indices[4][0] = 70_000
        assert dedup.plan_tables(indices, num_rows)[-1] == 3
        assert dedup.plan_tables(indices[:1], num_rows[:1])[-1] == -1  # one table: serial
    assert len(calls) == (4 if threads > 1 else 0)
    for bounds in calls:  # runs of tables, one per thread, covering every table
        assert bounds[0] == 0 and bounds[-1] == len(sizes) and bounds.size == min(threads, len(sizes)) + 1


def test_plans_start_on_one_thread_then_follow_the_measurements(monkeypatch):
    """The plans' thread count (``dedup._PLAN_THREADS``) is one until several measured
    faster; an optimizer's starts on several."""
    monkeypatch.setattr(_config, "ADAPTIVE", True)
    several = min(numba.get_num_threads(), 4)
    for several_first, first in ((False, 1), (True, several)):
        stats = _config.StepThreads(several_first)
        token = _config.enter_step(4, stats, per_thread=1)
        _config.leave_step(token)
        assert token[2] == first
        stats.one, stats.several = [2.0], [1.0]  # several measured faster
        token = _config.enter_step(4, stats, per_thread=1)
        _config.leave_step(token)
        assert token[2] == several
    assert dedup._PLAN_THREADS.several_first is False
