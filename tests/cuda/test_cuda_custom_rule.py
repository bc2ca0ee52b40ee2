"""A user's ``sparseopt.Rule`` on CUDA arrays: the example's AdaBelief
(``examples/custom_optimizer.py``) gives the CPU kernels' results on the device, dense,
sparse, lazy and exact (``tests/test_custom_rule.py`` checks the CPU against the formula)."""

import importlib.util
import pathlib

import numpy as np
import pytest

import sparseopt as so
from tests.cuda.helpers import assert_state_matches, dev, dev_slices, sparse_batch

_spec = importlib.util.spec_from_file_location(
    "custom_optimizer", pathlib.Path(__file__).resolve().parents[2] / "examples" / "custom_optimizer.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

ROWS, WIDTH, K = 60, 4, 40


@pytest.mark.parametrize("sparse_mode", ["lazy", "exact"])
def test_custom_rule_on_the_device_matches_cpu(sparse_mode, rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    steps = [sparse_batch(rng, ROWS, WIDTH, K, np.float32), rng.normal(size=(ROWS, WIDTH)).astype(np.float32),
             sparse_batch(rng, ROWS, WIDTH, K // 2, np.float32), sparse_batch(rng, ROWS, WIDTH, 3, np.float32)]
    cpu_var, gpu_var = p0.copy(), dev(p0)
    make = lambda: example.AdaBelief(learning_rate=0.01, weight_decay=0.01, sparse_mode=sparse_mode)  # noqa: E731
    cpu_opt, gpu_opt = make(), make()
    for step in steps:
        if isinstance(step, tuple):
            cpu_opt.apply_gradients([(so.IndexedSlices(step[0], step[1], p0.shape), cpu_var)])
            gpu_opt.apply_gradients([(dev_slices(step[0], step[1], p0.shape), gpu_var)])
        else:
            cpu_opt.apply_gradients([(step, cpu_var)])
            gpu_opt.apply_gradients([(dev(step), gpu_var)])
    if sparse_mode == "exact":
        cpu_opt.flush()
        gpu_opt.flush()
    assert_state_matches(gpu_opt, gpu_var, cpu_opt, cpu_var)
