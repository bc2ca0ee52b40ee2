"""tf.distribute: MirroredStrategy over two logical CPU devices, and MultiWorkerMirroredStrategy
over two local worker processes on loopback, match one device with the same global batch.

Logical devices must be configured before TensorFlow initializes, and each worker is its
own process, so the training runs in subprocesses (``tests/tf/_distributed_main.py``,
``tests/tf/_multiworker_main.py``).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")

from tests.conftest import rel_close  # noqa: E402
from tests.tf.helpers import free_ports  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_mirrored_strategy_matches_one_device():
    """Keras 3 and tf_keras models: Adam, Nadam (host state) and RowwiseAdagrad (row slots)."""
    proc = subprocess.run([sys.executable, "-m", "tests.tf._distributed_main", "mirrored", "Adam", "Nadam",
                           "RowwiseAdagrad"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("OK")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert float(lines[-1].split()[1]) < 1e-5


def test_mirrored_strategy_in_exact_mode_matches_one_device_and_dense_training():
    """Exact mode under MirroredStrategy: the replicas' copies of every variable stay
    bit-identical (checked in the subprocess), training matches one device, and it ends
    where the Keras / tf_keras optimizer given densified gradients does (dense training)."""
    proc = subprocess.run([sys.executable, "-m", "tests.tf._distributed_main", "exact", "Adam", "SGD",
                           "RMSprop", "Nadam"],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    lines = proc.stdout.splitlines()
    ok = [line for line in lines if line.startswith("OK")]
    dense = [line for line in lines if line.startswith("DENSE")]
    assert proc.returncode == 0 and ok and dense, proc.stderr[-3000:]
    assert float(ok[-1].split()[1]) < 1e-5
    assert float(dense[-1].split()[1]) < 1e-5


FEATURE_NAMES = ("Adam", "SGD", "RMSprop")
FEATURES = ("ema", "loss_scale", "mixed_float16", "multi", "accumulation")


def test_mirrored_strategy_exact_mode_with_keras_optimizer_features():
    """Exact mode under MirroredStrategy with each Keras 3 feature (EMA with overwrites,
    LossScaleOptimizer in float32 and mixed_float16, MultiOptimizer next to Keras' own
    optimizer, gradient accumulation over 4 steps) for Adam, SGD with momentum and RMSprop:
    the replicas' copies of every model and optimizer variable are bit-identical, training
    matches one device and Keras' optimizer with the same feature on densified gradients
    (in mixed_float16: under the same strategy; see ``_distributed_main.features_main``),
    and accumulation writes rows, never the table-sized accumulator."""
    proc = subprocess.run([sys.executable, "-m", "tests.tf._distributed_main", "features",
                           *FEATURE_NAMES, *FEATURES],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    cases = {tuple(line.split()[1:3]): [float(x) for x in line.split()[3:5]]
             for line in lines if line.startswith("CASE")}
    assert proc.returncode == 0 and not failed, "\n".join(failed) + proc.stderr[-3000:]
    assert set(cases) == {(n, f) for n in FEATURE_NAMES for f in FEATURES}, lines
    worst = {case: d for case, d in cases.items() if max(d) >= 1e-5}
    assert not worst, worst


# Messages of a collective runtime that cannot start (no loopback networking, ports refused).
_NO_RUNTIME = ("Failed to bind", "Address already in use", "Connection refused", "failed to connect",
               "UNAVAILABLE", "Could not start gRPC server", "DEADLINE_EXCEEDED")


def _run_workers(out_dir, timeout):
    import json
    import time
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        tf_config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), CUDA_VISIBLE_DEVICES="",
                   OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.tf._multiworker_main", str(out_dir)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                out, err = "", "timed out"
            outputs.append((p.returncode, out, err))
    finally:
        for p in procs:                       # never leave a worker behind
            if p.poll() is None:
                p.kill()
                p.wait()
    return outputs


def test_multi_worker_mirrored_strategy_matches_one_device(tmp_path):
    """Two worker processes on loopback, one replica each, half of every global batch each:
    gradients are summed across workers (sparse ones by all-gather), both replicas end
    identical, and training matches one device on the whole global batches; in lazy and
    in exact mode, and in exact mode with gradient accumulation over 4 steps (the run ends
    mid-cycle: the accumulators' partial sums are compared too) and with EMA, where it also
    matches Keras' Adam with the same feature on densified gradients."""
    outputs = _run_workers(tmp_path, timeout=150)
    ok = all(rc == 0 and "DONE" in out for rc, out, _ in outputs)
    if not ok:
        ready = all("READY" in out for _, out, _ in outputs)
        errs = "\n---\n".join(err[-2500:] for _, _, err in outputs)
        if not ready and any(m in errs for m in _NO_RUNTIME):
            pytest.skip(f"the TensorFlow collective runtime cannot start on this machine (loopback "
                        f"gRPC between two processes failed):\n{errs[-1500:]}")
        pytest.fail(f"workers failed (exit codes {[rc for rc, _, _ in outputs]}):\n{errs}")
    results = [np.load(tmp_path / f"worker{i}.npz") for i in range(2)]
    for name in ("Adam", "Nadam", "legacy.Adam", "exact.Adam", "exact.legacy.Adam",
                 "exact.Adam+accumulation", "exact.Adam+ema"):
        parts = ("table", "w") + (("acc",) if "accumulation" in name else ("ema",) if "ema" in name else ())
        for part in parts:
            mine, other = results[0][f"{name}/{part}"], results[1][f"{name}/{part}"]
            np.testing.assert_array_equal(mine, other)                 # the replicas agree bit for bit
            rel_close(mine, results[0][f"{name}/ref_{part}"], np.float32)   # = one device, global batch
            if "+" in name:     # = Keras' Adam with the feature, densified gradients, one device
                rel_close(mine, results[0][f"{name}/keras_{part}"], np.float32)
