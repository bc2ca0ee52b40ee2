r"""The math: each optimizer's update, written once, as a scalar rule.

A rule module holds

* ``SLOTS``: the names of the slots the rule reads and writes, in order (any number);
* ``Coefficients``: a ``NamedTuple`` of the per-step scalars (learning rate, bias
  corrections, flags) that :func:`coefficients` computes once per step on the host;
* ``coefficients(...)``: plain float math from the hyperparameters and the step;
* ``update(p, g, *slots, c)``: the element update, one argument per slot in ``SLOTS`` order,
  returning ``(p, *slots)`` (``(p,)`` for a rule without slots).

``update`` is plain arithmetic and ``math.*`` on scalars: no arrays, no NumPy, no
``raise``, no float literals (they would promote float32 math to float64; every
constant comes in ``c``, already cast to the variable's dtype). The generic kernels
in :mod:`sparseopt.kernels` compile the same function for the dense elementwise
pass, the row-wise sparse pass and the CUDA kernels (which take the slots as tuples and
call ``update`` with them spread out: :mod:`sparseopt.kernels._slots`). A slot that a
configuration does not keep (Adam's ``vhat`` without AMSGrad) is given the parameter's
value, and what ``update`` returns for it is dropped. (A rule with fewer than three slots
written for the former fixed three, ``update(p, g, s0, s1, s2, c)``, is still called so.)

**Plain Python.** A rule module imports neither Numba nor :mod:`sparseopt.kernels`
(``tests/test_rules_contract.py`` checks it): it declares data and plain functions, and
the kernels' side compiles them for each target (:mod:`sparseopt.kernels._compile`: the
CPU's ``njit`` for inlining, CUDA device functions), together with the helpers of this
package that they call (:mod:`sparseopt.rules._idle`) and the module constants a target
fixes.

Flags (``amsgrad``, ``nesterov``, ...) are fields of ``c`` equal to 0 or 1: a branch
on a loop-invariant flag between cheap expressions costs nothing measurable (the
compiler selects) and keeps one kernel per rule. Where one side is expensive (Ftrl's
``math.pow``, which the vectorizer would run for every element), the rule also declares
compile-time **variants** as data: ``VARIANTS = {name: {CONSTANT: value, ...}}`` (module
constants fixed in the variant's functions, so the compiler drops the branch they decide)
and ``variant_for(c) -> name or None``, which picks one per step from that step's
coefficients; the kernels compile each variant as a rule of its own
(:func:`sparseopt.kernels._compile.variant`).

**Legacy math.** Where ``tf_keras.optimizers.legacy.<Name>`` (Keras 2's
``OptimizerV2``) computes differently from Keras 3 (epsilon inside or outside the
square root, a different momentum schedule, float32 hyperparameter variables), the
rule carries both: ``coefficients(..., legacy=True)`` rounds the hyperparameters as
tf_keras does and, where the element formula differs, sets a flag field of ``c``
that selects the legacy branch. The module docstring explains the difference. One
rule file per optimizer, never one per variant.

**Row-wise rules** (:mod:`~sparseopt.rules.rowwise_adagrad`) also have ``ROW_SLOTS``
(one value per row), ``row_term(p, g, c)`` (summed over a row, divided by its width),
``row_update(*row_slots, mean, c) -> tuple of the row slots`` (once per touched row), and an
element update ``update(p, g, *slots, *row_slots, c) -> (p, *slots)`` that reads the new row
slots; the row-reduction kernels run them.

**Reduction rules** (:mod:`~sparseopt.rules.lamb`) declare ``REDUCTION = True`` and, in
place of ``update``, a stage that needs a sum over a *unit* of elements before any of them
moves: ``reduce_terms(p, g, *slots, c) -> (d, *slots, t0, t1)`` (per element: the
new slots, a direction ``d`` kept in scratch, and two terms summed over the unit),
``reduce_scale(sum_t0, sum_t1, c) -> scale`` (once per unit) and ``reduce_apply(p, d,
scale, c) -> p`` (per element). The unit is the whole variable in a dense step and each
touched row in a sparse step (a per-row norm, as FBGEMM's row-wise LAMB). The kernels
(:func:`sparseopt.kernels.cpu.dense_kernel` and ``sparse_kernel``) run it in two passes;
``p`` is the parameter after decoupled weight decay in both.

**Factored rules** (:mod:`~sparseopt.rules.adafactor`) declare ``FACTORED = True`` and
``FACTORED_SLOTS`` (statistics of other shapes: a row statistic of the variable's shape less
its last axis, a column statistic less its second last), and in place of ``update`` the
element functions ``square(g, c)``, ``decay(s, mean, c)``, ``direction(g, v)``,
``apply(p, u, alpha, divisor)`` and, once per unit, ``scale(sum_p2, sum_u2, n, c) -> (alpha,
divisor)`` (``n``: the unit's element count, for root-mean-squares). The kernels of
:mod:`sparseopt.kernels.factored` run them over a unit: the whole variable in a dense step,
the touched rows (gathered as a table of their own) in a sparse one. A variable of rank < 2
keeps the element slots ``SLOTS`` instead; ``factored_shapes(shape)`` (host code) gives the
statistics' shapes. The optimizer class keeps the statistics
(:class:`sparseopt.Adafactor`); exact mode, the table-batched path and CUDA do not run them.

**Exact mode** (``sparse_mode="exact"``): a rule may add the closed forms of its idle steps
and their tables, whose columns it names (``COLUMNS``); see :mod:`sparseopt.rules._idle`.

**Host state.** A rule whose per-step scalars depend on state carried across steps
(Nadam's momentum-schedule product) computes that state with a plain host function
(:func:`sparseopt.rules.nadam.next_u_product`); the optimizer keeps it.

**Kinds.** What a rule declares says which kernel family runs it; :func:`kind` is the one
place that reads it: ``"row"`` (``ROW_SLOTS``), ``"reduction"`` (``REDUCTION = True``),
``"factored"`` (``FACTORED = True``), else ``"element"``. A :class:`sparseopt.Rule`
presents itself as a rule module that declares its kind the same way
(:attr:`sparseopt.Rule.module`).
"""

from sparseopt.rules import (adadelta, adafactor, adagrad, adam, adamax, ftrl, lamb, lion, nadam,
                             rmsprop, rowwise_adagrad, sgd)

__all__ = ["ELEMENT", "FACTORED", "REDUCTION", "ROW", "adadelta", "adafactor", "adagrad", "adam", "adamax",
           "ftrl", "kind", "lamb", "lion", "nadam", "rmsprop", "rowwise_adagrad", "sgd"]

#: The kinds of rule (:func:`kind`).
ELEMENT, ROW, REDUCTION, FACTORED = "element", "row", "reduction", "factored"


def kind(rule):
    """The kind of ``rule`` (a rule module, a variant of one, or a :class:`sparseopt.Rule`'s
    ``module``): :data:`ROW` where it declares ``ROW_SLOTS``, :data:`REDUCTION` where
    ``REDUCTION = True``, :data:`FACTORED` where ``FACTORED = True``, else :data:`ELEMENT`.

    Read per step: decided once and kept on the rule (``__kind__``). Raises ``TypeError`` for
    a rule that declares two kinds."""
    namespace = vars(rule)
    found = namespace.get("__kind__")
    if found is None:
        declared = [name for name, says in ((ROW, "ROW_SLOTS" in namespace),
                                            (REDUCTION, namespace.get("REDUCTION") is True),
                                            (FACTORED, namespace.get("FACTORED") is True)) if says]
        if len(declared) > 1:
            raise TypeError(f"rule {rule.__name__!r} declares the kinds {declared}: a rule is of one kind")
        found = rule.__kind__ = declared[0] if declared else ELEMENT
    return found
