"""sparseopt_tf.legacy.<Name> as a drop-in for tf_keras.optimizers.legacy.<Name>.

The behaviours that tf-keras' own legacy optimizer tests check (its repository's
``tf_keras/optimizers/legacy/*_test.py``), written as our tests: configs written by tf_keras
load into ours, hyperparameters given as tensors or callables, ``epsilon=None``, deepcopy,
checkpoints written by tf_keras restore into ours, the slots' names and order, and the sparse
semantics of each tf_keras optimizer (which of our ``sparse_mode`` reproduces it). Every expected
number comes from the real tf_keras optimizer, run beside ours.
"""

import copy

import pytest

tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")

import numpy as np  # noqa: E402

import sparseopt_tf  # noqa: E402
from sparseopt.errors import HyperparameterError  # noqa: E402
from tests.tf.helpers import rel_close  # noqa: E402

L = tf_keras.optimizers.legacy

#: Every tf_keras legacy optimizer and the configurations whose slots differ.
CASES = [
    ("SGD", dict(learning_rate=0.1)),
    ("SGD", dict(learning_rate=0.1, momentum=0.9)),
    ("SGD", dict(learning_rate=0.1, momentum=0.9, nesterov=True)),
    ("Adam", dict(learning_rate=0.01)),
    ("Adam", dict(learning_rate=0.01, amsgrad=True)),
    ("Adagrad", dict(learning_rate=0.1)),
    ("Adadelta", dict(learning_rate=1.0)),
    ("Adamax", dict(learning_rate=0.01)),
    ("Nadam", dict(learning_rate=0.01)),
    ("RMSprop", dict(learning_rate=0.01)),
    ("RMSprop", dict(learning_rate=0.01, momentum=0.9)),
    ("RMSprop", dict(learning_rate=0.01, centered=True)),
    ("RMSprop", dict(learning_rate=0.01, centered=True, momentum=0.5)),
    ("Ftrl", dict(learning_rate=0.1)),
]
IDS = [name + "".join(f"-{k}" for k in kw if k != "learning_rate") for name, kw in CASES]


def _grads(rng, shape, steps, dtype):
    return [tf.constant(rng.normal(size=shape).astype(dtype)) for _ in range(steps)]


def _train(opt, var, grads, function=False):
    def step(g):
        opt.apply_gradients([(g, var)])
    step = tf.function(step) if function else step
    for g in grads:
        step(g)
    return var.numpy()


def _pair(name, kwargs):
    """The tf_keras optimizer and ours, built with the same arguments."""
    return getattr(L, name)(**kwargs), getattr(sparseopt_tf.legacy, name)(**kwargs)


# ------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_config_written_by_tf_keras_loads_and_trains_identically(name, kwargs):
    rng = np.random.default_rng(0)
    init = rng.normal(size=(4, 3)).astype(np.float32)
    grads = _grads(rng, init.shape, 20, np.float32)
    theirs = getattr(L, name)(**kwargs)
    config = theirs.get_config()
    ours = getattr(sparseopt_tf.legacy, name).from_config(config)
    own_config = ours.get_config()
    for key, value in config.items():
        assert own_config[key] == pytest.approx(value), key
    rel_close(_train(ours, tf.Variable(init), grads), _train(theirs, tf.Variable(init), grads), np.float32)


# ---------------------------------------------------------------- Nadam decay


@pytest.mark.parametrize("kwargs", [dict(learning_rate=0.01), dict(learning_rate=0.01, schedule_decay=0.1),
                                    dict(learning_rate=0.02, beta_1=0.5, schedule_decay=0.02)])
def test_nadam_decay_is_the_momentum_schedule_constant(kwargs):
    """tf_keras' Nadam: ``decay`` (alias ``schedule_decay``, default 0.004) sets the momentum
    schedule 0.96 ** (decay * t) and does not decay the learning rate. 200 float64 steps from
    the config tf_keras writes, and from the same arguments."""
    rng = np.random.default_rng(1)
    init = rng.normal(size=(3, 2))
    grads = _grads(rng, init.shape, 200, np.float64)
    theirs = L.Nadam(**kwargs)
    config = theirs.get_config()
    expected = _train(theirs, tf.Variable(init), grads)
    from_config = sparseopt_tf.legacy.Nadam.from_config(config)
    assert from_config.get_config()["decay"] == config["decay"]
    rel_close(_train(from_config, tf.Variable(init), grads), expected, np.float64)
    rel_close(_train(sparseopt_tf.legacy.Nadam(**kwargs), tf.Variable(init), grads), expected, np.float64)


def test_nadam_decay_argument_and_checks():
    assert sparseopt_tf.legacy.Nadam(decay=0.1).get_config()["decay"] == 0.1
    assert sparseopt_tf.legacy.Nadam(schedule_decay=0.2, decay=0.1).get_config()["decay"] == 0.2
    assert sparseopt_tf.legacy.Nadam().get_config()["decay"] == 0.004
    with pytest.raises(ValueError, match="decay"):
        sparseopt_tf.legacy.Nadam(schedule_decay=-1.0)
    # Adam's decay is still the learning rate's (OptimizerV2's inverse-time decay).
    assert sparseopt_tf.legacy.Adam(decay=0.1).get_config()["decay"] == 0.1


# --------------------------------------------- tensors, callables, epsilon None


@pytest.mark.parametrize("function", [False, True], ids=["eager", "function"])
@pytest.mark.parametrize("name,make_kwargs", [
    ("SGD", lambda: dict(learning_rate=0.1, momentum=tf.constant(0.9))),
    ("SGD", lambda: dict(learning_rate=0.1, momentum=lambda: 0.9, nesterov=True)),
    ("SGD", lambda: dict(learning_rate=lambda: 0.1, momentum=tf.Variable(0.5))),
    ("RMSprop", lambda: dict(learning_rate=0.01, rho=lambda: 0.8, momentum=lambda: 0.5)),
    ("RMSprop", lambda: dict(learning_rate=0.01, rho=tf.constant(0.8), momentum=0.5, centered=True)),
    ("Adadelta", lambda: dict(learning_rate=1.0, rho=lambda: 0.9)),
    ("Adam", lambda: dict(learning_rate=tf.constant(0.01), beta_1=lambda: 0.8, beta_2=tf.constant(0.99))),
    ("Ftrl", lambda: dict(learning_rate=0.1, l1_regularization_strength=tf.constant(0.01))),
], ids=["sgd-tensor", "sgd-callable-nesterov", "sgd-variable", "rmsprop-callables",
        "rmsprop-tensor-rho", "adadelta-callable-rho", "adam-tensors", "ftrl-tensor"])
def test_tensor_and_callable_hyperparameters(name, make_kwargs, function):
    rng = np.random.default_rng(2)
    init = rng.normal(size=(4, 3)).astype(np.float32)
    grads = _grads(rng, init.shape, 20, np.float32)
    expected = _train(getattr(L, name)(**make_kwargs()), tf.Variable(init), grads, function)
    ours = getattr(sparseopt_tf.legacy, name)(**make_kwargs())
    rel_close(_train(ours, tf.Variable(init), grads, function), expected, np.float32)


@pytest.mark.parametrize("name", ["Adam", "Adagrad", "Adadelta", "Adamax", "Nadam", "RMSprop"])
def test_epsilon_none_is_the_backend_epsilon(name):
    rng = np.random.default_rng(3)
    init = rng.normal(size=(4, 3))
    grads = _grads(rng, init.shape, 20, np.float64)
    theirs, ours = _pair(name, dict(learning_rate=0.01, epsilon=None))
    assert ours.get_config()["epsilon"] == theirs.get_config()["epsilon"] == tf_keras.backend.epsilon()
    rel_close(_train(ours, tf.Variable(init), grads), _train(theirs, tf.Variable(init), grads), np.float64)


def test_momentum_is_a_hyperparameter_of_sgd_and_rmsprop():
    for name in ("SGD", "RMSprop"):
        theirs, ours = _pair(name, dict(learning_rate=0.1, momentum=0.9))
        assert float(ours._get_hyper("momentum")) == pytest.approx(0.9)
        assert ours.get_config()["momentum"] == pytest.approx(theirs.get_config()["momentum"])
    # Reassigned between steps, as tf_keras allows (the slot exists from the start).
    rng = np.random.default_rng(4)
    init = rng.normal(size=(4, 3)).astype(np.float32)
    grads = _grads(rng, init.shape, 6, np.float32)
    results = []
    for opt in _pair("SGD", dict(learning_rate=0.1, momentum=0.9)):
        var = tf.Variable(init)
        _train(opt, var, grads[:3])
        opt.momentum = 0.5
        results.append(_train(opt, var, grads[3:]))
    rel_close(results[1], results[0], np.float32)


# ----------------------------------------------------------------- deepcopy


def test_deepcopy_gives_an_optimizer_that_trains_identically():
    rng = np.random.default_rng(5)
    init = rng.normal(size=(4, 3)).astype(np.float32)
    grads = _grads(rng, init.shape, 6, np.float32)
    ours = sparseopt_tf.legacy.Adam(0.42)
    fresh = copy.deepcopy(ours)
    assert isinstance(fresh, sparseopt_tf.legacy.Adam) and fresh is not ours
    expected = _train(L.Adam(0.42), tf.Variable(init), grads)
    rel_close(_train(fresh, tf.Variable(init), grads), expected, np.float32)
    # A copy taken mid-training continues as the original does (slots and iterations copied).
    for opt in (sparseopt_tf.legacy.Nadam(0.05), sparseopt_tf.legacy.SGD(0.1, momentum=tf.constant(0.9))):
        var = tf.Variable(init)
        _train(opt, var, grads[:3])
        middle = var.numpy()
        twin = copy.deepcopy(opt)
        after = _train(opt, var, grads[3:])
        var.assign(middle)
        np.testing.assert_array_equal(_train(twin, var, grads[3:]), after)
        assert int(twin.iterations.numpy()) == int(opt.iterations.numpy()) == 6


# ------------------------------------------------ checkpoints and slot names


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_checkpoint_written_by_tf_keras_restores_and_continues(name, kwargs, dtype, tmp_path):
    rng = np.random.default_rng(6)
    init = rng.normal(size=(5, 3)).astype(dtype)
    grads = _grads(rng, init.shape, 6, dtype)
    theirs, ours = _pair(name, kwargs)
    var = tf.Variable(init)
    _train(theirs, var, grads[:3])
    path = tf.train.Checkpoint(optimizer=theirs, var=var).save(str(tmp_path / "ckpt"))
    expected = _train(theirs, var, grads[3:])
    own_var = tf.Variable(np.zeros_like(init))
    status = tf.train.Checkpoint(optimizer=ours, var=own_var).restore(path)
    actual = _train(ours, own_var, grads[3:])
    status.assert_existing_objects_matched()    # every slot and weight of ours was in it
    assert int(ours.iterations.numpy()) == 6
    rel_close(actual, expected, dtype)


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_slot_and_weight_names_and_order_are_tf_keras(name, kwargs):
    names = []
    opts = _pair(name, kwargs)
    for opt in opts:
        variables = [tf.Variable(np.ones((2, 3), np.float32)), tf.Variable(np.ones(3, np.float32))]
        opt.apply_gradients([(tf.ones_like(v), v) for v in variables])
        names.append(([w.name.split("/", 1)[1] for w in opt.weights], opt.get_slot_names()))
    assert names[1] == names[0]
    # So tf_keras' get_weights() loads into ours.
    opts[1].set_weights(opts[0].get_weights())


# ----------------------------------------------------------------- sparse


#: Which sparse_mode reproduces tf_keras legacy on IndexedSlices (the table in the docs):
#: "lazy" (only the batch's rows change), "exact" (dense-equivalent), "both" (the rule leaves a
#: row with a zero gradient as it is, so the two coincide), None (Nadam: neither).
SPARSE_MATCH = {
    "SGD": "both", "SGD-momentum": "lazy", "SGD-momentum-nesterov": "lazy",
    "Adam": "exact", "Adam-amsgrad": "exact", "Adagrad": "both", "Adadelta": "lazy",
    "Adamax": "lazy", "Nadam": None, "RMSprop": "exact", "RMSprop-momentum": "lazy",
    "RMSprop-centered": "exact", "RMSprop-centered-momentum": "lazy", "Ftrl": "lazy",
}


def _sparse_runs(name, kwargs):
    rng = np.random.default_rng(7)
    init = rng.normal(size=(10, 3)).astype(np.float32)
    steps = []
    for _ in range(10):
        idx = rng.integers(0, 6, 4)     # rows 6.. never touched; duplicates
        idx[1] = idx[0]
        steps.append((tf.constant(rng.normal(size=(4, 3)).astype(np.float32)), tf.constant(idx)))
    out = {}
    for key, opt in (("tf_keras", getattr(L, name)(**kwargs)),
                     ("lazy", getattr(sparseopt_tf.legacy, name)(**kwargs)),
                     ("exact", getattr(sparseopt_tf.legacy, name)(sparse_mode="exact", **kwargs))):
        var = tf.Variable(init)
        for values, idx in steps:
            opt.apply_gradients([(tf.IndexedSlices(values, idx, (10, 3)), var)])
        if key == "exact":
            opt.flush()
        out[key] = (var.numpy(), {s: opt.get_slot(var, s).numpy() for s in opt.get_slot_names()})
    return init, out


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_which_sparse_mode_matches_tf_keras_legacy(name, kwargs):
    init, out = _sparse_runs(name, kwargs)
    expected = out["tf_keras"][0]
    match = SPARSE_MATCH[IDS[CASES.index((name, kwargs))]]
    differs = {}
    for mode in ("lazy", "exact"):
        if match in (mode, "both"):
            rel_close(out[mode][0], expected, np.float32)
            for slot, value in out["tf_keras"][1].items():
                rel_close(out[mode][1][slot], value, np.float32)
        else:
            differs[mode] = np.max(np.abs(out[mode][0] - expected))
    assert all(d > 1e-4 for d in differs.values()), differs
    if match is None:
        # Nadam: every row's moments decay (as in exact mode), the batch's rows alone move.
        for slot, value in out["tf_keras"][1].items():
            rel_close(out["exact"][1][slot], value, np.float32)
        np.testing.assert_array_equal(expected[6:], init[6:])


@pytest.mark.parametrize("name", ["SGD", "RMSprop"])
@pytest.mark.parametrize("momentum", [-0.1, 2.5])
def test_momentum_out_of_range_is_refused_in_tf_keras_words(name, momentum):
    """tf_keras' constructors check a number ``momentum`` against [0, 1]; its tests match the
    message (``must be between [0, 1]. Received: momentum=2.5 (of type <class 'float'>).``)."""
    with pytest.raises(HyperparameterError, match=r"`momentum` must be between \[0, 1\]\. Received: "
                       rf"momentum={momentum} \(of type <class 'float'>\)\.") as ours:
        getattr(sparseopt_tf.legacy, name)(1.0, momentum=momentum)
    with pytest.raises(ValueError, match=r"`momentum` must be between \[0, 1\]") as theirs:
        getattr(tf_keras.optimizers.legacy, name)(1.0, momentum=momentum)
    assert str(ours.value).endswith(str(theirs.value))
