"""Exact mode's table-batched step (issue 21): the fused catch-up + update of the sparse
variables of one call that share a kernel configuration run in one parallel region
(``backends.cpu.run_exact_tables``), with the same bits as table by table (``_batch_tables =
False``, the per-table exact kernel of ``tests/test_exact.py``, tested there against the
dense rule).

Few kernel configurations (each compiles its kernels cold): Adam (the series catch-up,
float32 and float64 tables: a region per dtype), SGD with momentum (a closed form), Ftrl
(its catch-up is one recompute with the coefficients of the last idle step, which a
learning-rate schedule makes differ from step to step: each table's own ``c_idle``), and
bfloat16 Adam tables with stochastic rounding beside float32 ones (each table's catch-up
rounded with the bits of its last idle step). The rows of each table fall behind by several steps before they are touched
again (``assert_rows_fall_behind``), so the catch-ups run inside the region.
"""

import numpy as np
import pytest

import sparseopt as so
from sparseopt import _config
from sparseopt.backends import cpu as cpu_backend
from tests.optimizer_table import CASES, IDS

#: (rows, trailing shape, dtype, gradient rows per step): widths 1-16, a 1-D and a 3-D
#: variable, an empty gradient, one of a single row.
TABLES = [
    (40, (4,), np.float32, 30),
    (300, (7,), np.float32, 50),
    (50, (), np.float32, 20),
    (60, (5,), np.float32, 0),
    (5, (1,), np.float32, 1),
    (1000, (16,), np.float32, 200),
    (20, (2, 3), np.float64, 25),
    (12, (6,), np.float64, 12),
]
FLOAT32 = [t for t in TABLES if t[2] == np.float32]

#: (case, options, tables, regions per step: tables in each; the empty gradient runs no kernel).
KERNEL_CASES = [("adam", {}, TABLES, [2, 5]), ("sgd_momentum", {}, FLOAT32, [5]),
                ("ftrl", dict(learning_rate=so.schedules.ExponentialDecay(0.1, 1, 0.8)), FLOAT32, [5])]

#: A short history: the ring is full every few steps and each table is caught up whole
#: (``_exact._push``), so the region sees tables with ``floor > 0``.
HISTORY = 4
STEPS = 7


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    """Steps on 1 thread, or on 2 (each step big enough for several, not measured)."""
    monkeypatch.setattr(_config, "MIN_WORK_PER_THREAD", 1)
    monkeypatch.setattr(_config, "ADAPTIVE", False)
    so.set_num_threads(request.param)
    yield request.param
    so.set_num_threads(None)


@pytest.fixture
def regions(monkeypatch):
    """The sizes of the table-batched exact regions run (so a test knows they ran)."""
    sizes = []
    original = cpu_backend.run_exact_tables

    def counted(rule, group, *args):
        sizes.append(len(group))
        return original(rule, group, *args)
    monkeypatch.setattr(cpu_backend, "run_exact_tables", counted)
    return sizes


def make_steps(tables, seed=1):
    """``[[(values, indices) per table] per step]``: Zipf-like ids (duplicates, rows left idle
    for several steps), float32 gradients for 16-bit tables."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(STEPS):
        grads = []
        for rows, shape, dtype, n in tables:
            idx = np.minimum(rng.zipf(1.3, n) - 1, rows - 1)
            grads.append((rng.normal(size=(n,) + shape).astype(dtype if dtype in (np.float32, np.float64)
                                                                  else np.float32), idx))
        steps.append(grads)
    return steps


def assert_rows_fall_behind(tables, steps):
    """Some row of every table with gradients is touched, idle for at least two steps, then
    touched again (a catch-up over several steps in the kernel); the test is not vacuous."""
    for t, (rows, _, _, n) in enumerate(tables):
        if n < 2:
            continue
        touched = [set(step[t][1].tolist()) for step in steps]
        assert any(r in touched[a] and r in touched[b] and not any(r in touched[s] for s in range(a + 1, b))
                   for a in range(STEPS) for b in range(a + 3, STEPS) for r in touched[a]), t


def initial(tables):
    rng = np.random.default_rng(0)
    return [(rng.normal(size=(rows,) + shape) * 0.5).astype(dtype) for rows, shape, dtype, _ in tables]


def run(name, tables, steps, batched, **options):
    """The steps in one call each (with a dense variable); the dense variable, the tables and
    every slot before a flush, then after it."""
    rng = np.random.default_rng(1)
    arrays = initial(tables)
    dense = rng.normal(size=(6, 5)).astype(np.float32)
    opt = CASES[IDS.index(name)].make(sparse_mode="exact", exact_history=HISTORY, **options)
    opt._batch_tables = batched
    for step in steps:
        pairs = [(so.IndexedSlices(v, i, a.shape), a) for (v, i), a in zip(step, arrays)]
        pairs.insert(2, (rng.normal(size=(6, 5)).astype(np.float32), dense))
        opt.apply_gradients(pairs)
    before_flush = [a.copy() for a in [dense] + arrays + list(opt.variables())]
    opt.flush()
    return before_flush + [dense] + arrays + list(opt.variables())


def assert_same_bits(got, expected):
    assert len(got) == len(expected)
    for x, y in zip(got, expected):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))


@pytest.mark.parametrize("name, options, tables, per_step", KERNEL_CASES, ids=[c[0] for c in KERNEL_CASES])
def test_exact_batched_step_is_bit_identical_to_the_per_table_path(name, options, tables, per_step, threads,
                                                                   regions):
    steps = make_steps(tables)
    assert_rows_fall_behind(tables, steps)
    reference = run(name, tables, steps, batched=False, **options)
    assert not regions
    got = run(name, tables, steps, batched=True, **options)
    assert len(regions) == STEPS * len(per_step) and sorted(regions[:len(per_step)]) == per_step
    assert_same_bits(got, reference)
    flushed = got[len(got) // 2 + 1:]
    for t, (table, start) in enumerate(zip(flushed, initial(tables))):
        if tables[t][3]:  # the tables with gradients moved (the test is not vacuous)
            assert not np.array_equal(table, start)


#: bfloat16 tables (stochastic rounding) beside float32 ones: a region per dtype.
TABLES16 = [(300, (7,), "bfloat16", 50), (40, (4,), np.float32, 30), (1000, (16,), "bfloat16", 200),
            (50, (), "bfloat16", 20), (20, (3,), np.float32, 12)]


def test_16_bit_tables_run_batched_with_the_per_table_bits(threads, regions):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    tables = [(rows, shape, np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else dtype, n)
              for rows, shape, dtype, n in TABLES16]
    steps = make_steps(tables, seed=5)
    assert_rows_fall_behind(tables, steps)
    reference = run("adam", tables, steps, batched=False, seed=11)
    assert not regions
    got = run("adam", tables, steps, batched=True, seed=11)
    assert len(regions) == 2 * STEPS and sorted(regions[:2]) == [2, 3]
    assert_same_bits(got, reference)
