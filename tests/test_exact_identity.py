"""Exact mode at lazy cost where the idle step is the identity (``idle_is_identity``).

Adagrad (``epsilon > 0``), plain SGD and RowwiseAdagrad without weight decay: a zero
gradient changes nothing, so a sparse exact step is a lazy step, with no bookkeeping. The
results stay those of the full exact path, bit for bit, and those of the dense rule.
"""

import numpy as np
import pytest

import sparseopt as so
from sparseopt import errors
from tests.optimizer_table import CASES, LEGACY_CASES

ROWS, WIDTH, STEPS = 40, 3, 25

IDENTITY = [c for c in CASES + LEGACY_CASES
            if c.id in ("sgd", "adagrad", "rowwise_adagrad", "legacy_adagrad", "legacy_adagrad_zero_init")]
#: Cases whose idle step is not the identity (or not without more state): always the full path.
NOT_IDENTITY = [c for c in CASES if c.id in ("sgd_momentum", "adam", "ftrl", "rmsprop")]


def steps(rng, dtype, unique=False, count=STEPS):
    """Random sparse steps (some empty, some with duplicates unless ``unique``)."""
    out = []
    for t in range(count):
        k = int(rng.integers(0, 10)) if t % 7 else 0
        idx = rng.choice(ROWS, k, replace=False) if unique else rng.integers(0, ROWS, k)
        out.append((rng.normal(size=(k, WIDTH)).astype(dtype), idx))
    return out


def slot_names(opt, p):
    return [n for n in ("accumulator", "momentum") if _has_slot(opt, p, n)]


def _has_slot(opt, p, name):
    try:
        opt.get_slot(p, name)
    except so.errors.UnknownSlotError:      # the optimizer has no such slot
        return False
    return True


def run(case, p0, grads, mode, dense=False, **extra):
    p = p0.copy()
    opt = case.make(sparse_mode=mode, **extra)
    for values, idx in grads:
        if dense:
            g = np.zeros_like(p)
            g[idx] = values           # unique rows
            opt.apply_gradients([(g, p)])
        else:
            opt.apply_gradients([(so.IndexedSlices(values, idx, p.shape), p)])
    opt.flush()
    return opt, p


def without_shortcut(monkeypatch, case):
    """Exact mode as it was before the shortcut: the rule declares no identity."""
    rule = case.make()._rule
    monkeypatch.delattr(rule, "idle_is_identity")


def assert_same(a, b, opt_a, opt_b, pa, pb):
    np.testing.assert_array_equal(a, b)
    for name in slot_names(opt_a, pa):
        np.testing.assert_array_equal(opt_a.get_slot(pa, name), opt_b.get_slot(pb, name))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", IDENTITY, ids=[c.id for c in IDENTITY])
def test_shortcut_equals_full_exact_lazy_and_dense_bit_for_bit(case, dtype, rng, monkeypatch):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    grads = steps(rng, dtype)
    lazy, p_lazy = run(case, p0, grads, "lazy")
    fast, p_fast = run(case, p0, grads, "exact")
    assert fast._exact_states == {}            # the shortcut ran: no bookkeeping at all
    assert_same(p_fast, p_lazy, fast, lazy, p_fast, p_lazy)
    unique = steps(rng, dtype, unique=True)
    dense, p_dense = run(case, p0, unique, "lazy", dense=True)
    fast_u, p_fast_u = run(case, p0, unique, "exact")
    assert_same(p_fast_u, p_dense, fast_u, dense, p_fast_u, p_dense)
    without_shortcut(monkeypatch, case)
    full, p_full = run(case, p0, grads, "exact")
    assert full._exact_states != {}            # the full path kept its bookkeeping
    assert_same(p_fast, p_full, fast, full, p_fast, p_full)


@pytest.mark.parametrize("case", NOT_IDENTITY, ids=[c.id for c in NOT_IDENTITY])
def test_rules_whose_idle_step_moves_rows_keep_the_full_path(case, rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    opt, _ = run(case, p0, steps(rng, np.float32, count=3), "exact")
    assert opt._exact_states != {}


def test_ftrl_idle_step_is_not_the_identity():
    """Why Ftrl declares no identity: a dense step with a zero gradient recomputes p from
    the linear and accumulator slots, which sets a row no step has computed yet to 0
    (with l1 and l2 too)."""
    for kw in ({}, dict(l1_regularization_strength=0.05, l2_regularization_strength=0.1)):
        p = np.ones((2, WIDTH), np.float32)
        g = np.zeros_like(p)
        g[0] = 0.5
        so.Ftrl(0.1, **kw).apply_gradients([(g, p)])
        np.testing.assert_array_equal(p[1], 0.0)


@pytest.mark.parametrize("eps_case", [
    lambda m: so.Adagrad(0.1, initial_accumulator_value=0.0, epsilon=0.0, sparse_mode=m),
    lambda m: so.Adagrad(0.1, initial_accumulator_value=0.0, epsilon=0.0, sparse_mode=m, _legacy=True),
], ids=["adagrad", "legacy_adagrad"])
def test_epsilon_zero_keeps_the_full_path_and_dense_nan(eps_case, rng):
    """0/0 on a zero accumulator: the dense rule writes NaN, so the step is not the identity."""
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    p, q = p0.copy(), p0.copy()
    exact, dense = eps_case("exact"), eps_case("lazy")
    for t in range(3):
        idx = np.array([t])
        vals = rng.normal(size=(1, WIDTH)).astype(np.float32)
        exact.apply_gradients([(so.IndexedSlices(vals, idx, p.shape), p)])
        g = np.zeros_like(q)
        g[idx] = vals
        dense.apply_gradients([(g, q)])
    assert exact._exact_states != {}
    exact.flush()
    np.testing.assert_array_equal(p, q)
    assert np.isnan(p[ROWS - 1]).all()


@pytest.mark.parametrize("case", IDENTITY, ids=[c.id for c in IDENTITY])
def test_weight_decay_on_then_off_falls_back_until_every_row_is_current(case, rng, monkeypatch):
    """Rows behind from weight-decayed steps: the full path, until a flush makes every row
    current; then the shortcut again (the state only counts steps). Same bits as without it."""
    dtype = np.float64
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    grads = steps(rng, dtype, count=24)

    def train(check):
        p = p0.copy()
        opt = case.make(sparse_mode="exact", weight_decay=0.05)
        for t, (values, idx) in enumerate(grads):
            if t == 6:
                opt.weight_decay = 0.0
            if t == 12:
                opt.flush()
            if t == 18:
                opt.weight_decay = 0.05
            before = {k: (ex.steps, ex.floor, ex.hist.copy()) for k, ex in opt._exact_states.items()}
            opt.apply_gradients([(so.IndexedSlices(values, idx, p.shape), p)])
            if check:
                ex = opt._exact_states[id(p)]
                steps_, floor, hist = before[id(p)] if t else (0, 0, None)
                assert ex.steps == steps_ + 1
                if 12 <= t < 18:                   # shortcut: every row current, no record
                    assert ex.floor == ex.steps
                    np.testing.assert_array_equal(ex.hist, hist)
                elif 6 <= t < 12:                  # rows still behind: full path
                    assert ex.floor == floor < ex.steps
        opt.flush()
        return opt, p

    fast, p_fast = train(True)
    without_shortcut(monkeypatch, case)
    full, p_full = train(False)
    assert_same(p_fast, p_full, fast, full, p_fast, p_full)


def test_excluded_variable_takes_the_shortcut_beside_a_decayed_one(rng):
    """The predicate is per variable: weight decay off for an excluded table."""
    a, b = (rng.normal(size=(ROWS, WIDTH)).astype(np.float32) for _ in range(2))
    opt = so.Adagrad(0.1, weight_decay=0.01, sparse_mode="exact")
    opt.exclude_from_weight_decay(var_list=[b])
    g = so.IndexedSlices(np.ones((2, WIDTH), np.float32), np.array([1, 2]), a.shape)
    opt.apply_gradients([(g, a), (g, b)])
    assert id(a) in opt._exact_states and id(b) not in opt._exact_states


def test_catch_up_and_flush_after_shortcut_steps_change_nothing(rng):
    p = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    opt = so.Adagrad(0.1, sparse_mode="exact")
    g = so.IndexedSlices(np.ones((2, WIDTH), np.float32), np.array([1, 2]), p.shape)
    opt.apply_gradients([(g, p)])
    before = p.copy()
    opt.catch_up(p, np.arange(ROWS))
    opt.flush()
    np.testing.assert_array_equal(p, before)
    with pytest.raises(IndexError):
        opt.catch_up(p, np.array([ROWS]))


def test_rollback_of_a_shortcut_step(rng):
    """A failing constraint undoes a shortcut step like any other (state counts included)."""
    p = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    opt = so.Adagrad(0.1, sparse_mode="exact", weight_decay=0.05)
    g = so.IndexedSlices(np.ones((2, WIDTH), np.float32), np.array([1, 2]), p.shape)
    opt.apply_gradients([(g, p)])
    opt.weight_decay = 0.0
    opt.flush()
    ex = opt._exact_states[id(p)]
    steps_before, before = ex.steps, p.copy()

    def bad(x):
        raise errors.ConstraintError("no")
    with pytest.raises(errors.ConstraintError):
        opt.apply_gradients([(g, p)], constraints=[(p, bad)])
    assert ex.steps == steps_before and ex.floor == steps_before
    np.testing.assert_array_equal(p, before)



@pytest.mark.parametrize("cls", [so.Adagrad, so.RowwiseAdagrad], ids=["adagrad", "rowwise_adagrad"])
def test_shortcut_steps_of_several_tables_run_in_one_region(cls, rng, monkeypatch):
    """The shortcut's updates run as a lazy step does: tables of one kernel configuration in
    one parallel region (``engine._run_tables``), with the bits of lazy mode's step."""
    from sparseopt import engine as core
    regions = []
    real = core._run_tables
    monkeypatch.setattr(core, "_run_tables", lambda *a: regions.append(len(a[1])) or real(*a))
    tables = [rng.normal(size=(ROWS, w)).astype(np.float32) for w in (WIDTH, WIDTH + 2, WIDTH)]
    lazy_tables = [t.copy() for t in tables]
    exact, lazy = cls(0.1, sparse_mode="exact"), cls(0.1)
    for _ in range(3):
        grads = [so.IndexedSlices(rng.normal(size=(5, t.shape[1])).astype(np.float32),
                                  rng.integers(0, ROWS, 5), t.shape) for t in tables]
        exact.apply_gradients(list(zip(grads, tables)))
        lazy.apply_gradients(list(zip(grads, lazy_tables)))
    assert regions and regions[0] == 3 and len(regions) == 6   # 3 steps, exact and lazy
    assert exact._exact_states == {}
    for a, b in zip(tables, lazy_tables):
        np.testing.assert_array_equal(a, b)
