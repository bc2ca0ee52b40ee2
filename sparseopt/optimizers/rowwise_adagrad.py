"""``RowwiseAdagrad``: Adagrad with one accumulator per row (FBGEMM's EXACT_ROWWISE_ADAGRAD)."""

import numpy as np

from sparseopt.optimizers._rowwise import RowwiseOptimizer
from sparseopt.rules import rowwise_adagrad as rule


class RowwiseAdagrad(RowwiseOptimizer):
    """Row-wise Adagrad (math: :mod:`sparseopt.rules.rowwise_adagrad`), the rule of FBGEMM's
    ``EXACT_ROWWISE_ADAGRAD``: each row keeps one accumulator, which grows by the mean
    over the row of the squared (de-duplicated) gradient; the row moves by
    ``lr * g / (sqrt(acc) + epsilon)``. A dense gradient updates every row.

    Memory: the slot is one value per row instead of one per element. For a
    float32 table of width 64, :class:`~sparseopt.Adagrad` keeps 64 x 4 = 256 bytes of
    accumulator per row, ``RowwiseAdagrad`` 4 bytes: 64x less (1M rows: 256 MB vs 4 MB),
    which is why it is the usual choice for large embedding tables. Rows are the
    first axis: a ``(rows, d)`` table, a ``(rows, a, b)`` one (rows of ``a * b``), or a
    vector (rows of one element, where it equals Adagrad with epsilon outside the root).
    A table whose rows have no elements (shape ``(N, 0)``) is left as it is, accumulators
    included (the mean over an empty row is undefined).

    Exact mode (``sparse_mode="exact"``) with ``epsilon=0``: a dense step moves a row whose
    accumulator is 0 by ``0 / 0`` (NaN); exact mode leaves such idle rows as they are (the
    one exception to "exact mode gives the dense result"; keep ``epsilon > 0``).

    Args:
        learning_rate: float, callable or schedule. Defaults to 0.01 (FBGEMM's default).
        initial_accumulator_value: starting value of the accumulators (>= 0); held in
            float32 like :class:`~sparseopt.Adagrad`'s. Defaults to 0.0 (FBGEMM).
        epsilon: added to the root of the accumulator. Defaults to 1e-8 (FBGEMM).
        **kwargs: see :class:`~sparseopt.Optimizer`.

    Slots: ``"accumulator"``, of shape ``(rows,)`` (a view of the row-slot storage).

    Example:
        >>> import numpy as np, sparseopt as so
        >>> table = np.zeros((1000, 64), np.float32)
        >>> opt = so.RowwiseAdagrad(learning_rate=0.1)
        >>> g = so.IndexedSlices(np.full((2, 64), 2.0, np.float32), np.array([7, 7]))
        >>> opt.apply_gradients([(g, table)])
        1
        >>> acc = opt.get_slot(table, "accumulator")
        >>> acc.shape, acc[7], table[7, 0]  # mean of (2 + 2)^2 = 16; -0.1 * 4 / sqrt(16)
        ((1000,), np.float32(16.0), np.float32(-0.1))
    """

    _rule = rule
    _hyper_names = ("learning_rate", "epsilon")
    _settings = {**RowwiseOptimizer._settings, "initial_accumulator_value": "number"}

    def __init__(self, learning_rate=0.01, initial_accumulator_value=0.0, epsilon=1e-8,
                 name="rowwise_adagrad", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon

    def _slot_initial_value(self, slot_name):
        return float(np.float32(self.initial_accumulator_value))

    def _coefficients(self, hypers, step):
        return rule.coefficients(hypers["learning_rate"], hypers["epsilon"])

    def get_config(self):
        return {**super().get_config(), "initial_accumulator_value": self.initial_accumulator_value}
