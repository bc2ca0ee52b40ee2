"""Row-wise optimizers: rules with per-row slots, run by the row-reduction kernels.

A row-wise rule (see :mod:`sparseopt.rules.rowwise_adagrad`) keeps ``ROW_SLOTS``,
one value per row of the variable (rows are the first axis; a 0-d variable is one
row), besides any per-element ``SLOTS``. :class:`RowwiseOptimizer` stores the row
slots of a variable in one contiguous ``(len(ROW_SLOTS), rows)`` array whose rows
``get_slot`` returns (shape ``var.shape[:1]``), lists them in :meth:`variables` after
the variable's element slots, and runs its updates' ``run_rowwise`` (the row-reduction
kernels: :func:`sparseopt.kernels.cpu.row_dense_kernel` /
:func:`~sparseopt.kernels.cpu.row_sparse_kernel` for a NumPy variable,
:func:`sparseopt.kernels.cuda.row_kernel` for a CUDA one) in place of the elementwise
kernels. The row-slot storage is the variable's backend's (``row_slot_storage``: a CUDA
variable's lives on its device). Everything else (validation, de-duplication, clipping,
weight decay, constraints, weights and configs) is the base class's.
"""

from sparseopt.optimizer import Optimizer


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
            storage = state.backend.row_slot_storage(var, initial)
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
        self.update.run_rowwise(rule, state, self.row_slots, c, wd, has_wd)
