"""``Ftrl``: follow the regularized leader (FTRL-Proximal), with L1, L2 and shrinkage."""

import numpy as np

from sparseopt.optimizer import Optimizer
from sparseopt.rules import ftrl as rule


class Ftrl(Optimizer):
    """FTRL-Proximal, as ``keras.optimizers.Ftrl`` (math: :mod:`sparseopt.rules.ftrl`).

    Args:
        learning_rate: float, callable or schedule. Defaults to 0.001.
        learning_rate_power: <= 0; how the per-coordinate rate decays (0: fixed). Defaults to -0.5.
        initial_accumulator_value: starting value of the accumulator (>= 0). Defaults to 0.1.
        l1_regularization_strength: >= 0; coordinates with ``|linear| <= l1`` are exactly 0.
            Defaults to 0.0.
        l2_regularization_strength: >= 0; the stabilizing L2 of the paper. Defaults to 0.0.
        l2_shrinkage_regularization_strength: >= 0; an L2 penalty on the weights added
            to the gradient (on the touched rows only for a sparse gradient). Defaults to 0.0.
        beta: >= 0; the paper's beta, added to the L2 strength as ``beta / (2 lr)``. Defaults to 0.0.
        **kwargs: see :class:`~sparseopt.Optimizer`.

    Slots: ``"accumulator"`` (starts at ``initial_accumulator_value``), ``"linear"``.

    A step whose learning rate is 0 (a schedule that reaches or starts at 0) changes
    nothing: the rule divides by the learning rate, so instead of Keras' NaN the
    variables, the accumulators and the linear terms stay as they are; ``iterations``
    advances (so the schedule moves on).

    Example:
        >>> import numpy as np, sparseopt as so
        >>> w = np.zeros(3)
        >>> opt = so.Ftrl(learning_rate=0.1, l1_regularization_strength=1.0)
        >>> opt.apply_gradients([(np.array([0.5, -2.0, 3.0]), w)])
        1
        >>> (w != 0).tolist()  # L1 keeps the small-gradient coordinate at exactly 0
        [False, True, True]
    """

    _rule = rule
    _hyper_names = ("learning_rate", "learning_rate_power", "l1_regularization_strength",
                    "l2_regularization_strength", "l2_shrinkage_regularization_strength", "beta")
    _has_legacy_math = True
    _settings = {**Optimizer._settings, "initial_accumulator_value": "number"}
    _zero_learning_rate_is_no_step = True

    def __init__(self, learning_rate=0.001, learning_rate_power=-0.5, initial_accumulator_value=0.1,
                 l1_regularization_strength=0.0, l2_regularization_strength=0.0,
                 l2_shrinkage_regularization_strength=0.0, beta=0.0, name="ftrl", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.initial_accumulator_value = initial_accumulator_value
        self.learning_rate_power = learning_rate_power
        self.l1_regularization_strength = l1_regularization_strength
        self.l2_regularization_strength = l2_regularization_strength
        self.l2_shrinkage_regularization_strength = l2_shrinkage_regularization_strength
        self.beta = beta

    def _slot_initial_value(self, slot_name):
        if slot_name != "accumulator":
            return 0.0
        # Keras 3's Constant initializer holds the value in float32, also for float64
        # slots; tf_keras' constant_initializer keeps it exact.
        value = self.initial_accumulator_value
        return value if self._legacy else float(np.float32(value))

    def _coefficients(self, hypers, step):
        return rule.coefficients(hypers["learning_rate"], hypers["learning_rate_power"],
                                 hypers["l1_regularization_strength"],
                                 hypers["l2_regularization_strength"],
                                 hypers["l2_shrinkage_regularization_strength"], hypers["beta"],
                                 legacy=self._legacy)

    def get_config(self):
        return {**super().get_config(), "initial_accumulator_value": self.initial_accumulator_value}
