r"""Stochastic gradient descent with momentum and Nesterov momentum, as ``keras.optimizers.SGD``.

Without momentum: :math:`p \leftarrow p - \eta g`. With momentum :math:`\mu`:

.. math::

    b &\leftarrow \mu b - \eta g \\
    p &\leftarrow p + b \quad\text{or, with Nesterov,}\quad p \leftarrow p + \mu b - \eta g

(the velocity form of Keras, which differs from torch's ``SGD``: torch keeps
:math:`b \leftarrow \mu b + g` and scales by the learning rate afterwards; the two agree
for a constant learning rate).

Legacy (``tf_keras.optimizers.legacy.SGD``, ``legacy=True``): TensorFlow's
``ResourceApplyKerasMomentum`` kernel computes the same velocity form, with
``momentum`` a float32 variable: the coefficients are the same.
"""

from typing import NamedTuple

from sparseopt.rules._floatx import f32

SLOTS = ("momentum",)


class Coefficients(NamedTuple):
    learning_rate: float
    momentum: float
    use_momentum: float   # 1 when momentum != 0 (then the "momentum" slot exists)
    nesterov: float


def coefficients(learning_rate, momentum, nesterov, legacy=False):
    """Keras casts ``momentum`` through float32 (see :mod:`sparseopt.rules._floatx`); so does tf_keras."""
    return Coefficients(learning_rate, f32(momentum), 1.0 if momentum != 0 else 0.0,
                        1.0 if nesterov else 0.0)


def update(p, g, b, c):
    if c.use_momentum != 0:
        b = -g * c.learning_rate + b * c.momentum
        if c.nesterov != 0:
            p = p + (-g * c.learning_rate + b * c.momentum)
        else:
            p = p + b
    else:
        p = p - g * c.learning_rate
    return p, b


# --- exact mode (sparse_mode="exact"): idle steps, see sparseopt.rules._idle ---------------
#
# With a zero gradient b decays by the momentum mu and p moves by b_t (Nesterov: mu b_t):
# closed form p <- D p + b sum_t mu^(t-L) D(t), b <- b mu^k. Without momentum p only
# decays. Exact to rounding (bit-exact without momentum and weight decay).

from sparseopt.rules import _idle  # noqa: E402

#: D, prod mu, sum_t mu^(t-L) D(t)
COLUMNS = _idle.columns(momentum_product=1, momentum_sum=1)
IDLE_COLUMNS = COLUMNS.count
IDLE_CONSTANT = ("momentum", "use_momentum", "nesterov")


def idle_table_init(t):
    t[COLUMNS.momentum_product] = 1.0


def idle_table_step(t, t_next, rec):
    t[COLUMNS.momentum_product] = rec.momentum * t_next[COLUMNS.momentum_product]
    t[COLUMNS.momentum_sum] = rec.momentum * (t_next[COLUMNS.decay] + t_next[COLUMNS.momentum_sum])


def idle_apply(p, b, t, c, tol, zero):
    # Branch-free (both cases computed, then selected; the table read unconditionally),
    # so the CPU catch-up pass over a row vectorizes.
    decay = t[COLUMNS.decay]
    b_decay = t[COLUMNS.momentum_product]
    b_sum = t[COLUMNS.momentum_sum]
    scale = c.momentum if c.nesterov != 0 else c.use_momentum
    moved = p * decay + b * scale * b_sum
    if c.use_momentum == 0:
        return p * decay, b * decay, True
    return moved, b * b_decay, True


def idle_is_identity(c, wd):
    """Without momentum and weight decay the idle step is ``p - 0 * lr = p``, bit for bit."""
    return wd == 0 and c.use_momentum == 0
