"""Reliability (issue 20): no half-applied step, no silent wrong update, typed errors.

Each test pins one defect the reliability review found: a step is all or nothing
(also when a user constraint fails), structural hyperparameters cannot change the
slot set under built slots, every hyperparameter is range-checked at construction and
at reassignment, and ``load`` turns any malformed header into ``ConfigError``.
"""

import json
import math
import os
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import sparseopt as so
from sparseopt import errors, saving

ROWS, WIDTH = 12, 3


def _table(dtype=np.float32):
    return np.linspace(-1, 1, ROWS * WIDTH).astype(dtype).reshape(ROWS, WIDTH)


def _sparse(idx=(1, 4, 1), dtype=np.float32, scale=1.0):
    idx = np.asarray(idx)
    values = (np.arange(idx.size * WIDTH, dtype=np.float64).reshape(idx.size, WIDTH) * 0.1 + scale)
    return so.IndexedSlices(values.astype(dtype), idx, (ROWS, WIDTH))


def _snapshot(opt, variables):
    return ([v.copy() for v in variables], [np.array(w, copy=True) for w in opt.variables()],
            opt.iterations)


def _assert_unchanged(opt, variables, snap):
    old_vars, old_weights, old_iterations = snap
    for v, old in zip(variables, old_vars):
        np.testing.assert_array_equal(v, old)
    assert opt.iterations == old_iterations
    weights = opt.variables()
    assert len(weights) == len(old_weights)
    for w, old in zip(weights, old_weights):
        np.testing.assert_array_equal(w, old)


# ------------------------------------------------------------ 1. structural hyperparameters

STRUCTURAL = [
    ("sgd_momentum_on", lambda: so.SGD(0.1), "momentum", 0.9),
    ("sgd_momentum_off", lambda: so.SGD(0.1, momentum=0.9), "momentum", 0.0),
    ("adam_amsgrad_on", lambda: so.Adam(0.1), "amsgrad", True),
    ("adam_amsgrad_off", lambda: so.Adam(0.1, amsgrad=True), "amsgrad", False),
    ("adamw_amsgrad_on", lambda: so.AdamW(0.1), "amsgrad", True),
    ("rmsprop_momentum_on", lambda: so.RMSprop(0.1), "momentum", 0.5),
    ("rmsprop_centered_on", lambda: so.RMSprop(0.1), "centered", True),
]


@pytest.mark.parametrize("make, key, value", [s[1:] for s in STRUCTURAL], ids=[s[0] for s in STRUCTURAL])
def test_structural_reassignment_after_build_is_refused(make, key, value):
    opt = make()
    w = _table()
    opt.apply_gradients([(_sparse(), w)])
    before_names = opt.get_slot_names()
    old = getattr(opt, key)
    with pytest.raises(errors.HyperparameterError, match=rf"{key}.*slots"):
        setattr(opt, key, value)
    assert getattr(opt, key) == old
    assert opt.get_slot_names() == before_names
    for name in opt.get_slot_names():
        opt.get_slot(w, name)   # every listed slot exists


@pytest.mark.parametrize("make, key, value", [s[1:] for s in STRUCTURAL], ids=[s[0] for s in STRUCTURAL])
def test_structural_reassignment_before_build_reconfigures(make, key, value):
    opt = make()
    setattr(opt, key, value)
    w = _table()
    opt.apply_gradients([(_sparse(), w)])
    fresh_kwargs = {key: value}
    for name in opt.get_slot_names():
        opt.get_slot(w, name)
    assert getattr(opt, key) == (float(value) if not isinstance(value, bool) else value)
    del fresh_kwargs


def test_momentum_change_within_the_same_slot_set_is_allowed():
    opt = so.SGD(0.1, momentum=0.9)
    w = _table()
    opt.apply_gradients([(_sparse(), w)])
    opt.momentum = 0.5
    assert opt.momentum == 0.5
    with pytest.raises(errors.HyperparameterError, match="momentum"):
        opt.momentum = 1.5


# ------------------------------------------------------------------ 2. constraints


def _raising(x):
    raise RuntimeError("constraint failed")


def _none(x):
    return None


def _wrong_shape(x):
    return x[:1]


@pytest.mark.parametrize("mode", ["lazy", "exact"])
@pytest.mark.parametrize("fn, exc", [(_raising, RuntimeError), (_none, errors.SparseoptError),
                                     (_wrong_shape, errors.ShapeMismatchError)],
                         ids=["raises", "returns_none", "wrong_shape"])
@pytest.mark.parametrize("make", [lambda m: so.Adam(0.1, sparse_mode=m),
                                  lambda m: so.SGD(0.1, momentum=0.9, sparse_mode=m),
                                  lambda m: so.RowwiseAdagrad(0.1, sparse_mode=m)],
                         ids=["adam", "sgd_momentum", "rowwise_adagrad"])
def test_failing_constraint_changes_nothing(make, fn, exc, mode):
    """Fault injection: the second variable's constraint fails after the kernels ran; the
    first variable, every slot and iterations are as before, and the next good step
    equals that of an optimizer that never saw the failed one."""
    opt, ref = make(mode), make(mode)
    a, b, w = _table(), _table() * 2, np.linspace(0, 1, WIDTH).astype(np.float32)
    ra, rb, rw = a.copy(), b.copy(), w.copy()
    for t in range(3):  # some history (exact mode: rows behind)
        pairs = lambda x, y, z: [(_sparse((t, 5)), x), (_sparse((7,)), y), (np.ones_like(z), z)]
        opt.apply_gradients(pairs(a, b, w))
        ref.apply_gradients(pairs(ra, rb, rw))
    snap = _snapshot(opt, [a, b, w])
    bad = [(_sparse((1, 2, 1)), a), (_sparse((3, 11)), b), (np.ones_like(w), w)]
    for constrained in (b, w):  # a sparse, then a dense constrained variable
        with pytest.raises(exc):
            opt.apply_gradients(bad, constraints=[(constrained, fn)])
        if mode == "lazy":
            _assert_unchanged(opt, [a, b, w], snap)
        else:  # the touched rows may have been brought current: compare after flush()
            assert opt.iterations == ref.iterations
            opt.flush()
            ref.flush()
            for x, y in [(a, ra), (b, rb), (w, rw)]:
                np.testing.assert_array_equal(x, y)
            for x, y in zip(opt.variables(), ref.variables()):
                np.testing.assert_array_equal(x, y)
    clip = lambda x: np.clip(x, -0.5, 0.5)
    good = lambda x, y, z: [(_sparse((1, 2, 1)), x), (_sparse((3, 11)), y), (np.ones_like(z), z)]
    opt.apply_gradients(good(a, b, w), constraints=[(b, clip), (w, clip)])
    ref.apply_gradients(good(ra, rb, rw), constraints=[(rb, clip), (rw, clip)])
    opt.flush()
    ref.flush()
    for x, y in [(a, ra), (b, rb), (w, rw)]:
        np.testing.assert_array_equal(x, y)
    for x, y in zip(opt.get_weights(), ref.get_weights()):
        np.testing.assert_array_equal(x, y)


def test_constraint_result_may_be_nan_and_float64():
    """NaN propagates (as in Keras); a float64 result is cast to a float32 variable."""
    opt = so.SGD(0.1)
    w = _table()
    opt.apply_gradients([(_sparse((2,)), w)], constraints=[(w, lambda x: np.full(x.shape, np.nan))])
    assert np.isnan(w[2]).all() and not np.isnan(w[3]).any()
    opt.apply_gradients([(np.ones_like(w), w)], constraints=[(w, lambda x: np.zeros(x.shape, np.float64))])
    assert (w == 0).all() and opt.iterations == 2


# ------------------------------------------------------------------ 3. hyperparameters

BAD_HYPERS = [
    (so.SGD, "learning_rate", 1e39),           # finite, but Inf in float32
    (so.SGD, "learning_rate", -0.1),
    (so.Adam, "learning_rate", float("inf")),
    (so.Adam, "beta_1", 1.0),
    (so.Adam, "beta_1", 1 - 1e-9),             # 1.0 in float32
    (so.Adam, "beta_2", 2.0),
    (so.Adam, "beta_2", -0.1),
    (so.Adam, "epsilon", -1e-7),
    (so.Adamax, "beta_1", 1.0),
    (so.Nadam, "beta_1", 1.0),
    (so.Nadam, "beta_2", 1.5),
    (so.Adagrad, "initial_accumulator_value", float("inf")),
    (so.Adagrad, "initial_accumulator_value", -1.0),
    (so.Adagrad, "epsilon", -1.0),
    (so.RMSprop, "rho", 2.0),
    (so.RMSprop, "momentum", -0.5),
    (so.Adadelta, "rho", 1.5),
    (so.Ftrl, "l1_regularization_strength", -1.0),
    (so.Ftrl, "l2_regularization_strength", -1.0),
    (so.Ftrl, "learning_rate_power", 0.5),
    (so.Ftrl, "initial_accumulator_value", float("inf")),
    (so.Lion, "beta_1", 0.0),
    (so.Lion, "beta_2", 1.5),
    (so.RowwiseAdagrad, "initial_accumulator_value", float("nan")),
    (so.RowwiseAdagrad, "epsilon", -1.0),
    (so.SGD, "momentum", 2.0),
    (so.Adam, "weight_decay", -1.0),
    (so.Adam, "clipnorm", 0.0),
]


@pytest.mark.parametrize("cls, key, value", BAD_HYPERS,
                         ids=[f"{c.__name__}-{k}-{v}" for c, k, v in BAD_HYPERS])
def test_bad_hyperparameter_refused_at_construction(cls, key, value):
    with pytest.raises(errors.HyperparameterError, match=rf"\b{key}\b"):
        cls(**{key: value})


@pytest.mark.parametrize("cls, key, value", BAD_HYPERS,
                         ids=[f"{c.__name__}-{k}-{v}" for c, k, v in BAD_HYPERS])
def test_bad_hyperparameter_refused_at_reassignment(cls, key, value):
    opt = cls(name="probe")
    old = getattr(opt, key)
    with pytest.raises(errors.HyperparameterError, match=rf"probe.*\b{key}\b"):
        setattr(opt, key, value)
    assert getattr(opt, key) == old or (math.isnan(old) and math.isnan(getattr(opt, key)))


def test_bad_hyperparameter_from_a_callable_is_refused_before_any_write():
    values = iter([0.9, 1.0])
    opt = so.Adam(0.1, beta_1=lambda: next(values))
    w = _table()
    opt.apply_gradients([(_sparse(), w)])
    snap = _snapshot(opt, [w])
    with pytest.raises(errors.HyperparameterError, match="beta_1"):
        opt.apply_gradients([(_sparse(), w)])
    _assert_unchanged(opt, [w], snap)
    opt2 = so.SGD(lambda: 1e39)
    with pytest.raises(errors.HyperparameterError, match="learning_rate"):
        opt2.apply_gradients([(_sparse(), w)])
    _assert_unchanged(opt, [w], snap)


def test_negative_iterations_refused():
    opt = so.Adam(0.1)
    with pytest.raises(errors.HyperparameterError, match="iterations"):
        opt.iterations = -3
    assert opt.iterations == 0
    w = _table()
    opt.build([w])
    weights = opt.get_weights()
    weights[0] = np.array(-1)
    with pytest.raises(errors.WeightsMismatchError, match="iterations"):
        opt.set_weights(weights)
    assert opt.iterations == 0


# ------------------------------------------------------------------ 4. Ftrl at lr 0


@pytest.mark.parametrize("mode", ["lazy", "exact"])
def test_ftrl_zero_learning_rate_is_no_step(mode):
    opt = so.Ftrl(learning_rate=0.0, beta=0.1, sparse_mode=mode)
    w, v = _table(), np.ones(3, np.float32)
    opt.build([w, v])
    snap = _snapshot(opt, [w, v])
    opt.apply_gradients([(_sparse(), w), (np.ones(3, np.float32), v)])
    assert opt.iterations == 1
    old_vars, old_weights, _ = snap
    np.testing.assert_array_equal(w, old_vars[0])
    np.testing.assert_array_equal(v, old_vars[1])
    for a, b in zip(opt.variables()[1:], old_weights[1:]):
        np.testing.assert_array_equal(a, b)
    # a schedule that starts at 0 (warm-up) goes on to train
    lrs = iter([0.0, 0.1])
    opt = so.Ftrl(learning_rate=lambda: next(lrs))
    opt.apply_gradients([(_sparse(), w)])
    np.testing.assert_array_equal(w, old_vars[0])
    opt.apply_gradients([(_sparse(), w)])
    assert not np.array_equal(w, old_vars[0])


# ------------------------------------------------------------ 5. RowwiseAdagrad, width 0


@pytest.mark.parametrize("mode", ["lazy", "exact"])
def test_rowwise_adagrad_zero_width_table(mode):
    opt = so.RowwiseAdagrad(0.1, sparse_mode=mode)
    other = _table()
    empty = np.zeros((5, 0), np.float32)
    g = so.IndexedSlices(np.zeros((2, 0), np.float32), np.array([1, 3]), (5, 0))
    opt.apply_gradients([(_sparse(), other), (g, empty)])
    opt.apply_gradients([(_sparse(), other), (np.zeros((5, 0), np.float32), empty)])
    assert opt.iterations == 2
    assert opt.get_slot(empty, "accumulator").shape == (5,)


# ------------------------------------------------- 6. exact mode, epsilon 0, zero state

EPS0 = [
    ("adagrad", lambda m: so.Adagrad(0.1, initial_accumulator_value=0.0, epsilon=0.0, sparse_mode=m)),
    ("adam", lambda m: so.Adam(0.1, epsilon=0.0, sparse_mode=m)),
    ("adam_amsgrad", lambda m: so.Adam(0.1, epsilon=0.0, amsgrad=True, sparse_mode=m)),
    ("rmsprop", lambda m: so.RMSprop(0.1, epsilon=0.0, sparse_mode=m)),
    ("adadelta", lambda m: so.Adadelta(1.0, epsilon=0.0, sparse_mode=m)),
    ("adamax", lambda m: so.Adamax(0.1, epsilon=0.0, sparse_mode=m)),
    ("nadam", lambda m: so.Nadam(0.1, epsilon=0.0, sparse_mode=m)),
]


@pytest.mark.parametrize("make", [e[1] for e in EPS0], ids=[e[0] for e in EPS0])
def test_exact_mode_epsilon_zero_matches_dense_nan(make):
    """Dense steps with epsilon 0 make rows whose state is zero NaN (0/0, as Keras);
    exact mode gives the same, bit for bit."""
    w_exact, w_dense = _table(), _table()
    exact, dense = make("exact"), make("lazy")
    for t in range(4):
        g = _sparse((t % 2, 5))
        exact.apply_gradients([(g, w_exact)])
        dense.apply_gradients([(np.asarray(_densify(g)), w_dense)])
    exact.flush()
    np.testing.assert_array_equal(w_exact, w_dense)   # NaN == NaN for assert_array_equal
    assert np.isnan(w_dense[ROWS - 1]).all()


def _densify(g):
    out = np.zeros((ROWS, WIDTH), np.float32)
    np.add.at(out, np.asarray(g.indices), g.values)
    return out


# ---------------------------------------------------------------------- 8. saving


def _saved(tmp_path):
    table = _table()
    opt = so.Adam(0.01)
    opt.apply_gradients([(_sparse(), table)])
    path = tmp_path / "run.npz"
    so.save(path, opt, variables={"table": table})
    return path, opt, table


def _rewrite_header(path, edit):
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    header = json.loads(arrays["header"].tobytes().decode())
    header = edit(header)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(path, **arrays)   # a valid zip with valid CRCs: only the header is wrong


def _set(path_keys, value):
    def edit(h):
        node = h
        for k in path_keys[:-1]:
            node = node[k]
        node[path_keys[-1]] = value
        return h
    return edit


HEADER_EDITS = {
    "not_a_dict": lambda h: [1, 2],
    "weights_not_list": _set(["weights"], 3),
    "weights_item_not_dict": _set(["weights"], [1, 2, 3]),
    "weight_shape_str": lambda h: (h["weights"][1].__setitem__("shape", "x"), h)[1],
    "weights_missing": lambda h: {k: v for k, v in h.items() if k != "weights"},
    "variables_kind": _set(["variables", "kind"], "set"),
    "variables_names_short": _set(["variables", "names"], []),
    "variables_arrays_int": _set(["variables", "arrays"], 5),
    "states_missing": lambda h: {k: v for k, v in h.items() if k != "states"},
    "states_variable_out_of_range": lambda h: (h["states"][0].__setitem__("variable", 7), h)[1],
    "states_variable_str": lambda h: (h["states"][0].__setitem__("variable", "0"), h)[1],
    "class_name_int": _set(["class_name"], 5),
    "config_list": _set(["config"], [1]),
    "config_bad_schedule": _set(["config", "learning_rate"], {"class_name": "ExponentialDecay", "config": 3}),
    "config_unknown_key": _set(["config", "bogus"], 1),
}


@pytest.mark.parametrize("edit", list(HEADER_EDITS.values()), ids=list(HEADER_EDITS))
def test_load_of_a_hand_edited_header_raises_config_error(tmp_path, edit):
    path, opt, table = _saved(tmp_path)
    _rewrite_header(path, edit)
    with pytest.raises(errors.ConfigError):
        so.load(path)
    if HEADER_EDITS.get("config_bad_schedule") is edit or HEADER_EDITS.get("config_unknown_key") is edit:
        return  # a given optimizer keeps its own config: loading into it does not read this one
    snap = _snapshot(opt, [table])
    with pytest.raises((errors.ConfigError, errors.WeightsMismatchError)):
        so.load(path, optimizer=opt, variables={"table": table})
    _assert_unchanged(opt, [table], snap)


def test_killed_save_leaves_a_temp_file_the_next_save_removes(tmp_path):
    path, opt, table = _saved(tmp_path)
    script = (
        "import os, signal, sys, numpy as np, sparseopt as so\n"
        "from sparseopt import saving\n"
        "def killed(f, arrays):\n"
        "    f.write(b'PK partial' * 1000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "saving._write_npz = killed\n"
        "opt = so.SGD(0.1); w = np.zeros(3, np.float32)\n"
        "opt.apply_gradients([(np.ones(3, np.float32), w)])\n"
        "so.save(sys.argv[1], opt, variables=[w])\n")
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, str(path)], env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p for p in os.listdir(tmp_path) if p != "run.npz"]
    assert leftovers, "the killed save should have left its temporary file"
    so.load(path)   # the old file is intact
    so.save(path, opt, variables={"table": table})
    assert os.listdir(tmp_path) == ["run.npz"]


def test_save_onto_a_symlink_writes_through(tmp_path):
    path, opt, table = _saved(tmp_path)
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "state.npz"
    link = tmp_path / "link.npz"
    os.symlink(target, link)
    so.save(link, opt, variables={"table": table})
    assert os.path.islink(link) and os.path.isfile(target)
    opt2, tables = so.load(link)
    np.testing.assert_array_equal(tables["table"], table)
    assert os.listdir(tmp_path / "real") == ["state.npz"]


def test_saved_zip_is_still_valid(tmp_path):
    path, _, _ = _saved(tmp_path)
    assert zipfile.ZipFile(path).testzip() is None


# ---------------------------------------------------------- Also: the step's own errors


@pytest.mark.parametrize("pairs, builtin", [
    ([], ValueError),
    ([(None, _table())], ValueError),
    ([(1, 2, 3)], ValueError),
    ([_table()], ValueError),
    ([5], TypeError),
    (5, TypeError),
], ids=["empty", "all_none", "triple", "array_as_pair", "number_as_pair", "not_iterable"])
def test_grads_and_vars_errors_are_sparseopt_errors(pairs, builtin):
    opt = so.SGD(0.1)
    with pytest.raises(errors.SparseoptError) as info:
        opt.apply_gradients(pairs)
    assert isinstance(info.value, builtin)
    assert "SGD" in str(info.value)


def test_same_variable_twice_is_a_sparseopt_error():
    opt = so.SGD(0.1)
    w = _table()
    with pytest.raises(errors.SparseoptError, match="twice") as info:
        opt.apply_gradients([(np.ones_like(w), w), (np.ones_like(w), w)])
    assert isinstance(info.value, ValueError)


def test_rowwise_adagrad_exact_epsilon_zero_is_the_documented_exception():
    """README: idle rows with a zero accumulator stay as they are (dense: NaN)."""
    w = _table()
    opt = so.RowwiseAdagrad(0.1, epsilon=0.0, sparse_mode="exact")
    opt.apply_gradients([(_sparse((1,)), w)])
    opt.apply_gradients([(_sparse((2,)), w)])
    opt.flush()
    np.testing.assert_array_equal(w[5], _table()[5])


def test_rule_cache_key_covers_the_helpers_it_inlines():
    """A kernel cached with old ``_idle`` code would run old math: its source is in the key."""
    from sparseopt.kernels import _specialize
    from sparseopt.rules import adamax, _idle
    assert _idle in _specialize._helper_modules(adamax)


_CACHED_STEP = """
import sys
import numpy as np
import sparseopt as so
w = np.zeros((6, 2), np.float32)
opt = so.SGD(0.5, momentum=0.9, sparse_mode="exact")  # the exact kernel (kernels/exact.py)
opt.apply_gradients([(so.IndexedSlices(np.ones((2, 2), np.float32), np.array([1, 4])), w)])
print(w[1, 0], w[4, 1])
"""


def test_a_cached_kernel_recompiles_when_a_helper_it_inlines_changes(tmp_path):
    """Numba checks a cached kernel against its template's file only. The exact-mode
    kernels (``kernels/exact.py``) inline ``kernels/cpu.py``'s gradient-row helper: in a
    copy of the package, a step cached in one process, then that helper made to double
    every single gradient row; a second process must compile the new code and step by
    twice the gradient, not load the cached kernel with the old math."""
    import shutil
    package = os.path.dirname(so.__file__)
    shutil.copytree(package, tmp_path / "pkg" / "sparseopt", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "pkg"), NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("NUMBA_DISABLE_JIT", None)

    def step():
        proc = subprocess.run([sys.executable, "-c", _CACHED_STEP], env=env, capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [float(x) for x in proc.stdout.split()]

    assert step() == [-0.5, -0.5]                            # SGD's first step: -lr * g
    assert any((tmp_path / "cache").rglob("*exact*.nbi"))    # the kernel was cached
    helper = tmp_path / "pkg" / "sparseopt" / "kernels" / "cpu.py"
    source = helper.read_text()
    assert source.count("return values, order[lo]") == 1
    helper.write_text(source.replace("return values, order[lo]", "return values * 2, order[lo]"))
    assert step() == [-1.0, -1.0]


# -------------------------------------------------------- 7. Lion, exact mode, float32


def test_lion_exact_float32_drift_is_the_dense_runs_rounding():
    """The documented bound (README): exact float32 stays within 1e-6 of dense float64,
    while dense float32 drifts by at most half an ulp of p per step."""
    rng = np.random.default_rng(0)
    rows, steps = 20, 600
    p0 = rng.normal(size=(rows, WIDTH)).astype(np.float32)
    pe, pd, p64 = p0.copy(), p0.copy(), p0.astype(np.float64)
    ex, de, d64 = so.Lion(1e-3, sparse_mode="exact"), so.Lion(1e-3), so.Lion(1e-3)
    for _ in range(steps):
        k = int(rng.integers(0, 3))
        idx = rng.integers(0, rows, k)
        vals = rng.normal(size=(k, WIDTH)).astype(np.float32)
        ex.apply_gradients([(so.IndexedSlices(vals, idx, pe.shape), pe)])
        g = np.zeros((rows, WIDTH))
        np.add.at(g, idx, vals.astype(np.float64))
        de.apply_gradients([(g.astype(np.float32), pd)])
        d64.apply_gradients([(g, p64)])
    ex.flush()
    scale = np.abs(p64).max()
    assert np.abs(pe - p64).max() / scale < 1e-6
    assert np.abs(pe - pd.astype(np.float64)).max() / scale <= steps * 2.0 ** -24


def test_load_of_negative_iterations_raises_config_error_before_writing(tmp_path):
    path, opt, table = _saved(tmp_path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["weight_0"] = np.array(-5, arrays["weight_0"].dtype)
    np.savez(path, **arrays)
    snap = _snapshot(opt, [table])
    with pytest.raises(errors.ConfigError, match="iterations"):
        so.load(path, optimizer=opt, variables={"table": table})
    _assert_unchanged(opt, [table], snap)
