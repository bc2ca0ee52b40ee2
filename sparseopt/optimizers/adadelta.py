"""``Adadelta``: steps scaled by the ratio of running update and gradient magnitudes."""

from sparseopt.optimizer import Optimizer
from sparseopt.rules import adadelta as rule


class Adadelta(Optimizer):
    """Adadelta, as ``keras.optimizers.Adadelta`` (math: :mod:`sparseopt.rules.adadelta`).

    Args:
        learning_rate: float, callable or schedule; 1.0 is the paper's form. Defaults to 0.001.
        rho: decay of both running averages. Defaults to 0.95.
        epsilon: added inside both square roots. Defaults to 1e-7.
        **kwargs: see :class:`~sparseopt.Optimizer`.

    Slots: ``"accumulated_grad"``, ``"accumulated_delta"`` (Keras 2's names).

    Example:
        >>> import numpy as np, sparseopt as so
        >>> w = np.zeros(2)
        >>> opt = so.Adadelta(learning_rate=1.0, rho=0.0, epsilon=1e-6)
        >>> opt.apply_gradients([(np.array([1.0, -1.0]), w)])
        1
        >>> w.round(6).tolist()  # sqrt(eps) / sqrt(g^2 + eps) * g
        [-0.001, 0.001]
    """

    _rule = rule
    _hyper_names = ("learning_rate", "rho", "epsilon")
    _has_legacy_math = True

    def __init__(self, learning_rate=0.001, rho=0.95, epsilon=1e-7, name="adadelta", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.rho = rho
        self.epsilon = epsilon

    def _coefficients(self, hypers, step):
        return rule.coefficients(hypers["learning_rate"], hypers["rho"], hypers["epsilon"],
                                 legacy=self._legacy)
