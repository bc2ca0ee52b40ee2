"""bfloat16 and float16 (``tf.half``) variables in both bridges (issue 18, item 3).

The references: the core's step (``sparseopt.<Name>``, tested against its NumPy definitions
in ``tests/test_low_precision.py``) on NumPy copies of the same values with the same seed,
which the bridge must equal bit for bit (variable and slots); and the real Keras 3 and
tf_keras optimizers on ``tf.half`` variables, at their own half tolerances (rtol = atol = 1e-3,
``assertAllCloseAccordingToType``).
"""

import json

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
tf_keras = pytest.importorskip("tf_keras")
ml_dtypes = pytest.importorskip("ml_dtypes")

import numpy as np  # noqa: E402

import sparseopt as so  # noqa: E402
import sparseopt_tf  # noqa: E402
from sparseopt import errors  # noqa: E402

pytestmark = pytest.mark.tf

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
TF_DTYPES = {BF16: tf.bfloat16, F16: tf.float16}

ROWS, WIDTH = 64, 8


def bits(a):
    """The bit patterns of an array (16-bit or float32), for comparing bit for bit."""
    a = np.ascontiguousarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def batches(dtype, steps=4, seed=0):
    """Per step: the table's sparse gradient (values, indices; duplicates; float32 values on
    odd steps, the variable's dtype on even ones) and the small variable's dense gradient."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        idx = rng.integers(0, ROWS, 24).astype(np.int64)
        values = rng.normal(size=(24, WIDTH)).astype(np.float32)
        dense = rng.normal(size=(WIDTH, 4)).astype(np.float32).astype(dtype)
        out.append((values if t % 2 else values.astype(dtype), idx, dense))
    return out


def initial(dtype, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(ROWS, WIDTH)).astype(np.float32).astype(dtype),
            rng.normal(size=(WIDTH, 4)).astype(np.float32).astype(dtype))


def core_run(name, kwargs, dtype, steps):
    """The core optimizer's variables and slots after each step (NumPy copies)."""
    opt = getattr(so, name)(**kwargs)
    table, small = (np.array(a, copy=True) for a in initial(dtype))
    history = []
    for values, idx, dense in steps:
        opt.apply_gradients([(so.IndexedSlices(values, idx, table.shape), table), (dense, small)])
        history.append(([table.copy(), small.copy()],
                        {n: [np.array(opt.get_slot(v, n), copy=True) for v in (table, small)]
                         for n in opt.get_slot_names()}))
    return history


#: (optimizer, its arguments, variable dtype): a momentum rule, Adam (float32 and bfloat16
#: slots, both roundings, a seed), a row-wise rule (float32 row state for a 16-bit table).
CASES = [
    ("SGD", dict(learning_rate=0.125, momentum=0.9), BF16),
    ("Adam", dict(learning_rate=0.0625, seed=7), F16),
    ("Adam", dict(learning_rate=0.0625, slot_dtype="bfloat16"), BF16),
    ("Adam", dict(learning_rate=0.0625, stochastic_rounding=False), BF16),
    ("RowwiseAdagrad", dict(learning_rate=0.25), F16),
]
IDS = [f"{n}-{d.name}-" + "-".join(f"{k}={v}" for k, v in kw.items() if k != "learning_rate")
       for n, kw, d in CASES]


@pytest.mark.parametrize("name,kwargs,dtype", CASES, ids=IDS)
def test_keras3_steps_equal_the_core_bit_for_bit(name, kwargs, dtype):
    """Eager steps, then tf.function steps (a sparse table, a dense variable): the variables
    and slots equal the core's, bit for bit; the slots are float32 (or bfloat16)."""
    steps = batches(dtype)
    expected = core_run(name, kwargs, dtype, steps)
    table, small = (tf.Variable(a) for a in initial(dtype))
    opt = getattr(sparseopt_tf, name)(**kwargs)

    def step(values, idx, dense):
        opt.apply_gradients([(tf.IndexedSlices(values, idx, tf.constant([ROWS, WIDTH], tf.int64)), table),
                             (dense, small)])
    traced = tf.function(step)
    for t, ((values, idx, dense), (variables, slots)) in enumerate(zip(steps, expected)):
        (step if t < 2 else traced)(tf.constant(values), tf.constant(idx), tf.constant(dense))
        for ours, theirs in zip((table, small), variables):
            assert ours.dtype == TF_DTYPES[dtype]
            np.testing.assert_array_equal(bits(ours.numpy()), bits(theirs), err_msg=f"step {t + 1}")
        for slot_name, arrays in slots.items():
            for var, theirs in zip((table, small), arrays):
                ours = opt.get_slot(var, slot_name).numpy()
                bf16_slots = kwargs.get("slot_dtype") == "bfloat16"
                assert ours.dtype == theirs.dtype == (BF16 if bf16_slots else np.float32), slot_name
                np.testing.assert_array_equal(bits(ours), bits(theirs), err_msg=f"{slot_name}, step {t + 1}")
    assert opt.iterations.numpy() == len(steps)


def test_eager_bfloat16_step_writes_in_place():
    """Eagerly a bfloat16 buffer reaches the kernels through its uint16 bitcast (DLPack has
    no bfloat16): the kernels write the variable's own buffer, and no table-sized copy is
    made, as for float32 (tests/tf/test_handover.py checks the graph path for every dtype)."""
    import tracemalloc

    from sparseopt_tf import _handover

    def address(v):
        read = tf.raw_ops.ReadVariableOp(resource=v.handle, dtype=v.dtype)
        return _handover.eager_array(read).__array_interface__["data"][0]

    table = tf.Variable(np.zeros((65536, 16), BF16))
    opt = sparseopt_tf.Adam(0.01)
    opt.build([table])
    grad = tf.IndexedSlices(tf.ones((8, 16), tf.bfloat16), tf.constant([5, 9, 5, 7, 100, 65000, 1, 2]))
    opt.apply_gradients([(grad, table)])                     # compile, make scratch
    before = [address(v) for v in (table, opt.get_slot(table, "m"))]
    tracemalloc.start()
    opt.apply_gradients([(grad, table)])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 65536 * 16 * 2 // 10, peak                  # (the step's Python objects: ~50 kB)
    assert [address(v) for v in (table, opt.get_slot(table, "m"))] == before
    rows = table.numpy()
    assert np.all(rows[[1, 2, 65000]] != 0) and np.all(rows[[0, 3, 65535]] == 0)


#: Legacy cases: rounding to nearest by default (as tf_keras), stochastic with a seed.
LEGACY_CASES = [
    ("Adam", dict(learning_rate=0.01), F16),
    ("SGD", dict(learning_rate=0.1, momentum=0.9, stochastic_rounding=True, seed=3), BF16),
]


@pytest.mark.parametrize("name,kwargs,dtype", LEGACY_CASES, ids=["Adam-float16", "SGD-bfloat16-stochastic"])
def test_legacy_steps_equal_the_core_bit_for_bit(name, kwargs, dtype):
    """tf_keras' OptimizerV2 classes, in a tf.function: the core's step with tf_keras' legacy
    math and the hyperparameters as tf_keras holds them (float32 variables), rounded to
    nearest unless asked otherwise."""
    hypers = {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in kwargs.items()}
    core_kwargs = {"stochastic_rounding": False, **hypers}
    if getattr(so, name)._has_legacy_math:
        core_kwargs["_legacy"] = True
    if name == "Adam":
        core_kwargs.update(beta_1=float(np.float32(0.9)), beta_2=float(np.float32(0.999)),
                           epsilon=float(np.float32(1e-7)))
    # tf_keras hands a variable's gradients over in its dtype
    steps = [(values.astype(dtype), idx, dense) for values, idx, dense in batches(dtype, steps=3)]
    expected = core_run(name, core_kwargs, dtype, steps)
    table, small = (tf.Variable(a) for a in initial(dtype))
    opt = getattr(sparseopt_tf.legacy, name)(**kwargs)

    @tf.function
    def step(values, idx, dense):
        opt.apply_gradients([(tf.IndexedSlices(values, idx, tf.constant([ROWS, WIDTH], tf.int64)), table),
                             (dense, small)])
    for t, ((values, idx, dense), (variables, slots)) in enumerate(zip(steps, expected)):
        step(tf.constant(values), tf.constant(idx), tf.constant(dense))
        for ours, theirs in zip((table, small), variables):
            np.testing.assert_array_equal(bits(ours.numpy()), bits(theirs), err_msg=f"step {t + 1}")
        for slot_name, arrays in slots.items():
            for var, theirs in zip((table, small), arrays):
                ours = opt.get_slot(var, slot_name).numpy()
                assert ours.dtype == np.float32
                np.testing.assert_array_equal(bits(ours), bits(theirs), err_msg=f"{slot_name}, step {t + 1}")


def test_legacy_half_slots_are_float32_and_hold_the_half_gradient_exactly():
    """tf_keras' momentum test, on our slots: the gradient is half(0.1); the float32 slot
    holds float32(-2 * half(0.1)) exactly (tf_keras' half slot rounds it), and the variable
    is that rounded to nearest half, which tf_keras' own optimizer also gives."""
    grad = np.array([[0.1, 0.1]], np.float16)
    ours_var = tf.Variable(tf.zeros([4, 2], tf.half))
    theirs_var = tf.Variable(tf.zeros([4, 2], tf.half))
    ours = sparseopt_tf.legacy.SGD(learning_rate=2.0, momentum=0.9)
    theirs = tf_keras.optimizers.legacy.SGD(learning_rate=2.0, momentum=0.9)
    for opt, var in ((ours, ours_var), (theirs, theirs_var)):
        sparse = tf.IndexedSlices(tf.constant(grad), tf.constant([1]), tf.constant([4, 2]))
        opt.apply_gradients([(sparse, var)])
    slot = ours.get_slot(ours_var, "momentum").numpy()
    assert slot.dtype == np.float32 and theirs.get_slot(theirs_var, "momentum").dtype == tf.half
    exact = np.float32(-2.0) * np.float32(grad[0, 0])          # -0.199951171875, exact in float32
    np.testing.assert_array_equal(slot[1], [exact, exact])
    np.testing.assert_array_equal(slot[[0, 2, 3]], 0.0)
    np.testing.assert_array_equal(ours_var.numpy()[1], np.array([exact, exact]).astype(np.float16))
    np.testing.assert_array_equal(ours_var.numpy(), theirs_var.numpy())


#: (optimizer, arguments): optimizers and settings of tf_keras' half tests.
AGREEMENT = [("Adam", dict(learning_rate=0.01)), ("Adagrad", dict(learning_rate=0.1)),
             ("RMSprop", dict(learning_rate=0.01, centered=True, epsilon=1e-3))]


@pytest.mark.parametrize("name,kwargs", AGREEMENT, ids=[n for n, _ in AGREEMENT])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_half_agrees_with_keras_at_its_half_tolerance(name, kwargs, sparse):
    """tf.half variables, 3 steps, dense or sparse: the legacy class (round to nearest) and
    the Keras 3 class (stochastic rounding) against tf_keras' legacy optimizer and
    keras.optimizers run in float64 on the same (half) values, at the tolerance of tf_keras'
    half tests (rtol = atol = 1e-3; their references are float64 NumPy too). A sparse
    gradient touches every row, one twice: the references take it densified (duplicates
    summed), which every sparse semantics equals then.

    The bound holds by construction, not by luck of the bits: the math is float32, and
    each step's rounding moves a value by less than one float16 ulp (these updates do not
    read the parameter, so errors do not compound): 3 steps, values in [0.25, 0.5) (ulp
    2**-12 = 2.4e-4), at most 7.3e-4, under the 1.25e-3 allowed there."""
    rng = np.random.default_rng(2)
    init = rng.uniform(0.3, 0.45, size=(6, 3)).astype(np.float16)
    grads = [rng.normal(scale=0.1, size=(6, 3)).astype(np.float16) for _ in range(3)]
    idx = np.array([3, 0, 2, 5, 2, 1, 4])

    def run(opt, var, dtype):
        for g in grads:
            if sparse and dtype == np.float16:
                grad = tf.IndexedSlices(tf.constant(g[idx]), tf.constant(idx), tf.constant([6, 3]))
            elif sparse:
                dense = np.zeros(g.shape)
                np.add.at(dense, idx, g[idx].astype(np.float64))
                grad = tf.constant(dense)
            else:
                grad = tf.constant(g.astype(dtype))
            opt.apply_gradients([(grad, var)])
        return np.asarray(var.numpy(), np.float64)

    for ours_cls, theirs_cls, make in (
            (getattr(sparseopt_tf.legacy, name), getattr(tf_keras.optimizers.legacy, name), tf.Variable),
            (getattr(sparseopt_tf, name), getattr(keras.optimizers, name), keras.Variable)):
        ours = run(ours_cls(**kwargs), make(init), np.float16)
        theirs = run(theirs_cls(**kwargs), make(init.astype(np.float64)), np.float64)
        np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3, err_msg=ours_cls.__module__)
        assert np.abs(ours - init).max() > 1e-2                    # it moved, by many ulps


def _fit_data(batch=8, n=32, seed=0):
    """Ids and targets whose loss ``sum(embedding * target) / batch`` has gradient
    ``target / batch`` for each looked-up row (exact in bfloat16: dyadic targets)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 40, size=(n, 1)).astype(np.int32)
    targets = rng.choice([-1.0, -0.5, 0.5, 1.0, 2.0], size=(n, 1, 4)).astype(np.float32)
    return ids, targets


def _fit_loss(y_true, y_pred):
    return tf.reduce_sum(tf.cast(y_pred, tf.float32) * tf.cast(y_true, tf.float32), axis=[1, 2])


@pytest.mark.parametrize("layer", ["keras", "sparseopt_tf", "tf_keras"])
def test_model_fit_trains_bfloat16_embeddings_as_the_core(layer):
    """``model.fit`` (graph mode) of a bfloat16 ``Embedding`` (Keras 3's and ours with
    ``sparseopt_tf.Adam``; tf_keras' with ``sparseopt_tf.legacy.Adam``): the table stays
    bfloat16 with float32 slots, and equals the core's Adam run on the same gradients, bit for
    bit (the legacy class: tf_keras' math and float32 hyperparameters, rounded to nearest)."""
    batch = 8
    ids, targets = _fit_data(batch)
    if layer == "tf_keras":
        K, opt = tf_keras, sparseopt_tf.legacy.Adam(learning_rate=0.0625)
        core = so.Adam(learning_rate=0.0625, beta_1=float(np.float32(0.9)), beta_2=float(np.float32(0.999)),
                       epsilon=float(np.float32(1e-7)), stochastic_rounding=False, _legacy=True)
        cls = tf_keras.layers.Embedding
    else:
        K, opt = keras, sparseopt_tf.Adam(learning_rate=0.0625, seed=5)
        core = so.Adam(learning_rate=0.0625, seed=5)
        cls = keras.layers.Embedding if layer == "keras" else sparseopt_tf.Embedding
    emb = cls(40, 4, dtype="bfloat16", embeddings_initializer=K.initializers.RandomNormal(seed=1))
    model = K.Sequential([K.Input((1,), dtype="int32"), emb])
    init = emb.embeddings.numpy().copy()
    model.compile(optimizer=opt, loss=_fit_loss)
    model.fit(ids, targets, batch_size=batch, epochs=2, shuffle=False, verbose=0)
    assert tf.as_dtype(emb.embeddings.dtype) == tf.bfloat16 and init.dtype == BF16
    assert {tf.as_dtype(opt.get_slot(emb.embeddings, n).dtype) for n in ("m", "v")} == {tf.float32}

    table = init.copy()
    for _ in range(2):
        for b in range(0, len(ids), batch):
            grad = (targets[b:b + batch, 0] / batch).astype(BF16)
            core.apply_gradients([(so.IndexedSlices(grad, ids[b:b + batch, 0].astype(np.int64), table.shape),
                                   table)])
    assert not np.array_equal(bits(table), bits(init))
    np.testing.assert_array_equal(bits(emb.embeddings.numpy()), bits(table))
    np.testing.assert_array_equal(opt.get_slot(emb.embeddings, "v").numpy(), core.get_slot(table, "v"))


EXACT_CASES = [("Adam", dict(learning_rate=0.0625, seed=2), BF16, False),
               ("SGD", dict(learning_rate=0.125, momentum=0.9), F16, True)]


@pytest.mark.parametrize("name,kwargs,dtype,legacy", EXACT_CASES, ids=["Adam-bfloat16", "SGD-float16-legacy"])
def test_exact_mode_equals_the_core_bit_for_bit(name, kwargs, dtype, legacy):
    """``sparse_mode="exact"`` on 16-bit variables (the core's: idle steps computed in float32
    and rounded once): tf.function steps, a ``catch_up`` of some rows, then ``flush``: the
    table, the dense variable and the slots equal the core's, bit for bit."""
    kwargs = dict(kwargs, sparse_mode="exact")
    core_kwargs = dict(kwargs)
    if legacy:           # tf_keras' float32 hyperparameters, its math, round to nearest
        core_kwargs = {k: float(np.float32(v)) if isinstance(v, float) else v for k, v in kwargs.items()}
        core_kwargs["stochastic_rounding"] = False
        if getattr(so, name)._has_legacy_math:
            core_kwargs["_legacy"] = True
    steps = [(values.astype(dtype), idx, dense) for values, idx, dense in batches(dtype, steps=3)]
    core = getattr(so, name)(**core_kwargs)
    np_table, np_small = (np.array(a, copy=True) for a in initial(dtype))
    table, small = (tf.Variable(a) for a in initial(dtype))
    opt = getattr(sparseopt_tf.legacy if legacy else sparseopt_tf, name)(**kwargs)

    @tf.function
    def step(values, idx, dense):
        opt.apply_gradients([(tf.IndexedSlices(values, idx, tf.constant([ROWS, WIDTH], tf.int64)), table),
                             (dense, small)])
    for values, idx, dense in steps:
        step(tf.constant(values), tf.constant(idx), tf.constant(dense))
        core.apply_gradients([(so.IndexedSlices(values, idx, np_table.shape), np_table), (dense, np_small)])
    rows = np.array([0, 7, 33, 63])
    opt.catch_up(table, tf.constant(rows))
    core.catch_up(np_table, rows)
    np.testing.assert_array_equal(bits(table.numpy()), bits(np_table))
    opt.flush()
    core.flush()
    for ours, theirs in ((table, np_table), (small, np_small)):
        np.testing.assert_array_equal(bits(ours.numpy()), bits(theirs))
        for n in core.get_slot_names():
            np.testing.assert_array_equal(bits(opt.get_slot(ours, n).numpy()), bits(core.get_slot(theirs, n)))


def test_unsupported_dtypes_are_refused_when_built():
    """An integer variable is refused with the core's error naming it, before anything is made."""
    opt = sparseopt_tf.SGD()
    with pytest.raises(errors.DtypeMismatchError, match=r"'v:0': variables must be float32, float64, bfloat"):
        opt.build([tf.Variable(np.ones(3, np.int32), name="v")])
    assert not opt.built and [v.name for v in opt.variables] == ["iteration", "learning_rate"]  # (Keras' own)


def test_configs_carry_the_16_bit_settings_only_where_not_default():
    plain = sparseopt_tf.Adam().get_config()
    assert not {"stochastic_rounding", "slot_dtype", "seed"} & set(plain)
    config = sparseopt_tf.Adam(stochastic_rounding=False, slot_dtype="bfloat16", seed=9).get_config()
    assert (config["stochastic_rounding"], config["slot_dtype"], config["seed"]) == (False, "bfloat16", 9)
    again = sparseopt_tf.Adam.from_config(config)
    assert (again.stochastic_rounding, again.slot_dtype, again.seed) == (False, "bfloat16", 9)
    # legacy: rounds to nearest by default (as tf_keras), so only stochastic rounding is written
    assert "stochastic_rounding" not in sparseopt_tf.legacy.Adam().get_config()
    assert not sparseopt_tf.legacy.Adam().stochastic_rounding
    config = sparseopt_tf.legacy.Adam(stochastic_rounding=True, seed=4).get_config()
    assert (config["stochastic_rounding"], config["seed"]) == (True, 4)
    assert sparseopt_tf.legacy.Adam.from_config(config).stochastic_rounding
    with pytest.raises(errors.HyperparameterError, match="seed"):
        sparseopt_tf.Adam(seed=-1)


def _sparse_steps(n, seed):
    rng = np.random.default_rng(seed)
    return [(tf.constant(rng.normal(size=(12, WIDTH)).astype(np.float32)),
             tf.constant(rng.integers(0, ROWS, 12))) for _ in range(n)]


def _train(opt, var, steps):
    for values, idx in steps:
        opt.apply_gradients([(tf.IndexedSlices(values, idx, tf.constant([ROWS, WIDTH], tf.int64)), var)])


@pytest.mark.parametrize("legacy", [False, True], ids=["keras3", "legacy"])
def test_checkpoint_resumes_bit_for_bit(legacy, tmp_path):
    """tf.train.Checkpoint of a bfloat16 table with bfloat16 slots, stochastic rounding with a
    seed: a run resumed from it continues bit for bit. The Keras 3 class's checkpoint carries
    the seed (the fresh optimizer has another); the legacy one's is in its config."""
    module = sparseopt_tf.legacy if legacy else sparseopt_tf
    kwargs = dict(learning_rate=0.0625, slot_dtype="bfloat16", stochastic_rounding=True)
    first, then = _sparse_steps(3, 0), _sparse_steps(2, 1)
    var = tf.Variable(initial(BF16)[0])
    opt = module.Adam(seed=11, **kwargs)
    _train(opt, var, first)
    path = tf.train.Checkpoint(v=var, opt=opt).write(str(tmp_path / "ckpt"))
    _train(opt, var, then)

    resumed_var = tf.Variable(np.zeros((ROWS, WIDTH), BF16))
    resumed = module.Adam(seed=11 if legacy else 0, **kwargs)
    if legacy:
        resumed._create_all_weights([resumed_var])
    else:
        resumed.build([resumed_var])
    tf.train.Checkpoint(v=resumed_var, opt=resumed).read(path).assert_consumed()
    assert resumed.seed == 11 and resumed.iterations.numpy() == 3
    _train(resumed, resumed_var, then)
    np.testing.assert_array_equal(bits(resumed_var.numpy()), bits(var.numpy()))
    for n in ("m", "v"):
        assert resumed.get_slot(resumed_var, n).dtype == tf.bfloat16
        np.testing.assert_array_equal(bits(resumed.get_slot(resumed_var, n).numpy()),
                                      bits(opt.get_slot(var, n).numpy()))


def test_keras_file_resumes_bit_for_bit(tmp_path):
    """``model.save('m.keras')`` / ``load_model`` of a bfloat16 Embedding trained by
    ``model.fit`` (bfloat16 slots, a seed): training the loaded model continues bit for bit."""
    ids, targets = _fit_data()
    model = keras.Sequential([keras.Input((1,), dtype="int32"),
                              keras.layers.Embedding(40, 4, dtype="bfloat16")])
    model.compile(optimizer=sparseopt_tf.Adam(0.0625, slot_dtype="bfloat16", seed=3), loss=_fit_loss)
    model.fit(ids, targets, batch_size=8, epochs=1, shuffle=False, verbose=0)
    model.save(tmp_path / "m.keras")
    model.fit(ids, targets, batch_size=8, epochs=1, shuffle=False, verbose=0)

    loaded = keras.models.load_model(tmp_path / "m.keras", custom_objects={"_fit_loss": _fit_loss})
    opt = loaded.optimizer
    assert type(opt) is sparseopt_tf.Adam and int(opt.iterations.numpy()) == 4
    assert (opt.seed, opt.slot_dtype) == (3, "bfloat16")
    loaded.fit(ids, targets, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for ours, theirs in zip(loaded.get_weights() + opt.get_weights(),
                            model.get_weights() + model.optimizer.get_weights()):
        assert ours.dtype == theirs.dtype
        np.testing.assert_array_equal(bits(ours), bits(theirs))
    assert json.loads(json.dumps(opt.get_config()))["seed"] == 3
