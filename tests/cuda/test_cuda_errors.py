"""Bad inputs to a CUDA step raise a clear error before anything is written (SPEC §5)."""

import re

import numpy as np
import pytest

import sparseopt as so
from sparseopt import errors
from tests.cuda.helpers import (InterfaceArray, assert_unchanged, dev, dev_slices, host, snapshot,
                                sparse_batch)

ROWS, WIDTH = 60, 3


def table():
    return dev(np.arange(ROWS * WIDTH, dtype=np.float32).reshape(ROWS, WIDTH) / 7)


def values(k=4, dtype=np.float32, width=WIDTH):
    return np.ones((k, width), dtype)


STEP_ERRORS = [
    ("host_dense_gradient", lambda v: (np.ones((ROWS, WIDTH), np.float32), v),
     errors.DeviceMismatchError, r"the variable is a CUDA array but the gradient is a host ndarray"),
    ("host_sparse_values", lambda v: (so.IndexedSlices(values(), dev(np.arange(4))), v),
     errors.DeviceMismatchError, r"the gradient values are a host ndarray"),
    ("host_indices", lambda v: (so.IndexedSlices(dev(values()), np.arange(4)), v),
     errors.DeviceMismatchError, r"the indices are a host ndarray"),
    ("dense_dtype", lambda v: (dev(np.ones((ROWS, WIDTH))), v),
     errors.DtypeMismatchError, r"gradient dtype float64 differs from the variable's float32"),
    ("dense_shape", lambda v: (dev(np.ones((ROWS, WIDTH + 1), np.float32)), v),
     errors.ShapeMismatchError, r"gradient shape \(60, 4\) differs from the variable's \(60, 3\)"),
    ("sparse_dtype", lambda v: (dev_slices(values(dtype=np.float64), np.arange(4)), v),
     errors.DtypeMismatchError, r"gradient dtype float64 differs from the variable's float32"),
    ("row_shape", lambda v: (dev_slices(values(width=5), np.arange(4)), v),
     errors.ShapeMismatchError, r"gradient rows have shape \(5,\); the variable's rows have shape \(3,\)"),
    ("length", lambda v: (dev_slices(values(3), np.arange(4)), v),
     errors.ShapeMismatchError, r"4 indices but 3 value rows"),
    ("dense_shape_arg", lambda v: (dev_slices(values(), np.arange(4), (ROWS + 1, WIDTH)), v),
     errors.ShapeMismatchError, r"dense_shape \(61, 3\) differs from the variable's shape \(60, 3\)"),
    ("index_too_large", lambda v: (dev_slices(values(), np.array([0, 5, ROWS, 2])), v),
     errors.IndexOutOfRangeError, r"indices must lie in \[0, 60\); got 60 at position 2"),
    ("negative_index", lambda v: (dev_slices(values(), np.array([0, -1, 3, -7], np.int32)), v),
     errors.IndexOutOfRangeError, r"indices must lie in \[0, 60\); got -1 at position 1"),
    ("float_indices", lambda v: (dev_slices(values(), np.arange(4.0)), v),
     errors.IndicesTypeError, r"indices must be a signed or 32-bit integer array; got dtype float64"),
    ("2d_indices", lambda v: (dev_slices(values(), np.arange(4).reshape(4, 1)), v),
     errors.IndicesTypeError, r"indices must be one-dimensional"),
    ("strided_gradient", lambda v: (dev(np.ones((ROWS, 2 * WIDTH), np.float32))[:, ::2], v),
     errors.ArrayLayoutError, r"the gradient must be C-contiguous on the device"),
    ("other_gpu", lambda v: (InterfaceArray(np.ones((ROWS, WIDTH), np.float32), device_index=1),
                             InterfaceArray(host(v), device_index=0)),
     errors.DeviceMismatchError, r"the variable is on GPU 0 but the gradient is on GPU 1"),
]


@pytest.mark.parametrize("make, exc, pattern", [c[1:] for c in STEP_ERRORS], ids=[c[0] for c in STEP_ERRORS])
def test_bad_step_raises_before_writing(make, exc, pattern, rng):
    var = table()
    opt = so.Adam(learning_rate=0.1)
    good_values, good_idx = sparse_batch(rng, ROWS, WIDTH, 20, np.float32)
    opt.apply_gradients([(dev_slices(good_values, good_idx), var)])
    g, bad_var = make(var)
    target = var if bad_var is var else bad_var
    if target is not var:
        opt.build([target])
    before = snapshot(opt, target)
    with pytest.raises(exc, match=pattern):
        opt.apply_gradients([(g, target)])
    assert_unchanged(before, opt, target)
    assert opt.iterations == 1
    # The optimizer still works afterwards (a failed range check leaves no stale flag).
    opt.apply_gradients([(dev_slices(good_values, good_idx), var)])
    assert opt.iterations == 2


def test_bad_index_in_a_later_variable_writes_nothing(rng):
    a, b = table(), table()
    opt = so.SGD(learning_rate=0.1, momentum=0.9)
    opt.build([a, b])
    before_a, before_b = snapshot(opt, a), snapshot(opt, b)
    good = dev_slices(values(), np.array([1, 2, 2, 3]))
    bad = dev_slices(values(), np.array([1, 2, 99, 3]))
    with pytest.raises(errors.IndexOutOfRangeError, match=r"got 99 at position 2"):
        opt.apply_gradients([(good, a), (bad, b)])
    assert_unchanged(before_a, opt, a)
    assert_unchanged(before_b, opt, b)
    assert opt.iterations == 0


@pytest.mark.parametrize("make, pattern", [
    (lambda: InterfaceArray(np.zeros((ROWS, WIDTH), np.float32), readonly=True), r"the variable is read-only"),
    (lambda: dev(np.zeros((ROWS, WIDTH), np.int32)),
     r"variables must be float32, float64, bfloat16 \(ml_dtypes\) or float16; got int32"),
    (lambda: dev(np.zeros((ROWS, 2 * WIDTH), np.float32))[:, ::2], r"variables must be C-contiguous"),
], ids=["read_only", "int_variable", "strided_variable"])
def test_bad_variables(make, pattern):
    var = make()
    opt = so.Adam(learning_rate=0.1)
    with pytest.raises(errors.SparseoptError, match=pattern):
        opt.build([var])
    with pytest.raises(errors.SparseoptError, match=pattern):
        opt.apply_gradients([(dev(np.ones((ROWS, WIDTH), np.float32)), var)])
    assert opt.iterations == 0


@pytest.mark.parametrize("make", [
    lambda: dev(np.ones((ROWS, WIDTH), np.float32)),
    lambda: so.IndexedSlices(dev(values()), dev(np.arange(4))),
    lambda: so.IndexedSlices(values(), dev(np.arange(4))),
], ids=["dense", "sparse", "device_indices"])
def test_device_gradient_for_host_variable(make):
    var = np.zeros((ROWS, WIDTH), np.float32)
    opt = so.Adam(learning_rate=0.1)
    with pytest.raises(errors.DeviceMismatchError, match=re.escape("CUDA array but the variable is a NumPy array")):
        opt.apply_gradients([(make(), var)])
    assert not var.any() and opt.iterations == 0


def test_non_finite_hyperparameter_changes_nothing(rng):
    var = table()
    opt = so.Adam(learning_rate=lambda: float("nan"))
    opt.build([var])
    before = snapshot(opt, var)
    with pytest.raises(errors.HyperparameterError):
        opt.apply_gradients([(dev_slices(values(), np.arange(4)), var)])
    assert_unchanged(before, opt, var)


class _CannotExport:
    """Like a torch CUDA tensor that requires grad: the interface exists but raises."""

    shape = (ROWS, WIDTH)

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't export tensors that require gradient, use tensor.detach()")


def test_array_that_cannot_export_its_interface():
    var = table()
    opt = so.SGD(learning_rate=0.1)
    with pytest.raises(errors.ArrayLayoutError, match=r"cannot read the CUDA array interface of the gradient: "
                                                      r"Can't export tensors that require gradient"):
        opt.apply_gradients([(_CannotExport(), var)])
    with pytest.raises(errors.ArrayLayoutError, match=r"of the variable"):
        opt.apply_gradients([(dev(np.ones((ROWS, WIDTH), np.float32)), _CannotExport())])
    assert opt.iterations == 0

