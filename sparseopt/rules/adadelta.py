r"""Adadelta (Zeiler, 2012), as Keras 3's ``keras.optimizers.Adadelta``.

.. math::

    a_g &\leftarrow \rho\, a_g + (1-\rho)\, g^2 \\
    \Delta &= \frac{\sqrt{a_\Delta + \epsilon}}{\sqrt{a_g + \epsilon}}\, g \\
    a_\Delta &\leftarrow \rho\, a_\Delta + (1-\rho)\, \Delta^2 \\
    p &\leftarrow p - \eta\, \Delta

The learning rate (1.0 in the paper, 0.001 by default in Keras) scales the step but
not the accumulated update. Keras 3 uses ``rho`` and ``epsilon`` at full precision.

Legacy (``tf_keras.optimizers.legacy.Adadelta``, ``legacy=True``): the same formula
(TensorFlow's ``ResourceApplyAdadelta``), with ``rho`` a float32 variable.
"""

import math
from typing import NamedTuple

from sparseopt.rules._floatx import f32

SLOTS = ("accumulated_grad", "accumulated_delta")


class Coefficients(NamedTuple):
    learning_rate: float
    rho: float
    one_minus_rho: float
    epsilon: float


def coefficients(learning_rate, rho, epsilon, legacy=False):
    """Per-step scalars for ``update``; ``legacy=True`` rounds ``rho`` to float32 as tf_keras does."""
    if legacy:
        rho = f32(rho)
    return Coefficients(learning_rate, rho, 1.0 - rho, epsilon)


def update(p, g, acc_grad, acc_delta, c):
    acc_grad = c.rho * acc_grad + c.one_minus_rho * g * g
    delta = math.sqrt(acc_delta + c.epsilon) / math.sqrt(acc_grad + c.epsilon) * g
    acc_delta = c.rho * acc_delta + c.one_minus_rho * delta * delta
    return p - c.learning_rate * delta, acc_grad, acc_delta


# --- exact mode (sparse_mode="exact"): idle steps, see sparseopt.rules._idle ---------------
#
# With a zero gradient the step is zero and both accumulators decay by rho: closed form.
# Exact to rounding (bit-exact for p without weight decay).

from sparseopt.rules import _idle  # noqa: E402

#: D, prod rho
COLUMNS = _idle.columns(rho_product=1)
IDLE_COLUMNS = COLUMNS.count
IDLE_CONSTANT = ()


def idle_table_init(t):
    t[COLUMNS.rho_product] = 1.0


def idle_table_step(t, t_next, rec):
    t[COLUMNS.rho_product] = rec.rho * t_next[COLUMNS.rho_product]


def idle_apply(p, acc_grad, acc_delta, t, c, tol, zero):
    # epsilon == 0: replay (0/0 is NaN in the dense rule; see _idle.EPSILON_ZERO)
    rho_product = t[COLUMNS.rho_product]
    return p * t[COLUMNS.decay], acc_grad * rho_product, acc_delta * rho_product, c.epsilon > 0
