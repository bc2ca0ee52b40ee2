"""RowwiseAdagrad and the row-reduction kernels (FBGEMM's EXACT_ROWWISE_ADAGRAD).

RowwiseAdagrad has no Keras counterpart: its reference (``references.rowwise_adagrad``)
runs the generic suite through the optimizer table, and is pinned here by
hand-computed numbers and by the width-1 case, where it is tf_keras' legacy Adagrad
(epsilon outside the root), which ``test_references_keras_legacy.py`` checks.
"""

import math
import types
from typing import NamedTuple

import numpy as np
import pytest

import sparseopt as so
from sparseopt import _config
from sparseopt.kernels import cpu
from tests import references as ref
from tests.conftest import rel_close


def test_hand_computed_step_with_duplicates():
    table = np.zeros((4, 2), np.float64)
    opt = so.RowwiseAdagrad(learning_rate=0.5, epsilon=0.0)
    # Row 1 gets (1, 1) + (2, 3) = (3, 4): mean of squares 12.5.
    g = so.IndexedSlices(np.array([[1.0, 1.0], [2.0, 3.0]]), np.array([1, 1]))
    opt.apply_gradients([(g, table)])
    acc = opt.get_slot(table, "accumulator")
    assert acc.tolist() == [0.0, 12.5, 0.0, 0.0]
    lr = float(np.float32(0.5))
    np.testing.assert_allclose(table[1], [-lr * 3 / math.sqrt(12.5), -lr * 4 / math.sqrt(12.5)], rtol=1e-15)
    assert not table[[0, 2, 3]].any()


def test_one_accumulator_per_row_in_contiguous_storage():
    table = np.zeros((1000, 64), np.float32)
    opt = so.RowwiseAdagrad(initial_accumulator_value=0.25)
    opt.build([table])
    acc = opt.get_slot(table, "accumulator")
    assert acc.shape == (1000,) and acc.dtype == np.float32 and np.all(acc == 0.25)
    assert acc.base is not None and acc.base.flags.c_contiguous
    assert opt.get_slot_names() == ["accumulator"]
    dense = so.Adagrad()
    dense.build([table.copy()])
    slot_bytes = sum(w.nbytes for w in opt.variables()[1:])
    dense_bytes = sum(w.nbytes for w in dense.variables()[1:])
    assert dense_bytes == 64 * slot_bytes  # the 64x saving of a 64-wide table
    w = opt.variables()
    assert len(w) == 2 and w[1] is acc


def test_width_one_rows_are_legacy_adagrad():
    # A vector's rows have one element: mean(g^2) = g^2, and the step divides by
    # sqrt(acc) + eps: tf_keras' Adagrad (ResourceApplyAdagradV2).
    rng = np.random.default_rng(3)
    p0 = rng.normal(size=17)
    grads = [rng.normal(size=17) for _ in range(10)]
    a, b = p0.copy(), p0.copy()
    rowwise = so.RowwiseAdagrad(learning_rate=0.1, initial_accumulator_value=0.5, epsilon=1e-3)
    legacy = so.Adagrad(learning_rate=0.1, initial_accumulator_value=0.5, epsilon=1e-3, _legacy=True)
    for g in grads:
        rowwise.apply_gradients([(g, a)])
        legacy.apply_gradients([(g, b)])
    rel_close(a, b, np.float64)
    rel_close(rowwise.get_slot(a, "accumulator"), legacy.get_slot(b, "accumulator"), np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_gradient_equals_sparse_gradient_on_every_row_bit_for_bit(dtype):
    rng = np.random.default_rng(4)
    p0 = rng.normal(size=(9, 5)).astype(dtype)
    grads = [rng.normal(size=p0.shape).astype(dtype) for _ in range(3)]
    a, b = p0.copy(), p0.copy()
    da, sb = so.RowwiseAdagrad(weight_decay=0.1), so.RowwiseAdagrad(weight_decay=0.1)
    for g in grads:
        da.apply_gradients([(g, a)])
        sb.apply_gradients([(so.IndexedSlices(g, np.arange(9)), b)])
    assert np.array_equal(a, b)
    assert np.array_equal(da.get_slot(a, "accumulator"), sb.get_slot(b, "accumulator"))


def test_weight_decay_is_fused_and_lazy():
    rng = np.random.default_rng(5)
    p0 = rng.normal(size=(10, 3))
    steps = [(rng.normal(size=(4, 3)), rng.integers(0, 10, 4)) for _ in range(5)]
    p = p0.copy()
    opt = so.RowwiseAdagrad(learning_rate=0.1, weight_decay=0.2)
    for values, idx in steps:
        opt.apply_gradients([(so.IndexedSlices(values, idx), p)])
    expected, _ = ref.run_lazy(ref.weight_decayed(ref.rowwise_adagrad, 0.2), p0, steps,
                               learning_rate=ref.f32(0.1), initial_accumulator_value=0.0)
    rel_close(p, expected, np.float64)


def test_zero_dim_variable_is_one_row():
    w = np.array(2.0)
    opt = so.RowwiseAdagrad(learning_rate=1.0, epsilon=0.0)
    opt.apply_gradients([(np.array(3.0), w)])
    assert opt.get_slot(w, "accumulator").shape == () and float(opt.get_slot(w, "accumulator")) == 9.0
    assert float(w) == pytest.approx(1.0)


def test_config_round_trip():
    opt = so.RowwiseAdagrad(learning_rate=0.05, initial_accumulator_value=0.1, epsilon=1e-6)
    clone = so.RowwiseAdagrad.from_config(opt.get_config())
    assert clone.get_config() == opt.get_config()


# A second row-wise rule, defined here, shows that the row-reduction kernels are
# generic: FBGEMM's PARTIAL_ROWWISE_ADAM keeps the first moment per element and the
# second moment per row.

class _PartialCoefficients(NamedTuple):
    learning_rate: float
    one_minus_beta_1: float
    one_minus_beta_2: float
    epsilon: float


def _row_term(p, g, c):
    return g * g


def _row_update(v, mean_g2, c):
    return (v + (mean_g2 - v) * c.one_minus_beta_2,)


def _update(p, g, m, v, c):
    m = m + (g - m) * c.one_minus_beta_1
    return p - c.learning_rate * m / (math.sqrt(v) + c.epsilon), m


PARTIAL_ROWWISE_ADAM = types.ModuleType("partial_rowwise_adam_test_rule")
PARTIAL_ROWWISE_ADAM.__dict__.update(SLOTS=("m",), ROW_SLOTS=("v",), row_term=_row_term,
                                     row_update=_row_update, update=_update)


def _partial_reference(p, g, m, v, c):
    m[...] = m + (g - m) * c.one_minus_beta_1
    v[...] = v + (np.mean(g * g, axis=1) - v) * c.one_minus_beta_2
    return p - c.learning_rate * m / (np.sqrt(v)[:, None] + c.epsilon)


def test_row_kernels_run_another_rowwise_rule_with_element_and_row_slots(monkeypatch, rng):
    # A rule defined in a test has no stable source hash: keep its kernels out of the disk cache.
    monkeypatch.setattr(_config, "CPU_KERNEL_FLAGS", {**_config.CPU_KERNEL_FLAGS, "cache": False})
    c = _PartialCoefficients(0.1, 0.1, 0.01, 1e-8)
    n, d = 8, 3
    p0 = rng.normal(size=(n, d))
    p, s, r = p0.copy(), np.zeros((1, n, d)), np.zeros((1, n))
    slots, used = cpu.place(PARTIAL_ROWWISE_ADAM.SLOTS, {"m": s[0]}, p)
    row_slots, row_used = cpu.place(PARTIAL_ROWWISE_ADAM.ROW_SLOTS, {"v": r[0]}, r[0])
    g = rng.normal(size=(n, d))
    cpu.row_dense_kernel(PARTIAL_ROWWISE_ADAM, used, row_used, False)(
        p, g, slots, row_slots, c, 0.0, float(d))
    m, v = np.zeros((n, d)), np.zeros(n)
    expected = _partial_reference(p0, g, m, v, c)
    rel_close(p, expected, np.float64)
    rel_close(s[0], m, np.float64)
    rel_close(r[0], v, np.float64)
    # The sparse kernel on rows 5 and 2 (row 5 twice) leaves the other rows alone.
    rows, offsets, order = np.array([5, 2]), np.array([0, 2, 3]), np.array([0, 2, 1])
    values = rng.normal(size=(3, d))
    before = p.copy()
    cpu.row_sparse_kernel(PARTIAL_ROWWISE_ADAM, used, row_used, False)(
        p, slots, row_slots, rows, offsets, order, values, c, 0.0, float(d))
    summed = np.stack([values[0] + values[2], values[1]])
    expected_rows = _partial_reference(before[rows], summed, m[rows], v[rows], c)
    rel_close(p[rows], expected_rows, np.float64)
    untouched = np.setdiff1d(np.arange(n), rows)
    assert np.array_equal(p[untouched], before[untouched])
