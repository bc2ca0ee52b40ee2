"""``Lamb``: Adam's moments with a layer-wise (dense) or row-wise (sparse) trust ratio."""

from sparseopt import errors
from sparseopt.optimizer import Optimizer
from sparseopt.rules import lamb as rule


class Lamb(Optimizer):
    """LAMB, as ``keras.optimizers.Lamb`` (math: :mod:`sparseopt.rules.lamb`): Adam's
    moments and bias corrections give the update ``u = m_hat / (sqrt(v_hat) + epsilon)``;
    the parameter moves by ``learning_rate * ||p|| / ||u|| * u`` (the trust ratio is 1 where
    either norm is 0).

    Which norms: a dense gradient takes them over the whole variable, as Keras does. A
    sparse gradient (lazy mode) takes them **per touched row**, from that row's parameter
    (after weight decay) and update, as FBGEMM's partial row-wise LAMB does for embedding
    tables: a norm over the whole table would read every row at every step, and a row's
    step would depend on rows the batch does not touch. Rows the batch does not touch
    keep their values and moments. A table of one row (or a vector updated as a
    ``(1, d)`` table) steps as the dense rule would.

    ``sparse_mode="exact"`` is refused (a :class:`~sparseopt.errors.HyperparameterError`
    at construction): the dense rule's step of an idle row depends on the norms over the
    whole variable at that step, which a sparse step cannot know without reading every row.

    Args:
        learning_rate: float, callable or schedule. Defaults to 0.001.
        beta_1: decay of the first moment. Defaults to 0.9.
        beta_2: decay of the second moment. Defaults to 0.999.
        epsilon: added to the root of the bias-corrected second moment. Defaults to 1e-7.
        **kwargs: see :class:`~sparseopt.Optimizer` (``weight_decay`` is applied before the
            update, so the trust ratio sees the decayed weights, as in Keras).

    Slots: ``"m"``, ``"v"``.

    Example:
        >>> import numpy as np, sparseopt as so
        >>> w = np.array([3.0, 4.0])
        >>> so.Lamb(learning_rate=0.1).apply_gradients([(np.array([1.0, -1.0]), w)])
        1
        >>> w.round(6).tolist()  # u = sign(g) (to epsilon), ||w|| = 5, ||u|| = sqrt(2)
        [2.646447, 4.353553]
    """

    _rule = rule
    _hyper_names = ("learning_rate", "beta_1", "beta_2", "epsilon")

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, name="lamb",
                 **kwargs):
        if kwargs.get("sparse_mode") == "exact":
            raise errors.HyperparameterError(
                f"{name}: Lamb has no sparse_mode='exact': the dense step of an idle row depends "
                "on the norms over the whole variable, which a sparse step cannot know without "
                "reading every row; use sparse_mode='lazy' (per-row trust ratios)")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def _coefficients(self, hypers, step):
        return rule.coefficients(hypers["learning_rate"], hypers["beta_1"], hypers["beta_2"],
                                 hypers["epsilon"], step)
