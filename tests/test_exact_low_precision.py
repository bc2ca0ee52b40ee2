"""Exact mode (``sparse_mode="exact"``) on bfloat16 and float16 variables.

The semantics: a row's idle steps are computed as for a float32 variable (the closed
forms in float64 from the float32 state, or the replay in float32), and the result is
rounded to 16 bits **once** per catch-up, with the random bits of the window's last step
(:mod:`sparseopt.kernels.lowp`; round-to-nearest-even with ``stochastic_rounding=False``).
So the origin of every expected value here is exact mode on a float32 variable holding the
same values (tested against the dense rule in ``tests/test_exact.py``), rounded by the
reference of ``tests/test_low_precision.py`` (from the definition of the bits and of
stochastic rounding, in float64).
"""

import numpy as np
import pytest

import sparseopt as so
from tests.optimizer_table import CASES, IDS
from tests.test_low_precision import BF16, F16, rounded_reference, same16

ROWS, WIDTH, SEED = 24, 5, 11
# Step 1 touches every row, the later steps only BUSY: IDLE and LATE are idle from step 2 on.
IDLE, BUSY, LATE = np.arange(0, 8), np.arange(8, 16), np.arange(16, 24)

# One rule per way of catching up: series (adam), closed form with momentum (sgd_momentum),
# weight decay on a row-wise rule (rowwise_adagrad), and the replay (adam with epsilon=0:
# the closed forms do not apply, the dense rule is replayed with a zero gradient).
KINDS = [
    ("adam", {}, BF16, True),
    ("adam", {}, F16, True),
    ("adam", {}, BF16, False),
    ("sgd_momentum", {}, BF16, True),
    ("rowwise_adagrad", dict(weight_decay=0.05), F16, True),
    ("adam", dict(epsilon=0.0), BF16, True),
]
KIND_IDS = [f"{n}{'_' + '_'.join(kw) if kw else ''}_{np.dtype(d).name}_{'sr' if s else 'rne'}"
            for n, kw, d, s in KINDS]


def _make(name, kwargs, **extra):
    case = CASES[IDS.index(name)]
    return case.make(sparse_mode="exact", **{**kwargs, **extra})


def _gradient(rng, rows):
    return so.IndexedSlices(rng.normal(size=(rows.size, WIDTH)).astype(np.float32), rows,
                            (ROWS, WIDTH))


def _steps(seed, steps=6):
    """Step 1 touches every row; steps 2..steps only BUSY (same gradients for every run)."""
    rng = np.random.default_rng(seed)
    return [_gradient(rng, np.arange(ROWS))] + [_gradient(rng, BUSY) for _ in range(steps - 1)]


@pytest.mark.parametrize("name, kwargs, dtype, stochastic", KINDS, ids=KIND_IDS)
def test_catch_up_of_a_16_bit_row_is_the_float32_catch_up_rounded_once(name, kwargs, dtype, stochastic):
    """After step 1 the float32 run is given the 16-bit run's state (``set_weights``, the
    table widened): from there both runs take the same steps on BUSY, and the rows idle
    since step 1 are caught up at step N: the 16-bit rows must be the float32 rows rounded
    with the bits of step N, their float32 slots equal to the float32 run's."""
    rng = np.random.default_rng(3)
    steps = _steps(4)
    t16 = (rng.normal(size=(ROWS, WIDTH)) * 0.5).astype(dtype)
    o16 = _make(name, kwargs, seed=SEED, stochastic_rounding=stochastic)
    o16.apply_gradients([(steps[0], t16)])
    t32 = t16.astype(np.float32)
    o32 = _make(name, kwargs)
    o32.build([t32])
    o32.set_weights(o16.get_weights())
    for g in steps[1:]:
        o16.apply_gradients([(g, t16)])
        o32.apply_gradients([(g, t32)])
    n = len(steps)
    o16.catch_up(t16, IDLE)            # the rows path (a lookup's)
    o32.catch_up(t32, IDLE)
    w16, w32 = o16.get_weights(), o32.get_weights()    # a flush: the every-row path for 16-23
    idle = np.r_[IDLE, LATE]
    assert (t32[idle] != t16[idle].astype(np.float32)).any()  # the idle steps moved the rows
    expected = rounded_reference(t32, dtype, SEED, n, stochastic)
    assert same16(t16[idle], expected[idle])
    # The slots (float32) depend on the gradients only: equal for every row.
    for a, b in zip(w16[1:], w32[1:]):
        assert np.array_equal(a, b)


def _run_to_the_end(name, kwargs, dtype, two_phase, threads=None):
    """Steps as :func:`_steps`, then a step N+1 on IDLE: caught up inside the step, or
    first by ``catch_up`` (``two_phase``). Returns the table and the first slot."""
    rng = np.random.default_rng(5)
    table = (rng.normal(size=(ROWS, WIDTH)) * 0.5).astype(dtype)
    opt = _make(name, kwargs, seed=SEED)
    previous = so.get_num_threads()
    try:
        if threads:
            so.set_num_threads(threads)
        for g in _steps(6):
            opt.apply_gradients([(g, table)])
        last = _gradient(np.random.default_rng(7), IDLE)
        if two_phase:
            opt.catch_up(table, IDLE)
        opt.apply_gradients([(last, table)])
    finally:
        so.set_num_threads(previous)
    slot = next(iter(opt.variables()[1:]), None)
    return table, (None if slot is None else np.array(slot))


@pytest.mark.parametrize("name, kwargs, dtype", [("adam", {}, BF16), ("rowwise_adagrad", dict(weight_decay=0.05), F16)],
                         ids=["adam_bfloat16", "rowwise_adagrad_wd_float16"])
def test_catch_up_in_the_step_equals_catch_up_before_it_for_any_thread_count(name, kwargs, dtype):
    """The window is rounded with the bits of its last step wherever it is caught up: a
    lookup's ``catch_up`` before the step and the step's own catch-up give the same bits,
    with one thread or two."""
    fused, fused_slot = _run_to_the_end(name, kwargs, dtype, two_phase=False, threads=1)
    for two_phase, threads in ((True, 1), (False, 2), (True, 2)):
        table, slot = _run_to_the_end(name, kwargs, dtype, two_phase, threads)
        assert same16(table, fused)
        assert np.array_equal(slot, fused_slot)


def test_bfloat16_slots_in_exact_mode_are_rounded_once_per_window():
    """``slot_dtype="bfloat16"``: the caught-up slots are the float32 run's rounded to
    bfloat16 (the slot bits of step N, as in a step: ``tests/test_low_precision.py``)."""
    from tests.test_low_precision import slot_bits, stochastic_reference
    rng = np.random.default_rng(9)
    steps = _steps(10)
    t16 = (rng.normal(size=(ROWS, WIDTH)) * 0.5).astype(BF16)
    o16 = so.Adam(0.01, sparse_mode="exact", seed=SEED, slot_dtype="bfloat16")
    o16.apply_gradients([(steps[0], t16)])
    t32 = t16.astype(np.float32)
    o32 = so.Adam(0.01, sparse_mode="exact")
    o32.build([t32])
    iterations, *slots = o16.get_weights()
    o32.set_weights([iterations] + [np.asarray(w, np.float32) for w in slots])
    for g in steps[1:]:
        o16.apply_gradients([(g, t16)])
        o32.apply_gradients([(g, t32)])
    o16.catch_up(t16, IDLE)
    o32.catch_up(t32, IDLE)
    n = len(steps)
    assert same16(t16[IDLE], rounded_reference(t32, BF16, SEED, n, True)[IDLE])
    for k, slot in enumerate(("m", "v")):
        want = o32.get_slot(t32, slot)
        got = o16.get_slot(t16, slot)
        for r in IDLE.tolist():
            for j in range(WIDTH):
                i = r * WIDTH + j
                expected = stochastic_reference(want[r, j], slot_bits(SEED, n, i, k), BF16)
                assert np.float64(got[r, j]) == expected, (slot, r, j)


def test_a_resumed_exact_run_continues_bit_for_bit(tmp_path):
    """``get_weights`` flushes (every row caught up, rounded with that step's bits), so a
    run that saved at step 3 and one resumed from that save go on bit for bit."""
    steps = _steps(12, steps=6)
    table0 = (np.random.default_rng(13).normal(size=(ROWS, WIDTH)) * 0.5).astype(BF16)

    straight = table0.copy()
    first = so.Adam(0.01, sparse_mode="exact", seed=SEED)
    for g in steps[:3]:
        first.apply_gradients([(g, straight)])
    saved = first.get_weights()
    resumed = straight.copy()
    for g in steps[3:]:
        first.apply_gradients([(g, straight)])
    first.flush()

    second = so.Adam.from_config(first.get_config())
    second.build([resumed])
    second.set_weights(saved)
    for g in steps[3:]:
        second.apply_gradients([(g, resumed)])
    second.flush()
    assert same16(resumed, straight)
