"""``Adam``: adaptive moments, with AMSGrad."""

from sparseopt.optimizer import Optimizer
from sparseopt.rules import adam as rule


class Adam(Optimizer):
    """Adam, as ``keras.optimizers.Adam`` (math: :mod:`sparseopt.rules.adam`).

    Args:
        learning_rate: float, callable or schedule. Defaults to 0.001.
        beta_1: decay of the first moment. Defaults to 0.9.
        beta_2: decay of the second moment. Defaults to 0.999.
        epsilon: added to the root of the second moment. Defaults to 1e-7.
        amsgrad: keep the running maximum of the second moment. Defaults to False.
        **kwargs: see :class:`~sparseopt.Optimizer`.

    Slots: ``"m"``, ``"v"``, and ``"vhat"`` with AMSGrad. ``amsgrad`` cannot change once
    slots are built (it adds or drops ``"vhat"``): a
    :class:`~sparseopt.errors.HyperparameterError` says so.

    Example:
        >>> import numpy as np, sparseopt as so
        >>> table = np.zeros((5, 2), np.float32)
        >>> opt = so.Adam(learning_rate=0.1)
        >>> g = so.IndexedSlices(np.ones((2, 2), np.float32), np.array([3, 3]))
        >>> opt.apply_gradients([(g, table)])
        1
        >>> table[3], table[0]  # only the touched row moves
        (array([-0.09999917, -0.09999917], dtype=float32), array([0., 0.], dtype=float32))
    """

    _rule = rule
    _hyper_names = ("learning_rate", "beta_1", "beta_2", "epsilon")
    _has_legacy_math = True
    _settings = {**Optimizer._settings, "amsgrad": "flag"}
    _structural = ("amsgrad",)

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 amsgrad=False, name="adam", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.amsgrad = amsgrad
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def _slot_names(self):
        return rule.SLOTS if self.amsgrad else rule.SLOTS[:2]

    def _coefficients(self, hypers, step):
        return rule.coefficients(hypers["learning_rate"], hypers["beta_1"], hypers["beta_2"],
                                 hypers["epsilon"], step, self.amsgrad, legacy=self._legacy)

    def get_config(self):
        return {**super().get_config(), "amsgrad": self.amsgrad}
