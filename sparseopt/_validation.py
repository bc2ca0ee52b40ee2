"""The checks of a gradient against its variable that both backends share, and the
de-duplication plan of host indices.

:mod:`sparseopt.backends.cpu` (NumPy arrays) and :mod:`sparseopt.backends.cuda` (CUDA
arrays) call these for the checks that read only dtypes and shapes, so a bad input gets
the same exception and the same message on either. They write nothing.
"""

import numpy as np

from sparseopt import errors
from sparseopt.kernels import dedup, lowp

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FLOAT32 = np.dtype(np.float32)


def check_gradient_dtype(name, var, dtype):
    """A gradient has the variable's dtype; a 16-bit variable's may also be float32."""
    if dtype == var.dtype or (dtype == _FLOAT32 and lowp.kind(var.dtype)):
        return
    also = f" (a {var.dtype} variable takes {var.dtype} or float32 gradients)" if lowp.kind(var.dtype) else ""
    raise errors.DtypeMismatchError(
        f"{name!r}: gradient dtype {dtype} differs from the variable's {var.dtype}{also}")


def math_values(values):
    """Gradient values in the kernels' math dtype: 16-bit ones widened to float32 (a new array)."""
    return lowp.widen(values) if lowp.kind(values.dtype) else values


def check_sparse_layout(name, var, values, indices, dense_shape):
    """The checks of a sparse gradient that read only dtypes and shapes (host or device arrays)."""
    var_shape, values_shape = tuple(var.shape), tuple(values.shape)
    if len(var_shape) == 0:
        raise errors.ShapeMismatchError(f"{name!r}: a 0-d variable cannot take a sparse gradient")
    if indices.dtype.kind not in "iu" or indices.dtype == np.uint64:
        raise errors.IndicesTypeError(
            f"{name!r}: indices must be a signed or 32-bit integer array; got dtype {indices.dtype}")
    if indices.ndim != 1:
        raise errors.IndicesTypeError(
            f"{name!r}: indices must be one-dimensional; got shape {tuple(indices.shape)}")
    check_gradient_dtype(name, var, values.dtype)
    if len(values_shape) < 1 or values_shape[0] != indices.shape[0]:
        raise errors.ShapeMismatchError(
            f"{name!r}: {indices.shape[0]} indices but {values_shape[0] if values_shape else 0} "
            f"value rows (values shape {values_shape})")
    if values_shape[1:] != var_shape[1:]:
        raise errors.ShapeMismatchError(
            f"{name!r}: gradient rows have shape {values_shape[1:]}; the variable's rows "
            f"have shape {var_shape[1:]}")
    if dense_shape is not None and tuple(dense_shape) != var_shape:
        raise errors.ShapeMismatchError(
            f"{name!r}: dense_shape {tuple(dense_shape)} differs from the variable's shape {var_shape}")


def plan(indices, num_rows, name):
    """Range-check ``indices`` and group their duplicates (:func:`sparseopt.kernels.dedup.plan_rows`).

    Returns:
        ``(rows, offsets, order)``: the unique rows, increasing; the positions of ``rows[u]`` are
        ``order[offsets[u]:offsets[u + 1]]``, in increasing order.
    """
    rows, offsets, order, bad = dedup.plan_rows(indices, num_rows)
    if bad >= 0:
        raise errors.IndexOutOfRangeError(
            f"{name!r}: indices must lie in [0, {num_rows}); got {int(indices[bad])} at position {bad}")
    return rows, offsets, order
