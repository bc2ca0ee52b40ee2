"""Validation and de-duplication planning of one ``(gradient, variable)`` pair on the host.

The one implementation of these checks: the core optimizer
(:meth:`sparseopt.Optimizer.apply_gradients`, through ``optimizer._DenseUpdate`` and
``optimizer._SparseUpdate``) and the TensorFlow bridge's host step
(``sparseopt_tf._host``) both call these functions, so a bad input gets the same
exception and the same message whichever way it came. They write nothing.

Each returns the arrays the kernels take: C-contiguous, without a copy where the
input already is.
"""

import math

import numpy as np

from sparseopt import _cuda, errors
from sparseopt.kernels import dedup, lowp

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FLOAT32 = np.dtype(np.float32)


def check_host_variable(var, name, low_precision=False):
    """A NumPy variable the CPU kernels can update in place: float32 or float64 (or,
    with ``low_precision``, bfloat16 or float16), C-contiguous and writeable."""
    if var.dtype not in FLOAT_DTYPES and not (low_precision and lowp.kind(var.dtype)):
        allowed = "float32, float64, bfloat16 (ml_dtypes) or float16" if low_precision else "float32 or float64"
        raise errors.DtypeMismatchError(f"{name!r}: variables must be {allowed}; got {var.dtype}")
    flags = var.flags
    if not flags.c_contiguous:
        raise errors.ArrayLayoutError(
            f"{name!r}: variables must be C-contiguous (they are updated in place); "
            f"got strides {var.strides}")
    if not flags.writeable:
        raise errors.ArrayLayoutError(f"{name!r}: the variable is read-only")


def dense_gradient(g, var, name):
    """The dense gradient ``g`` of NumPy variable ``var``, checked: a C-contiguous array
    of the variable's shape and dtype."""
    if not isinstance(g, np.ndarray):
        if _cuda.is_device_array(g):
            raise errors.DeviceMismatchError(
                f"{name!r}: the gradient is a CUDA array but the variable is a NumPy array")
        g = np.asarray(g)
    _check_gradient_dtype(name, var, g.dtype)
    if g.shape != var.shape:
        raise errors.ShapeMismatchError(
            f"{name!r}: gradient shape {g.shape} differs from the variable's {var.shape}")
    return _math_values(np.ascontiguousarray(g))


def _check_gradient_dtype(name, var, dtype):
    """A gradient has the variable's dtype; a 16-bit variable's may also be float32."""
    if dtype == var.dtype or (dtype == _FLOAT32 and lowp.kind(var.dtype)):
        return
    also = f" (a {var.dtype} variable takes {var.dtype} or float32 gradients)" if lowp.kind(var.dtype) else ""
    raise errors.DtypeMismatchError(
        f"{name!r}: gradient dtype {dtype} differs from the variable's {var.dtype}{also}")


def _math_values(values):
    """Gradient values in the kernels' math dtype: 16-bit ones widened to float32 (a new array)."""
    return lowp.widen(values) if lowp.kind(values.dtype) else values


def sparse_gradient(g, var, name):
    """The ``IndexedSlices``-like ``g`` (``values``, ``indices``, ``dense_shape``) of NumPy
    variable ``var``, checked.

    Returns:
        ``(values, indices)``: ``values`` C-contiguous of shape ``(k, row size)``, of the
        gradient's dtype (16-bit values are not widened: the sparse kernels widen them
        row by row as they read them, ``sparseopt.optimizer._SparseUpdate``),
        ``indices`` a C-contiguous 1-D int32 or int64 array of ``k`` entries (not yet
        range-checked: :func:`plan` does that).
    """
    values, indices = g.values, g.indices
    if type(values) is not np.ndarray or type(indices) is not np.ndarray:
        if _cuda.is_device_array(values) or _cuda.is_device_array(indices):
            raise errors.DeviceMismatchError(
                f"{name!r}: the gradient values are a CUDA array but the variable is a NumPy array")
        values = np.asarray(values)
        indices = np.asarray(indices)
    check_sparse_layout(name, var, values, indices, getattr(g, "dense_shape", None))
    if indices.dtype.itemsize < 4 or indices.dtype.kind == "u":  # int8/16, uint8/16/32 (uint64 refused)
        indices = indices.astype(np.int64)
    elif not indices.flags.c_contiguous:
        indices = np.ascontiguousarray(indices)
    if values.ndim != 2 or not values.flags.c_contiguous:  # else already (k, row size)
        values = np.ascontiguousarray(values).reshape(values.shape[0], math.prod(var.shape[1:]))
    return values, indices


_INT32, _INT64 = np.dtype(np.int32), np.dtype(np.int64)
_FLOAT64 = np.dtype(np.float64)


def sparse_gradients(items):
    """:func:`sparse_gradient` of several pairs in one pass (the sparse pairs of a step).

    The common case (NumPy values and indices, int32 or int64 indices, 2-D C-contiguous
    values of a 2-D float32 or float64 variable's dtype and row width, a matching or
    absent ``dense_shape``) is recognised with a few attribute reads (dtypes compared by
    identity: NumPy's built-in dtypes are singletons) and returns the arrays themselves,
    as :func:`sparse_gradient` would; any other pair goes through :func:`sparse_gradient`,
    which converts it or raises its error (the same exception and message either way).

    Args:
        items: ``(gradient, variable, name)`` triples; the variables already checked
            (:func:`check_host_variable`).

    Returns:
        ``(checked, error)``: ``(values, indices)`` of each item before the first bad one,
        and that item's exception (None if every item passed). Nothing is raised, so the
        caller can order this error among its other checks.
    """
    checked = []
    append = checked.append
    for g, var, name in items:
        values = g.values
        indices = g.indices
        if type(values) is np.ndarray and type(indices) is np.ndarray:
            dtype = values.dtype
            index_dtype = indices.dtype
            shape = var.shape
            row_shape = values.shape
            dense_shape = getattr(g, "dense_shape", None)
            if ((dtype is _FLOAT32 or dtype is _FLOAT64) and dtype is var.dtype
                    and (index_dtype is _INT64 or index_dtype is _INT32) and indices.ndim == 1
                    and len(row_shape) == 2 and len(shape) == 2 and row_shape[1] == shape[1]
                    and row_shape[0] == indices.shape[0] and (dense_shape is None or dense_shape == shape)
                    and values.flags.c_contiguous and indices.flags.c_contiguous):
                append((values, indices))
                continue
        try:
            append(sparse_gradient(g, var, name))
        except Exception as exc:  # returned, not raised: no chained traceback in the caller
            return checked, exc
    return checked, None


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
    _check_gradient_dtype(name, var, values.dtype)
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
