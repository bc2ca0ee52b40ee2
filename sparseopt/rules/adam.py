r"""Adam (Kingma & Ba, 2014), with AMSGrad, as Keras 3's ``keras.optimizers.Adam``.

.. math::

    t &= \text{iterations} + 1,\qquad
    \alpha_t = \eta\,\frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t} \\
    m &\leftarrow m + (g - m)(1-\beta_1) \\
    v &\leftarrow v + (g^2 - v)(1-\beta_2) \\
    \hat v &\leftarrow \max(\hat v, v) \quad\text{(AMSGrad only; then } v := \hat v\text{ below)} \\
    p &\leftarrow p - \alpha_t\, \frac{m}{\sqrt{v} + \epsilon}

The epsilon is added outside the square root and is *not* bias-corrected (Keras'
"epsilon hat" of the paper's section 2.1), so results differ from the paper's
algorithm 1 (and from ``optax.adam``) when ``v`` is tiny.

Legacy (``tf_keras.optimizers.legacy.Adam``, ``legacy=True``): TensorFlow's
``ResourceApplyAdam`` kernel computes the same form (the bias-corrected
:math:`\alpha_t` and the same uncorrected "epsilon hat"), but both betas are float32
variables, also in ``1 - beta``.
"""

import math
from typing import NamedTuple

from sparseopt.rules._floatx import f32

SLOTS = ("m", "v", "vhat")


class Coefficients(NamedTuple):
    alpha: float          # bias-corrected step size
    one_minus_beta_1: float
    one_minus_beta_2: float
    epsilon: float
    amsgrad: float        # 1 or 0


def coefficients(learning_rate, beta_1, beta_2, epsilon, step, amsgrad=False, legacy=False):
    """Per-step scalars for ``update``; ``step`` is ``iterations + 1``.

    Keras casts the betas through float32 in the bias-correction powers only (see
    :mod:`sparseopt.rules._floatx`); ``1 - beta`` keeps full precision. With
    ``legacy=True`` (tf_keras) the betas are float32 everywhere.
    """
    if legacy:
        beta_1, beta_2 = f32(beta_1), f32(beta_2)
    alpha = learning_rate * math.sqrt(1.0 - f32(beta_2) ** step) / (1.0 - f32(beta_1) ** step)
    return Coefficients(alpha, 1.0 - beta_1, 1.0 - beta_2, epsilon, 1.0 if amsgrad else 0.0)


def update(p, g, m, v, vhat, c):
    m = m + (g - m) * c.one_minus_beta_1
    v = v + (g * g - v) * c.one_minus_beta_2
    second = v
    if c.amsgrad != 0:  # the branch picks an operand: one square root and one division
        vhat = max(vhat, v)
        second = vhat
    p = p - c.alpha * m / (math.sqrt(second) + c.epsilon)
    return p, m, v, vhat


# --- exact mode (sparse_mode="exact"): idle steps, see sparseopt.rules._idle ---------------
#
# With a zero gradient m and v decay geometrically, vhat stays, and each step moves p by
# alpha_t m_t / (sqrt(v_t) + eps). AMSGrad has a closed form (the denominator is fixed);
# plain Adam has none because of eps: the sum over the window is expanded in eps/sqrt(v)
# (terms W_n below) and truncated once the tail is below the dtype's rounding; where that
# ratio is not small, in the decay of sqrt(v) over the window (the centred series, W'_n,
# see _idle.window_series_apply); the steps are replayed where neither converges (a long
# window with sqrt(v) close to eps). Exact to rounding.

from sparseopt.rules import _idle  # noqa: E402

#: D, prod beta_1, prod beta_2, the AMSGrad sum, W_n (eps-series), W'_n (centred series)
COLUMNS = _idle.columns(beta_1_product=1, beta_2_product=1, amsgrad_sum=1,
                        series=_idle.SERIES_COLUMNS, centred=_idle.SERIES_COLUMNS)
IDLE_COLUMNS = COLUMNS.count
IDLE_CONSTANT = ("epsilon", "amsgrad")


def idle_table_init(t):
    t[COLUMNS.beta_1_product] = 1.0
    t[COLUMNS.beta_2_product] = 1.0


def idle_table_step(t, t_next, rec):
    b1 = 1.0 - rec.one_minus_beta_1
    b2 = 1.0 - rec.one_minus_beta_2
    t[COLUMNS.beta_1_product] = b1 * t_next[COLUMNS.beta_1_product]
    t[COLUMNS.beta_2_product] = b2 * t_next[COLUMNS.beta_2_product]
    t[COLUMNS.amsgrad_sum] = b1 * (rec.alpha * t_next[COLUMNS.decay] + t_next[COLUMNS.amsgrad_sum])
    _idle.moment_series_step(t, t_next, COLUMNS.series, rec.alpha, b1, b2, 0.5, 1.0)
    _idle.centred_series_step(t, t_next, COLUMNS.centred, rec.alpha, b1, t_next[COLUMNS.beta_2_product],
                              0.5)


def idle_apply(p, m, v, vhat, t, c, tol, zero):
    # Branch-free (every case computed, then selected; every table read unconditional),
    # so the CPU catch-up pass over a row vectorizes.
    m_new = m * t[COLUMNS.beta_1_product]
    v_new = v * t[COLUMNS.beta_2_product]
    decay = p * t[COLUMNS.decay]
    amsgrad_sum = t[COLUMNS.amsgrad_sum]
    amsgrad = c.amsgrad != 0
    s = math.sqrt(vhat if amsgrad else v)
    moved, ok = _idle.window_series_apply(decay, m, s, c.epsilon, t, COLUMNS.series, COLUMNS.centred,
                                          math.sqrt(t[COLUMNS.beta_2_product]), tol)
    # AMSGrad: the denominator is fixed over the window; Adam: the two series
    if amsgrad:
        moved = decay if m == 0 else decay - m / (s + c.epsilon) * amsgrad_sum
    # epsilon == 0: replay (0/0 is NaN in the dense rule; see _idle.EPSILON_ZERO)
    return moved, m_new, v_new, vhat, (amsgrad | ok) & (c.epsilon > 0)
