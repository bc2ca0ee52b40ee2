"""The device de-duplication plan equals the CPU plan: same groups, positions in increasing order."""

import numpy as np
import pytest
from numba import cuda

from sparseopt.kernels import cuda_dedup, dedup
from tests.cuda.conftest import SIMULATOR
from tests.cuda.helpers import dev


def device_plan(idx, num_rows):
    planner = cuda_dedup.Planner()
    planner.enqueue(dev(idx), num_rows, 0)
    bad, k = planner.read_info(0)
    if bad >= 0:
        return bad, None
    rows, offsets, order = (a.copy_to_host() for a in planner.result(k))
    return -1, (rows, offsets, order)


def groups(rows, offsets, order):
    return {int(r): order[offsets[u]:offsets[u + 1]].tolist() for u, r in enumerate(rows)}


@pytest.mark.parametrize("num_rows, n, seed", [
    (1, 5, 0),          # one row: every index equal
    (7, 1, 1),          # one index
    (300, 200, 2),      # a hot row and a Zipf tail
    (5000, 333, 3),     # 13-bit keys: 4 radix passes; n not a multiple of any tile
    (2**20 + 3, 64, 4),  # 21-bit keys
])
def test_plan_matches_cpu(num_rows, n, seed):
    rng = np.random.default_rng(seed)
    idx = (rng.zipf(1.2, n) - 1) % num_rows
    idx[rng.random(n) < 0.2] = num_rows // 2
    bad, plan = device_plan(idx, num_rows)
    assert bad == -1
    rows, offsets, order = plan
    assert np.all(np.diff(rows) > 0)          # unique rows, increasing
    assert offsets[0] == 0 and offsets[-1] == n
    for u in range(rows.size):                # positions of a row in increasing order
        assert np.all(np.diff(order[offsets[u]:offsets[u + 1]]) > 0)
    crows, coffsets, corder, cbad = dedup.plan_rows(idx.astype(np.int64), num_rows)
    assert cbad == -1
    assert groups(rows, offsets, order) == groups(crows, coffsets, corder)


def test_first_bad_position_is_reported():
    idx = np.array([3, 9, 10, -2, 10, 1])
    bad, plan = device_plan(idx, 10)
    assert bad == 2 and plan is None


def test_planner_reuses_and_grows_its_scratch():
    planner = cuda_dedup.Planner()
    rng = np.random.default_rng(5)
    for n in (10, 40, 7, 100):
        idx = rng.integers(0, 50, n)
        planner.enqueue(dev(idx), 50, 0)
        bad, k = planner.read_info(0)
        rows, offsets, order = (a.copy_to_host() for a in planner.result(k))
        assert bad == -1 and k == np.unique(idx).size
        assert np.array_equal(rows, np.unique(idx))
        assert np.array_equal(np.sort(order), np.arange(n))
    assert planner.capacity >= 100


def test_exclusive_scan_across_levels():
    from sparseopt.kernels import cuda as kc
    previous = kc.set_launch_config(scan_items=2)
    try:
        cfg = kc.launch_config()
        tile = cfg.threads * cfg.scan_items
        n = tile * tile + 5   # three levels of block sums
        x = np.random.default_rng(6).integers(0, 5, n).astype(np.int64)
        d = dev(x)
        levels = [cuda.device_array(s, np.int64) for s in cuda_dedup._scan_levels(n, tile)]
        assert len(levels) == 3
        cuda_dedup.exclusive_scan(d, d, levels, 0)
    finally:
        kc.set_launch_config(**vars(previous))
    expected = np.concatenate([[0], np.cumsum(x)[:-1]])
    assert np.array_equal(d.copy_to_host(), expected)


@pytest.mark.skipif(not SIMULATOR, reason="a property of the CUDA simulator's thread emulation")
def test_plan_survives_thread_switches_in_shared_memory_allocation(monkeypatch):
    """The rare failure under load: a simulated thread switched out inside the simulator's
    ``cuda.shared.array`` got a block's shared array of its own, and the prefix scans of
    the radix sort and of the row heads read uninitialized memory (unsorted keys, rows
    past the end). Here every ``np.empty`` sleeps, forcing that switch at every
    allocation; with the allocation under a lock (``conftest.py``) the plans stay right."""
    import time
    empty = np.empty

    def switching_empty(*args, **kwargs):
        time.sleep(2e-4)  # releases the GIL: other simulated threads run here
        return empty(*args, **kwargs)

    rng = np.random.default_rng(7)
    for num_rows, n in ((300, 90), (5000, 150)):
        idx = (rng.zipf(1.2, n) - 1) % num_rows
        with monkeypatch.context() as m:
            m.setattr(np, "empty", switching_empty)
            bad, plan = device_plan(idx, num_rows)
        assert bad == -1
        crows, coffsets, corder, _ = dedup.plan_rows(idx.astype(np.int64), num_rows)
        assert np.array_equal(plan[0], np.unique(idx))
        assert groups(*plan) == groups(crows, coffsets, corder)
