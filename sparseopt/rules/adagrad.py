r"""Adagrad (Duchi et al., 2011), as Keras 3's ``keras.optimizers.Adagrad``.

.. math::

    a &\leftarrow a + g^2 \\
    p &\leftarrow p - \eta\, \frac{g}{\sqrt{a + \epsilon}}

The accumulator starts at ``initial_accumulator_value`` (0.1), and Keras 3 puts the
epsilon *inside* the square root.

Legacy (``tf_keras.optimizers.legacy.Adagrad``, ``legacy=True``): TensorFlow's
``ResourceApplyAdagradV2`` kernel puts the epsilon *outside* the square root,
:math:`p \leftarrow p - \eta\, g / (\sqrt{a} + \epsilon)`, which matters while the
accumulator is tiny (``initial_accumulator_value=0``).
"""

import math
from typing import NamedTuple

SLOTS = ("accumulator",)


class Coefficients(NamedTuple):
    learning_rate: float
    epsilon_inside: float   # added under the square root (Keras 3), else 0
    epsilon_outside: float  # added to the square root (tf_keras), else 0


def coefficients(learning_rate, epsilon, legacy=False):
    return Coefficients(learning_rate, 0.0 if legacy else epsilon, epsilon if legacy else 0.0)


def update(p, g, acc, c):
    # One square root and one division for both placements of epsilon: adding the
    # other placement's 0 changes no bits (the accumulator is never -0), where a branch
    # on a flag would be if-converted into both square roots and both divisions.
    acc = acc + g * g
    p = p - c.learning_rate * g / (math.sqrt(acc + c.epsilon_inside) + c.epsilon_outside)
    return p, acc

# --- exact mode (sparse_mode="exact"): idle steps, see sparseopt.rules._idle ---------------
#
# A zero gradient leaves p and the accumulator unchanged: only the decoupled weight decay
# of the idle steps applies. Exact (bit-exact without weight decay). Where the denominator
# is zero (epsilon 0 and a zero accumulator) or NaN, the dense rule writes 0/0 = NaN: replay
# (see sparseopt.rules._idle.EPSILON_ZERO).

from sparseopt.rules import _idle  # noqa: E402

COLUMNS = _idle.columns()    # D only
IDLE_COLUMNS = COLUMNS.count
IDLE_CONSTANT = ()


def idle_table_init(t):
    return


def idle_table_step(t, t_next, rec):
    return


def idle_apply(p, acc, t, c, tol, zero):
    ok = math.sqrt(acc + c.epsilon_inside) + c.epsilon_outside > 0   # False for 0 and NaN
    return p * t[COLUMNS.decay], acc, ok


def idle_is_identity(c, wd):
    """Without weight decay and with ``epsilon > 0`` (in the variable's dtype) the idle step
    is ``p - lr * 0 / d`` with ``d >= epsilon > 0``: ``p`` bit for bit (the accumulator is
    never negative, and NaN only where a NaN gradient made ``p`` NaN too). With ``epsilon == 0`` a zero accumulator gives 0/0: not the identity."""
    return wd == 0 and (c.epsilon_inside > 0 or c.epsilon_outside > 0)
