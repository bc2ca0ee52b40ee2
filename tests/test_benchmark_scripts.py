"""The issue-20 benchmark scripts still run: asv_benchmarks/contention.py and cold_start.py, tiny."""

import os
import subprocess
import sys

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
