"""The issue-20 benchmark scripts still run: asv_benchmarks/contention.py and cold_start.py, tiny."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "asv_benchmarks", script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, NUMBA_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_contention_tiny():
    out = _run("contention.py", "--steps", "4", "--sizes", "4", "--busy", "1")
    rows = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 4  # printed as measured, then in the table: 0 and 1 spinning processes


def test_cold_start_tiny():
    out = _run("cold_start.py", "--repeats", "1", "--optimizers", "SGD", "--modes", "lazy")
    assert "| SGD |" in out


def test_w4_bench_quick_tiny():
    # issue 21, item 4: the W4 script on tiny tables (core part only; FBGEMM absent or present)
    out = _run("w4_bench.py", "--quick", "--cap", "2000", "--lookups", "32", "--parts", "core",
               "--optimizers", "adam,rowwise_adagrad", "--steps", "3", "--breakdown-steps", "2")
    rows = [line for line in out.splitlines() if line.startswith("| adam |") and "26 tables /" not in line]
    assert any("1 table (control)" in line for line in rows)
    assert "26 tables vs control: max abs difference: 0.00e+00" in out
    assert "| W4 core step within 1.5x of the probe |" in out


def test_w4_bench_keras_part_tiny():
    # The Keras part wraps the bridge's host step to time its parts: it must follow the
    # bridge's code (a renamed method broke it once, unseen by the core-only run above).
    pytest.importorskip("tf_keras")
    out = _run("w4_bench.py", "--quick", "--parts", "keras", "--keras-cap", "300", "--tables", "3",
               "--keras-batch", "64", "--keras-steps", "2", "--keras-warmup", "1", "--mlps", "small")
    assert "| Keras DLRM step within 1.1x of the sink (small MLP) |" in out
