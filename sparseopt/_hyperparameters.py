"""Range checks of the optimizers' arguments (clear errors, before any state exists).

Every hyperparameter is checked when it is set, at construction and at reassignment
(``opt.rho = 2`` raises as ``RMSprop(rho=2)`` does), by :class:`sparseopt.Optimizer`'s
``__setattr__``; a callable or a schedule is checked on its value at each step, before
anything is written. The ranges follow torch's constructors (``0 <= beta < 1``,
``epsilon >= 0``, ``learning_rate >= 0``, ...): :data:`DEFAULT_RANGES` by name, which
an optimizer class overrides in its ``_ranges`` (Lion's ``beta_1`` is in ``(0, 1]``).
A value must also stay finite and in range once rounded to float32, the precision
Keras and float32 variables compute with: ``learning_rate=1e39`` (``inf`` in float32)
and ``beta_1=1 - 1e-9`` (``1.0`` in float32) are refused.
"""

import math
from typing import NamedTuple

from sparseopt import errors
from sparseopt.rules._floatx import f32


class Range(NamedTuple):
    """The interval a float hyperparameter must lie in (``None``: unbounded)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, x):
        """Whether ``x`` lies in the range (False for NaN)."""
        if self.low is not None and not (x > self.low if self.low_open else x >= self.low):
            return False
        if self.high is not None and not (x < self.high if self.high_open else x <= self.high):
            return False
        return x == x

    def __str__(self):
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")


_UNIT = Range(0.0, 1.0)
_BETA = Range(0.0, 1.0, high_open=True)
_NONNEGATIVE = Range(0.0)

#: The range of each hyperparameter, by name (torch's constructors are the anchor).
DEFAULT_RANGES = {
    "learning_rate": _NONNEGATIVE,
    "epsilon": _NONNEGATIVE,
    "beta_1": _BETA,
    "beta_2": _BETA,
    "rho": _UNIT,
    "momentum": _UNIT,
    "initial_accumulator_value": _NONNEGATIVE,
    "learning_rate_power": Range(None, 0.0),
    "l1_regularization_strength": _NONNEGATIVE,
    "l2_regularization_strength": _NONNEGATIVE,
    "l2_shrinkage_regularization_strength": _NONNEGATIVE,
    "beta": _NONNEGATIVE,
}


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_value(opt_name, key, value, rng):
    """``value`` (a float) if it is finite and in ``rng``, also once rounded to float32."""
    if not math.isfinite(value):
        raise errors.HyperparameterError(
            f"{opt_name}: hyperparameter {key!r} is {value}; it must be finite")
    if rng is not None and not rng.contains(value):
        raise errors.HyperparameterError(f"{opt_name}: {key} must be a float {rng}; got {value!r}")
    rounded = f32(value)
    if not math.isfinite(rounded) or (rng is not None and not rng.contains(rounded)):
        raise errors.HyperparameterError(
            f"{opt_name}: {key} must be a float {rng}{' and finite' if rng else ' finite'} in float32 "
            f"(the precision the kernels use); got {value!r}, which is {rounded!r} in float32")
    return value


def check_number(opt_name, key, value, rng):
    """A plain number (a structural argument such as SGD's ``momentum``) in ``rng``."""
    if hasattr(value, "ndim") and getattr(value, "ndim") == 0 and hasattr(value, "item"):
        value = value.item()
    if not is_number(value):
        raise errors.HyperparameterError(
            f"{opt_name}: {key} must be a float{' ' + str(rng) if rng else ''}; got {value!r}")
    return check_value(opt_name, key, float(value), rng)
