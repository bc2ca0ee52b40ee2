"""``Nadam``: Adam with Nesterov momentum and a momentum schedule."""

from sparseopt.optimizer import Optimizer
from sparseopt.rules import nadam as rule


class Nadam(Optimizer):
    """Nadam, as ``keras.optimizers.Nadam`` (math: :mod:`sparseopt.rules.nadam`).

    Args:
        learning_rate: float, callable or schedule. Defaults to 0.001.
        beta_1: decay of the first moment (scaled by the momentum schedule). Defaults to 0.9.
        beta_2: decay of the second moment. Defaults to 0.999.
        epsilon: added to the root of the second moment. Defaults to 1e-7.
        **kwargs: see :class:`~sparseopt.Optimizer`.

    Slots: ``"m"``, ``"v"``. Besides ``iterations``, the optimizer keeps ``u_product``,
    the running product of the momentum schedule (Keras 3's state of that name;
    tf_keras' ``momentum_cache``): a 0-d float64 array, second in :meth:`variables`
    and :meth:`get_weights`, so that ``set_weights`` continues a run exactly.

    Example:
        >>> import numpy as np, sparseopt as so
        >>> w = np.zeros(2)
        >>> opt = so.Nadam(learning_rate=0.1)
        >>> opt.apply_gradients([(np.array([1.0, -1.0]), w)])
        1
        >>> w.round(4).tolist()  # the Nesterov look-ahead makes the first step exceed lr
        [-0.1063, 0.1063]
        >>> opt.get_weights()[1].round(4)  # u_product = 0.9 * (1 - 0.5 * 0.96)
        np.float64(0.468)
    """

    _rule = rule
    _hyper_names = ("learning_rate", "beta_1", "beta_2", "epsilon")
    _has_legacy_math = True
    _scalar_state_names = ("u_product",)
    #: The legacy schedule decay's default (tf_keras' ``decay``/``schedule_decay``); the
    #: legacy bridge sets ``_schedule_decay`` from those arguments.
    _legacy_schedule_decay = rule.LEGACY_SCHEDULE_DECAY
    _schedule_decay = rule.LEGACY_SCHEDULE_DECAY

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, name="nadam",
                 **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def _scalar_state_initial_value(self, key):
        return 1.0

    def _next_scalar_state(self, hypers, step):
        u_product = float(self._scalar_state["u_product"])
        return {"u_product": rule.next_u_product(u_product, hypers["beta_1"], step, legacy=self._legacy,
                                                 schedule_decay=self._schedule_decay)}

    def _coefficients(self, hypers, step):
        return rule.coefficients(hypers["learning_rate"], hypers["beta_1"], hypers["beta_2"],
                                 hypers["epsilon"], step, hypers["u_product"], legacy=self._legacy,
                                 schedule_decay=self._schedule_decay)
