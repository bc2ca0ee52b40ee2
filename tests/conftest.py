import numpy as np
import pytest

# tests/cuda runs in its own process (test_cuda_simulator.py); the tf/_*_main.py scripts are
# run as subprocesses by their tests and are not collected (--doctest-modules would import them).
collect_ignore = ["cuda"]
collect_ignore_glob = ["tf/_*_main.py"]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def rel_close(actual, expected, dtype):
    """Relative agreement of SPEC §4: 1e-5 in float32, 1e-10 in float64.

    Elementwise relative error, with an absolute floor at the tolerance times the
    array's scale so that entries crossing zero do not dominate.
    """
    tol = 1e-5 if np.dtype(dtype) == np.float32 else 1e-10
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(np.max(np.abs(expected)), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)
