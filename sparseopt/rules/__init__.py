r"""The math: each optimizer's update, written once, as a scalar rule.

A rule module holds

* ``SLOTS``: the names of the slots the rule reads and writes, in order (at most three);
* ``Coefficients``: a ``NamedTuple`` of the per-step scalars (learning rate, bias
  corrections, flags) that :func:`coefficients` computes once per step on the host;
* ``coefficients(...)``: plain float math from the hyperparameters and the step;
* ``update(p, g, s0, s1, s2, c)``: the element update, returning ``(p, s0, s1, s2)``.

``update`` is plain arithmetic and ``math.*`` on scalars: no arrays, no NumPy, no
``raise``, no float literals (they would promote float32 math to float64; every
constant comes in ``c``, already cast to the variable's dtype). The generic kernels
in :mod:`sparseopt.kernels` compile the same function for the dense elementwise
pass, the row-wise sparse pass and the CUDA kernels. Slots a rule does not use are
passed through unchanged.

Flags (``amsgrad``, ``nesterov``, ...) are fields of ``c`` equal to 0 or 1: a branch
on a loop-invariant flag between cheap expressions costs nothing measurable (the
compiler selects) and keeps one kernel per rule. Where one side is expensive (Ftrl's
``math.pow``, which the vectorizer would run for every element), the rule also offers
a compile-time variant with a module constant fixed (:mod:`sparseopt.rules._variant`),
chosen per step from that step's coefficients (``variant_for(c)``).

**Legacy math.** Where ``tf_keras.optimizers.legacy.<Name>`` (Keras 2's
``OptimizerV2``) computes differently from Keras 3 (epsilon inside or outside the
square root, a different momentum schedule, float32 hyperparameter variables), the
rule carries both: ``coefficients(..., legacy=True)`` rounds the hyperparameters as
tf_keras does and, where the element formula differs, sets a flag field of ``c``
that selects the legacy branch. The module docstring explains the difference. One
rule file per optimizer, never one per variant.

**Row-wise rules** (:mod:`~sparseopt.rules.rowwise_adagrad`) also have ``ROW_SLOTS``
(one value per row), ``row_term(p, g, c)`` (summed over a row, divided by its width),
``row_update(r0, r1, r2, mean, c) -> (r0, r1, r2)`` (once per touched row), and an
element update ``update(p, g, s0, s1, s2, r0, r1, r2, c)`` that reads the new row
slots; the row-reduction kernels run them.

**Reduction rules** (:mod:`~sparseopt.rules.lamb`) declare ``REDUCTION = True`` and, in
place of ``update``, a stage that needs a sum over a *unit* of elements before any of them
moves: ``reduce_terms(p, g, s0, s1, s2, c) -> (d, s0, s1, s2, t0, t1)`` (per element: the
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

**Host state.** A rule whose per-step scalars depend on state carried across steps
(Nadam's momentum-schedule product) computes that state with a plain host function
(:func:`sparseopt.rules.nadam.next_u_product`); the optimizer keeps it.
"""

from sparseopt.rules import (adadelta, adafactor, adagrad, adam, adamax, ftrl, lamb, lion, nadam,
                             rmsprop, rowwise_adagrad, sgd)

__all__ = ["adadelta", "adafactor", "adagrad", "adam", "adamax", "ftrl", "lamb", "lion", "nadam",
           "rmsprop", "rowwise_adagrad", "sgd"]
