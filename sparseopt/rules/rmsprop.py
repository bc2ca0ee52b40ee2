r"""RMSprop (Hinton, 2012), with momentum and the centered variant, as Keras 3's ``keras.optimizers.RMSprop``.

.. math::

    r &\leftarrow \rho\, r + (1-\rho)\, g^2 \\
    \bar g &\leftarrow \rho\, \bar g + (1-\rho)\, g \quad\text{(centered only)} \\
    \Delta &= \eta\, \frac{g}{\sqrt{r - \bar g^2 + \epsilon}}
        \quad(\text{without centering: } \bar g = 0) \\
    b &\leftarrow \mu\, b + \Delta,\quad p \leftarrow p - b
        \quad\text{with momentum } \mu > 0, \text{ else } p \leftarrow p - \Delta

Keras 3 puts the epsilon *inside* the square root on every path, and uses ``rho``,
``momentum`` and ``epsilon`` at full precision (only the learning rate is float32).

Legacy (``tf_keras.optimizers.legacy.RMSprop``, ``legacy=True``): ``rho`` and
``momentum`` are float32 variables, and the two paths place the epsilon
differently. With momentum it runs TensorFlow's ``ResourceApply(Centered)RMSProp``
kernels, which match the formula above; without momentum it runs Python ops that put
the epsilon *outside* the root: :math:`p \leftarrow p - \eta\, g / (\sqrt{r - \bar g^2} + \epsilon)`
(the TF1 ``RMSPropOptimizer`` heritage; Optax's ``eps_in_sqrt`` flag describes the same choice).
"""

import math
from typing import NamedTuple

from sparseopt.rules._floatx import f32

SLOTS = ("rms", "momentum", "mg")


class Coefficients(NamedTuple):
    learning_rate: float
    rho: float
    one_minus_rho: float
    momentum: float
    epsilon_inside: float   # added under the square root, else 0
    epsilon_outside: float  # added to the square root (tf_keras' momentum-free path), else 0
    use_momentum: float   # 1 when momentum > 0 (then the "momentum" slot exists)
    centered: float       # 1 when centered (then the "mg" slot exists)
    legacy_plain: float   # 1 for tf_keras' momentum-free path: epsilon outside the root


def coefficients(learning_rate, rho, momentum, epsilon, centered, legacy=False):
    """Per-step scalars for ``update``; ``legacy=True`` reproduces ``tf_keras.optimizers.legacy.RMSprop``."""
    if legacy:
        rho, momentum = f32(rho), f32(momentum)
    use_momentum = momentum > 0
    plain = legacy and not use_momentum
    return Coefficients(learning_rate, rho, 1.0 - rho, momentum,
                        0.0 if plain else epsilon, epsilon if plain else 0.0,
                        1.0 if use_momentum else 0.0, 1.0 if centered else 0.0,
                        1.0 if plain else 0.0)


def update(p, g, rms, mom, mg, c):
    rms = c.rho * rms + c.one_minus_rho * g * g
    denominator = rms
    if c.centered != 0:
        mg = c.rho * mg + c.one_minus_rho * g
        denominator = rms - mg * mg
    # Both placements of epsilon in one expression (the other's is 0, which changes no
    # bits): one square root and one division, where a branch would be if-converted into two.
    increment = c.learning_rate * g / (math.sqrt(denominator + c.epsilon_inside) + c.epsilon_outside)
    if c.use_momentum != 0:
        mom = c.momentum * mom + increment
        p = p - mom
    else:
        p = p - increment
    return p, rms, mom, mg


# --- exact mode (sparse_mode="exact"): idle steps, see sparseopt.rules._idle ---------------
#
# With a zero gradient rms (and mg) decay by rho and the increment is zero; with momentum the
# velocity decays by mu and still moves p: closed form p <- D p - b sum_t mu^(t-L) D(t).
# Exact to rounding (bit-exact for p without momentum and weight decay).

from sparseopt.rules import _idle  # noqa: E402

#: D, prod rho, prod mu, sum_t mu^(t-L) D(t)
COLUMNS = _idle.columns(rho_product=1, momentum_product=1, momentum_sum=1)
IDLE_COLUMNS = COLUMNS.count
IDLE_CONSTANT = ("momentum", "use_momentum", "centered", "legacy_plain")


def idle_table_init(t):
    t[COLUMNS.rho_product] = 1.0
    t[COLUMNS.momentum_product] = 1.0


def idle_table_step(t, t_next, rec):
    t[COLUMNS.rho_product] = rec.rho * t_next[COLUMNS.rho_product]
    t[COLUMNS.momentum_product] = rec.momentum * t_next[COLUMNS.momentum_product]
    t[COLUMNS.momentum_sum] = rec.momentum * (t_next[COLUMNS.decay] + t_next[COLUMNS.momentum_sum])


def idle_apply(p, rms, mom, mg, t, c, tol, zero):
    # Branch-free (the table read unconditionally), so the CPU catch-up pass vectorizes.
    decay = p * t[COLUMNS.decay]
    moving = t[COLUMNS.momentum_sum]
    moved = decay - mom * moving
    p_new = moved if (c.legacy_plain == 0) & (c.use_momentum != 0) else decay
    # epsilon == 0: replay (0/0 is NaN in the dense rule; see _idle.EPSILON_ZERO)
    ok = c.epsilon_inside + c.epsilon_outside > 0
    rho_product = t[COLUMNS.rho_product]
    return p_new, rms * rho_product, mom * t[COLUMNS.momentum_product], mg * rho_product, ok
