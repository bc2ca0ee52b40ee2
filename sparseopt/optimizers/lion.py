"""``Lion``: sign of an interpolated momentum, one step size for every coordinate."""

from sparseopt.optimizer import Optimizer
from sparseopt._hyperparameters import Range
from sparseopt.rules import lion as rule


class Lion(Optimizer):
    """Lion, as ``keras.optimizers.Lion`` (math: :mod:`sparseopt.rules.lion`).

    Use a learning rate 3-10x smaller than AdamW's, and a weight decay 3-10x larger.

    Args:
        learning_rate: float, callable or schedule. Defaults to 0.001.
        beta_1: in (0, 1]; interpolation of momentum and gradient for the step's sign.
            Defaults to 0.9.
        beta_2: in [0, 1]; decay of the momentum. Defaults to 0.99.
        **kwargs: see :class:`~sparseopt.Optimizer`.

    Slots: ``"momentum"``.

    Example:
        >>> import numpy as np, sparseopt as so
        >>> w = np.zeros(3)
        >>> opt = so.Lion(learning_rate=0.5)
        >>> opt.apply_gradients([(np.array([2.0, -1e-3, 0.0]), w)])
        1
        >>> w.tolist()
        [-0.5, 0.5, 0.0]
    """

    _rule = rule
    _hyper_names = ("learning_rate", "beta_1", "beta_2")
    # Keras: beta_1 in (0, 1] (with beta_1 == 0 Lion degenerates to signSGD); the
    # momentum's decay beta_2 may be 1 (a constant momentum).
    _ranges = {"beta_1": Range(0.0, 1.0, low_open=True), "beta_2": Range(0.0, 1.0)}

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.99, name="lion", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2

    def _coefficients(self, hypers, step):
        return rule.coefficients(hypers["learning_rate"], hypers["beta_1"], hypers["beta_2"])
