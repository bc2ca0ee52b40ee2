r"""Adamax (Kingma & Ba, 2014, section 7.1), as Keras 3's ``keras.optimizers.Adamax``.

.. math::

    t &= \text{iterations} + 1 \\
    m &\leftarrow m + (g - m)(1-\beta_1) \\
    u &\leftarrow \max(\beta_2\, u,\ |g|) \\
    p &\leftarrow p - \frac{\eta}{1-\beta_1^t}\, \frac{m}{u + \epsilon}

Keras 3 casts ``beta_1`` through float32 in the bias correction :math:`\beta_1^t`
only; ``1 - beta_1`` and ``beta_2`` keep full precision.

Legacy (``tf_keras.optimizers.legacy.Adamax``, ``legacy=True``): the same formula
(TensorFlow's ``ResourceApplyAdaMax``), with both betas float32 variables everywhere.
"""

from typing import NamedTuple

from sparseopt.rules._floatx import f32

SLOTS = ("m", "v")


class Coefficients(NamedTuple):
    alpha: float          # bias-corrected step size
    one_minus_beta_1: float
    beta_2: float
    epsilon: float


def coefficients(learning_rate, beta_1, beta_2, epsilon, step, legacy=False):
    """Per-step scalars for ``update``; ``step`` is ``iterations + 1``."""
    if legacy:
        beta_1, beta_2 = f32(beta_1), f32(beta_2)
    alpha = learning_rate / (1.0 - f32(beta_1) ** step)
    return Coefficients(alpha, 1.0 - beta_1, beta_2, epsilon)


def update(p, g, m, u, c):
    m = m + (g - m) * c.one_minus_beta_1
    u = max(abs(g), c.beta_2 * u)   # a NaN gradient propagates into u
    return p - c.alpha * m / (u + c.epsilon), m, u


# --- exact mode (sparse_mode="exact"): idle steps, see sparseopt.rules._idle ---------------
#
# With a zero gradient m decays by beta_1 and u by beta_2; each step moves p by
# alpha_t m_t / (u_t + eps): Adam's two series with the norm in place of the root.
# Exact to rounding.

from sparseopt.rules import _idle  # noqa: E402

#: D, prod beta_1, prod beta_2, W_n (eps-series), W'_n (centred series)
COLUMNS = _idle.columns(beta_1_product=1, beta_2_product=1, series=_idle.SERIES_COLUMNS,
                        centred=_idle.SERIES_COLUMNS)
IDLE_COLUMNS = COLUMNS.count
IDLE_CONSTANT = ("epsilon",)


def idle_table_init(t):
    t[COLUMNS.beta_1_product] = 1.0
    t[COLUMNS.beta_2_product] = 1.0


def idle_table_step(t, t_next, rec):
    b1 = 1.0 - rec.one_minus_beta_1
    t[COLUMNS.beta_1_product] = b1 * t_next[COLUMNS.beta_1_product]
    t[COLUMNS.beta_2_product] = rec.beta_2 * t_next[COLUMNS.beta_2_product]
    _idle.moment_series_step(t, t_next, COLUMNS.series, rec.alpha, b1, rec.beta_2, 1.0, 1.0)
    _idle.centred_series_step(t, t_next, COLUMNS.centred, rec.alpha, b1, t_next[COLUMNS.beta_2_product],
                              1.0)


def idle_apply(p, m, u, t, c, tol, zero):
    # Branch-free, as adam.idle_apply (the CPU catch-up pass over a row vectorizes).
    m_new = m * t[COLUMNS.beta_1_product]
    u_new = u * t[COLUMNS.beta_2_product]
    decay = p * t[COLUMNS.decay]
    p_new, ok = _idle.window_series_apply(decay, m, u, c.epsilon, t, COLUMNS.series, COLUMNS.centred,
                                          t[COLUMNS.beta_2_product], tol)
    return p_new, m_new, u_new, ok
