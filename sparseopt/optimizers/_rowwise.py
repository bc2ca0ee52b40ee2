"""Row-wise optimizers: rules with per-row slots, run by the row-reduction kernels.

A row-wise rule (see :mod:`sparseopt.rules.rowwise_adagrad`) keeps ``ROW_SLOTS``,
one value per row of the variable (rows are the first axis; a 0-d variable is one
row), besides any per-element ``SLOTS``. :class:`RowwiseOptimizer` stores the row
slots of a variable in one contiguous ``(len(ROW_SLOTS), rows)`` array whose rows
``get_slot`` returns (shape ``var.shape[:1]``), lists them in :meth:`variables` after
the variable's element slots, and runs :func:`sparseopt.kernels.cpu.row_dense_kernel`
/ :func:`~sparseopt.kernels.cpu.row_sparse_kernel` in place of the elementwise
kernels. Everything else (validation, de-duplication, clipping, weight decay,
constraints, weights and configs) is the base class's. A CUDA variable keeps its row
slots on its device and runs the CUDA row-reduction kernels
(:func:`sparseopt.kernels.cuda.row_kernel`, through its update's ``run_rowwise``).
"""

import math

import numpy as np

from sparseopt import _cuda
from sparseopt.kernels import cpu
from sparseopt.optimizer import Optimizer, _SparseUpdate, kernel_step


class RowwiseOptimizer(Optimizer):
    """Base class of optimizers whose rule keeps per-row slots (``rule.ROW_SLOTS``)."""

    def __init__(self, learning_rate, name, **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self._row_storage = {}  # id(var) -> (len(ROW_SLOTS), rows) array

    def _row_slot_names(self):
        """The per-row slots this configuration keeps, in storage order."""
        return self._rule.ROW_SLOTS

    def _state_for(self, var, name=None):
        new = id(var) not in self._states
        state = super()._state_for(var, name)
        if new:
            row_names = self._row_slot_names()
            initial = [self._slot_initial_value(slot_name) for slot_name in row_names]
            if isinstance(var, np.ndarray):
                # the math's dtype: the variable's, float32 for a 16-bit one (also with bfloat16 slots)
                storage = np.empty((len(row_names), var.shape[0] if var.ndim else 1), state.math_dtype)
                for i, value in enumerate(initial):
                    storage[i].fill(value)
            else:  # a CUDA array: its row slots live on its device
                storage = _cuda.row_slot_storage(var, initial)
            for i, slot_name in enumerate(row_names):
                state.slots[slot_name] = storage[i].reshape(tuple(var.shape[:1]))  # a view
                self._weights.append((state, slot_name))
            self._row_storage[id(var)] = storage
        return state

    def get_slot_names(self):
        names = list(self._slot_names()) + list(self._row_slot_names())
        return names + [n for n in super().get_slot_names() if n not in names]

    def _wrap_update(self, state, update):
        return _RowUpdate(update, {n: state.slots[n] for n in self._row_slot_names()})


class _RowUpdate:
    """Runs a validated dense or sparse update through the row-reduction kernels."""

    __slots__ = ("update", "row_slots")

    def __init__(self, update, row_slots):
        self.update = update
        self.row_slots = row_slots  # {name: (rows,) view} of the kept row slots

    def run(self, rule, state, c, wd, has_wd):
        if 0 in state.var.shape[1:]:
            return  # rows without elements (an (N, 0) table): nothing to update, not even the row slots
        if getattr(self.update, "on_device", False):  # a CUDA update: the CUDA row-reduction kernels
            self.update.run_rowwise(rule, state, self.row_slots, c, wd, has_wd)
            return
        var = state.var
        rows = var.shape[0] if var.ndim else 1
        width = math.prod(var.shape[1:])
        p, slots, used = state.kernel_arrays(rule.SLOTS, (rows, width))
        row_slots, row_used = state.kernel_views(
            ("rows", rule.ROW_SLOTS, rows),
            lambda: cpu.place(rule.ROW_SLOTS, {n: v.reshape(rows) for n, v in self.row_slots.items()},
                              p[:, 0] if width else p.reshape(rows)))
        u = self.update
        rounding, c = kernel_step(state, c)
        if isinstance(u, _SparseUpdate):
            if u.rows.size == 0:
                return
            kernel = cpu.row_sparse_kernel(rule, used, row_used, has_wd, rounding)
            kernel(p, *slots, *row_slots, u.rows, u.offsets, u.order, u.values, c, wd, type(wd)(width))
        else:
            kernel = cpu.row_dense_kernel(rule, used, row_used, has_wd, rounding)
            kernel(p, u.values.reshape(rows, width), *slots, *row_slots, c, wd, type(wd)(width))
