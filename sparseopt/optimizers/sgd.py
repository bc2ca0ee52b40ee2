"""``SGD``: gradient descent with optional (Nesterov) momentum."""

from sparseopt.optimizer import Optimizer
from sparseopt.rules import sgd as rule


class SGD(Optimizer):
    """Gradient descent with momentum, as ``keras.optimizers.SGD`` (math: :mod:`sparseopt.rules.sgd`).

    Args:
        learning_rate: float, callable or schedule. Defaults to 0.01.
        momentum: float in [0, 1]; 0 keeps no slot. Defaults to 0.0.
        nesterov: use Nesterov momentum. Defaults to False.
        **kwargs: see :class:`~sparseopt.Optimizer`.

    Slots: ``"momentum"`` (when ``momentum > 0``). ``momentum`` can be reassigned, but not
    across 0 once slots are built (that would add or drop the slot: a
    :class:`~sparseopt.errors.HyperparameterError` says so; build a new optimizer).

    Example:
        >>> import numpy as np, sparseopt as so
        >>> w = np.ones(3, np.float32)
        >>> opt = so.SGD(learning_rate=0.1, momentum=0.9)
        >>> opt.apply_gradients([(np.ones(3, np.float32), w)])
        1
        >>> w
        array([0.9, 0.9, 0.9], dtype=float32)
    """

    _rule = rule
    _hyper_names = ("learning_rate",)
    _has_legacy_math = True
    _settings = {**Optimizer._settings, "momentum": "number", "nesterov": "flag"}
    _structural = ("momentum",)

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, name="SGD", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = momentum
        self.nesterov = nesterov

    def _slot_names(self):
        return rule.SLOTS if self.momentum != 0 else ()

    def _coefficients(self, hypers, step):
        return rule.coefficients(hypers["learning_rate"], self.momentum, self.nesterov,
                                 legacy=self._legacy)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}
