"""``sparseopt.Rule``: a user's optimizer as one rule gets every path of the built-in ones.

The rule under test is the example's AdaBelief (``examples/custom_optimizer.py``), checked
against AdaBelief's formula in float64 NumPy (the example's ``reference``).
"""

import importlib.util
import math
import pathlib

import numpy as np
import pytest

import sparseopt as so
from sparseopt import errors
from tests.conftest import rel_close

_spec = importlib.util.spec_from_file_location(
    "custom_optimizer", pathlib.Path(__file__).resolve().parent.parent / "examples" / "custom_optimizer.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)
AdaBelief = example.AdaBelief

ROWS, WIDTH, STEPS = 30, 3, 15
LR = 0.01


def _reference_run(p0, dense_grads, weight_decay=0.0, **hp):
    """The formula, step by step (the learning rate in float32, as sparseopt and Keras hold it)."""
    lr = float(np.float32(hp.pop("learning_rate", LR)))
    p, m, s = p0.astype(np.float64), np.zeros(p0.shape), np.zeros(p0.shape)
    for t, g in enumerate(dense_grads, start=1):
        p = p - p * float(np.float32(weight_decay)) * lr
        p, m, s = example.reference(p, g, m, s, t, learning_rate=lr, **hp)
    return p, m, s


def _sparse_batches(rng, dtype):
    out = []
    for t in range(STEPS):
        k = int(rng.integers(0, 6)) if t % 5 else 0
        out.append((rng.normal(size=(k, WIDTH)).astype(dtype), rng.integers(0, ROWS, k)))
    return out


def _densify(values, idx):
    g = np.zeros((ROWS, WIDTH))
    np.add.at(g, idx, values.astype(np.float64))
    return g


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_steps_equal_the_formula(dtype, rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    grads = [rng.normal(size=(ROWS, WIDTH)) for _ in range(STEPS)]
    p, opt = p0.copy(), AdaBelief(learning_rate=LR, beta_1=0.8)
    for g in grads:
        opt.apply_gradients([(g.astype(dtype), p)])
    expected, m, s = _reference_run(p0, grads, beta_1=0.8)
    rel_close(p, expected, dtype)
    rel_close(opt.get_slot(p, "m"), m, dtype)
    rel_close(opt.get_slot(p, "s"), s, dtype)
    assert opt.iterations == STEPS


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_sparse_steps_with_weight_decay_equal_dense_training(dtype, rng):
    """Exact mode (the idle steps replayed: a custom rule has no closed form) with decoupled
    weight decay equals the dense formula on the densified gradients."""
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    batches = _sparse_batches(rng, dtype)
    p = p0.copy()
    opt = AdaBelief(learning_rate=LR, weight_decay=0.05, sparse_mode="exact", exact_history=8)
    for values, idx in batches:
        opt.apply_gradients([(so.IndexedSlices(values, idx, p.shape), p)])
    opt.flush()
    expected, m, s = _reference_run(p0, [_densify(v, i) for v, i in batches], weight_decay=0.05)
    rel_close(p, expected, dtype)
    rel_close(opt.get_slot(p, "s"), s, dtype)


def test_lazy_sparse_steps_touch_only_their_rows(rng):
    """Lazy mode: each touched row takes the formula's step on its summed gradient, the
    others stay as they were (slots included)."""
    p0 = rng.normal(size=(ROWS, WIDTH))
    p, opt = p0.copy(), AdaBelief(learning_rate=LR)
    idx = np.array([3, 7, 3])
    values = rng.normal(size=(3, WIDTH))
    opt.apply_gradients([(so.IndexedSlices(values, idx, p.shape), p)])
    expected, _, _ = _reference_run(p0[[3, 7]], [np.stack([values[0] + values[2], values[1]])])
    rel_close(p[[3, 7]], expected, np.float64)
    untouched = np.setdiff1d(np.arange(ROWS), [3, 7])
    np.testing.assert_array_equal(p[untouched], p0[untouched])
    np.testing.assert_array_equal(opt.get_slot(p, "m")[untouched], 0.0)


def test_clipping_schedules_config_and_checkpoints(tmp_path, rng):
    """The base class's features: clipnorm, a schedule as a hyperparameter, get_config /
    from_config, and save / load with ``custom_objects`` continue identically."""
    schedule = so.schedules.ExponentialDecay(0.02, decay_steps=3, decay_rate=0.5)
    opt = AdaBelief(learning_rate=schedule, beta_2=0.99, clipnorm=1.0)
    config = opt.get_config()
    assert config["beta_2"] == 0.99 and config["clipnorm"] == 1.0 and config["name"] == "adabelief"
    p = rng.normal(size=(ROWS, WIDTH))
    grads = [rng.normal(size=(ROWS, WIDTH)) * 10 for _ in range(4)]
    for g in grads[:2]:
        opt.apply_gradients([(g, p)])
    so.save(tmp_path / "opt.npz", opt, [p])
    twin_p = np.zeros_like(p)
    twin, _ = so.load(tmp_path / "opt.npz", variables=[twin_p], custom_objects={"AdaBelief": AdaBelief})
    np.testing.assert_array_equal(twin_p, p)
    assert type(twin) is AdaBelief and twin.iterations == 2
    for g in grads[2:]:
        opt.apply_gradients([(g, p)])
        twin.apply_gradients([(g, twin_p)])
    np.testing.assert_array_equal(p, twin_p)
    # the clipped formula: each gradient scaled to norm 1, the scheduled learning rates
    q, m, s = rng.normal(size=(ROWS, WIDTH)), np.zeros((ROWS, WIDTH)), np.zeros((ROWS, WIDTH))
    again, q0 = AdaBelief.from_config(config), q.copy()
    for t, g in enumerate(grads, start=1):
        again.apply_gradients([(g, q)])
        lr = float(np.float32(schedule(t - 1)))
        q0, m, s = example.reference(q0, g / max(1.0, np.linalg.norm(g)), m, s, t, learning_rate=lr,
                                     beta_2=0.99)
    rel_close(q, q0, np.float64)


def test_a_rule_with_one_slot_and_a_flag():
    """Fewer slots than three, a bool hyperparameter (a flag: in the config, passed to
    ``coefficients`` as a bool), and the results worked out by hand."""
    def coefficients(step, learning_rate=0.5, nesterov=False):
        return {"lr": learning_rate, "nesterov": 1.0 if nesterov else 0.0, "half": 0.5}

    def update(p, g, velocity, c):
        velocity = velocity * c.half + g
        step = g + velocity * c.half if c.nesterov != 0 else velocity
        return p - c.lr * step, velocity

    cls = so.Rule("halfmomentum", ("velocity",), coefficients, update).optimizer_class()
    assert cls.__name__ == "halfmomentum"
    # velocity: 2, then 2 * 0.5 + 1 = 2; steps: v (2, 2), or with nesterov g + v / 2 (3, 2)
    for nesterov, expected in ((False, [-1.0, -2.0]), (True, [-1.5, -2.5])):
        w = np.zeros(1)
        opt = cls(nesterov=nesterov)
        assert opt.get_config()["nesterov"] is nesterov
        got = []
        for g in (2.0, 1.0):
            opt.apply_gradients([(np.array([g]), w)])
            got.append(float(w[0]))
        assert got == expected


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="not a name"), "identifier"),
    (dict(slots=("m", "m")), "distinct"),
    (dict(update=lambda p, g, c: (p,)), "update takes .p, g, m, c., 4 arguments; got .p, g, c."),
    (dict(slots=("a", "b", "c", "d"), update=lambda p, g, a, b, c: (p, a, b)),
     "update takes .p, g, a, b, c, d, c., 7 arguments"),
    (dict(coefficients=lambda learning_rate=0.1: {}), "first parameter is step"),
    (dict(coefficients=lambda step, learning_rate: {"lr": learning_rate}), "needs a default"),
    (dict(coefficients=lambda step, rate=0.1: {"lr": rate}), "must take learning_rate"),
    (dict(coefficients=lambda step, learning_rate=0.1, clipnorm=1.0: {"lr": 1.0}), "every optimizer"),
    (dict(coefficients=lambda step, learning_rate=0.1: [learning_rate]), "dict"),
    (dict(update=None), "neither"),
    (dict(reduction=(lambda p, g, m, c: (g, m, p, g), lambda a, b, c: a, lambda p, d, s, c: p)), "both"),
    (dict(update=None, reduction=(lambda p, g, m, c: (g, m, p, g),)), "three functions"),
    (dict(update=None, reduction=(lambda p, g, m, c: (g, m, p, g), lambda a, b: a,
                                  lambda p, d, s, c: p)), "scale takes .sum_t0, sum_t1, c."),
    (dict(update=None, reduction=(lambda p, g, c: (g, p, g), lambda a, b, c: a, lambda p, d, s, c: p)),
     "terms takes .p, g, m, c., 4 arguments"),
])
def test_bad_rules_are_refused_by_name(kwargs, message):
    assert_refused(kwargs, message)


def assert_refused(kwargs, message, **defaults):
    """``sparseopt.Rule`` of a one-slot rule (``defaults`` replace its parts), changed by
    ``kwargs``, raises ``HyperparameterError`` matching ``message``."""
    args = dict(name="mine", slots=("m",), coefficients=lambda step, learning_rate=0.1: {"lr": learning_rate},
                update=lambda p, g, m, c: (p - c.lr * g, m))
    args.update(defaults, **kwargs)
    with pytest.raises(errors.HyperparameterError, match=message):
        so.Rule(**args)


def test_coefficients_that_change_their_fields_are_refused_before_any_write():
    """A step whose coefficients come back with other names raises, naming the rule, and
    leaves the variable, its slots and ``iterations`` as they were."""
    def coefficients(step, learning_rate=0.1):
        return {"lr": learning_rate} if step < 2 else {"lr": learning_rate, "extra": 1.0}

    cls = so.Rule("fickle", ("m",), coefficients,
                  lambda p, g, m, c: (p - c.lr * g, m + g)).optimizer_class()
    w = np.ones(3)
    opt = cls()
    opt.apply_gradients([(np.ones(3), w)])
    before, slot = w.copy(), opt.get_slot(w, "m").copy()
    with pytest.raises(errors.HyperparameterError, match="fickle.*step 2"):
        opt.apply_gradients([(np.ones(3), w)])
    np.testing.assert_array_equal(w, before)
    np.testing.assert_array_equal(opt.get_slot(w, "m"), slot)
    assert opt.iterations == 1


def test_the_cache_key_follows_the_rule_source():
    """Two rules of the same name and slots but different math never share a compiled kernel."""
    def coefficients(step, learning_rate=0.1):
        return {"lr": learning_rate}

    a, b = (so.Rule("same", (), coefficients, f) for f in (  # one line: the same source line
        lambda p, g, c: (p - c.lr * g,), lambda p, g, c: (p + c.lr * g,)))
    assert a.module.__rule_key__ != b.module.__rule_key__
    wa, wb = np.zeros(2), np.zeros(2)
    a.optimizer_class()().apply_gradients([(np.ones(2), wa)])
    b.optimizer_class()().apply_gradients([(np.ones(2), wb)])
    lr = float(np.float32(0.1))
    assert wa.tolist() == [-lr, -lr] and wb.tolist() == [lr, lr]


def test_float32_math_stays_float32():
    """No float64 creeps into a float32 step: the rule's constants come cast to the
    variable's dtype, so one step equals the formula evaluated in float32."""
    p = np.array([1.0, -2.0, 0.5], np.float32)
    g = np.array([0.3, 0.1, -0.7], np.float32)
    AdaBelief(learning_rate=0.1).apply_gradients([(g, p)])
    c = {k: np.float32(v) for k, v in example.coefficients(1, learning_rate=float(np.float32(0.1))).items()}
    m = (g - np.float32(0)) * c["one_minus_beta_1"]
    b = g - m
    s = b * b * c["one_minus_beta_2"] + c["epsilon"]
    expected = np.array([1.0, -2.0, 0.5], np.float32) - c["lr_m"] * m / (
        np.sqrt(s * c["v_scale"]) + c["epsilon"])
    assert expected.dtype == np.float32
    np.testing.assert_allclose(p, expected, rtol=2 ** -22)
    assert math.isfinite(float(p[0]))


def lamb_rule():
    """A user's LAMB: the built-in Lamb's scalar functions (:mod:`sparseopt.rules.lamb`), given
    to a ``Rule`` as its reduction stage."""
    from sparseopt.rules import lamb

    def coefficients(step, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        return lamb.coefficients(learning_rate, beta_1, beta_2, epsilon, step)
    return so.Rule("mylamb", lamb.SLOTS, coefficients,
                   reduction=(lamb.reduce_terms, lamb.reduce_scale, lamb.reduce_apply))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_rule_with_a_reduction_stage_steps_as_the_built_in_lamb(dtype, rng):
    """Dense steps (the norms over the variable) and sparse steps (over each touched row),
    with weight decay: the built-in ``Lamb`` (checked against Keras in tests/test_lamb.py)
    and the same functions as a user's rule leave the same bits."""
    MyLamb = lamb_rule().optimizer_class("MyLamb")
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    mine, theirs = p0.copy(), p0.copy()
    ours, builtin = MyLamb(learning_rate=0.01, weight_decay=0.01), so.Lamb(learning_rate=0.01, weight_decay=0.01)
    for step in range(4):
        if step % 2:
            g = so.IndexedSlices(rng.normal(size=(9, WIDTH)).astype(dtype), rng.integers(0, ROWS, 9))
        else:
            g = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
        ours.apply_gradients([(g, mine)])
        builtin.apply_gradients([(g, theirs)])
    assert np.array_equal(mine, theirs) and not np.array_equal(mine, p0)
    for slot in ("m", "v"):
        assert np.array_equal(ours.get_slot(mine, slot), builtin.get_slot(theirs, slot))
    with pytest.raises(errors.HyperparameterError, match="no sparse_mode='exact'"):
        MyLamb(sparse_mode="exact")


# A rule with a row stage: per-row statistics (one value per row), as FBGEMM's row-wise rules
# keep them. RowRMS: a per-row running mean of g^2 scales a per-element momentum.

def _rowrms_coefficients(step, learning_rate=0.01, rho=0.9, beta=0.5, epsilon=1e-6):
    return {"lr": learning_rate, "one_minus_rho": 1.0 - rho, "beta": beta, "epsilon": epsilon}


def _rowrms_term(p, g, c):
    return g * g


def _rowrms_row(v, mean_g2, c):
    return (v + (mean_g2 - v) * c.one_minus_rho,)


def _rowrms_update(p, g, m, v, c):
    m = c.beta * m + g / (math.sqrt(v) + c.epsilon)
    return p - c.lr * m, m


ROWRMS = so.Rule("rowrms", ("m",), _rowrms_coefficients, _rowrms_update, row_slots=("v",),
                 row=(_rowrms_term, _rowrms_row))


def _rowrms_reference(p, v, m, g, rows, wd, lr, rho=0.9, beta=0.5, epsilon=1e-6):
    """RowRMS's formula in float64 on ``rows`` (touched rows of a sparse step, all of a dense one)
    of ``g`` (the de-duplicated gradient, dense), with decoupled weight decay first."""
    for i in rows:
        p[i] -= p[i] * wd * lr
        v[i] += (np.mean(g[i] ** 2) - v[i]) * (1.0 - rho)
        m[i] = beta * m[i] + g[i] / (math.sqrt(v[i]) + epsilon)
        p[i] -= lr * m[i]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_rule_with_a_row_stage_equals_its_formula(dtype, rng):
    """Per-row slots (``row_slots``, shape ``(rows,)``) updated once per touched row from the
    mean over the row of ``row``'s term, then the element update reading them: dense and lazy
    sparse steps (duplicates summed, only the touched rows move) with weight decay, against
    the formula in float64."""
    RowRMS = ROWRMS.optimizer_class("RowRMS")
    opt = RowRMS(learning_rate=0.05, weight_decay=0.02)
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    p, ref_p = p0.copy(), p0.astype(np.float64)
    ref_v, ref_m = np.zeros(ROWS), np.zeros((ROWS, WIDTH))
    lr, wd = float(np.float32(0.05)), float(np.float32(0.02))
    for step in range(6):
        if step % 3 == 2:
            g = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
            opt.apply_gradients([(g, p)])
            _rowrms_reference(ref_p, ref_v, ref_m, g.astype(np.float64), range(ROWS), wd, lr)
        else:
            values, idx = rng.normal(size=(8, WIDTH)).astype(dtype), rng.integers(0, ROWS // 2, 8)
            opt.apply_gradients([(so.IndexedSlices(values, idx, p.shape), p)])
            _rowrms_reference(ref_p, ref_v, ref_m, _densify(values, idx), np.unique(idx), wd, lr)
    assert opt.get_slot(p, "v").shape == (ROWS,) and opt.get_slot_names() == ["m", "v"]
    rel_close(p, ref_p, dtype)
    rel_close(opt.get_slot(p, "v"), ref_v, dtype)
    rel_close(opt.get_slot(p, "m"), ref_m, dtype)


def test_a_row_stage_steps_as_the_built_in_rowwise_adagrad(rng):
    """The built-in RowwiseAdagrad's functions as a user's rule: the same bits, dense and
    sparse, one table and several in one call (the table-batched region), with weight decay;
    a bfloat16 table and a 0-d variable too."""
    from sparseopt.rules import rowwise_adagrad as rw

    def coefficients(step, learning_rate=0.01, epsilon=1e-8):
        return rw.coefficients(learning_rate, epsilon)._asdict()

    Mine = so.Rule("myrowwise", rw.SLOTS, coefficients, rw.update, row_slots=rw.ROW_SLOTS,
                   row=(rw.row_term, rw.row_update)).optimizer_class()
    tables = [rng.normal(size=(ROWS, WIDTH)).astype(np.float32), rng.normal(size=(12, 5)).astype(np.float32)]
    mine, theirs = [t.copy() for t in tables], [t.copy() for t in tables]
    ours, builtin = Mine(learning_rate=0.1, weight_decay=0.01), so.RowwiseAdagrad(learning_rate=0.1, weight_decay=0.01)
    for step in range(4):
        grads = [rng.normal(size=t.shape).astype(np.float32) if step == 2 else
                 so.IndexedSlices(rng.normal(size=(7,) + t.shape[1:]).astype(np.float32),
                                  rng.integers(0, t.shape[0], 7), t.shape) for t in tables]
        ours.apply_gradients(list(zip(grads, mine)))
        builtin.apply_gradients(list(zip(grads, theirs)))
    for a, b, t in zip(mine, theirs, tables):
        assert np.array_equal(a, b) and not np.array_equal(a, t)
        assert np.array_equal(ours.get_slot(a, "accumulator"), builtin.get_slot(b, "accumulator"))
    # a bfloat16 table (stochastic rounding with the optimizer's seed) and a 0-d variable (one row)
    import ml_dtypes
    for shape, dtype in [((ROWS, WIDTH), ml_dtypes.bfloat16), ((), np.float32)]:
        start = rng.normal(size=shape).astype(dtype)
        a, b = start.copy(), start.copy()
        ours, builtin = Mine(learning_rate=0.1, weight_decay=0.01, seed=3), so.RowwiseAdagrad(
            learning_rate=0.1, weight_decay=0.01, seed=3)
        for step in range(3):
            g = (so.IndexedSlices(rng.normal(size=(7, WIDTH)).astype(dtype), rng.integers(0, ROWS, 7), shape)
                 if shape and step != 1 else rng.normal(size=shape).astype(dtype))
            ours.apply_gradients([(g, a)])
            builtin.apply_gradients([(g, b)])
        assert np.array_equal(a, b) and not np.array_equal(a, start)
        assert np.array_equal(ours.get_slot(a, "accumulator"), builtin.get_slot(b, "accumulator"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(row_slots=("v",)), "row_slots and row=.term, update. together; got row_slots alone"),
    (dict(row=(_rowrms_term, _rowrms_row)), "got row alone"),
    (dict(row_slots=("m",), row=(_rowrms_term, _rowrms_row)), "none of them also in slots"),
    (dict(row_slots=("w", "x", "y", "z"), row=(_rowrms_term, _rowrms_row)),
     "update takes .p, g, m, w, x, y, z, c., 8 arguments"),
    (dict(row_slots=("w", "x"), row=(_rowrms_term, _rowrms_row), update=lambda p, g, m, w, x, c: (p, m)),
     "row's update takes .w, x, mean, c., 4 arguments"),
    (dict(row_slots=("v",), row=(_rowrms_term,)), "two functions"),
    (dict(row_slots=("v",), row=(_rowrms_term, _rowrms_row), update=lambda p, g, m, c: (p, m)),
     "update takes .p, g, m, v, c., 5 arguments"),
    (dict(row_slots=("v",), row=(lambda p, g: g, _rowrms_row)), "row's term takes .p, g, c."),
    (dict(row_slots=("v",), row=(_rowrms_term, _rowrms_row), update=None,
          reduction=(lambda p, g, m, c: (g, m, p, g), lambda a, b, c: a, lambda p, d, s, c: p)),
     "row stage or a reduction stage"),
])
def test_bad_row_stages_are_refused_by_name(kwargs, message):
    assert_refused(kwargs, message, coefficients=_rowrms_coefficients, update=_rowrms_update)


def test_a_row_stage_has_no_exact_mode():
    with pytest.raises(errors.HyperparameterError, match="per-row slots has no sparse_mode='exact'"):
        ROWRMS.optimizer_class()(sparse_mode="exact")


# Exact mode's closed form for a user's rule (sparseopt.IdleSteps): the built-in SGD's, given to
# a Rule, steps bit for bit as sparseopt.SGD does in exact mode.

def _heavy_ball_rule(idle):
    from sparseopt.rules import sgd

    def coefficients(step, learning_rate=0.05, momentum=0.9, nesterov=True):
        return sgd.coefficients(learning_rate, momentum, nesterov)
    return so.Rule("heavyball", sgd.SLOTS, coefficients, sgd.update, idle=idle)


def _sgd_idle():
    from sparseopt.rules import sgd
    return so.IdleSteps(sgd.COLUMNS, sgd.idle_table_init, sgd.idle_table_step, sgd.idle_apply,
                        constant=sgd.IDLE_CONSTANT, is_identity=sgd.idle_is_identity)


@pytest.mark.parametrize("nesterov", [False, True])
def test_idle_steps_give_exact_mode_the_built_in_closed_form(nesterov, rng):
    """SGD with momentum's closed form (sparseopt/rules/sgd.py) as a user's ``IdleSteps``:
    exact-mode sparse steps, rows idle for several steps, weight decay, a flush: the same bits
    as the built-in ``SGD``, whose kernels run the same closed form."""
    cls = _heavy_ball_rule(_sgd_idle()).optimizer_class("HeavyBall")
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    ours, builtin = p0.copy(), p0.copy()
    a = cls(learning_rate=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.02, sparse_mode="exact")
    b = so.SGD(learning_rate=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.02, sparse_mode="exact")
    for values, idx in _sparse_batches(rng, np.float32):
        a.apply_gradients([(so.IndexedSlices(values, idx, p0.shape), ours)])
        b.apply_gradients([(so.IndexedSlices(values, idx, p0.shape), builtin)])
    a.flush()
    b.flush()
    np.testing.assert_array_equal(ours, builtin)
    np.testing.assert_array_equal(a.get_slot(ours, "momentum"), b.get_slot(builtin, "momentum"))


MARK_COLUMNS = so.idle_columns(marker=1)


def _mark_init(t):
    t[MARK_COLUMNS.marker] = 1.0


def _mark_step(t, t_next, rec):
    t[MARK_COLUMNS.marker] = 1.0


def _mark(p, t, c, tol, zero):
    return p + t[MARK_COLUMNS.marker], True


def test_idle_apply_runs_in_place_of_the_replay():
    """The rule's ``apply`` is what catches an idle row up: one that (wrongly, for the test)
    adds 1 to the parameter per window leaves its mark, where the replay of a plain SGD step
    with a zero gradient would leave the row as it was."""
    def coefficients(step, learning_rate=0.1):
        return {"lr": learning_rate}

    rule = so.Rule("marked", (), coefficients, lambda p, g, c: (p - c.lr * g,),
                   idle=so.IdleSteps(MARK_COLUMNS, _mark_init, _mark_step, _mark))
    w = np.zeros((4, 2))
    opt = rule.optimizer_class()(sparse_mode="exact")
    for rows in ([0], [1], [0]):   # rows 0 and 1 each caught up over one idle window
        opt.apply_gradients([(so.IndexedSlices(np.zeros((1, 2)), np.array(rows), w.shape), w)])
    assert w[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    opt.flush()                    # row 1 idle at step 3; rows 2 and 3 since the start
    assert w[:, 0].tolist() == [1.0, 2.0, 1.0, 1.0]


@pytest.mark.parametrize("kwargs,message", [
    (dict(idle=(1, 2)), "idle must be a sparseopt.IdleSteps"),
    (dict(idle=so.IdleSteps((0, 1), print, print, print)), "columns must come from sparseopt.idle_columns"),
    (dict(idle=so.IdleSteps(so.idle_columns(), lambda t: None, lambda t, t_next, rec: None,
                            lambda p, t, c, tol, zero: (p, True))),
     r"idle's apply takes \(p, m, t, c, tol, zero\), 6 arguments"),
    (dict(idle=so.IdleSteps(so.idle_columns(), lambda t: None, lambda t, rec: None,
                            lambda p, m, t, c, tol, zero: (p, m, True))),
     r"idle's table_step takes \(t, t_next, rec\)"),
    (dict(idle=so.IdleSteps(so.idle_columns(), lambda t: None, lambda t, t_next, rec: None,
                            lambda p, m, t, c, tol, zero: (p, m, True), constant=("momentum",))),
     r"idle's constant names coefficients; \['momentum'\] are not among \('lr',\)"),
    (dict(idle=so.IdleSteps(so.idle_columns(), lambda t: None, lambda t, t_next, rec: None,
                            lambda p, m, t, c, tol, zero: (p, m, True)), row_slots=("v",),
          row=(_rowrms_term, _rowrms_row), update=_rowrms_update), "a rule with a row stage does not have"),
])
def test_bad_idle_steps_are_refused_by_name(kwargs, message):
    assert_refused(kwargs, message)


# Compile-time variants: a module constant of the rule's functions fixed per variant.

FAST_ONLY = False   # fixed to True in the variant "fast" (read by _powered_update)


def _powered_coefficients(step, learning_rate=0.1, power=0.5):
    return {"lr": learning_rate, "power": power, "use_sqrt": 1.0 if power == 0.5 else 0.0}


def _powered_update(p, g, c):
    if FAST_ONLY or c.use_sqrt != 0:
        scale = math.sqrt(abs(g))
    else:
        scale = abs(g) ** c.power
    return (p - c.lr * g * scale,)


def _powered_rule():
    return so.Rule("powered", (), _powered_coefficients, _powered_update, variants={"fast": {"FAST_ONLY": True}},
                   variant_for=lambda c: "fast" if c.use_sqrt != 0 else None)


def test_a_variant_fixes_its_constant_in_the_compiled_code():
    """The variant "fast" compiles ``_powered_update`` with ``FAST_ONLY = True``: its square root
    whatever the coefficients' flag says, where the rule itself follows the flag; the steps
    pick the variant from their coefficients, so they equal the formula for either power."""
    from sparseopt.kernels import _compile
    rule = _powered_rule()
    fast = _compile.variant(rule.module, "fast")
    c = rule.coefficients(1, {"learning_rate": 0.1, "power": 0.25})   # use_sqrt 0: the pow branch
    assert _compile.function(fast, "update")(1.0, 0.16, c)[0] == pytest.approx(1.0 - 0.1 * 0.16 * 0.4, rel=1e-12)
    assert _compile.function(rule.module, "update")(1.0, 0.16, c)[0] == pytest.approx(
        1.0 - 0.1 * 0.16 * 0.16 ** 0.25, rel=1e-12)
    assert _compile.for_step(rule.module, rule.coefficients(1, {"learning_rate": 0.1, "power": 0.5})) is fast
    assert _compile.for_step(rule.module, c) is rule.module
    for power in (0.5, 0.25):
        w = np.ones(3)
        g = np.array([0.16, -0.09, 0.25])
        rule.optimizer_class()(learning_rate=0.1, power=power).apply_gradients([(g, w)])
        expected = 1.0 - float(np.float32(0.1)) * g * np.abs(g) ** power
        np.testing.assert_allclose(w, expected, rtol=1e-14)


@pytest.mark.parametrize("kwargs,message", [
    (dict(variants={"fast": {"FAST_ONLY": True}}), "given with variant_for"),
    (dict(variants={"fast": {"NOT_READ": True}}, variant_for=lambda c: None), r"fixes \['NOT_READ'\], which none"),
    (dict(variants={"not a name": {"FAST_ONLY": True}}, variant_for=lambda c: None), "identifier"),
])
def test_bad_variants_are_refused_by_name(kwargs, message):
    assert_refused(kwargs, message, slots=(), coefficients=_powered_coefficients, update=_powered_update)
