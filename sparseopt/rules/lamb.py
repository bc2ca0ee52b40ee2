r"""LAMB (You et al., 2019), as Keras 3's ``keras.optimizers.Lamb``: Adam's moments and a
trust ratio from the norms of the weights and of the update.

.. math::

    t &= \text{iterations} + 1 \\
    m &\leftarrow m + (g - m)(1-\beta_1), \qquad v \leftarrow v + (g^2 - v)(1-\beta_2) \\
    u &= \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon} \\
    r &= \frac{\lVert p \rVert}{\lVert u \rVert}
        \quad (1 \text{ where either norm is } 0) \\
    p &\leftarrow p - \eta\, r\, u

Unlike Adam's, the epsilon is added to the root of the *bias-corrected* second moment (as
Keras writes it). ``p`` is the parameter after the decoupled weight decay, which Keras
applies before the update (so the trust ratio sees the decayed weights).

The norms are a *reduction* over the unit a kernel updates (see :mod:`sparseopt.rules`,
"Reduction rules"): the whole variable in a dense step (Keras: ``||w||`` over the
variable), each touched row in a sparse step (FBGEMM's partial row-wise LAMB: a row's trust
ratio from that row's parameter and update). So a sparse step of a one-row table equals the
dense step, and a dense step of a table is not a sequence of row steps.

* ``reduce_terms``: the moments, the update ``u`` and the two terms summed over the unit,
  :math:`p^2` and :math:`u^2`;
* ``reduce_scale``: :math:`\eta\, r` from the two sums, once per unit;
* ``reduce_apply``: :math:`p - \eta r\, u`.

No legacy variant: tf_keras' legacy optimizers have no Lamb. No exact mode: an idle row's
step depends on the norm over the whole variable (see :class:`sparseopt.Lamb`).
"""

import math
from typing import NamedTuple

from sparseopt.rules._floatx import f32

SLOTS = ("m", "v")

#: The rule has a reduction stage (``reduce_terms``, ``reduce_scale``, ``reduce_apply``)
#: in place of ``update``.
REDUCTION = True


class Coefficients(NamedTuple):
    learning_rate: float
    one_minus_beta_1: float
    one_minus_beta_2: float
    bias_1: float         # 1 - beta_1 ** t
    bias_2: float         # 1 - beta_2 ** t
    epsilon: float
    one: float            # the trust ratio where a norm is 0 (no float literals in a rule)


def coefficients(learning_rate, beta_1, beta_2, epsilon, step):
    """Per-step scalars; ``step`` is ``iterations + 1``. Keras casts the betas through
    float32 in the powers (``ops.cast(beta, dtype)``), not in ``1 - beta``."""
    return Coefficients(learning_rate, 1.0 - beta_1, 1.0 - beta_2, 1.0 - f32(beta_1) ** step,
                        1.0 - f32(beta_2) ** step, epsilon, 1.0)


def reduce_terms(p, g, m, v, c):
    m = m + (g - m) * c.one_minus_beta_1
    v = v + (g * g - v) * c.one_minus_beta_2
    u = (m / c.bias_1) / (math.sqrt(v / c.bias_2) + c.epsilon)
    return u, m, v, p * p, u * u


def reduce_scale(p_squares, u_squares, c):
    w_norm = math.sqrt(p_squares)
    u_norm = math.sqrt(u_squares)
    ratio = c.one
    if w_norm > 0 and u_norm > 0:   # Keras: 1 where either norm is 0 (or NaN)
        ratio = w_norm / u_norm
    return ratio * c.learning_rate


def reduce_apply(p, u, scale, c):
    return p - scale * u
