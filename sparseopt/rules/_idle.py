r"""Shared pieces of the rules' exact-mode catch-up (``sparse_mode="exact"``).

In exact mode a row that received no gradient for the steps :math:`(L, T]` must be
brought to the state the dense rule would have given it with a zero gradient. A rule
that can do this faster than replaying ``update`` step by step defines, besides its
``update``:

* ``COLUMNS``: the named columns of its idle table (:func:`columns`: the first column of
  each quantity, built once), and ``IDLE_COLUMNS``, their count (column :data:`DECAY`, the
  product of the decoupled weight decay factors
  :math:`D(L) = \prod_{\tau=L+1}^{T} (1 - w_\tau)`, is filled by the kernel and counts as
  one of them). The rule's functions read the table by these names (``t[COLUMNS.decay]``);
* ``IDLE_CONSTANT``: fields of ``Coefficients`` the closed form assumes constant over
  the window (the optimizer flushes before one changes);
* ``idle_table_init(t)``: the scalars of the empty window (``t[COLUMNS.decay]`` is set to 1);
* ``idle_table_step(t, t_next, rec)``: the scalars of window :math:`(L, T]` from those
  of :math:`(L+1, T]` and the coefficients ``rec`` of step :math:`L+1` (``t[COLUMNS.decay]``
  already holds :math:`D(L)`). The host runs this backward recursion once per step
  for every window a row may need, in float64;
* ``idle_apply(p, *slots, t, c, tol, zero) -> (p, *slots, ok)``: one element
  after the window ``t`` (``c``: the coefficients of step :math:`T`; ``tol``: half the
  variable dtype's machine epsilon). ``ok=False`` makes the kernel replay ``update``
  with a zero gradient over the window instead (always correct, bounded by the history).

* ``idle_is_identity(c, wd) -> bool`` (optional; absent means ``False``): whether a step
  with a zero gradient, coefficients ``c`` and decoupled weight decay factor ``wd`` (both
  in the variable's dtype) leaves every element and slot unchanged, bit for bit, where
  exact mode's catch-up over that step would leave it unchanged too (``idle_apply``
  succeeds and returns its inputs for a window of that step alone). Plain host Python,
  called once per step and variable. Where it holds and no row of the variable is behind,
  a sparse exact-mode step is a lazy step: no history record, no idle tables, no per-row
  bookkeeping, no catch-up (:func:`sparseopt._exact.run`). It must be ``False`` wherever
  the closed form would fail (``ok`` False, e.g. ``epsilon == 0``, see :data:`EPSILON_ZERO`).
  It may read the coefficients that come from hyperparameters other than the learning
  rate, and ``wd``'s being zero, nothing else (not the learning rate, not the step): the
  TensorFlow bridge decides it once while tracing a lookup, and leaves out the lookup's
  catch-up where it holds (``sparseopt_tf._exact.idle_always_identity``).

These functions (and the helpers here) read arrays (the window's table row); ``update`` stays
pure scalar math. A rule without them is caught up by the replay, which equals the dense rule
bit for bit. Like the rules, this module is plain Python: the kernels compile the helpers a
rule's function calls together with it, for their target (:mod:`sparseopt.kernels._compile`).

Write ``idle_apply`` branch-free: compute every case, then select (``a if cond else b`` of
computed values, ``&``/``|`` of comparisons), and read the table row unconditionally. The
CPU catch-up runs it over a whole row in one loop, which then vectorizes; a conditional
table read or an early return keeps it scalar. The CPU's first pass compiles it with a
short :func:`series` (``sparseopt.kernels.exact.FAST_SERIES_TERMS`` terms: the kernels compile
this module's functions with :data:`SERIES_TERMS` re-bound), and retries with all terms where
that one fails.
:func:`series_apply` is the series part of Nadam's ``idle_apply``; Adam and Adamax use
:func:`window_series_apply`, which picks per element between that series and a second one
(:func:`centred_series_step`) that converges where ``epsilon / sqrt(v)`` is not small.
"""

import collections
import math

#: Terms of the eps-series of the Adam family (``1 / (s q + eps)`` expanded in ``eps / s``).
SERIES_TERMS = 12
#: Table columns per series (the layout; the CPU's first pass sums fewer terms of them).
SERIES_COLUMNS = SERIES_TERMS
#: The series is used only while ``eps / (s q)`` stays below this (else: replay).
SERIES_LIMIT = 0.25
#: Column of every idle table that holds the window's weight decay product :math:`D(L)`.
DECAY = 0

#: How the closed forms treat ``epsilon == 0``: they do not apply (``ok`` is False), and
#: the idle steps are replayed with the dense rule, bit for bit. A dense step with a zero
#: gradient divides 0 by 0 where the state is zero (Adagrad's accumulator, Adam's ``v``,
#: RMSprop's ``rms``, ...) and writes NaN, as Keras does; exact mode must do the same
#: (and a decaying state may underflow to zero inside a window). Every rule whose update
#: divides by a root or norm plus epsilon follows this rule in its ``idle_apply``.
EPSILON_ZERO = "replay"


def columns(**widths):
    """The named columns of an idle table: ``decay`` (:data:`DECAY`), then one name per
    keyword, in order, each spanning ``width`` columns (a series: :data:`SERIES_COLUMNS`).

    Returns a NamedTuple of each name's first column, and ``count``, the table's width (the
    rule's ``IDLE_COLUMNS``). The kernels read its fields as compile-time constants."""
    names = ("decay",) + tuple(widths) + ("count",)
    offsets = [DECAY]
    at = DECAY + 1
    for width in widths.values():
        offsets.append(at)
        at += width
    return collections.namedtuple("IdleColumns", names)(*offsets, at)


def series(x, t, first, tol):
    r"""``sum_n (-x)^n t[first + n]`` over all ``SERIES_TERMS`` terms (Horner's scheme),
    and whether the last term is below ``tol`` relative to the sum.

    No early exit: a fixed count of multiply-adds and no branch, so the CPU kernels'
    element loops vectorize (an element whose series has not converged is replayed).
    """
    acc = t[first + SERIES_TERMS - 1]
    xn = 1.0
    for n in range(SERIES_TERMS - 2, -1, -1):
        acc = t[first + n] - x * acc
        xn *= x
    return acc, abs(xn * t[first + SERIES_TERMS - 1]) <= tol * abs(acc)


def series_apply(decay, m, s, epsilon, t, first, limit, tol):
    r"""The weight after the window for the Adam family: ``decay - m / s * sum_n (-x)^n W_n``
    with ``x = epsilon / s`` (:func:`series` from column ``first``), and whether that holds:
    ``epsilon > 0``, and ``m == 0`` or (``s > 0``, ``x <= limit`` and the series converged).
    Branch-free; ``s = 0`` divides by ``epsilon`` instead, which keeps the unused quotients
    finite. With ``epsilon == 0`` a zero state divides 0 by 0 in the dense rule (NaN, as in
    Keras), and a decaying one may underflow to that inside the window: the replay (see
    :data:`EPSILON_ZERO`) reproduces it bit for bit.
    """
    positive = s > 0
    divisor = s if positive else epsilon
    x = epsilon / divisor
    acc, converged = series(x, t, first, tol)
    ok = ((m == 0) | (positive & (x <= limit) & converged)) & (epsilon > 0)
    return (decay if m == 0 else decay - m / divisor * acc), ok


def window_series_apply(decay, m, s, epsilon, t, first, centred, shrink, tol):
    r"""The weight after the window for Adam and Adamax, by one of two series, chosen per
    element: the eps-series of :func:`series_apply` (columns ``first``...) or the **centred
    series** (columns ``centred``..., :func:`centred_series_step`), whichever
    has the smaller ratio of terms; it holds where that ratio is below :data:`SERIES_LIMIT`
    and the series converged (else ``ok`` is False: the caller retries or replays).

    ``shrink``: the window's total decay of the denominator's moment term,
    :math:`P_v(L,T)^r` (:math:`r_T`). Step :math:`\tau`'s divisor is
    :math:`s\,r_T\,\rho_\tau + \epsilon` with :math:`\rho_\tau = P_v(\tau,T)^{-r} \ge 1`
    independent of the window's start, so with :math:`U = \epsilon + s\,r_T`,
    :math:`x = s\,r_T / U \in [0, 1)` and :math:`u_\tau = \rho_\tau - 1`,
    :math:`1/(U (1 + x u_\tau)) = U^{-1} \sum_n (-x)^n u_\tau^n`. The ratio of its terms is
    at most :math:`x\,u_{max}` with :math:`u_{max} \le 1/r_T - 1` (about ``k (1 - beta_2) r``
    for a window of ``k`` steps), whatever ``epsilon / s``. The eps-series' ratio is
    :math:`\epsilon / (s\,r_T)`; the comparison of the two is made without a division:
    :math:`\epsilon\,U \le (s\,r_T)^2 u_{max}`. Branch-free, with one division per element
    (the CPU's catch-up is bound by this arithmetic, and divisions are its dearest part).
    """
    # s in float64 (a float32 s times a Python float stays float32 on the CUDA simulator)
    wide = s + 0.0 * shrink
    scaled = wide * shrink
    grow = 1.0 / shrink - 1.0                    # u_max, the same for the whole window
    centred_divisor = epsilon + scaled
    take_eps = (scaled > 0) & (epsilon * centred_divisor <= scaled * scaled * grow)
    divisor = wide if take_eps else centred_divisor
    divisor = divisor if divisor > 0 else 1.0    # epsilon == 0 and s == 0: not ok, kept finite
    inverse = 1.0 / divisor
    x = (epsilon if take_eps else scaled) * inverse
    # Both series at the chosen x, then one kept by weights 1 and 0 (exact; x is at most
    # SERIES_LIMIT where a result is used, so neither sum overflows there): selected by a
    # branch, LLVM sinks each series into its arm and the vectorized loop gathers the table.
    acc_eps, converged_eps = series(x, t, first, tol)
    acc_centred, converged_centred = series(x, t, centred, tol)
    weight = 1.0 * take_eps
    acc = acc_eps * weight + acc_centred * (1.0 - weight)
    converged = converged_eps if take_eps else converged_centred
    small = (x <= SERIES_LIMIT * shrink) if take_eps else (x * grow <= SERIES_LIMIT)
    ok = ((m == 0) | (small & converged)) & (epsilon > 0)
    return (decay if m == 0 else decay - m * inverse * acc), ok


def centred_series_step(t, t_next, first, a, decay_m, decay_v_after, root):
    r"""One backward step of the centred series' :math:`W'_n(L) = \sum_\tau a_\tau D(\tau)
    P_m(L,\tau) u_\tau^n` (:func:`window_series_apply`) from :math:`W'_n(L+1)`:
    ``decay_v_after`` is :math:`P_v(L+1,T)`, so :math:`u_{L+1} = P_v(L+1,T)^{-r} - 1`."""
    u = (1.0 / (math.sqrt(decay_v_after) if root == 0.5 else decay_v_after)) - 1.0
    weight = a * t_next[DECAY]
    for n in range(SERIES_TERMS):
        t[first + n] = decay_m * (weight + t_next[first + n])
        weight *= u


def moment_series_step(t, t_next, first, a, decay_m, decay_v, root, e):
    r"""One backward step of :math:`W_n(L) = \sum_\tau a_\tau D(\tau) e_\tau^n
    P_m(L,\tau) P_v(L,\tau)^{-(n+1) r}` (``root`` :math:`r`: 1/2 for a second moment,
    1 for an infinity norm) from :math:`W_n(L+1)`."""
    q = 1.0 / (math.sqrt(decay_v) if root == 0.5 else decay_v)
    ratio = decay_m * q
    weight = a * t_next[DECAY]
    for n in range(SERIES_TERMS):
        t[first + n] = ratio * (weight + t_next[first + n])
        ratio *= q
        weight *= e


def no_idle_table_init(t):
    return


def no_idle_table_step(t, t_next, rec):
    return
