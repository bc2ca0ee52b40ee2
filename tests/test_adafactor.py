"""Adafactor: the factored kernels (dense: statistics over the variable; sparse: over the
touched rows), against the float64 references ``tests.references.adafactor`` (checked
against ``keras.optimizers.Adafactor`` below) and ``run_adafactor_lazy`` (the same formula
on the touched rows as a table of their own)."""

import numba
import numpy as np
import pytest

import sparseopt as so
from sparseopt import errors
from sparseopt.kernels import factored
from tests import references as ref
from tests.conftest import rel_close

STEPS = 12
LR = ref.f32(0.5)  # the core (as Keras) keeps the learning rate in float32; 0.5: rho = 1/sqrt(t)
HP = dict(beta_2_decay=-0.65, epsilon_1=1e-15, epsilon_2=1e-4, clip_threshold=0.9)


def _dense_run(opt, p0, grads):
    p = p0.copy()
    for g in grads:
        opt.apply_gradients([(g, p)])
    return p


def test_reference_matches_keras_adafactor():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    cases = [((), np.float64, None), ((7,), np.float32, None), ((6, 4), np.float64, 0.05),
             ((6, 4), np.float32, None), ((3, 5, 4), np.float64, None)]
    for shape, dtype, wd in cases:
        p0 = rng.normal(size=shape).astype(dtype)
        grads = [rng.normal(size=shape).astype(dtype) for _ in range(STEPS)]
        var = tf.Variable(p0)
        opt = tf.keras.optimizers.Adafactor(learning_rate=0.5, weight_decay=wd, **HP)
        for g in grads:
            opt.apply_gradients([(tf.constant(g), var)])
        step = ref.adafactor if wd is None else ref.weight_decayed(ref.adafactor, wd)
        expected, _ = ref.run_dense(step, p0, grads, learning_rate=LR, **HP)
        rel_close(expected, var.numpy(), dtype)


@pytest.mark.parametrize("shape, dtype, wd", [((300, 6), np.float32, None), ((300, 6), np.float64, 0.05),
                                              ((40,), np.float64, None), ((4, 30, 5), np.float32, 0.05)])
def test_dense_steps_match_the_reference(shape, dtype, wd):
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=shape).astype(dtype)
    grads = [rng.normal(size=shape).astype(dtype) for _ in range(STEPS)]
    opt = so.Adafactor(learning_rate=0.5, weight_decay=wd, **HP)
    p = _dense_run(opt, p0, grads)
    step = ref.adafactor if wd is None else ref.weight_decayed(ref.adafactor, wd)
    expected, slots = ref.run_dense(step, p0, grads, learning_rate=LR, **HP)
    rel_close(p, expected, dtype)
    for name, value in slots.items():
        assert opt.get_slot(p, name).shape == value.shape
        rel_close(opt.get_slot(p, name), value, dtype)
    assert set(slots) == ({"v"} if len(shape) < 2 else {"r", "c"})


def test_default_learning_rate_and_clipping():
    """Keras' defaults (lr 0.001 < 1/sqrt(t)), and ``clipnorm``/``clipvalue`` applied to the
    gradient before the rule."""
    rng = np.random.default_rng(2)
    p0 = rng.normal(size=(20, 3))
    grads = [rng.normal(size=p0.shape) for _ in range(5)]
    p = _dense_run(so.Adafactor(), p0, grads)
    expected, _ = ref.run_dense(ref.adafactor, p0, grads, learning_rate=ref.f32(0.001))
    rel_close(p, expected, np.float64)
    p = _dense_run(so.Adafactor(clipvalue=0.1), p0, grads)
    expected, _ = ref.run_dense(ref.adafactor, p0, [np.clip(g, -0.1, 0.1) for g in grads],
                                learning_rate=ref.f32(0.001))
    rel_close(p, expected, np.float64)


@pytest.mark.parametrize("shape, dtype, wd", [((400, 8), np.float32, None), ((400, 8), np.float64, 0.05),
                                              ((300,), np.float64, None), ((50, 4, 3), np.float64, None)])
def test_sparse_steps_use_the_touched_rows(shape, dtype, wd):
    """Lazy mode: duplicates summed, the touched rows stepped as a table of their own,
    untouched rows (and their ``r`` / ``v``) bit-identical; one and two threads give the
    same bits."""
    rng = np.random.default_rng(3)
    p0 = rng.normal(size=shape).astype(dtype)
    batches = [(rng.normal(size=(60,) + shape[1:]).astype(dtype), rng.integers(0, shape[0] // 2, 60))
               for _ in range(STEPS)]
    step = ref.adafactor if wd is None else ref.weight_decayed(ref.adafactor, wd)
    expected, slots = ref.run_adafactor_lazy(step, p0, batches, learning_rate=LR, **HP)
    results = []
    threads = numba.get_num_threads()
    try:
        for n in sorted({1, min(2, threads)}):
            so.set_num_threads(n)
            p = p0.copy()
            opt = so.Adafactor(learning_rate=0.5, weight_decay=wd, **HP)
            for values, idx in batches:
                opt.apply_gradients([(so.IndexedSlices(values, idx), p)])
            results.append((p, [opt.get_slot(p, k).copy() for k in sorted(slots)]))
    finally:
        so.set_num_threads(threads)
    p, kept = results[0]
    rel_close(p, expected, dtype)
    for name, value in zip(sorted(slots), kept):
        rel_close(value, slots[name], dtype)
    untouched = np.arange(shape[0] // 2, shape[0])
    np.testing.assert_array_equal(p[untouched], p0[untouched])
    assert not kept[sorted(slots).index("v" if len(shape) < 2 else "r")][untouched].any()
    for other, other_slots in results[1:]:
        np.testing.assert_array_equal(other, p)
        for a, b in zip(other_slots, kept):
            np.testing.assert_array_equal(a, b)


def test_sparse_step_of_every_row_is_the_dense_step():
    """The touched rows are the whole table: the sparse step is the dense one, bit for bit;
    a step touching some rows differs from the dense step of the densified gradient (whose
    means and root-mean-squares take in every row)."""
    rng = np.random.default_rng(4)
    p0 = rng.normal(size=(40, 5))
    g = rng.normal(size=p0.shape)
    sparse, dense = p0.copy(), p0.copy()
    reverse = np.arange(40)[::-1].copy()
    so.Adafactor(learning_rate=0.5).apply_gradients([(so.IndexedSlices(g, reverse), sparse)])
    so.Adafactor(learning_rate=0.5).apply_gradients([(g[::-1].copy(), dense)])
    np.testing.assert_array_equal(sparse, dense)
    partial, densified = p0.copy(), p0.copy()
    rows = np.arange(0, 40, 3)
    so.Adafactor(learning_rate=0.5).apply_gradients([(so.IndexedSlices(g[rows], rows), partial)])
    full = np.zeros_like(g)
    full[rows] = g[rows]
    so.Adafactor(learning_rate=0.5).apply_gradients([(full, densified)])
    idle = np.setdiff1d(np.arange(40), rows)
    np.testing.assert_array_equal(densified[idle], p0[idle])  # Keras moves no idle row either
    assert np.max(np.abs(partial - densified)) > 1e-3


def test_tables_of_one_call_step_as_each_on_its_own():
    """Several sparse tables and a dense variable in one call (planned together, each
    table's kernels on their own): the bits of one call per variable."""
    rng = np.random.default_rng(7)
    inits = [rng.normal(size=(80, 4)), rng.normal(size=(30, 2, 3)), rng.normal(size=(5, 4))]
    grads = [[so.IndexedSlices(rng.normal(size=(20, 4)), rng.integers(0, 80, 20)),
              so.IndexedSlices(rng.normal(size=(9, 2, 3)), rng.integers(0, 30, 9)),
              rng.normal(size=(5, 4))] for _ in range(3)]
    together = [p.copy() for p in inits]
    opt = so.Adafactor(learning_rate=0.5)
    for gs in grads:
        opt.apply_gradients(list(zip(gs, together)))
    for i, p0 in enumerate(inits):
        alone = p0.copy()
        other = so.Adafactor(learning_rate=0.5)
        for gs in grads:
            other.apply_gradients([(gs[i], alone)])
        np.testing.assert_array_equal(together[i], alone)


@pytest.mark.parametrize("shape", [(5000,), (3, 700, 9)])
def test_dense_kernels_are_the_same_for_any_thread_count(shape):
    rng = np.random.default_rng(5)
    p0 = rng.normal(size=shape).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    opt = so.Adafactor(**HP)
    c = opt._coefficients({"learning_rate": 0.5, **HP}, 1)
    c = type(c)(*(np.float32(x) for x in c))
    wd = np.float32(0.01)
    results = []
    threads = numba.get_num_threads()
    try:
        for n in sorted({1, threads}):
            numba.set_num_threads(n)
            p = p0.copy()
            if len(shape) < 2:
                v = np.zeros_like(p)
                factored.plain_kernel(so.Adafactor._rule, True)(p, g, v, c, wd, np.float32(p.size))
                results.append((p, v))
            else:
                r, col = np.zeros(shape[:-1], np.float32), np.zeros((shape[0], shape[2]), np.float32)
                factored.factored_kernel(so.Adafactor._rule, True)(
                    p, g, r, col, c, wd, np.float32(shape[1]), np.float32(shape[2]), np.float32(p.size))
                results.append((p, r, col))
    finally:
        numba.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(results[0][0], p0)


def test_state_round_trips(tmp_path):
    """``get_config``, ``get_weights``/``set_weights`` and ``save``/``load``: a run continued
    from the restored state gives the bits of the uninterrupted run."""
    rng = np.random.default_rng(6)
    shapes = {"table": (30, 4), "bias": (4,), "scale": (), "kernel": (2, 3, 4)}
    variables = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(4)]
    opt = so.Adafactor(learning_rate=0.3, relative_step=False, weight_decay=0.01, **HP)

    def step(o, vs, gs):
        o.apply_gradients([(gs[k], vs[k]) for k in shapes])

    for gs in grads[:2]:
        step(opt, variables, gs)
    config = opt.get_config()
    assert config["relative_step"] is False and config["clip_threshold"] == HP["clip_threshold"]
    copy = so.Adafactor.from_config(config)
    copy_vars = {k: v.copy() for k, v in variables.items()}
    copy.build([copy_vars[k] for k in shapes])
    weights = opt.get_weights()
    assert [w.shape for w in weights[1:]] == [(30,), (4,), (4,), (), (2, 3), (2, 4)]
    copy.set_weights(weights)
    so.save(tmp_path / "run.npz", opt, variables=variables)
    loaded, loaded_vars = so.load(tmp_path / "run.npz")
    for gs in grads[2:]:
        for o, vs in ((opt, variables), (copy, copy_vars), (loaded, loaded_vars)):
            step(o, vs, gs)
    for vs in (copy_vars, loaded_vars):
        for k in shapes:
            np.testing.assert_array_equal(vs[k], variables[k])
    for a, b in zip(loaded.get_weights(), opt.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_failed_constraint_restores_the_statistics():
    p = np.ones((10, 3))
    opt = so.Adafactor(learning_rate=0.1)
    opt.apply_gradients([(so.IndexedSlices(np.ones((2, 3)), np.array([1, 4])), p)])
    before = p.copy(), opt.get_slot(p, "r").copy(), opt.get_slot(p, "c").copy()

    def bad(x):
        raise errors.ConstraintError("no")

    with pytest.raises(errors.ConstraintError):
        opt.apply_gradients([(so.IndexedSlices(np.ones((2, 3)), np.array([2, 4])), p)],
                            constraints=[(p, bad)])
    for a, b in zip((p, opt.get_slot(p, "r"), opt.get_slot(p, "c")), before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparse_mode="exact"), r"adafactor: Adafactor has no sparse_mode='exact'"),
    (dict(beta_2_decay=0.5), r"beta_2_decay must be a float <= 0; got 0.5"),
    (dict(clip_threshold=0.0), r"clip_threshold must be a float > 0; got 0.0"),
    (dict(epsilon_1=-1e-30), r"epsilon_1 must be a float >= 0"),
    (dict(epsilon_2=float("nan")), r"epsilon_2"),
])
def test_bad_hyperparameters_are_refused(kwargs, match):
    with pytest.raises(errors.HyperparameterError, match=match):
        so.Adafactor(**kwargs)


def test_bad_input_writes_nothing():
    p = np.ones((10, 3))
    opt = so.Adafactor(learning_rate=0.1)
    opt.apply_gradients([(so.IndexedSlices(np.ones((1, 3)), np.array([1])), p)])
    before = p.copy(), opt.get_slot(p, "r").copy(), opt.get_slot(p, "c").copy(), opt.iterations
    with pytest.raises(errors.IndexOutOfRangeError, match=r"indices must lie in \[0, 10\); got 10"):
        opt.apply_gradients([(so.IndexedSlices(np.ones((2, 3)), np.array([2, 10])), p)])
    for a, b in zip((p, opt.get_slot(p, "r"), opt.get_slot(p, "c")), before):
        np.testing.assert_array_equal(a, b)
    assert opt.iterations == before[3]
    half = np.ones(3, np.float16)
    with pytest.raises(errors.DtypeMismatchError,
                       match=r"Adafactor runs on float32 and float64 variables only; got dtype float16"):
        opt.apply_gradients([(np.ones(3, np.float16), half), (np.ones((10, 3)), p)])
    np.testing.assert_array_equal(p, before[0])
