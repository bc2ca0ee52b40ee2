"""Reliability (issue 20, items 9-11): the environments a step must survive.

* a read-only install where Numba finds no writable cache location: the package
  imports and steps, compiling without the disk cache, with one warning (item 9);
* ``NUMBA_DISABLE_JIT=1``, how people debug Numba code: every optimizer runs as
  plain Python, lazy and exact, and gives the jitted results (item 10);
* threads: two optimizers stepping in two threads at once, under each threading layer
  Numba has here, and one optimizer entered from two threads at once, which raises
  :class:`~sparseopt.errors.ConcurrentUseError` instead of corrupting it (item 11).

Each runs in a subprocess: the environment variables are read when Numba starts.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

from tests.optimizer_table import CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, env=None, cwd=ROOT, timeout=600):
    env = dict(os.environ, **(env or {}))
    env.setdefault("NUMBA_NUM_THREADS", "2")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------- 9. read-only install, no cache location

def _read_only_copy(tmp):
    """A copy of the ``sparseopt`` package where no cache location is writable, also for
    root (whom permission bits do not stop): a *file* named ``__pycache__`` in every
    package folder, so Numba's in-tree cache folder cannot be created; the folders are
    also made read-only for everyone else."""
    site = os.path.join(tmp, "site")
    shutil.copytree(os.path.join(ROOT, "sparseopt"), os.path.join(site, "sparseopt"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for folder, _, _ in os.walk(site):
        open(os.path.join(folder, "__pycache__"), "w").close()
    for folder, _, files in os.walk(site, topdown=False):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)
    blocker = os.path.join(tmp, "not_a_folder")
    open(blocker, "w").close()
    return site, blocker


def _make_writable(tmp):
    for folder, dirs, files in os.walk(tmp):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o755)


def test_read_only_install_without_cache_location_imports_and_steps():
    tmp = tempfile.mkdtemp(prefix="sparseopt_ro_")
    try:
        site, blocker = _read_only_copy(tmp)
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
        env.update(PYTHONPATH=site, PYTHONDONTWRITEBYTECODE="1", HOME=blocker,
                   XDG_CACHE_HOME=os.path.join(blocker, "cache"), NUMBA_NUM_THREADS="2")
        code = """
            import warnings
            warnings.simplefilter("always")
            with warnings.catch_warnings(record=True) as caught:
                import numpy as np
                import sparseopt as so
                from sparseopt import _config
                t = np.ones((10, 4), np.float32)
                so.Adam(0.1).apply_gradients([(so.IndexedSlices(np.ones((3, 4), np.float32),
                                                                np.array([1, 3, 1])), t)])
            assert so.__file__.startswith(%r), so.__file__
            assert not _config.CACHE
            ours = [w for w in caught if issubclass(w.category, _config.CacheUnavailableWarning)]
            assert len(ours) == 1, [str(w.message) for w in caught]
            assert "NUMBA_CACHE_DIR" in str(ours[0].message)
            assert np.all(t[[1, 3]] < 1) and np.all(t[[0, 2]] == 1)
            print("ok")
        """ % site
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
    finally:
        _make_writable(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def test_writable_cache_location_keeps_the_cache_on():
    proc = _python("""
        import warnings
        warnings.simplefilter("error")
        from sparseopt import _config
        print(_config.CACHE)
    """, env={"SPARSEOPT_NUMBA_CACHE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "True"


# ------------------------------------------------------------------ 10. NUMBA_DISABLE_JIT=1

#: Case ids of tests/optimizer_table.py run in the NUMBA_DISABLE_JIT test (every one).
NOJIT_IDS = [c.id for c in CASES]


def nojit_workload(case_id, mode, dtype):
    """Four steps of one optimizer on a small table (duplicates, idle rows, a dense
    variable), then ``flush()``: the table and the dense variable."""
    import sparseopt as so
    case = next(c for c in CASES if c.id == case_id)
    rng = np.random.default_rng(7)
    table = rng.normal(size=(6, 3)).astype(dtype)
    dense = rng.normal(size=(4,)).astype(dtype)
    opt = case.make(sparse_mode=mode)
    for idx in ([1, 4, 1], [0, 2], [5, 5, 5], [1]):
        idx = np.array(idx)
        g = so.IndexedSlices(rng.normal(size=(idx.size, 3)).astype(dtype), idx, table.shape)
        opt.apply_gradients([(g, table), (rng.normal(size=dense.shape).astype(dtype), dense)])
    opt.flush()
    return table, dense


def nojit_wide_batch(case_id, mode):
    """One step on 900 unique rows: each of the kernels' 256 runs gets several rows,
    so the prefetch of the row two ahead runs too."""
    import sparseopt as so
    case = next(c for c in CASES if c.id == case_id)
    rng = np.random.default_rng(3)
    table = rng.normal(size=(1000, 2))
    idx = rng.permutation(1000)[:900]
    opt = case.make(sparse_mode=mode)
    for _ in range(2):
        opt.apply_gradients([(so.IndexedSlices(rng.normal(size=(900, 2)), idx, table.shape), table)])
    return table


def test_numba_disable_jit_runs_every_optimizer_like_the_jitted_kernels(tmp_path):
    out = tmp_path / "nojit.npz"
    proc = _python(f"""
        import numpy as np
        from numba import config
        from tests import test_runtime_environment as t
        assert config.DISABLE_JIT
        arrays = {{}}
        for case_id in t.NOJIT_IDS:
            for mode in ("lazy", "exact"):
                for dtype in (np.float32, np.float64):
                    table, dense = t.nojit_workload(case_id, mode, dtype)
                    key = f"{{case_id}}-{{mode}}-{{np.dtype(dtype).name}}"
                    arrays[key + "-table"], arrays[key + "-dense"] = table, dense
        for case_id in ("adam", "rowwise_adagrad"):
            for mode in ("lazy", "exact"):
                arrays[f"wide-{{case_id}}-{{mode}}"] = t.nojit_wide_batch(case_id, mode)
        np.savez({str(out)!r}, **arrays)
    """, env={"NUMBA_DISABLE_JIT": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    for case_id in NOJIT_IDS:
        for mode in ("lazy", "exact"):
            for dtype in (np.float32, np.float64):
                key = f"{case_id}-{mode}-{np.dtype(dtype).name}"
                table, dense = nojit_workload(case_id, mode, dtype)
                tol = 2e-6 if dtype == np.float32 else 1e-13
                np.testing.assert_allclose(got[key + "-table"], table, rtol=tol, atol=tol, err_msg=key)
                np.testing.assert_allclose(got[key + "-dense"], dense, rtol=tol, atol=tol, err_msg=key)
    for case_id in ("adam", "rowwise_adagrad"):
        for mode in ("lazy", "exact"):
            np.testing.assert_allclose(got[f"wide-{case_id}-{mode}"], nojit_wide_batch(case_id, mode),
                                       rtol=1e-13, atol=1e-13)


# ------------------------------------------------------------------------------ 11. threads

TWO_THREADS = """
    import sys, threading
    import numba
    import numpy as np
    import sparseopt as so
    from sparseopt import _config

    try:
        numba.get_num_threads()    # starts the threading layer
        layer = numba.threading_layer()
    except ValueError as exc:      # this layer's runtime is not installed here
        print("unavailable", exc)
        sys.exit(0)

    def train(seed, mode, out):
        rng = np.random.default_rng(seed)
        table = np.zeros((3000, 16), np.float32)
        dense = np.zeros(64, np.float32)
        opt = so.Adam(0.01, sparse_mode=mode)
        for _ in range(60):
            idx = rng.integers(0, 3000, 4000)
            g = so.IndexedSlices(rng.normal(size=(4000, 16)).astype(np.float32), idx)
            opt.apply_gradients([(g, table), (rng.normal(size=64).astype(np.float32), dense)])
        opt.flush()
        out[seed] = (table, dense, opt.iterations)

    for mode in ("lazy", "exact"):
        # big steps (several threads each), so that parallel regions overlap
        _config.MIN_WORK_PER_THREAD, _config.ADAPTIVE = 1, False
        alone, together = {}, {}
        for seed in (1, 2):
            train(seed, mode, alone)
        threads = [threading.Thread(target=train, args=(seed, mode, together)) for seed in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for seed in (1, 2):
            assert together[seed][2] == 60
            assert np.array_equal(together[seed][0], alone[seed][0]), (mode, seed)
            assert np.array_equal(together[seed][1], alone[seed][1]), (mode, seed)
    print("ok", layer)
"""


@pytest.mark.parametrize("layer", ["omp", "tbb", "workqueue"])
def test_two_optimizers_step_in_two_threads(layer):
    proc = _python(TWO_THREADS, env={"NUMBA_THREADING_LAYER": layer, "NUMBA_NUM_THREADS": "2"})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    if proc.stdout.startswith("unavailable"):
        pytest.skip(f"Numba's {layer} threading layer cannot load here")
    assert proc.stdout.split() == ["ok", layer]


def _small_step(opt, table, constraint=None):
    import sparseopt as so
    g = so.IndexedSlices(np.ones((3, table.shape[1]), table.dtype), np.array([1, 4, 1]))
    kwargs = {"constraints": {id(table): constraint}} if constraint else {}
    return opt.apply_gradients([(g, table)], **kwargs)


def test_one_optimizer_entered_from_two_threads_raises_and_changes_nothing():
    import threading

    import sparseopt as so
    from sparseopt import errors

    table = np.zeros((8, 3), np.float32)
    inside, release = threading.Event(), threading.Event()

    def blocking(pairs):      # the first thread waits inside its step
        inside.set()
        assert release.wait(60)
        return pairs

    opt = so.SGD(0.1, momentum=0.9, gradient_transformers=[blocking])
    first = threading.Thread(target=_small_step, args=(opt, table))
    first.start()
    try:
        assert inside.wait(60)
        before = [table.copy()] + [w.copy() for w in opt.variables()]
        for call in (lambda: _small_step(opt, table), opt.flush, lambda: opt.catch_up(table, [1]),
                     lambda: opt.set_weights(opt.get_weights())):
            with pytest.raises(errors.ConcurrentUseError, match="another thread"):
                call()
        after = [table.copy()] + [w.copy() for w in opt.variables()]
        assert all(np.array_equal(a, b) for a, b in zip(before, after))
    finally:
        release.set()
        first.join()
    assert opt.iterations == 1
    assert _small_step(opt, table) == 2  # the guard is released: the next step runs
    np.testing.assert_array_equal(table[[0, 2, 3]], 0)


def test_a_step_nested_in_a_step_of_the_same_optimizer_raises():
    import sparseopt as so
    from sparseopt import errors

    table = np.zeros((8, 3), np.float32)
    opt = so.Adam(0.1)

    def nested(pairs):
        _small_step(opt, table)
        return pairs

    opt.gradient_transformers = [nested]
    with pytest.raises(errors.ConcurrentUseError, match="inside apply_gradients"):
        _small_step(opt, table)
    assert opt.iterations == 0
    opt.gradient_transformers = []
    assert _small_step(opt, table) == 1


def test_a_deep_copy_of_an_optimizer_has_its_own_guard():
    import copy

    import sparseopt as so

    opt = so.Adam(0.1)
    table = np.zeros((8, 3), np.float32)
    _small_step(opt, table)
    clone = copy.deepcopy(opt)
    assert clone._guard is not opt._guard
    assert _small_step(clone, clone_table := table.copy()) == 2 and clone_table[1, 0] != 0


# ------------------------------------------------------- 12. thread count chosen per step

needs_two_threads = pytest.mark.skipif(
    __import__("numba").config.NUMBA_NUM_THREADS < 2, reason="Numba runs one thread here")


@needs_two_threads
def test_small_step_runs_on_one_thread_big_step_on_every_thread_count_restored():
    import numba

    import sparseopt as so
    from sparseopt import _config

    seen = []

    def record(rows):
        seen.append(numba.get_num_threads())
        return rows

    table = np.zeros((8, 3), np.float32)
    before = numba.get_num_threads()
    _small_step(so.Adam(0.1), table, record)
    assert seen[-1] == 1 and numba.get_num_threads() == before
    saved = _config.MIN_WORK_PER_THREAD, _config.ADAPTIVE
    _config.MIN_WORK_PER_THREAD, _config.ADAPTIVE = 1, False
    try:
        _small_step(so.Adam(0.1), table, record)
        assert seen[-1] == before
        so.set_num_threads(1)             # the user's cap
        _small_step(so.Adam(0.1), table, record)
        assert seen[-1] == 1 and so.get_num_threads() == 1
    finally:
        so.set_num_threads(None)
        _config.MIN_WORK_PER_THREAD, _config.ADAPTIVE = saved
    assert numba.get_num_threads() == before
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError):
            so.set_num_threads(bad)


@needs_two_threads
def test_big_steps_measure_and_run_the_faster_thread_count(monkeypatch):
    """A fake clock: steps on several threads take 10x longer than on one (a busy core),
    so after its first probe the optimizer runs big steps on one thread and tries several
    again at doubling intervals; when several are faster again, it goes back to them."""
    from sparseopt import _config

    now = [0.0]
    monkeypatch.setattr(_config.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(_config, "ADAPTIVE", True)
    stats = _config.StepThreads()
    work = 4 * _config.MIN_WORK_PER_THREAD
    cost = {1: 1.0, "several": 10.0}

    def step():
        token = _config.enter_step(work, stats)
        n = token[2]
        now[0] += work * (cost[1] if n == 1 else cost["several"])
        _config.leave_step(token)
        return n

    choices = [step() for _ in range(200)]
    assert choices[0] > 1                      # several threads first
    assert choices[15] == 1                    # the first probe: one thread, which wins
    several = [i for i, n in enumerate(choices) if n > 1 and i > 15]
    assert several == [31, 63, 127]            # probes of several threads, at doubling intervals
    cost[1], cost["several"] = 10.0, 1.0       # the other process has stopped
    later = [step() for _ in range(200)]
    assert later[-1] > 1 and sum(n > 1 for n in later[-50:]) >= 45
