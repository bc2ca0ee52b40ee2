r"""Lion (Chen et al., 2023), as Keras 3's ``keras.optimizers.Lion``.

.. math::

    p &\leftarrow p - \eta\, \operatorname{sign}\big(\beta_1 m + (1-\beta_1)\, g\big) \\
    m &\leftarrow \beta_2 m + (1-\beta_2)\, g

The step has the same size :math:`\eta` on every coordinate (zero where the
interpolation is exactly zero; NaN propagates). Keras 3 casts both betas through
float32 (see :mod:`sparseopt.rules._floatx`), also in ``1 - beta``.
No legacy variant: ``tf_keras.optimizers.legacy`` has no Lion.
"""

from typing import NamedTuple

from sparseopt.rules._floatx import f32

SLOTS = ("momentum",)


class Coefficients(NamedTuple):
    learning_rate: float
    beta_1: float
    one_minus_beta_1: float
    beta_2: float
    one_minus_beta_2: float


def coefficients(learning_rate, beta_1, beta_2):
    beta_1, beta_2 = f32(beta_1), f32(beta_2)
    return Coefficients(learning_rate, beta_1, 1.0 - beta_1, beta_2, 1.0 - beta_2)


def update(p, g, m, c):
    direction = m * c.beta_1 + g * c.one_minus_beta_1
    if direction > 0:
        p = p - c.learning_rate
    elif direction < 0:
        p = p + c.learning_rate
    elif direction != direction:    # NaN: sign(NaN) is NaN
        p = p + direction
    m = m * c.beta_2 + g * c.one_minus_beta_2
    return p, m


# --- exact mode (sparse_mode="exact"): idle steps, see sparseopt.rules._idle ---------------
#
# With a zero gradient the momentum decays by beta_2 and keeps its sign, so every idle step
# moves p by -lr_t sign(m): closed form p <- D p - sign(m) sum_t lr_t D(t), m <- m prod beta_2,
# as long as beta_1 m_t does not underflow to zero inside the window (then: replay).
# Exact to rounding.

from sparseopt.rules import _idle  # noqa: E402

#: D, prod beta_2, sum_t lr_t D(t)
COLUMNS = _idle.columns(beta_2_product=1, learning_rate_sum=1)
IDLE_COLUMNS = COLUMNS.count
IDLE_CONSTANT = ()
#: Below this, beta_1 m_t might underflow inside the window: replay instead.
_SAFE_MAGNITUDE = 1e-30


def idle_table_init(t):
    t[COLUMNS.beta_2_product] = 1.0


def idle_table_step(t, t_next, rec):
    t[COLUMNS.beta_2_product] = rec.beta_2 * t_next[COLUMNS.beta_2_product]
    lr_sum = t_next[COLUMNS.learning_rate_sum]
    t[COLUMNS.learning_rate_sum] = rec.learning_rate * t_next[COLUMNS.decay] + lr_sum


def idle_apply(p, m, t, c, tol, zero):
    # Branch-free (every case computed, then selected; the table read unconditionally),
    # so the CPU catch-up pass over a row vectorizes.
    decay = p * t[COLUMNS.decay]
    m_decay = t[COLUMNS.beta_2_product]
    m_new = m * m_decay
    lr_sum = t[COLUMNS.learning_rate_sum]
    moved = decay - lr_sum if m > 0 else decay + lr_sum
    ok = (m == 0) | (abs(m) * m_decay * c.beta_1 > _SAFE_MAGNITUDE)
    return (decay if m == 0 else moved), m_new, ok
