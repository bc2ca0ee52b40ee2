"""``RMSprop``: gradients scaled by a running root mean square, with momentum and centering."""

from sparseopt.optimizer import Optimizer
from sparseopt.rules import rmsprop as rule


class RMSprop(Optimizer):
    """RMSprop, as ``keras.optimizers.RMSprop`` (math: :mod:`sparseopt.rules.rmsprop`).

    Args:
        learning_rate: float, callable or schedule. Defaults to 0.001.
        rho: decay of the running mean square. Defaults to 0.9.
        momentum: float in [0, 1]; 0 keeps no ``"momentum"`` slot. Defaults to 0.0.
        epsilon: added inside the square root. Defaults to 1e-7.
        centered: divide by the estimated variance (keeps the ``"mg"`` slot). Defaults to False.
        **kwargs: see :class:`~sparseopt.Optimizer`.

    Slots: ``"rms"``, ``"momentum"`` (when ``momentum > 0``), ``"mg"`` (when centered).
    Once slots are built, ``momentum`` cannot cross 0 and ``centered`` cannot change (that
    would add or drop a slot): a :class:`~sparseopt.errors.HyperparameterError` says so.

    Example:
        >>> import numpy as np, sparseopt as so
        >>> w = np.ones(2)
        >>> opt = so.RMSprop(learning_rate=0.1, epsilon=0.0)
        >>> opt.apply_gradients([(np.array([1.0, -2.0]), w)])
        1
        >>> w.round(4).tolist()  # each step is lr / sqrt(1 - rho) at first
        [0.6838, 1.3162]
    """

    _rule = rule
    _hyper_names = ("learning_rate", "rho", "epsilon")
    _has_legacy_math = True
    _settings = {**Optimizer._settings, "momentum": "number", "centered": "flag"}
    _structural = ("momentum", "centered")

    def __init__(self, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False,
                 name="rmsprop", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = momentum
        self.centered = centered
        self.rho = rho
        self.epsilon = epsilon

    def _slot_names(self):
        return tuple(n for n, keep in zip(rule.SLOTS, (True, self.momentum > 0, self.centered)) if keep)

    def _coefficients(self, hypers, step):
        return rule.coefficients(hypers["learning_rate"], hypers["rho"], self.momentum,
                                 hypers["epsilon"], self.centered, legacy=self._legacy)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "centered": self.centered}
