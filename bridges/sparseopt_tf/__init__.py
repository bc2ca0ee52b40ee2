"""sparseopt_tf: sparseopt's Numba kernels behind the Keras optimizer interfaces.

* ``sparseopt_tf.<Name>`` (``Adam``, ``SGD``, ... one per optimizer of
  :mod:`sparseopt.optimizers`): Keras 3 ``keras.optimizers.Optimizer`` subclasses
  (TensorFlow backend), for ``model.compile`` / ``model.fit`` and custom loops;
* ``sparseopt_tf.legacy.<Name>``: ``tf_keras.optimizers.legacy.Optimizer``
  (Keras 2 ``OptimizerV2``) subclasses;
* :func:`keras_optimizer`: the Keras 3 class of your own core optimizer
  (:class:`sparseopt.Rule`); ``sparseopt_tf.legacy.keras_optimizer``: its tf_keras class;
* for ``sparse_mode="exact"``: :class:`Embedding` and :func:`embedding_lookup` (lookups
  that read caught-up rows) and the :class:`ExactFlush` callback.

An ``IndexedSlices`` gradient updates only the touched rows of the variable and its
slots, in place in the variables' own buffers (see :mod:`sparseopt_tf._handover`), and
nothing in a step touches the whole table: in the Keras 3 classes, clipping sees the
de-duplicated rows (a sparse gradient is clipped as its dense equivalent) and a
variable's ``constraint`` runs on the touched rows only. Host state of the core
optimizer (Nadam's ``u_product``) lives in a float64 variable of the optimizer, saved
and restored with it. ``tf.train.Checkpoint`` refuses (before writing anything) a
checkpoint of another optimizer or of other shapes.
"""

_INSTALL = 'pip install "sparseopt[tf]"'


def _missing(exc, what):
    """``exc`` (a failed import of TensorFlow or tf_keras) again, saying which extra installs it."""
    return ModuleNotFoundError(
        f"sparseopt_tf needs {what}, which is not installed ({exc}). Install sparseopt with its "
        f"TensorFlow extra: {_INSTALL} (tensorflow and tf-keras; the core, `import sparseopt`, "
        f"needs neither).", name=exc.name)


try:
    import tensorflow  # noqa: F401  (first, so that a missing TensorFlow is named as such)
except ModuleNotFoundError as exc:
    if exc.name is None or exc.name.split(".")[0] != "tensorflow":
        raise
    raise _missing(exc, "TensorFlow") from exc

from sparseopt_tf import optimizers
from sparseopt_tf._exact import ExactModeNotSupportedError
from sparseopt_tf._handover import (DeviceNotSupportedError, NotAVariableError, StrategyNotSupportedError,
                                   XlaNotSupportedError)
from sparseopt_tf.callbacks import ExactFlush
from sparseopt_tf.layers import Embedding, embedding_lookup
from sparseopt_tf.optimizers import *  # noqa: F401,F403  (one class per core optimizer)
from sparseopt_tf.optimizers import Optimizer, keras_optimizer

__all__ = ["DeviceNotSupportedError", "Embedding", "ExactFlush", "ExactModeNotSupportedError",
           "NotAVariableError", "Optimizer", "StrategyNotSupportedError", "XlaNotSupportedError",
           "embedding_lookup", "keras_optimizer", "legacy"] + [
    n for n in optimizers.__all__ if n != "Optimizer"]


def __getattr__(name):
    # ``legacy`` needs tf_keras; import it on first use.
    if name == "legacy":
        import importlib
        try:
            module = importlib.import_module("sparseopt_tf.legacy")
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] != "tf_keras":
                raise
            raise _missing(exc, "tf_keras (the Keras 2 optimizers of sparseopt_tf.legacy)") from exc
        globals()["legacy"] = module
        return module
    raise AttributeError(f"module 'sparseopt_tf' has no attribute {name!r}")
