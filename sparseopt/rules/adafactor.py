r"""Adafactor (Shazeer and Stern, 2018), as Keras 3's ``keras.optimizers.Adafactor``: no
first moment, a second moment that is *factored* for a variable of rank >= 2.

.. math::

    t &= \text{iterations} + 1, \qquad \beta_t = 1 - t^{\text{beta\_2\_decay}},
        \qquad \rho_t = \min(\eta, 1/\sqrt{t}) \\
    q &= g^2 + \epsilon_1 \\
    \text{rank} < 2:&\quad v \leftarrow \beta_t v + (1-\beta_t)\, q \\
    \text{rank} \ge 2:&\quad r \leftarrow \beta_t r + (1-\beta_t)\, \text{mean}_{-1}(q),
        \quad c \leftarrow \beta_t c + (1-\beta_t)\, \text{mean}_{-2}(q),
        \quad v = \frac{r}{\text{mean}_{-1}(r)} \otimes c \\
    u &= g / \sqrt{v}, \qquad
        \alpha = \max(\epsilon_2, \text{rms}(p))\, \rho_t \\
    p &\leftarrow p - \alpha\, \frac{u}{\max(1, \text{rms}(u) / \text{clip\_threshold})}

``r`` has the variable's shape less its last axis, ``c`` its shape less its second last
axis (Keras factors the last two axes; a leading axis indexes independent matrices);
``rms`` is over the whole variable. ``p`` is the parameter after the decoupled weight
decay, which Keras applies before the update. Keras 3 takes ``min(lr, 1/sqrt(t))``
whether ``relative_step`` is set or not (it applies the minimum again in ``rho_t``), so
the rule has no flag for it.

A *factored* rule (see :mod:`sparseopt.rules`, "Factored rules"): the element functions
below are run by :mod:`sparseopt.kernels.factored` in three passes over the unit (the
whole variable in a dense step, the touched rows in a sparse one):

* ``square(g, c)``: :math:`q`, summed along the rows and columns;
* ``decay(s, mean, c)``: the new ``r``, ``c`` or ``v`` from a mean of :math:`q`;
* ``direction(g, v)``: :math:`u`; :math:`p^2` and :math:`u^2` are summed over the unit;
* ``scale(sum_p2, sum_u2, n, c) -> (alpha, divisor)`` once per unit (``n`` elements);
* ``apply(p, u, alpha, divisor)``: the new parameter.

No legacy variant: tf_keras' legacy optimizers have no Adafactor. No exact mode: an idle
row's step depends on statistics over the whole variable (see :class:`sparseopt.Adafactor`).
"""

import math
from typing import NamedTuple

SLOTS = ("v",)

#: The row and column statistics of a variable of rank >= 2 (which keeps no ``v``).
FACTORED_SLOTS = ("r", "c")

#: The rule is run by the factored kernels (:mod:`sparseopt.kernels.factored`).
FACTORED = True


def factored_shapes(shape):
    """The shapes of ``FACTORED_SLOTS`` for a variable of ``shape`` (rank >= 2): ``r`` drops
    the last axis, ``c`` the second last (host code: the optimizer and the bridge)."""
    shape = tuple(shape)
    return shape[:-1], shape[:-2] + shape[-1:]


class Coefficients(NamedTuple):
    beta_2: float             # beta_2_t = 1 - t ** beta_2_decay
    one_minus_beta_2: float   # 1 - beta_2_t
    epsilon_1: float
    epsilon_2: float
    clip_threshold: float
    rho: float                # min(learning_rate, 1 / sqrt(t))
    one: float


def coefficients(learning_rate, beta_2_decay, epsilon_1, epsilon_2, clip_threshold, step):
    """Per-step scalars; ``step`` is ``iterations + 1``."""
    beta_2 = 1.0 - float(step) ** beta_2_decay
    return Coefficients(beta_2, 1.0 - beta_2, epsilon_1, epsilon_2, clip_threshold,
                        min(learning_rate, 1.0 / math.sqrt(step)), 1.0)


def square(g, c):
    return g * g + c.epsilon_1


def decay(s, mean, c):
    return c.beta_2 * s + c.one_minus_beta_2 * mean


def direction(g, v):
    return g / math.sqrt(v)


def scale(sum_p2, sum_u2, n, c):
    alpha = max(c.epsilon_2, math.sqrt(sum_p2 / n)) * c.rho
    return alpha, max(c.one, math.sqrt(sum_u2 / n) / c.clip_threshold)


def apply(p, u, alpha, divisor):
    return p - alpha * (u / divisor)
