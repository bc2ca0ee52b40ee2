"""The exceptions sparseopt raises.

Every class inherits from :class:`SparseoptError` and from the builtin a caller
would catch (``ValueError``, ``IndexError`` or ``TypeError``). Messages name the
variable, what was expected and what came, for example
``"'table': indices must lie in [0, 1000000); got -1 at position 7"``.
Every check runs before anything is written: on any of these errors the
variables, the slots and ``iterations`` are exactly as they were.
"""


class SparseoptError(Exception):
    """Base class of every error sparseopt raises."""

    # The builtin initializer, by identity: TensorFlow's autograph re-raises an error raised
    # while it traces a function as its own type only when the type's ``__init__`` is
    # ``Exception.__init__`` (or a builtin's); otherwise as a StagingError.
    __init__ = Exception.__init__


class IndexOutOfRangeError(SparseoptError, IndexError):
    """A sparse gradient names a row outside the variable."""


class IndicesTypeError(SparseoptError, TypeError):
    """Indices that are not a one-dimensional integer array."""


class ShapeMismatchError(SparseoptError, ValueError):
    """A gradient, a slot value or a weight whose shape does not fit."""


class DtypeMismatchError(SparseoptError, TypeError):
    """A gradient or weight whose dtype differs from its variable's, or an unsupported dtype."""


class ArrayLayoutError(SparseoptError, ValueError):
    """A variable that is not C-contiguous, or is read-only."""


class DeviceMismatchError(SparseoptError, ValueError):
    """A gradient on another device than its variable (host vs CUDA)."""


class HyperparameterError(SparseoptError, ValueError):
    """A hyperparameter that is NaN, infinite, out of range or of the wrong kind."""


class UnknownSlotError(SparseoptError, ValueError):
    """A slot name or a variable the optimizer does not know."""


class WeightsMismatchError(SparseoptError, ValueError):
    """``set_weights`` with the wrong number, shapes or dtypes of arrays."""


class ConfigError(SparseoptError, ValueError):
    """A configuration or saved state that cannot be loaded."""


class GradientsError(SparseoptError, ValueError, TypeError):
    """A malformed ``grads_and_vars``: empty, every gradient ``None``, an item that is not a
    ``(gradient, variable)`` pair, or a variable listed twice. It is a ``ValueError``
    and a ``TypeError``, the builtins these cases raised before it existed."""


class ConstraintError(SparseoptError, ValueError, TypeError):
    """A constraint returned something that cannot replace the rows it was given (``None``,
    another shape, a non-float dtype); the step is undone."""


class ConstraintNotRowWiseError(SparseoptError, ValueError):
    """A variable updated sparsely whose constraint is not row-wise (a norm over the rows,
    such as ``keras.constraints.MaxNorm()``'s default ``axis=0``): the sparse step
    constrains only the touched rows, so it cannot apply it as the dense step would."""


class ConcurrentUseError(SparseoptError, RuntimeError):
    """One optimizer entered from two threads at once (a step, ``flush``, ``catch_up`` or
    ``set_weights`` while another thread is inside one): optimizers are thread compatible,
    not thread safe. Nothing was written by the call that raised."""


class CudaUnavailableError(SparseoptError, RuntimeError):
    """A CUDA array was given, but numba-cuda, a CUDA driver or a GPU is missing."""
