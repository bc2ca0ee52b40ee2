"""The benchmark scripts still run: every asv benchmark once on tiny inputs, and peers.py.

No timing is asserted (timings belong to the benchmarks, never to tests).
"""

import importlib
import importlib.util
import inspect
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ASV_DIR = Path(__file__).resolve().parents[1] / "asv_benchmarks"
PREFIXES = ("time_", "timeraw_", "peakmem_", "mem_", "track_")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ASV_DIR))
    try:
        import benchmarks
        modules = {name: importlib.import_module(f"benchmarks.{name}")
                   for _, name, _ in pkgutil.iter_modules(benchmarks.__path__)}
        yield modules
    finally:
        sys.path.remove(str(ASV_DIR))


def _run_timeraw(code):
    """Run a timeraw benchmark's code as asv does: timeit in a fresh interpreter."""
    stmt, setup = code if isinstance(code, tuple) else (code, "")
    runner = f"import timeit; print(timeit.timeit(stmt={stmt!r}, setup={setup!r}, number=1))"
    proc = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) > 0


def _first_params(obj):
    params = getattr(obj, "params", None)
    if params is None:
        return ()
    if params and not isinstance(params[0], (list, tuple)):
        params = (params,)
    return tuple(p[0] for p in params)


def _benchmarks(modules):
    for mod_name, mod in sorted(modules.items()):
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and obj.__module__ == mod.__name__:
                methods = [m for m in vars(obj) if m.startswith(PREFIXES)]
                if methods:
                    yield mod_name, obj, methods
            elif inspect.isfunction(obj) and name.startswith(PREFIXES):
                yield mod_name, obj, None


def test_asv_config_is_valid_json_for_existing_envs():
    import json
    import re

    text = (ASV_DIR / "asv.conf.json").read_text()
    config = json.loads(re.sub(r"^\s*//.*$", "", text, flags=re.M))  # asv allows // comments
    assert config["environment_type"] == "existing"
    assert config["repo"] == ".."
    assert (ASV_DIR / config["benchmark_dir"] / "__init__.py").exists()


def test_every_asv_benchmark_runs_once(bench, monkeypatch, tmp_path):
    common = bench["common"]
    # Tiny inputs: the module-level sizes are the benchmarks' knobs.
    monkeypatch.setattr(bench["bench_sparse"], "TABLE_ROWS", 4096)
    monkeypatch.setattr(bench["bench_sparse"].SlotMemory, "rows", 1024)
    first_optimizer = next(iter(common.OPTIMIZERS))
    monkeypatch.setattr(bench["bench_compile"], "populate_cache",
                        lambda d: common.populate_cache(d, [first_optimizer], ("sparse",)))
    ran = []
    for mod_name, obj, methods in _benchmarks(bench):
        if methods is None:  # a module-level benchmark function
            assert obj.__name__.startswith("timeraw_"), obj.__name__
            _run_timeraw(obj())
            ran.append(obj.__name__)
            continue
        params = _first_params(obj)
        instance = obj()
        cache = (instance.setup_cache(),) if hasattr(instance, "setup_cache") else ()
        for method in methods:
            fn = getattr(instance, method)
            if method.startswith("timeraw_"):
                for cache_kind in ("cold", "warm") if "cache" in getattr(obj, "param_names", ()) else (None,):
                    args = list(params)
                    if cache_kind is not None:
                        args[obj.param_names.index("cache")] = cache_kind
                    _run_timeraw(fn(*cache, *args))
            else:
                if hasattr(instance, "setup"):
                    instance.setup(*cache, *params)  # asv sets up before every benchmark
                result = fn(*cache, *params)
                if method.startswith("track_"):
                    assert result is not None and result >= 0
            ran.append(f"{obj.__name__}.{method}")
    expected = {"SparseStep.time_apply_gradients", "DenseStep.time_apply_gradients",
                "DedupPlan.time_plan_rows", "SlotMemory.peakmem_build",
                "SlotMemory.track_slot_bytes_per_table_byte", "FirstStep.timeraw_first_step",
                "timeraw_import_sparseopt"}
    assert expected <= set(ran), sorted(ran)


def test_optimizer_registry_drives_the_suites(bench):
    common, sparse = bench["common"], bench["bench_sparse"]
    assert list(common.OPTIMIZERS) == sparse.SparseStep.params[0]
    assert {"adam", "adagrad", "sgd_momentum"} <= set(common.OPTIMIZERS)
    assert common.slot_count("adam") == 2
    values, indices = common.sparse_batches(1000, 4, 500, 1)[0]
    assert values.shape == (500, 4) and indices.dtype.kind == "i"
    assert 0 <= indices.min() and indices.max() < 1000
    assert common.unique_count(indices) < 500  # Zipf(1.05): duplicates


def _peers():
    sys.path.insert(0, str(ASV_DIR))
    try:
        spec = importlib.util.spec_from_file_location("sparseopt_asv_peers", ASV_DIR / "peers.py")
        peers = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(peers)
        return peers
    finally:
        sys.path.remove(str(ASV_DIR))


def test_peers_tiny_sparseopt_and_probe(tmp_path):
    """The script runs with no peer library at all (sparseopt, the probe, the breakdown)."""
    peers = _peers()
    assert peers.main(["--tiny", "--no-compile", "--families", "sparseopt,probe",
                       "--out", str(tmp_path)]) == 0
    report = (tmp_path / "cpu.md").read_text()
    for needle in ("## Machine", "GB/s", "## Summary", "memory-touch probe", "sparseopt lazy",
                   "Where a sparseopt lazy step goes", "W3"):
        assert needle in report
    assert (tmp_path / "cpu_ratios.png").exists() or (tmp_path / "cpu_ratios.txt").exists()
    (tmp_path / "cpu.md").unlink()
    assert peers.main(["--report-only", "--out", str(tmp_path)]) == 0  # from cpu_results.json
    assert (tmp_path / "cpu.md").read_text().startswith("# sparseopt on the CPU")
    times = peers.compile_times([], 1, print)  # the import part of the compile-time section
    assert all(v["n"] == 1 and "error" not in v for v in times.values()), times


def test_peers_tiny_every_peer(tmp_path):
    """Every peer that is installed builds, passes the semantics check and is timed."""
    peers = _peers()
    assert peers.main(["--tiny", "--no-compile", "--no-breakdown", "--workloads", "W1,W3",
                       "--out", str(tmp_path)]) == 0
    report = (tmp_path / "cpu.md").read_text()
    assert "failed" not in report, [line for line in report.splitlines() if "failed" in line]
    for module, label in (("tensorflow", "Keras 3"), ("tf_keras", "tf_keras.optimizers.legacy"),
                          ("tensorflow", "tf.raw_ops.ResourceSparseApplyAdagradV2"),
                          ("tensorflow", "tf.raw_ops.ResourceApplyAdam"),
                          ("tensorflow", "LazyAdam with TF scatter ops"),
                          ("torch", "torch.optim.SparseAdam"), ("fbgemm_gpu", "EXACT_ADAGRAD")):
        if importlib.util.find_spec(module) is not None:
            assert label in report, label


def test_peers_tiny_family_rows(tmp_path):
    """``--family``: the W1 rows of the whole family, with the probe of each optimizer's slots
    (per-row for RowwiseAdagrad) and the peers that exist (TF raw ops, FBGEMM row-wise),
    merged into the report of a plain run, and kept by the next plain run."""
    import json

    peers = _peers()
    names = peers.optimizer_names()
    assert set(peers.common.OPTIMIZERS) <= set(names) and "rowwise_adagrad" in names
    assert peers.parse_args(["--optimizers", "all"]).optimizers.split(",") == names
    plain = ["--tiny", "--no-compile", "--no-breakdown", "--families", "sparseopt,probe", "--workloads", "W1",
             "--optimizers", "adam", "--out", str(tmp_path)]
    assert peers.main(plain) == 0
    family = ["--tiny", "--family", "--optimizers", "rmsprop_centered,ftrl,adadelta,rowwise_adagrad",
              "--families", "sparseopt,probe,tf_raw,fbgemm", "--out", str(tmp_path)]
    assert peers.main(family) == 0
    assert peers.main(plain) == 0  # a plain run keeps the family rows
    report = (tmp_path / "cpu.md").read_text()
    assert "failed" not in report, [line for line in report.splitlines() if "failed" in line]
    for needle in ("## Summary", "## Family, W1", "sparseopt / probe", "## Family rows in detail"):
        assert needle in report, needle
    state = json.loads((tmp_path / "cpu_results.json").read_text())
    groups = {g["optimizer"]: g for g in state["family"]["results"]}
    assert list(groups) == ["adadelta", "ftrl", "rmsprop_centered", "rowwise_adagrad"]  # registry order
    assert (groups["rowwise_adagrad"]["nslots"], groups["rowwise_adagrad"]["nrowslots"]) == (0, 1)
    assert any(i["family"] == "probe" for i in groups["rowwise_adagrad"]["impls"])
    expected = [("tensorflow", "adadelta", "tf.raw_ops.ResourceSparseApplyAdadelta"),
                ("tensorflow", "ftrl", "tf.raw_ops.ResourceSparseApplyFtrlV2"),
                ("tensorflow", "rmsprop_centered", "tf.raw_ops.ResourceSparseApplyCenteredRMSProp"),
                ("fbgemm_gpu", "rowwise_adagrad", "EXACT_ROWWISE_ADAGRAD")]
    for module, opt, label in expected:
        if importlib.util.find_spec(module) is None:
            continue
        impl = next((i for i in groups[opt]["impls"] if label in i["label"]), None)
        assert impl is not None, (opt, label, groups[opt]["absent"])
        # the same update as sparseopt's (Keras 3) rule, also with the stress hyperparameters
        assert impl["semantics"].startswith("lazy") and "legacy" not in impl["semantics"], impl["semantics"]

