"""Any number of slots (issue 17): a rule with more than three runs on every path.

The rule is Adan (Xie et al., 2022, algorithm 1 without restarts), four slots per element, as
``docs/src/custom_rules.md`` writes it, checked against the algorithm in float64 NumPy; then
the paths whose code depends on the count: exact mode (replay), the table-batched region,
thread counts, checkpoints, bfloat16 slots past the third (rounded with a further hash of the
element's bits), and rules written for the former fixed three slots.
"""

import math

import numpy as np
import pytest

import sparseopt as so
from sparseopt import _config, engine
from sparseopt.backends import cpu as cpu_backend
from tests.conftest import rel_close
from tests.test_custom_rule import ROWS, STEPS, WIDTH, _densify, _sparse_batches
from tests.test_low_precision import BF16, GOLDEN, M64, element_bits, mix, same16, stochastic_reference

LR = 0.01
HYPERS = dict(beta_1=0.9, beta_2=0.8, beta_3=0.95, epsilon=1e-6)


def adan_coefficients(step, learning_rate=0.001, beta_1=0.98, beta_2=0.92, beta_3=0.99, epsilon=1e-8):
    return {"lr": learning_rate, "one_minus_beta_1": 1.0 - beta_1, "one_minus_beta_2": 1.0 - beta_2,
            "one_minus_beta_3": 1.0 - beta_3, "beta_2": beta_2, "after_first": 1.0 if step > 1 else 0.0,
            "bias_1": 1.0 - beta_1 ** step, "bias_2": 1.0 - beta_2 ** step, "bias_3": 1.0 - beta_3 ** step,
            "epsilon": epsilon}


def adan_update(p, g, m, v, n, prev, c):
    diff = (g - prev) * c.after_first
    m = m + (g - m) * c.one_minus_beta_1
    v = v + (diff - v) * c.one_minus_beta_2
    q = g + c.beta_2 * diff
    n = n + (q * q - n) * c.one_minus_beta_3
    step = (m / c.bias_1 + c.beta_2 * v / c.bias_2) / (math.sqrt(n / c.bias_3) + c.epsilon)
    return p - c.lr * step, m, v, n, g


ADAN = so.Rule("adan", ("m", "v", "n", "prev"), adan_coefficients, adan_update)
Adan = ADAN.optimizer_class("Adan")


def reference_step(p, g, state, t, lr=LR, weight_decay=0.0, beta_1=0.9, beta_2=0.8, beta_3=0.95, epsilon=1e-6):
    """Adan's algorithm 1 (the official implementation's form), float64, in place on ``state``
    (``m, v, n, prev``); decoupled weight decay first, as every sparseopt optimizer applies it."""
    m, v, n, prev = state
    p = p - p * weight_decay * lr
    diff = g - prev if t > 1 else np.zeros_like(g)
    m[...] = beta_1 * m + (1 - beta_1) * g
    v[...] = beta_2 * v + (1 - beta_2) * diff
    n[...] = beta_3 * n + (1 - beta_3) * (g + beta_2 * diff) ** 2
    update = (m / (1 - beta_1 ** t) + beta_2 * v / (1 - beta_2 ** t)) / (np.sqrt(n / (1 - beta_3 ** t)) + epsilon)
    prev[...] = g
    return p - lr * update


def _state(shape):
    return [np.zeros(shape) for _ in range(4)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_steps_equal_the_formula(dtype, rng):
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    grads = [rng.normal(size=(ROWS, WIDTH)) for _ in range(STEPS)]
    p, opt = p0.copy(), Adan(learning_rate=LR, weight_decay=0.05, **HYPERS)
    for g in grads:
        opt.apply_gradients([(g.astype(dtype), p)])
    expected, state = p0.astype(np.float64), _state(p0.shape)
    lr, wd = float(np.float32(LR)), float(np.float32(0.05))
    for t, g in enumerate(grads, start=1):
        expected = reference_step(expected, g.astype(dtype).astype(np.float64), state, t, lr=lr, weight_decay=wd,
                                  **HYPERS)
    rel_close(p, expected, dtype)
    for name, want in zip(ADAN.slots, state):
        rel_close(opt.get_slot(p, name), want, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_sparse_steps_equal_dense_training(dtype, rng):
    """Exact mode replays a row's idle steps (a rule of the user's has no closed form): the
    sparse steps give what dense training on the densified gradients gives."""
    p0 = rng.normal(size=(ROWS, WIDTH)).astype(dtype)
    batches = _sparse_batches(rng, dtype)
    p, opt = p0.copy(), Adan(learning_rate=LR, sparse_mode="exact", weight_decay=0.02, **HYPERS)
    for values, idx in batches:
        opt.apply_gradients([(so.IndexedSlices(values, idx, p.shape), p)])
    opt.flush()
    expected, state = p0.astype(np.float64), _state(p0.shape)
    lr, wd = float(np.float32(LR)), float(np.float32(0.02))
    for t, (values, idx) in enumerate(batches, start=1):
        expected = reference_step(expected, _densify(values, idx), state, t, lr=lr, weight_decay=wd, **HYPERS)
    rel_close(p, expected, dtype)
    for name, want in zip(ADAN.slots, state):
        rel_close(opt.get_slot(p, name), want, dtype)


def test_lazy_sparse_steps_update_only_their_rows(rng):
    """Lazy mode: a step moves the touched rows (duplicates summed) by the formula and leaves
    every other row and its four slots as they were."""
    p0 = rng.normal(size=(ROWS, WIDTH))
    p, opt = p0.copy(), Adan(learning_rate=LR, **HYPERS)
    expected, state = p0.copy(), _state(p0.shape)
    for t, (values, idx) in enumerate(_sparse_batches(rng, np.float64), start=1):
        opt.apply_gradients([(so.IndexedSlices(values, idx, p.shape), p)])
        rows = np.unique(idx)
        sub = [s[rows] for s in state]
        expected[rows] = reference_step(expected[rows], _densify(values, idx)[rows], sub, t,
                                        lr=float(np.float32(LR)), **HYPERS)
        for s, new in zip(state, sub):
            s[rows] = new
        rel_close(p, expected, np.float64)
    for name, want in zip(ADAN.slots, state):
        rel_close(opt.get_slot(p, name), want, np.float64)


@pytest.fixture
def batched_calls(monkeypatch):
    """Counts the table-batched kernel calls, lazy and exact (so a test knows the batched path ran)."""
    calls = []
    for module, name in ((engine, "_run_tables"), (cpu_backend, "run_exact_tables")):
        def counted(rule, group, *args, original=getattr(module, name)):
            calls.append(len(group))
            return original(rule, group, *args)
        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("sparse_mode", ["lazy", "exact"])
def test_table_batched_steps_are_the_per_table_bits_on_any_thread_count(sparse_mode, monkeypatch, batched_calls):
    """Three tables of two widths in one call: the table-batched region (its slots' addresses
    are the last columns of its table description) gives the per-table path's bits, on one
    thread and on two."""
    monkeypatch.setattr(_config, "MIN_WORK_PER_THREAD", 1)
    monkeypatch.setattr(_config, "ADAPTIVE", False)
    rng = np.random.default_rng(5)
    shapes = [(40, 4), (30, 4), (50, 2)]
    tables0 = [rng.normal(size=s).astype(np.float32) for s in shapes]
    steps = [[(rng.normal(size=(9, s[1])).astype(np.float32), rng.integers(0, s[0], 9)) for s in shapes]
             for _ in range(4)]
    results = []
    for batched, threads in ((False, 1), (True, 1), (True, 2)):
        so.set_num_threads(threads)
        try:
            tables = [t.copy() for t in tables0]
            opt = Adan(learning_rate=LR, sparse_mode=sparse_mode, weight_decay=0.01, **HYPERS)
            opt._batch_tables = batched
            for grads in steps:
                opt.apply_gradients([(so.IndexedSlices(v, i, t.shape), t) for (v, i), t in zip(grads, tables)])
            results.append(tables + list(opt.variables()))
        finally:
            so.set_num_threads(None)
    assert batched_calls, "the batched path did not run"
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b)


def test_checkpoints_keep_the_four_slots(tmp_path, rng):
    p = rng.normal(size=(ROWS, WIDTH)).astype(np.float32)
    opt = Adan(learning_rate=LR, **HYPERS)
    values, idx = rng.normal(size=(5, WIDTH)).astype(np.float32), rng.integers(0, ROWS, 5)
    opt.apply_gradients([(so.IndexedSlices(values, idx, p.shape), p)])
    path = tmp_path / "adan.npz"
    so.save(path, opt, {"table": p})
    q = np.zeros_like(p)
    again, _ = so.load(path, variables={"table": q}, custom_objects={"Adan": Adan})
    assert np.array_equal(p, q)
    for a, b in ((opt, p), (again, q)):
        a.apply_gradients([(so.IndexedSlices(values, idx, b.shape), b)])
    assert np.array_equal(p, q)
    for name in ADAN.slots:
        assert np.array_equal(opt.get_slot(p, name), again.get_slot(q, name))


def _slot_bits(seed, step, index, k):
    """The random bits of bfloat16 slot ``k`` of element ``index``: bits 16 (k + 1).. of the
    element's 64 for the first three slots, then 16 bits each of ``mix(r + g * GOLDEN)``,
    ``g = 1, 2, ...`` (four slots per further hash)."""
    r = element_bits(seed, step, index)
    if k < 3:
        return r >> (16 * (k + 1))
    group, lane = divmod(k - 3, 4)
    return mix((r + (group + 1) * GOLDEN) & M64) >> (16 * lane)


def test_bfloat16_slots_past_the_third_are_rounded_with_their_own_bits(rng):
    """A bfloat16 table with bfloat16 slots: each step (sparse with duplicates, then dense)
    equals the float32 step on the widened values, the table and each of the four slots
    stochastically rounded; the fourth (``prev``) with bits of a further hash."""
    seed = 23
    t32 = (rng.normal(size=(9, 5)) * 0.5).astype(np.float32)
    t16 = t32.astype(BF16)
    opt16 = Adan(learning_rate=0.1, seed=seed, slot_dtype="bfloat16", **HYPERS)
    opt32 = Adan(learning_rate=0.1, **HYPERS)
    opt16.build([t16])
    opt32.build([t32])
    idx = np.array([4, 1, 4, 7])
    grads = [so.IndexedSlices(rng.normal(size=(4, 5)).astype(np.float32), idx),
             rng.normal(size=(9, 5)).astype(np.float32)]
    for step, g in enumerate(grads, start=1):
        t32[...] = t16.astype(np.float32)
        for name in ADAN.slots:
            opt32.get_slot(t32, name)[...] = opt16.get_slot(t16, name).astype(np.float32)
        before = [t16.copy()] + [opt16.get_slot(t16, n).copy() for n in ADAN.slots]
        opt32.apply_gradients([(g, t32)])
        opt16.apply_gradients([(g, t16)])
        touched = np.unique(g.indices) if isinstance(g, so.IndexedSlices) else np.arange(9)
        for k, (got, want32, old) in enumerate(zip([t16] + [opt16.get_slot(t16, n) for n in ADAN.slots],
                                                   [t32] + [opt32.get_slot(t32, n) for n in ADAN.slots],
                                                   before)):
            expected = old.copy()
            for r in touched:
                for j in range(5):
                    index = int(r) * 5 + j
                    bits = element_bits(seed, step, index) if k == 0 else _slot_bits(seed, step, index, k - 1)
                    expected[r, j] = stochastic_reference(want32[r, j], bits, BF16)
            assert same16(got, expected), (step, k)


def test_rules_written_for_three_slots_still_run_bit_for_bit():
    """The first release's form (three slot values whatever the rule has; three row values)
    is still accepted, and steps as the same rule written with one argument per slot."""
    def coefficients(step, learning_rate=0.1, beta=0.5):
        return {"lr": learning_rate, "beta": beta, "one": 1.0}

    def now(p, g, m, c):
        m = c.beta * m + g
        return p - c.lr * m, m

    def former(p, g, m, s1, s2, c):
        m = c.beta * m + g
        return p - c.lr * m, m, s1, s2

    def term(p, g, c):
        return g * g

    def row_now(v, mean, c):
        return (v + mean,)

    def row_former(v, r1, r2, mean, c):
        return v + mean, r1, r2

    def rowwise_now(p, g, m, v, c):
        m = c.beta * m + g / math.sqrt(v + c.one)
        return p - c.lr * m, m

    def rowwise_former(p, g, m, s1, s2, v, r1, r2, c):
        m = c.beta * m + g / math.sqrt(v + c.one)
        return p - c.lr * m, m, s1, s2

    pairs = [(so.Rule("now", ("m",), coefficients, now), so.Rule("former", ("m",), coefficients, former)),
             (so.Rule("rnow", ("m",), coefficients, rowwise_now, row_slots=("v",), row=(term, row_now)),
              so.Rule("rformer", ("m",), coefficients, rowwise_former, row_slots=("v",), row=(term, row_former)))]
    rng = np.random.default_rng(3)
    p0 = rng.normal(size=(10, 3))
    grads = [rng.normal(size=(10, 3)), so.IndexedSlices(rng.normal(size=(4, 3)), np.array([1, 8, 1, 2]))]
    for a, b in pairs:
        out = []
        for rule in (a, b):
            p, opt = p0.copy(), rule.optimizer_class()()
            for g in grads:
                opt.apply_gradients([(g, p)])
            out.append((p, list(opt.variables())))
        assert np.array_equal(out[0][0], out[1][0])
        for x, y in zip(out[0][1], out[1][1]):
            assert np.array_equal(x, y)


def _n_slot_rule(n):
    """A rule with ``n`` slots: ``s_k <- decay * s_k + (k + 1) g``, ``p <- p - lr * (g + sum_k s_k)``
    (its update written out for ``n``, as a user would write it)."""
    names = [f"s{k}" for k in range(n)]
    lines = [f"    {s} = {s} * c.decay + g * c.k{k + 1}" for k, s in enumerate(names)]
    total = " + ".join(["g"] + names)
    source = (f"def update(p, g, {''.join(s + ', ' for s in names)}c):\n" + "\n".join(lines) + "\n"
              f"    return ({', '.join(['p - c.lr * (' + total + ')'] + names)},)\n")
    namespace = {}
    exec(compile(source, f"<{n}-slot rule>", "exec"), namespace)  # noqa: S102 - the test's own source

    def coefficients(step, learning_rate=0.1, decay=0.5):
        return {"lr": learning_rate, "decay": decay, **{f"k{k + 1}": float(k + 1) for k in range(n)}}
    return so.Rule(f"slots{n}", tuple(names), coefficients, namespace["update"])


def _n_slot_reference(p, g, state, lr, decay=0.5):
    for k, s in enumerate(state):
        s[...] = s * decay + g * (k + 1)
    return p - lr * (g + sum(state, np.zeros_like(p)))


@pytest.mark.parametrize("n", [0, 2, 5, 8])
@pytest.mark.parametrize("mode", ["dense", "lazy", "exact"])
def test_rules_with_any_number_of_slots_equal_their_formula(n, mode, rng):
    """No slot, fewer than three, more, and more than one further hash's worth: dense steps,
    lazy sparse steps (the touched rows only) and exact ones (= dense training on the
    densified gradients), against the formula in float64."""
    cls = _n_slot_rule(n).optimizer_class()
    p0 = rng.normal(size=(ROWS, WIDTH))
    p, opt = p0.copy(), cls(sparse_mode="exact" if mode == "exact" else "lazy")
    expected, state = p0.copy(), [np.zeros_like(p0) for _ in range(n)]
    lr = float(np.float32(0.1))
    for values, idx in _sparse_batches(rng, np.float64)[:6]:
        g = _densify(values, idx)
        if mode == "dense":
            opt.apply_gradients([(g, p)])
            expected = _n_slot_reference(expected, g, state, lr)
            continue
        opt.apply_gradients([(so.IndexedSlices(values, idx, p.shape), p)])
        if mode == "exact":
            expected = _n_slot_reference(expected, g, state, lr)
        else:
            rows = np.unique(idx)
            sub = [s[rows] for s in state]
            expected[rows] = _n_slot_reference(expected[rows], g[rows], sub, lr)
            for s, new in zip(state, sub):
                s[rows] = new
    if mode == "exact":
        opt.flush()
    rel_close(p, expected, np.float64)
    for k, want in enumerate(state):
        rel_close(opt.get_slot(p, f"s{k}"), want, np.float64)


def test_bfloat16_slots_of_an_eight_slot_rule_take_bits_of_two_further_hashes(rng):
    """Eight bfloat16 slots: 0-2 rounded with the element's own 64 bits, 3-6 with the first
    further hash, 7 with the second (``_slot_bits``), each the float32 step's value rounded."""
    seed = 41
    cls = _n_slot_rule(8).optimizer_class()
    t16 = (rng.normal(size=(6, 4)) * 0.5).astype(BF16)
    opt16 = cls(seed=seed, slot_dtype="bfloat16")
    opt32 = cls()
    t32 = t16.astype(np.float32)
    g = (rng.normal(size=(6, 4)) * 0.3).astype(np.float32)
    opt16.apply_gradients([(g, t16)])
    opt32.apply_gradients([(g, t32)])   # zero slots in both: the float32 step of the 16-bit values
    for k in range(8):
        got, want32 = opt16.get_slot(t16, f"s{k}"), opt32.get_slot(t32, f"s{k}")
        expected = np.empty_like(got)
        for index in range(got.size):
            bits = _slot_bits(seed, 1, index, k)
            expected.flat[index] = stochastic_reference(want32.flat[index], bits, BF16)
        assert same16(got, expected), k
