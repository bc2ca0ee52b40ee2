"""Table-batched CUDA steps (issue 21): the sparse gradients of one ``apply_gradients`` call
are planned together (one launch sequence over ``(table, row)`` keys) and updated in one
launch, with the same bits as the per-table path (``_batch_tables = False``), which
``test_cuda_steps.py`` checks against the CPU kernels."""

import numpy as np
import pytest
from numba.cuda.simulator import kernel as sim_kernel

import sparseopt as so
from sparseopt import errors
from tests.cuda.conftest import SIMULATOR
from tests.cuda.helpers import dev, host
from tests.optimizer_table import CASES

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
BY_ID = {c.id: c for c in CASES}
SHAPES = [(30, 4), (50, 7), (20, 1), (40, 4)]  # tables of different rows and widths

pytestmark = pytest.mark.skipif(not SIMULATOR, reason="bit-identity and launch counts: simulator")


def tables(rng, count, dtype=np.float32):
    return [(rng.normal(size=shape) * 0.5).astype(dtype) for shape in SHAPES[:count]]


def batches(rng, shapes, k=12, index_dtypes=None):
    out = []
    for i, (rows, width) in enumerate(shapes):
        idx = rng.integers(0, rows, k)
        idx[::4] = rows // 2  # duplicates
        dtype = index_dtypes[i] if index_dtypes else np.int64
        out.append((rng.normal(size=(k, width)).astype(np.float32), idx.astype(dtype)))
    return out


def run(make, t0, steps, batched, dense=None):
    """``steps``: per step a list of ``(values, indices)``, one per table; ``dense``: a dense
    variable and its gradient, in the same calls."""
    vars_ = [dev(t) for t in t0]
    opt = make()
    opt._batch_tables = batched
    extra = [] if dense is None else [(dev(dense[1]), dense_var := dev(dense[0]))]
    for step in steps:
        pairs = [(so.IndexedSlices(dev(v), dev(i), t.shape), var) for (v, i), t, var in zip(step, t0, vars_)]
        opt.apply_gradients(pairs + extra)
    out = [host(v) for v in vars_] + [host(opt.get_slot(v, n)) for v in vars_ for n in opt.get_slot_names()]
    if dense is not None:
        out.append(host(dense_var))
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8))


@pytest.mark.parametrize("case, extra", [("sgd_momentum", {}), ("adam", dict(weight_decay=0.1)),
                                         ("adagrad", {}), ("adam", dict(seed=3))],
                         ids=["sgd_momentum", "adam_wd", "adagrad", "adam_bfloat16"])
def test_batched_steps_equal_per_table_steps(case, extra, rng):
    dtype = BF16 if "seed" in extra else np.float32
    t0 = tables(rng, 4, dtype)
    # step 2: two plans (int64 and int32 indices), each shared by two tables
    steps = [batches(rng, SHAPES), batches(rng, SHAPES, index_dtypes=[np.int64, np.int32, np.int64, np.int32])]
    dense = ((rng.normal(size=(6, 3))).astype(dtype), rng.normal(size=(6, 3)).astype(np.float32))
    make = lambda: BY_ID[case].make(**extra)  # noqa: E731
    assert_same(run(make, t0, steps, True, dense), run(make, t0, steps, False, dense))


@pytest.mark.parametrize("case, mode", [("rowwise_adagrad", "lazy"), ("adam", "exact")])
def test_shared_plans_feed_the_per_table_kernels(case, mode, rng):
    """Row-wise rules and exact mode run their own kernels per table, on views of the shared plan."""
    t0 = tables(rng, 3)
    steps = [batches(rng, SHAPES[:3]) for _ in range(2)]
    make = lambda: BY_ID[case].make(sparse_mode=mode)  # noqa: E731
    assert_same(run(make, t0, steps, True), run(make, t0, steps, False))


def count_launches(monkeypatch, fn):
    launches = []
    call = sim_kernel.FakeCUDAKernel.__call__

    def counted(self, *args):
        if not self._device:
            launches.append(self.fn.__name__)
        return call(self, *args)
    monkeypatch.setattr(sim_kernel.FakeCUDAKernel, "__call__", counted)
    fn()
    monkeypatch.setattr(sim_kernel.FakeCUDAKernel, "__call__", call)
    return launches


@pytest.mark.parametrize("batched", [True, False])
def test_launches_do_not_grow_with_the_number_of_tables(batched, rng, monkeypatch):
    """2 tables and 4 tables, the same number of indices in all (the plan's scans have as
    many levels) and total rows of the same bit length (as many radix passes)."""
    counts = []
    for count in (2, 4):
        t0 = tables(rng, count)
        vars_ = [dev(t) for t in t0]
        opt = so.Adam(learning_rate=0.01)
        opt._batch_tables = batched
        opt.build(vars_)
        step = batches(rng, SHAPES[:count], k=48 // count)
        pairs = [(so.IndexedSlices(dev(v), dev(i), t.shape), var) for (v, i), t, var in zip(step, t0, vars_)]
        counts.append(len(count_launches(monkeypatch, lambda: opt.apply_gradients(pairs))))
    if batched:
        assert counts[0] == counts[1]
    else:
        assert counts[1] > counts[0]  # the per-table path: one plan and one update per table


def test_a_bad_index_raises_as_per_table_and_writes_nothing(rng):
    t0 = tables(rng, 3)
    step = batches(rng, SHAPES[:3])
    step[2][1][5] = 99  # table 2 (20 rows)
    step[1][1][7] = -1  # table 1: the first bad table in pair order
    messages = []
    for batched in (True, False):
        vars_ = [dev(t) for t in t0]
        opt = so.Adam(learning_rate=0.01)
        opt._batch_tables = batched
        pairs = [(so.IndexedSlices(dev(v), dev(i), t.shape), var) for (v, i), t, var in zip(step, t0, vars_)]
        with pytest.raises(errors.IndexOutOfRangeError) as info:
            opt.apply_gradients(pairs)
        messages.append(str(info.value))
        assert opt.iterations == 0
        for var, t in zip(vars_, t0):
            assert np.array_equal(host(var), t)
    assert messages[0] == messages[1] and "got -1 at position 7" in messages[0]
