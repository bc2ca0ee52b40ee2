"""``Adafactor``: a factored second moment, updates scaled by root-mean-squares."""

import numpy as np

from sparseopt import backends, errors
from sparseopt._hyperparameters import Range
from sparseopt.backends import cuda_factored
from sparseopt.backends.cpu import SparseUpdate as _SparseUpdate
from sparseopt.kernels import factored
from sparseopt.optimizer import Optimizer
from sparseopt.rules import adafactor as rule
from sparseopt.slots import VariableState


class Adafactor(Optimizer):
    """Adafactor, as ``keras.optimizers.Adafactor`` (math: :mod:`sparseopt.rules.adafactor`):
    no first moment; a variable of rank >= 2 keeps a row statistic ``r`` (its shape less the
    last axis) and a column statistic ``c`` (its shape less the second last axis) in place of
    a second moment of its own size; the update ``g / sqrt(v)`` is divided by
    ``max(1, rms(u) / clip_threshold)`` and scaled by ``max(epsilon_2, rms(p)) *
    min(learning_rate, 1 / sqrt(t))``.

    Which unit: a dense gradient takes the statistics over the whole variable, as Keras
    does. A sparse gradient (lazy mode) steps the **touched rows as a table of their own**
    ("partial" Adafactor, as FBGEMM's partial row-wise LAMB takes its norms from the
    touched rows): duplicates are summed first; the rows' ``r``, the column statistics
    and ``mean(r)``, ``rms(u)`` and ``rms(p)`` come from the touched rows only; a 2-D
    table's ``c`` (one value per column, shared by all rows) decays once per sparse step
    by the touched rows' mean. Rows the batch does not touch keep their values and their
    ``r``. (A vector's sparse step is the dense rule on the touched elements, with their
    ``v``; a table of rank >= 3 keeps ``r`` and ``c`` per row, so only the root-mean-squares
    are partial.) Keras' dense step on the densified gradient moves the untouched rows by
    nothing either (``u = 0`` there), but decays their ``r`` and takes the means and
    ``rms(p)`` over every row: that needs a pass over the whole table per step. ``rms(u)``
    and the column sums of ``g^2`` could be had exactly from the touched rows (idle rows add
    0 and ``epsilon_1``), ``mean(r)`` and ``rms(p)`` could not.

    ``sparse_mode="exact"`` is refused (a :class:`~sparseopt.errors.HyperparameterError` at
    construction): the dense step of a row depends on statistics over the whole variable.
    16-bit variables are refused (a :class:`~sparseopt.errors.DtypeMismatchError`): the
    factored kernels are float32 and float64 only. CUDA arrays run the CUDA factored
    kernels (:mod:`sparseopt.kernels.cuda_factored`), with ``r``, ``c`` and ``v`` on the
    variable's device: the same steps, their sums taken in the CPU kernels' order (the
    CPU's bits on the simulator; a few ulps apart on a GPU, which fuses multiply-adds). A
    variable with no elements is left as it is.

    Args:
        learning_rate: float, callable or schedule. Defaults to 0.001. The step uses
            ``min(learning_rate, 1 / sqrt(t))``.
        beta_2_decay: the second moments decay with ``1 - t ** beta_2_decay`` (<= 0).
            Defaults to -0.8.
        epsilon_1: added to ``g^2``. Defaults to 1e-30.
        epsilon_2: the least ``rms(p)`` the step scales by. Defaults to 1e-3.
        clip_threshold: ``u`` is divided by ``max(1, rms(u) / clip_threshold)`` (> 0).
            Defaults to 1.0.
        relative_step: accepted for Keras' signature; Keras 3 takes ``min(learning_rate,
            1 / sqrt(t))`` whether it is set or not, and so do we. Defaults to True.
        **kwargs: see :class:`~sparseopt.Optimizer` (``weight_decay`` is applied before the
            update, so ``rms(p)`` sees the decayed weights, as in Keras).

    Slots: ``"v"`` (the variable's shape) for a variable of rank < 2; ``"r"`` and ``"c"``
    for one of rank >= 2.

    Example:
        >>> import numpy as np, sparseopt as so
        >>> w = np.array([[1.0, 2.0], [3.0, 4.0]])
        >>> so.Adafactor(learning_rate=0.5).apply_gradients([(np.array([[1.0, 6.0], [7.0, 2.0]]), w)])
        1
        >>> w.round(4).tolist()  # Keras' adafactor_test.py, test_single_step_2d
        [[0.7007, -0.0081], [1.2492, 3.4407]]
        >>> so.Adafactor().get_slot_names()
        ['v', 'r', 'c']
    """

    _rule = rule
    _hyper_names = ("learning_rate", "beta_2_decay", "epsilon_1", "epsilon_2", "clip_threshold")
    _settings = {**Optimizer._settings, "relative_step": "flag"}
    _ranges = {"beta_2_decay": Range(None, 0.0), "epsilon_1": Range(0.0), "epsilon_2": Range(0.0),
               "clip_threshold": Range(0.0, low_open=True)}

    def __init__(self, learning_rate=0.001, beta_2_decay=-0.8, epsilon_1=1e-30, epsilon_2=1e-3,
                 clip_threshold=1.0, relative_step=True, name="adafactor", **kwargs):
        if kwargs.get("sparse_mode") == "exact":
            raise errors.HyperparameterError(
                f"{name}: Adafactor has no sparse_mode='exact': the dense step of a row depends on "
                "statistics over the whole variable (mean(r), rms(p)), which a sparse step cannot "
                "know without reading every row; use sparse_mode='lazy' (the touched rows as a "
                "table of their own)")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_2_decay = beta_2_decay
        self.epsilon_1 = epsilon_1
        self.epsilon_2 = epsilon_2
        self.clip_threshold = clip_threshold
        self.relative_step = relative_step

    def _coefficients(self, hypers, step):
        return rule.coefficients(hypers["learning_rate"], hypers["beta_2_decay"], hypers["epsilon_1"],
                                 hypers["epsilon_2"], hypers["clip_threshold"], step)

    def get_config(self):
        return {**super().get_config(), "relative_step": self.relative_step}

    def get_slot_names(self):
        names = list(rule.SLOTS + rule.FACTORED_SLOTS)
        return names + [n for n in super().get_slot_names() if n not in names]

    def _check_variable(self, var, name):
        super()._check_variable(var, name)
        dtype = backends.backend_for(var).dtype_of(var)
        if dtype not in (np.float32, np.float64):
            raise errors.DtypeMismatchError(
                f"{name!r}: Adafactor runs on float32 and float64 variables only; got dtype {dtype} "
                "(its factored kernels have no 16-bit version)")

    def _state_for(self, var, name=None):
        """A variable of rank < 2 keeps ``v`` in the slot storage; one of rank >= 2 keeps
        ``r`` and ``c`` (arrays of their own shapes) and no ``v``."""
        state = self._states.get(id(var))
        if state is not None:
            return state
        shape = tuple(var.shape)
        kept = rule.SLOTS if len(shape) < 2 else ()
        state = VariableState(var, name or self._default_name(var), kept, self._slot_initial_value,
                              rule.SLOTS, slot_dtype=self.slot_dtype)
        self._states[id(var)] = state
        self._weights.extend((state, slot_name) for slot_name in kept)
        if len(shape) >= 2:
            shapes = rule.factored_shapes(shape)
            on_device = cuda_factored.statistics(var, shapes) if state.backend.on_device else None
            for i, (slot_name, slot_shape) in enumerate(zip(rule.FACTORED_SLOTS, shapes)):
                if on_device is None:
                    state.add_extra_slot(slot_name, "zeros", slot_shape)
                else:  # on the variable's device
                    state.slots[slot_name] = on_device[i]
                self._weights.append((state, slot_name))
        return state

    def _wrap_update(self, state, update):
        return _FactoredUpdate(update)

    def _run_constrained(self, updates, coefficients, wd, constraints):
        """The base class's, with ``r`` and ``c`` (not in the slot storage, which its
        snapshot keeps) kept and restored too (a CUDA variable's through the host)."""
        kept = [(state.slots[n], state.backend.to_host(state.slots[n]), state.backend) for state, _ in updates
                for n in rule.FACTORED_SLOTS if n in state.slots]
        try:
            super()._run_constrained(updates, coefficients, wd, constraints)
        except BaseException:
            for array, copy, backend in kept:
                backend.copy_from_host(array, copy)
            raise


class _FactoredUpdate:
    """Runs a validated dense or sparse update through the factored kernels (a wrapper, as
    :class:`sparseopt.optimizers._rowwise._RowUpdate`; its attribute is not ``update``, so
    the table-batched path passes it by)."""

    __slots__ = ("inner",)

    def __init__(self, inner):
        self.inner = inner

    def run(self, rule_module, state, c, wd, has_wd):
        update = self.inner
        if getattr(update, "on_device", False):  # a CUDA update: the CUDA factored kernels
            cuda_factored.run(rule_module, state, update, c, wd, has_wd)
            return
        var = state.var
        if var.size == 0:
            return
        sparse = isinstance(update, _SparseUpdate)
        if sparse:
            if update.rows.size == 0:
                return
            update._sum_duplicates()  # the touched rows' summed gradients, in update.rows order
            rows = update.rows
            p = var[rows]
            g = update.values.reshape(p.shape)
        else:
            p = var
            g = update.values.reshape(var.shape)
        dtype = type(wd)
        if var.ndim < 2:
            v = state.slots["v"]
            v_unit = v[rows] if sparse else v.reshape(-1)
            factored.plain_kernel(rule_module, has_wd)(p.reshape(-1), g.reshape(-1), v_unit, c, wd,
                                                       dtype(p.size))
            if sparse:
                v[rows] = v_unit
        else:
            r, col = state.slots["r"], state.slots["c"]
            nrows, cols = p.shape[-2], p.shape[-1]  # a 2-D table's unit: its touched rows
            if sparse:
                r_unit = r[rows]
                # a 2-D table's column statistics are one for all rows; a table of rank >= 3
                # keeps them per row
                c_unit = col.reshape(1, cols) if var.ndim == 2 else col[rows]
            else:
                r_unit, c_unit = r, col
            k = p.size // (nrows * cols)
            factored.factored_kernel(rule_module, has_wd)(
                p.reshape(k, nrows, cols), g.reshape(k, nrows, cols), r_unit.reshape(k, nrows),
                c_unit.reshape(-1, cols), c, wd, dtype(nrows), dtype(cols), dtype(p.size))
            if sparse:
                r[rows] = r_unit
                if var.ndim > 2:
                    col[rows] = c_unit
        if sparse:
            var[rows] = p
