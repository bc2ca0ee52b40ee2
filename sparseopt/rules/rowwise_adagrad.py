r"""Row-wise Adagrad, FBGEMM's ``EXACT_ROWWISE_ADAGRAD``: one accumulator per row.

For a row :math:`i` of width :math:`d` whose (de-duplicated) gradient row is
:math:`g_{i\cdot}`:

.. math::

    a_i &\leftarrow a_i + \frac1d \sum_{j} g_{ij}^2 \\
    p_{ij} &\leftarrow p_{ij} - \eta\, \frac{g_{ij}}{\sqrt{a_i} + \epsilon}

A *row-wise rule*: besides the element update it has a row prologue, which the
row-reduction kernels (:func:`sparseopt.kernels.cpu.row_dense_kernel`,
:func:`sparseopt.kernels.cpu.row_sparse_kernel`) run once per touched row:

* ``ROW_SLOTS``: the per-row slots (any number), shape ``(rows,)``;
* ``row_term(p, g, c)``: one element's contribution; the kernel sums it over the row
  and divides by the width (here the mean of :math:`g^2`);
* ``row_update(*row_slots, mean, c) -> tuple``: the row slots after this step;
* ``update(p, g, *slots, *row_slots, c) -> (p, *slots)``: the element update, which also
  reads the new row slots (``SLOTS`` lists its per-element slots; none here).

No legacy variant: Keras has no row-wise Adagrad.
"""

import math
from typing import NamedTuple

SLOTS = ()
ROW_SLOTS = ("accumulator",)


class Coefficients(NamedTuple):
    learning_rate: float
    epsilon: float


def coefficients(learning_rate, epsilon):
    return Coefficients(learning_rate, epsilon)


def row_term(p, g, c):
    return g * g


def row_update(acc, mean_g2, c):
    return (acc + mean_g2,)


def update(p, g, acc, c):
    return (p - c.learning_rate * g / (math.sqrt(acc) + c.epsilon),)


# --- exact mode (sparse_mode="exact"): idle steps, see sparseopt.rules._idle ---------------
#
# A zero gradient leaves the row and its accumulator unchanged: only the decoupled weight
# decay of the idle steps applies (a per-row scale). Exact.

IDLE_COLUMNS = 1
IDLE_CONSTANT = ()


def idle_is_identity(c, wd):
    """Without weight decay exact mode leaves an idle row as it is (with ``epsilon == 0`` too:
    the documented exception, see :class:`sparseopt.RowwiseAdagrad`)."""
    return wd == 0
