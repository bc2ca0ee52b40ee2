"""Reliability of the bridge (issue 20): it behaves as the core where the core was fixed.

* ``Ftrl`` at learning rate 0 is no step (the core's rule divides by the learning
  rate; see ``sparseopt.Ftrl``): the variables and slots stay as they are and
  ``iterations`` advances, in ``sparseopt_tf.Ftrl`` and ``sparseopt_tf.legacy.Ftrl``;
* ``import sparseopt_tf`` without TensorFlow names the extra to install.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import sparseopt_tf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _classes():
    return [("keras3", sparseopt_tf.Ftrl), ("legacy", sparseopt_tf.legacy.Ftrl)]


@pytest.mark.parametrize("mode", ["lazy", "exact"])
@pytest.mark.parametrize("which", ["keras3", "legacy"])
def test_ftrl_zero_learning_rate_is_no_step(which, mode):
    cls = dict(_classes())[which]
    table0 = np.linspace(-1, 1, 24, dtype=np.float32).reshape(8, 3)
    table = tf.Variable(table0)
    dense = tf.Variable(np.ones(3, np.float32))
    opt = cls(learning_rate=0.0, beta=0.1, sparse_mode=mode)
    grads = [(tf.IndexedSlices(tf.ones((3, 3)), tf.constant([1, 4, 1]), tf.constant([8, 3])), table),
             (tf.ones(3), dense)]
    opt.apply_gradients(grads)
    assert int(opt.iterations.numpy()) == 1
    np.testing.assert_array_equal(table.numpy(), table0)
    np.testing.assert_array_equal(dense.numpy(), np.ones(3, np.float32))
    assert all(np.all(np.isfinite(np.asarray(w))) for w in opt.get_weights()[1:]
               if np.asarray(w).dtype.kind == "f")
    # the learning rate becomes positive (a warm-up): training goes on
    opt.learning_rate = 0.1
    opt.apply_gradients(grads)
    assert int(opt.iterations.numpy()) == 2
    assert not np.array_equal(table.numpy(), table0)
    assert np.all(np.isfinite(table.numpy()))


def test_import_without_tensorflow_names_the_extra():
    code = """
        import importlib.abc, sys

        class Missing(importlib.abc.MetaPathFinder):
            # TensorFlow and tf_keras are not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorflow", "tf_keras", "keras"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, Missing())
        import sparseopt   # the core needs no TensorFlow
        try:
            import sparseopt_tf
        except ImportError as exc:
            assert exc.name == "tensorflow", exc.name
            print(exc)
        else:
            raise AssertionError("sparseopt_tf imported without TensorFlow")
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'pip install "sparseopt[tf]"' in proc.stdout, proc.stdout
