"""Drop-in errors of both bridges: a tensor where a variable belongs, and a
``ParameterServerStrategy``, are refused with a clear error before anything is written."""

import os
import subprocess
import sys

import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf_keras")

import numpy as np  # noqa: E402

import sparseopt_tf  # noqa: E402
from tests.tf.helpers import free_ports  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _classes():
    return [sparseopt_tf.Adam, sparseopt_tf.SGD, sparseopt_tf.legacy.Adam, sparseopt_tf.legacy.SGD]


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("cls", _classes(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_tensor_in_place_of_a_variable(cls, mode):
    var = tf.Variable(np.ones((3, 2), np.float32))
    opt = cls(0.1)

    def step():
        tensor = tf.convert_to_tensor(np.ones((2,), np.float32))
        opt.apply_gradients([(tf.ones((3, 2)), var), (tf.ones((2,)), tensor)])

    if mode == "function":
        step = tf.function(step)
    with pytest.raises(sparseopt_tf.NotAVariableError, match=r"entry 1 .*not a variable") as info:
        step()
    # tf_keras raises NotImplementedError for this; a TypeError is what the rest of us expect.
    assert isinstance(info.value, NotImplementedError) and isinstance(info.value, TypeError)
    np.testing.assert_array_equal(var.numpy(), np.ones((3, 2), np.float32))
    assert int(opt.iterations.numpy()) == 0


def test_parameter_server_strategy_is_refused_up_front():
    """Both bridge families, in a process of its own (``tests/tf/_parameter_server_main.py``)."""
    proc = subprocess.run([sys.executable, "-m", "tests.tf._parameter_server_main",
                           *map(str, free_ports(2))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    ok = [line for line in proc.stdout.splitlines() if line.startswith("OK")]
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert ok == ["OK sparseopt_tf.optimizers", "OK sparseopt_tf.legacy"]
