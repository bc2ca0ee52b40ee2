"""``sparse_mode="exact"``: sparse steps, then ``flush()``, equal the dense rule applied
every step to the densified gradient (the float64 NumPy references)."""

import numpy as np
import pytest

import sparseopt as so
from sparseopt import schedules
from tests import references as ref
from tests.conftest import rel_close
from tests.optimizer_table import CASES, IDS

STEPS = 30
ROWS, WIDTH = 40, 3


def random_sparse(rng, dtype, steps=STEPS, rows=ROWS, width=WIDTH):
    """Random subsets (some steps empty, some touching few rows) with duplicates."""
    out = []
    for t in range(steps):
        k = int(rng.integers(0, 10)) if t % 7 else 0
        idx = rng.integers(0, rows, k)
        if k > 2:
            idx[:2] = idx[2]
        out.append((rng.normal(size=(k, width)).astype(dtype), idx))
    return out


def densify(values, idx, rows):
    g = np.zeros((rows,) + values.shape[1:], np.float64)
    np.add.at(g, idx, values.astype(np.float64))
    return g


class StepDecay(schedules.LearningRateSchedule):
    """A schedule that changes the learning rate at every step (float32-representable)."""

    def __init__(self, base):
        self.base = base

    def __call__(self, step):
        return self.base * (1.0 + 0.5 * np.sin(float(step)))

    def get_config(self):
        return {"base": self.base}


def reference_with_schedule(case, lr_fn):
    """The case's reference with the learning rate of each step from ``lr_fn(step)``."""
    hp = case.hp()

    def step(p, g, s, t, **kw):
        kw = dict(kw, learning_rate=float(np.float32(lr_fn(t - 1))))
        return case.reference(p, g, s, t, **kw)
    return step, hp


def run_exact(case, p0, grads, dtype, history=None, **extra):
    p = p0.copy()
    opt = case.make(sparse_mode="exact", exact_history=history, **extra)
    for values, idx in grads:
        opt.apply_gradients([(so.IndexedSlices(values, idx, p.shape), p)])
    opt.flush()
    return opt, p


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_exact_matches_dense_reference(case, dtype, rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    grads = random_sparse(rng, dtype)
    opt, p = run_exact(case, p0, grads, dtype)
    dense = [densify(v, i, ROWS) for v, i in grads]
    expected, slots = ref.run_dense(case.reference, p0, dense, **case.hp())
    assert opt.iterations == STEPS
    rel_close(p, expected, dtype)
    for name, value in slots.items():
        rel_close(opt.get_slot(p, name), value, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_exact_with_schedule_weight_decay_and_short_history(case, dtype, rng):
    """A learning rate that changes every step, decoupled weight decay on every row, and a
    history shorter than the run (so the ring forces intermediate flushes)."""
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    grads = random_sparse(rng, dtype)
    base = case.hp()["learning_rate"]
    lr = StepDecay(base)
    wd = case.kwargs.get("weight_decay", 0.05)
    opt, p = run_exact(case, p0, grads, dtype, history=8, learning_rate=lr, weight_decay=wd)
    hp = {k: v for k, v in case.hp().items() if k != "weight_decay"}
    reference = ref.weight_decayed(ref.adam if case.reference is ref.adamw else case.reference, wd)

    def step(p_, g, s, t, **kw):
        return reference(p_, g, s, t, **dict(kw, learning_rate=float(np.float32(lr(t - 1)))))
    expected, slots = ref.run_dense(step, p0, [densify(v, i, ROWS) for v, i in grads], **hp)
    rel_close(p, expected, dtype)
    for name, value in slots.items():
        rel_close(opt.get_slot(p, name), value, dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_long_idle_rows_use_the_fast_path_correctly(case, rng):
    """Rows idle for hundreds of steps (the closed forms and truncated series, not the replay)."""
    dtype = np.float64
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    grads = []
    for t in range(300):
        idx = np.array([t % 3]) if t > 5 else np.arange(ROWS)
        grads.append((rng.normal(size=(idx.size, WIDTH)).astype(dtype), idx))
    opt, p = run_exact(case, p0, grads, dtype, history=512)
    expected, slots = ref.run_dense(case.reference, p0, [densify(v, i, ROWS) for v, i in grads],
                                    **case.hp())
    rel_close(p, expected, dtype)
    for name, value in slots.items():
        rel_close(opt.get_slot(p, name), value, dtype)


SERIES_CASES = [c for c in CASES if c.id in ("adam", "adamw", "adamax", "nadam")]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", SERIES_CASES, ids=[c.id for c in SERIES_CASES])
def test_every_tier_of_the_series_catch_up(case, dtype, rng):
    """The eps-series rules with ``eps / sqrt(v)`` spread over three decades per row (the
    columns' gradients scale from 1 to 1000 with a large epsilon): the vectorized short
    series suffices for the small ratios, the full series is needed for the middle ones
    and the replay for the large ones; all must equal the dense rule."""
    rows, width = 30, 24
    p0 = rng.normal(size=(rows, width)).astype(dtype)
    scale = np.logspace(0, 3, width)
    grads = [((v * scale).astype(dtype), i) for v, i in random_sparse(rng, dtype, 40, rows, width)]
    opt, p = run_exact(case, p0, grads, dtype, epsilon=0.05)
    expected, slots = ref.run_dense(case.reference, p0, [densify(v, i, rows) for v, i in grads],
                                    **dict(case.hp(), epsilon=0.05))
    rel_close(p, expected, dtype)
    for name, value in slots.items():
        rel_close(opt.get_slot(p, name), value, dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dense_gradient_catches_up_pending_rows_first(case, rng):
    dtype = np.float64
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    grads = random_sparse(rng, dtype, steps=10)
    p = p0.copy()
    opt = case.make(sparse_mode="exact")
    for values, idx in grads:
        opt.apply_gradients([(so.IndexedSlices(values, idx, p.shape), p)])
    g_dense = rng.normal(size=p.shape).astype(dtype)
    opt.apply_gradients([(g_dense, p)])  # no flush before: the step must catch up first
    dense = [densify(v, i, ROWS) for v, i in grads] + [g_dense]
    expected, slots = ref.run_dense(case.reference, p0, dense, **case.hp())
    rel_close(p, expected, dtype)
    for name, value in slots.items():
        rel_close(opt.get_slot(p, name), value, dtype)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_catch_up_brings_given_rows_current(case, rng):
    dtype = np.float64
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    grads = random_sparse(rng, dtype, steps=12)
    p = p0.copy()
    opt = case.make(sparse_mode="exact")
    for values, idx in grads:
        opt.apply_gradients([(so.IndexedSlices(values, idx, p.shape), p)])
    expected, _ = ref.run_dense(case.reference, p0, [densify(v, i, ROWS) for v, i in grads],
                                **case.hp())
    rows = np.array([5, 0, 5, 39])
    opt.catch_up(p, rows)
    rel_close(p[rows], expected[rows], dtype)
    before = p.copy()
    opt.catch_up(p, rows)  # already current: nothing changes
    np.testing.assert_array_equal(p, before)


def test_untouched_step_leaves_the_table_alone_until_read(rng):
    """Exact mode defers the work: a sparse step writes only the touched rows."""
    p = rng.normal(size=(ROWS, WIDTH))
    p0 = p.copy()
    opt = so.Adam(learning_rate=0.01, sparse_mode="exact")
    opt.apply_gradients([(so.IndexedSlices(np.ones((2, WIDTH)), np.array([1, 2])), p)])
    opt.apply_gradients([(so.IndexedSlices(np.ones((1, WIDTH)), np.array([3])), p)])
    np.testing.assert_array_equal(np.delete(p, [1, 2, 3], axis=0), np.delete(p0, [1, 2, 3], axis=0))
    opt.flush()
    assert not np.array_equal(p[1], p0[1])


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("adam", "sgd_momentum", "ftrl_regularized",
                                                               "rowwise_adagrad")],
                         ids=lambda c: c.id)
def test_weights_round_trip_continues_identically(case, rng):
    dtype = np.float64
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    grads = random_sparse(rng, dtype)
    first, second = grads[:15], grads[15:]
    p = p0.copy()
    opt = case.make(sparse_mode="exact")
    for values, idx in first:
        opt.apply_gradients([(so.IndexedSlices(values, idx, p.shape), p)])
    weights = opt.get_weights()  # flushes
    q = p.copy()
    clone = type(opt).from_config(opt.get_config())
    assert clone.sparse_mode == "exact"
    clone.build([q])
    clone.set_weights(weights)
    for values, idx in second:
        opt.apply_gradients([(so.IndexedSlices(values, idx, p.shape), p)])
        clone.apply_gradients([(so.IndexedSlices(values, idx, q.shape), q)])
    opt.flush()
    clone.flush()
    np.testing.assert_array_equal(p, q)


def test_catch_up_validates_indices(rng):
    p = rng.normal(size=(ROWS, WIDTH))
    opt = so.Adam(sparse_mode="exact")
    opt.apply_gradients([(so.IndexedSlices(np.ones((1, WIDTH)), np.array([1])), p)])
    with pytest.raises(so.errors.IndexOutOfRangeError, match=r"indices must lie in \[0, 40\)"):
        opt.catch_up(p, np.array([1, 40]))
    with pytest.raises(so.errors.IndicesTypeError):
        opt.catch_up(p, np.array([1.0]))


def test_exact_history_is_checked():
    with pytest.raises(so.errors.HyperparameterError, match="exact_history"):
        so.Adam(sparse_mode="exact", exact_history=1)


def _window_table(rule, records):
    """The rule's idle table of the window made of ``records`` (its steps, oldest first),
    built as the host builds it (:func:`sparseopt.kernels.exact._table_template`, no decay)."""
    t = np.zeros(rule.IDLE_COLUMNS)
    t[0] = 1.0
    rule.idle_table_init(t)
    for rec in reversed(records):
        t_next, t = t, np.zeros(rule.IDLE_COLUMNS)
        t[0] = t_next[0]
        rule.idle_table_step(t, t_next, rec)
    return t


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["adam", "adamax"])
def test_catch_up_near_epsilon_needs_no_replay(name, dtype):
    """``sqrt(v)`` (Adamax: ``u``) between epsilon / 8 and 8 epsilon, the regime of small
    gradients (a loss averaged over a large batch): the eps-series does not converge there;
    the centred series must (``ok``: no replay) and give the float64 replay of the rule with
    a zero gradient to the dtype's rounding, over windows of up to 200 steps in float32 (the
    tables are float64; the tolerance is the variable's) and 20 in float64."""
    from sparseopt.rules import adam, adamax
    rule = {"adam": adam, "adamax": adamax}[name]
    tol = float(np.finfo(dtype).eps) / 2
    eps, start = 1e-7, 50
    for k in (1, 5, 20, 60, 200) if dtype == np.float32 else (1, 5, 20):
        records = [rule.coefficients(1e-3, 0.9, 0.999, eps, step)
                   for step in range(start + 1, start + k + 1)]
        t = _window_table(rule, records)
        for ratio in (0.125, 0.5, 1.0, 2.0, 8.0):
            s = ratio * eps
            p, m, second = 0.3, 2e-8, (s * s if name == "adam" else s)
            vhat = (0.0,) if name == "adam" else ()  # Adam's third slot (AMSGrad's; off here)
            moved, m_new, second_new, *_, ok = rule.idle_apply(p, m, second, *vhat, t, records[-1], tol, 0.0)
            x, a, b = p, m, second
            for rec in records:
                x, a, b, *_ = rule.update(x, 0.0, a, b, *vhat, rec)
            assert ok, (k, ratio)
            assert abs(moved - x) <= 4 * tol * abs(x - p) + 4 * np.spacing(p), (k, ratio)
            assert m_new == pytest.approx(a, rel=1e-14) and second_new == pytest.approx(b, rel=1e-14)
