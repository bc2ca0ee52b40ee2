r"""FTRL-Proximal (McMahan et al., 2013), as Keras 3's ``keras.optimizers.Ftrl``.

With :math:`q = -\text{learning\_rate\_power}` (0.5 by default), the L2 strength
:math:`\lambda_2 = \text{l2} + \beta / (2\eta)` and the shrinkage :math:`\lambda_s`:

.. math::

    \tilde g &= g + 2 \lambda_s\, p \\
    n' &= n + g^2 \\
    z &\leftarrow z + \tilde g - \frac{n'^{\,q} - n^q}{\eta}\, p \\
    p &\leftarrow \frac{\operatorname{clip}(z, -\lambda_1, \lambda_1) - z}{n'^{\,q} / \eta + 2 \lambda_2}
        \quad(= 0 \text{ where } |z| \le \lambda_1), \qquad n \leftarrow n'

The accumulator ``n`` starts at ``initial_accumulator_value`` and grows with the
*unshrunk* gradient. Keras 3 uses every strength at full precision (its ``Constant``
initializer rounds the initial accumulator to float32, see the optimizer class).
For ``learning_rate_power == -0.5`` the power is a square root (as TensorFlow's kernels do).

Legacy (``tf_keras.optimizers.legacy.Ftrl``, ``legacy=True``): TensorFlow's
``ResourceApplyFtrl(V2)`` computes the same formula with ``learning_rate_power``, the L1
and L2 strengths, ``beta`` and the shrinkage strength as float32 values (and an
unrounded initial accumulator).
"""

import math
from typing import NamedTuple

from sparseopt.rules._floatx import f32

SLOTS = ("accumulator", "linear")


class Coefficients(NamedTuple):
    learning_rate: float
    power: float              # -learning_rate_power
    use_sqrt: float           # 1 when power == 0.5
    l1: float
    neg_l1: float
    two_l2: float             # 2 * (l2 + beta / (2 * learning_rate))
    two_shrinkage: float      # 2 * l2_shrinkage_regularization_strength


def coefficients(learning_rate, learning_rate_power, l1_regularization_strength,
                 l2_regularization_strength, l2_shrinkage_regularization_strength, beta,
                 legacy=False):
    """Per-step scalars for ``update``; ``legacy=True`` rounds every strength to float32 as tf_keras does."""
    values = (learning_rate_power, l1_regularization_strength, l2_regularization_strength,
              l2_shrinkage_regularization_strength, beta)
    if legacy:
        values = tuple(f32(x) for x in values)
    power_arg, l1, l2, shrinkage, beta = values
    power = -power_arg
    l2 = l2 + beta / (2.0 * learning_rate)
    return Coefficients(learning_rate, power, 1.0 if power == 0.5 else 0.0, l1, -l1,
                        2.0 * l2, 2.0 * shrinkage)


#: True in the variant ``"sqrt"``, for steps with ``use_sqrt`` (``learning_rate_power ==
#: -0.5``, the default; see :func:`variant_for`): there the flag is known at compile time,
#: and the ``pow`` branch, which the vectorizer would otherwise run for every element, is
#: dropped (3-4x faster kernels).
SQRT_ONLY = False

#: Compile-time variants: name -> the module constants fixed in it (see :mod:`sparseopt.rules`).
VARIANTS = {"sqrt": {"SQRT_ONLY": True}}


def variant_for(c):
    """The variant to compile for a step with coefficients ``c``: ``"sqrt"`` when
    ``c.use_sqrt`` (``learning_rate_power == -0.5``), else None (the rule as it is)."""
    return "sqrt" if c.use_sqrt != 0 else None


def update(p, g, n, z, c):
    n_new = n + g * g
    if SQRT_ONLY or c.use_sqrt != 0:
        n_pow = math.sqrt(n)
        n_new_pow = math.sqrt(n_new)
    else:
        n_pow = math.pow(n, c.power)
        n_new_pow = math.pow(n_new, c.power)
    z = z + (g + c.two_shrinkage * p) - (n_new_pow - n_pow) / c.learning_rate * p
    clipped = min(max(z, c.neg_l1), c.l1)   # NaN in z propagates
    p = (clipped - z) / (n_new_pow / c.learning_rate + c.two_l2)
    return p, n_new, z


# --- exact mode (sparse_mode="exact"): idle steps, see sparseopt.rules._idle ---------------
#
# Without shrinkage a zero gradient leaves n and z unchanged and recomputes p from them, so
# the idle steps equal one step with the last idle step's coefficients (bit-exact; the weight
# decay is overwritten by that recomputation). With shrinkage z keeps moving with p: replay
# (bounded by the history), bit-exact.

#
# No ``idle_is_identity``: the idle step is not the identity even without shrinkage. It
# recomputes p from z and n with the step's coefficients, so it moves every row that no
# step has computed yet (dense Ftrl sets an untouched row with z = 0 to 0 at its first
# step, l1 and l2 or not) and every row when the learning rate, l1 or l2 changes. It is
# the identity only on rows last computed with the same coefficients, a per-row fact
# that needs the bookkeeping this shortcut exists to skip.

IDLE_COLUMNS = 1
IDLE_CONSTANT = ("two_shrinkage",)


def idle_table_init(t):
    return


def idle_table_step(t, t_next, rec):
    return


def idle_apply(p, n, z, t, c, tol, zero):
    if c.two_shrinkage != 0:
        return p, n, z, False
    # update(p, 0, n, z, c): n and z unchanged, p recomputed (the same expressions)
    if SQRT_ONLY or c.use_sqrt != 0:
        n_pow = math.sqrt(n)
    else:
        n_pow = math.pow(n, c.power)
    clipped = min(max(z, c.neg_l1), c.l1)
    return (clipped - z) / (n_pow / c.learning_rate + c.two_l2), n, z, True
