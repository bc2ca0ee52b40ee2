"""The error table (SPEC §5): input, exception type, message pattern; nothing written."""

import math

import numpy as np
import pytest

import sparseopt as so
from sparseopt import errors


def table():
    return np.arange(20, dtype=np.float32).reshape(10, 2)


def slices(values=None, indices=None, dense_shape=None):
    values = np.ones((3, 2), np.float32) if values is None else values
    indices = np.array([1, 4, 1]) if indices is None else indices
    return so.IndexedSlices(values, indices, dense_shape)


ro = table()
ro.flags.writeable = False

# (id, make the (gradient, variable) pair, exception, message regex)
STEP_ERRORS = [
    ("index_too_large", lambda: (slices(indices=np.array([1, 10, 2])), table()),
     errors.IndexOutOfRangeError, r"'variable 1 \(shape \(10, 2\), float32\)': indices must lie in \[0, 10\); got 10 at position 1"),
    ("negative_index", lambda: (slices(indices=np.array([-1, 0, 2])), table()),
     IndexError, r"indices must lie in \[0, 10\); got -1 at position 0"),
    ("float_indices", lambda: (slices(indices=np.array([1.0, 2.0, 3.0])), table()),
     errors.IndicesTypeError, r"indices must be a signed or 32-bit integer array; got dtype float64"),
    ("bool_indices", lambda: (slices(indices=np.array([True, False, True])), table()),
     TypeError, r"integer array; got dtype bool"),
    ("uint64_indices", lambda: (slices(indices=np.array([1, 2, 3], np.uint64)), table()),
     TypeError, r"got dtype uint64"),
    ("2d_indices", lambda: (slices(indices=np.array([[1, 2, 3]])), table()),
     TypeError, r"indices must be one-dimensional; got shape \(1, 3\)"),
    ("length_mismatch", lambda: (slices(indices=np.array([1, 2])), table()),
     errors.ShapeMismatchError, r"2 indices but 3 value rows"),
    ("row_shape", lambda: (slices(values=np.ones((3, 5), np.float32)), table()),
     ValueError, r"gradient rows have shape \(5,\); the variable's rows have shape \(2,\)"),
    ("dense_shape", lambda: (slices(dense_shape=(11, 2)), table()),
     ValueError, r"dense_shape \(11, 2\) differs from the variable's shape \(10, 2\)"),
    ("sparse_dtype", lambda: (slices(values=np.ones((3, 2), np.float64)), table()),
     errors.DtypeMismatchError, r"gradient dtype float64 differs from the variable's float32"),
    ("dense_dtype", lambda: (np.ones((10, 2)), table()),
     TypeError, r"gradient dtype float64 differs from the variable's float32"),
    ("dense_shape_mismatch", lambda: (np.ones((10, 3), np.float32), table()),
     errors.ShapeMismatchError, r"gradient shape \(10, 3\) differs from the variable's \(10, 2\)"),
    ("int_variable", lambda: (np.ones(3, np.int32), np.zeros(3, np.int32)),
     TypeError, r"variables must be float32, float64, bfloat16 \(ml_dtypes\) or float16; got int32"),
    ("list_variable", lambda: (np.ones(3), [0.0, 0.0, 0.0]),
     TypeError, r"variables must be NumPy arrays; got list"),
    ("non_contiguous", lambda: (np.ones((10, 1), np.float32), table()[:, :1]),
     errors.ArrayLayoutError, r"variables must be C-contiguous"),
    ("read_only", lambda: (np.ones((10, 2), np.float32), ro),
     errors.ArrayLayoutError, r"the variable is read-only"),
    ("sparse_on_scalar", lambda: (slices(values=np.ones(1), indices=np.array([0])), np.zeros(())),
     ValueError, r"a 0-d variable cannot take a sparse gradient"),
    ("cuda_gradient_for_host_variable", lambda: (_FakeCudaArray(), table()),
     errors.DeviceMismatchError, r"the gradient is a CUDA array but the variable is a NumPy array"),
]


class _FakeCudaArray:
    """Looks like a device array to the validation code (no GPU needed)."""
    __cuda_array_interface__ = {"shape": (10, 2), "typestr": "<f4", "data": (0, False), "version": 3}


@pytest.mark.parametrize("make, exc, pattern", [c[1:] for c in STEP_ERRORS], ids=[c[0] for c in STEP_ERRORS])
@pytest.mark.parametrize("opt_cls", [so.SGD, so.Adam, so.Adagrad])
def test_bad_step_raises_before_writing(opt_cls, make, exc, pattern):
    opt = opt_cls(learning_rate=0.1)
    good = np.ones(4, np.float32)
    opt.apply_gradients([(np.ones(4, np.float32), good)])
    g, var = make()
    var_before = np.array(var, copy=True)
    state_before = opt.get_weights()
    good_before = good.copy()
    with pytest.raises(exc, match=pattern) as info:
        opt.apply_gradients([(np.ones(4, np.float32), good), (g, var)])
    assert isinstance(info.value, errors.SparseoptError)
    np.testing.assert_array_equal(np.asarray(var), var_before)
    np.testing.assert_array_equal(good, good_before)
    assert opt.iterations == 1
    assert len(opt.get_weights()) == len(state_before)
    for x, y in zip(opt.get_weights(), state_before):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("how", ["constructor", "assignment", "callable", "schedule"])
def test_non_finite_hyperparameter_raises_before_writing(bad, how):
    var = np.ones(3)
    if how == "constructor":
        with pytest.raises(errors.HyperparameterError, match=r"hyperparameter 'learning_rate' is (nan|inf|-inf)"):
            so.Adam(learning_rate=bad)
        return
    opt = so.Adam(learning_rate=0.1)
    opt.apply_gradients([(np.ones(3), var)])
    before = var.copy(), opt.get_weights()
    if how == "assignment":
        with pytest.raises(errors.HyperparameterError, match="'beta_1'"):
            opt.beta_1 = bad
        return
    if how == "callable":
        opt.learning_rate = lambda: bad
    else:
        class Bad(so.schedules.LearningRateSchedule):
            def __call__(self, step):
                return bad
        opt.learning_rate = Bad()
    with pytest.raises(errors.HyperparameterError, match=r"'learning_rate' is"):
        opt.apply_gradients([(np.ones(3), var)])
    np.testing.assert_array_equal(var, before[0])
    assert opt.iterations == 1
    for x, y in zip(opt.get_weights(), before[1]):
        np.testing.assert_array_equal(x, y)


CONSTRUCTOR_ERRORS = [
    (lambda: so.SGD(momentum=1.5), r"momentum must be a float in \[0, 1\]; got 1.5"),
    (lambda: so.Adagrad(initial_accumulator_value=-1.0), r"initial_accumulator_value must be a float >= 0"),
    (lambda: so.Adam(clipnorm=-1.0), r"clipnorm must be a positive finite float"),
    (lambda: so.Adam(clipnorm=1.0, global_clipnorm=1.0), r"cannot set both clipnorm"),
    (lambda: so.Adam(weight_decay=math.nan), r"weight_decay must be a finite float >= 0"),
    (lambda: so.Adam(sparse_mode="eager"), r"sparse_mode must be one of"),
    (lambda: so.Adam(learning_rate="fast"), r"'learning_rate' must be a float, a callable or a schedule"),
]


@pytest.mark.parametrize("make, pattern", CONSTRUCTOR_ERRORS)
def test_bad_constructor_arguments(make, pattern):
    with pytest.raises(errors.HyperparameterError, match=pattern):
        make()


def test_unknown_keyword_is_rejected_by_name():
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['use_ema'\]"):
        so.Adam(use_ema=True)


def test_unknown_slot_and_variable():
    opt = so.Adam()
    var = np.zeros(3)
    with pytest.raises(errors.UnknownSlotError, match="has no slots"):
        opt.get_slot(var, "m")
    opt.build([var], names=["w"])
    with pytest.raises(errors.UnknownSlotError, match=r"'w' has no slot 'velocity'; its slots are \['m', 'v'\]"):
        opt.get_slot(var, "velocity")


def test_set_weights_mismatches_change_nothing():
    opt = so.Adam()
    var = np.zeros((2, 3))
    opt.apply_gradients([(np.ones((2, 3)), var)])
    before = opt.get_weights()
    good = [w + 1 for w in before]
    with pytest.raises(errors.WeightsMismatchError, match="set_weights got 2 arrays; the optimizer has 3"):
        opt.set_weights(good[:2])
    with pytest.raises(errors.WeightsMismatchError, match=r"slot 'v' must have shape \(2, 3\); got \(3, 2\)"):
        opt.set_weights(good[:2] + [np.zeros((3, 2))])
    with pytest.raises(errors.WeightsMismatchError, match="must have dtype float64; got complex128"):
        opt.set_weights(good[:2] + [np.zeros((2, 3), complex)])
    for x, y in zip(opt.get_weights(), before):
        np.testing.assert_array_equal(x, y)


def test_same_variable_twice_is_rejected():
    var = np.zeros(3)
    with pytest.raises(ValueError, match="appears twice"):
        so.SGD().apply_gradients([(np.ones(3), var), (np.ones(3), var)])
    np.testing.assert_array_equal(var, 0)
