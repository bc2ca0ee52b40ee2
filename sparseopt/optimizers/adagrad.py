"""``Adagrad``: per-element learning rates from accumulated squared gradients."""

import numpy as np

from sparseopt.optimizer import Optimizer
from sparseopt.rules import adagrad as rule


class Adagrad(Optimizer):
    """Adagrad, as ``keras.optimizers.Adagrad`` (math: :mod:`sparseopt.rules.adagrad`).

    Args:
        learning_rate: float, callable or schedule. Defaults to 0.001.
        initial_accumulator_value: starting value of the accumulator (>= 0). Defaults to 0.1.
        epsilon: added inside the square root. Defaults to 1e-7.
        **kwargs: see :class:`~sparseopt.Optimizer`.

    Slots: ``"accumulator"``.

    Example:
        >>> import numpy as np, sparseopt as so
        >>> w = np.zeros(2, np.float64)
        >>> opt = so.Adagrad(learning_rate=0.1, initial_accumulator_value=0.0, epsilon=0.0)
        >>> opt.apply_gradients([(np.array([2.0, -3.0]), w)])
        1
        >>> w.round(6).tolist()  # the learning rate is float32, as in Keras
        [-0.1, 0.1]
    """

    _rule = rule
    _hyper_names = ("learning_rate", "epsilon")
    _has_legacy_math = True
    _settings = {**Optimizer._settings, "initial_accumulator_value": "number"}

    def __init__(self, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7,
                 name="adagrad", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon

    def _slot_initial_value(self, slot_name):
        # Keras' Constant initializer holds the value in float32, also for float64 slots;
        # tf_keras' (legacy) constant_initializer keeps it exact.
        value = self.initial_accumulator_value
        return value if self._legacy else float(np.float32(value))

    def _coefficients(self, hypers, step):
        return rule.coefficients(hypers["learning_rate"], hypers["epsilon"], legacy=self._legacy)

    def get_config(self):
        return {**super().get_config(), "initial_accumulator_value": self.initial_accumulator_value}
