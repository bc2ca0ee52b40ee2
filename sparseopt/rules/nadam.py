r"""Nadam (Dozat, 2016): Adam with Nesterov momentum, as Keras 3's ``keras.optimizers.Nadam``.

With the momentum schedule :math:`\mu_t = \beta_1 (1 - \tfrac12\, 0.96^{t})` and its
running product :math:`\Pi_t = \prod_{i \le t} \mu_i` (optimizer state, ``u_product``,
advanced once per step on the host by :func:`next_u_product`):

.. math::

    t &= \text{iterations} + 1 \\
    m &\leftarrow m + (g - m)(1-\beta_1), \qquad v \leftarrow v + (g^2 - v)(1-\beta_2) \\
    \hat m &= \frac{\mu_{t+1}}{1 - \Pi_t\, \mu_{t+1}}\, m + \frac{1 - \mu_t}{1 - \Pi_t}\, g,
    \qquad \hat v = \frac{v}{1 - \beta_2^t} \\
    p &\leftarrow p - \eta\, \frac{\hat m}{\sqrt{\hat v} + \epsilon}

Keras 3 advances :math:`\Pi` with the unrounded ``beta_1`` and 0.96, but casts
``beta_1``, ``beta_2`` and 0.96 through float32 in the update itself (also in
``1 - beta``); :func:`coefficients` does the same, so float64 agrees to 1e-10.

Legacy (``tf_keras.optimizers.legacy.Nadam``, ``legacy=True``): the schedule of the
paper, :math:`\mu_t = \beta_1 (1 - \tfrac12\, 0.96^{d\,t})` with the schedule decay
:math:`d` (tf_keras' ``decay`` argument, alias ``schedule_decay``, default 0.004; it does
not decay the learning rate there), whose product is kept in the ``momentum_cache``
weight (the same state as ``u_product``); the betas and 0.96 are float32 everywhere.
The element update is the same formula (``g' = g / (1 - \Pi_t)``,
``m' = m / (1 - \Pi_{t+1})``).
"""

import math
from typing import NamedTuple

from sparseopt.rules._floatx import f32

SLOTS = ("m", "v")

#: The legacy momentum schedule's decay (tf_keras' ``schedule_decay`` default).
LEGACY_SCHEDULE_DECAY = 0.004


class Coefficients(NamedTuple):
    learning_rate: float
    one_minus_beta_1: float
    one_minus_beta_2: float
    m_weight: float       # mu_{t+1} / (1 - Pi_t mu_{t+1})
    g_weight: float       # (1 - mu_t) / (1 - Pi_t)
    v_correction: float   # 1 - beta_2 ** t
    epsilon: float


def _mu(beta_1, decay, step, legacy, schedule_decay):
    exponent = schedule_decay * step if legacy else step
    return beta_1 * (1.0 - 0.5 * decay ** exponent)


def next_u_product(u_product, beta_1, step, legacy=False, schedule_decay=LEGACY_SCHEDULE_DECAY):
    """The momentum-schedule product after step ``step`` (``iterations + 1``), from the one before.

    Keras 3 uses the unrounded ``beta_1`` and 0.96 here; tf_keras rounds both to float32.
    ``schedule_decay`` is the legacy schedule's (Keras 3 has none).
    """
    if legacy:
        return u_product * _mu(f32(beta_1), f32(0.96), step, True, schedule_decay)
    return u_product * beta_1 * (1.0 - 0.5 * 0.96 ** step)


def coefficients(learning_rate, beta_1, beta_2, epsilon, step, u_product, legacy=False,
                 schedule_decay=LEGACY_SCHEDULE_DECAY):
    """Per-step scalars for ``update``; ``u_product`` is :func:`next_u_product` of this step."""
    beta_1, beta_2, decay = f32(beta_1), f32(beta_2), f32(0.96)
    mu_t = _mu(beta_1, decay, step, legacy, schedule_decay)
    mu_next = _mu(beta_1, decay, step + 1, legacy, schedule_decay)
    return Coefficients(learning_rate, 1.0 - beta_1, 1.0 - beta_2,
                        mu_next / (1.0 - u_product * mu_next), (1.0 - mu_t) / (1.0 - u_product),
                        1.0 - beta_2 ** step, epsilon)


def update(p, g, m, v, c):
    m = m + (g - m) * c.one_minus_beta_1
    v = v + (g * g - v) * c.one_minus_beta_2
    m_hat = c.m_weight * m + c.g_weight * g
    p = p - c.learning_rate * m_hat / (math.sqrt(v / c.v_correction) + c.epsilon)
    return p, m, v


# --- exact mode (sparse_mode="exact"): idle steps, see sparseopt.rules._idle ---------------
#
# With a zero gradient m_hat = m_weight m and each step moves p by
# lr m_weight sqrt(vc) m_t / (sqrt(v_t) + eps sqrt(vc)): Adam's eps-series with a per-step
# eps scale e_t = sqrt(vc_t). Exact to rounding.

from sparseopt.rules import _idle  # noqa: E402

#: D, prod beta_1, prod beta_2, W_n (eps-series)
COLUMNS = _idle.columns(beta_1_product=1, beta_2_product=1, series=_idle.SERIES_COLUMNS)
IDLE_COLUMNS = COLUMNS.count
IDLE_CONSTANT = ("epsilon",)


def idle_table_init(t):
    t[COLUMNS.beta_1_product] = 1.0
    t[COLUMNS.beta_2_product] = 1.0


def idle_table_step(t, t_next, rec):
    b1 = 1.0 - rec.one_minus_beta_1
    b2 = 1.0 - rec.one_minus_beta_2
    t[COLUMNS.beta_1_product] = b1 * t_next[COLUMNS.beta_1_product]
    t[COLUMNS.beta_2_product] = b2 * t_next[COLUMNS.beta_2_product]
    e = math.sqrt(rec.v_correction)
    _idle.moment_series_step(t, t_next, COLUMNS.series, rec.learning_rate * rec.m_weight * e, b1, b2,
                             0.5, e)


def idle_apply(p, m, v, t, c, tol, zero):
    # Branch-free, as adam.idle_apply (the CPU catch-up pass over a row vectorizes).
    m_new = m * t[COLUMNS.beta_1_product]
    v_new = v * t[COLUMNS.beta_2_product]
    decay = p * t[COLUMNS.decay]
    limit = _idle.SERIES_LIMIT * math.sqrt(t[COLUMNS.beta_2_product])
    p_new, ok = _idle.series_apply(decay, m, math.sqrt(v), c.epsilon, t, COLUMNS.series, limit, tol)
    return p_new, m_new, v_new, ok
