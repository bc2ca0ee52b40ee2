"""``sparse_mode="exact"`` in the bridge: sparse steps whose results equal dense training.

Every reference is the real Keras optimizer (``keras.optimizers.<Name>``, or
``tf_keras.optimizers.legacy.<Name>`` for the legacy classes) given the *dense* gradient:
Keras 3 squares an ``IndexedSlices`` gradient's rows before summing duplicates, which is
not dense training when a batch repeats an id, so the references densify the embedding
gradient first (:func:`_dense_keras`). Where Keras has no such optimizer the core's dense
step is the reference (checked against Keras in ``tests/test_references_keras*.py``).
"""

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
tf_keras = pytest.importorskip("tf_keras")

import numpy as np  # noqa: E402

import sparseopt as so  # noqa: E402
import sparseopt_tf  # noqa: E402
import sparseopt_tf.legacy  # noqa: E402,F401
from tests.tf.helpers import BRIDGED, bridge_class, core_dense_run, rel_close  # noqa: E402

ROWS, DIM, LOOKUPS = 2000, 8, 4         # the acceptance model's table and ids per example


def _densify(grads):
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]


def _dense_keras(name, **kwargs):
    """``keras.optimizers.<name>`` given dense gradients (a class made on the fly)."""
    base = getattr(keras.optimizers, name)
    return type(f"Dense{name}", (base,), {"apply": lambda self, g, v=None: base.apply(self, _densify(g), v)})(
        **kwargs)


def _data(seed, n=256, num_rows=ROWS):
    """Ids with repeats within batches (so the dense reference matters) and idle rows."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, num_rows, size=(n, LOOKUPS)).astype(np.int32)
    x[::7, 1] = x[::7, 0]
    return x, rng.normal(size=(n, 1)).astype(np.float32)


def _keras_model(embedding):
    keras.utils.set_random_seed(0)
    ids = keras.Input(shape=(LOOKUPS,), dtype="int32")
    x = embedding(ROWS, DIM, name="emb")(ids)
    return keras.Model(ids, keras.layers.Dense(1, name="head")(keras.layers.Flatten()(x)))


# ------------------------------------------------------------ the acceptance test

@pytest.mark.parametrize("run_eagerly", [False, True])
@pytest.mark.parametrize("name, kwargs", [("Adam", dict(learning_rate=0.01)),
                                          ("SGD", dict(learning_rate=0.05, momentum=0.9)),
                                          ("RMSprop", dict(learning_rate=0.01, momentum=0.5))],
                         ids=["adam", "sgd_momentum", "rmsprop_momentum"])
def test_model_fit_in_exact_mode_equals_dense_keras(name, kwargs, run_eagerly):
    """An Embedding (2000 x 8) feeding a dense head, trained by ``model.fit`` for 16 steps:
    ``sparseopt_tf.<name>(sparse_mode="exact")`` with ``sparseopt_tf.Embedding`` ends with
    the weights of ``keras.optimizers.<name>`` applied densely."""
    x, y = _data(0)
    ours = _keras_model(sparseopt_tf.Embedding)
    ours.compile(optimizer=getattr(sparseopt_tf, name)(sparse_mode="exact", **kwargs), loss="mse",
                 run_eagerly=run_eagerly)
    dense = _keras_model(keras.layers.Embedding)
    dense.compile(optimizer=_dense_keras(name, **kwargs), loss="mse")
    for model in (ours, dense):
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(ours.trainable_weights, dense.trainable_weights):
        rel_close(a.numpy(), b.numpy(), np.float32)


def test_model_fit_in_exact_mode_keeps_the_table_gradient_sparse():
    """The lookup's gradient still reaches the row kernel as IndexedSlices, and a step
    leaves the rows it did not touch as they were (the catch-up is deferred)."""
    from sparseopt_tf import _host
    seen = []
    original = _host.HostStep.__call__

    def spy(self, jobs, scalars, arrays):
        seen.extend((job.name, job.sparse) for job in jobs)
        return original(self, jobs, scalars, arrays)

    x, y = _data(1, n=64)
    model = _keras_model(sparseopt_tf.Embedding)
    model.compile(optimizer=sparseopt_tf.Adam(0.01, sparse_mode="exact"), loss="mse")
    _host.HostStep.__call__ = spy
    try:
        model.train_on_batch(x[:32], y[:32])
        before = model.get_layer("emb").embeddings.numpy()
        model.train_on_batch(x[32:], y[32:])
    finally:
        _host.HostStep.__call__ = original
    assert ("emb/embeddings:0", True) in seen and ("head/kernel:0", False) in seen
    after = model.get_layer("emb").embeddings.numpy()
    read = np.unique(x[32:])
    np.testing.assert_array_equal(np.delete(after, read, 0), np.delete(before, read, 0))


def test_legacy_model_fit_in_exact_mode_equals_dense_tf_keras():
    """tf_keras: ``sparseopt_tf.legacy.Adam(sparse_mode="exact")`` with
    ``sparseopt_tf.legacy.Embedding`` equals ``tf_keras.optimizers.legacy.Adam`` applied
    densely; ``sparseopt_tf.legacy.ExactFlush`` flushes at the end of training."""

    class DenseLegacyAdam(tf_keras.optimizers.legacy.Adam):
        def apply_gradients(self, grads_and_vars, *args, **kwargs):
            return super().apply_gradients([(tf.convert_to_tensor(g), v) for g, v in grads_and_vars],
                                           *args, **kwargs)

    x, y = _data(2)
    weights = []
    for opt in (sparseopt_tf.legacy.Adam(0.01, sparse_mode="exact"), DenseLegacyAdam(0.01)):
        tf_keras.utils.set_random_seed(0)
        ids = tf_keras.Input(shape=(LOOKUPS,), dtype="int32")
        if isinstance(opt, sparseopt_tf.legacy.Optimizer):
            emb = sparseopt_tf.legacy.Embedding(ROWS, DIM, optimizer=opt)
        else:
            emb = tf_keras.layers.Embedding(ROWS, DIM)
        model = tf_keras.Model(ids, tf_keras.layers.Dense(1)(tf_keras.layers.Flatten()(emb(ids))))
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0,
                  callbacks=[sparseopt_tf.legacy.ExactFlush()])
        weights.append([w.numpy() for w in model.trainable_weights])
    for a, b in zip(*weights):
        rel_close(a, b, np.float32)


# ---------------------------------------------------- every optimizer, custom loops

def _sparse_steps(rng, num_rows, width, steps):
    """Random subsets of rows with repeats; one step touches no row at all."""
    out = []
    for t in range(steps):
        k = 0 if t == 3 else int(rng.integers(1, 6))
        idx = rng.integers(0, num_rows, k)
        out.append((rng.normal(size=(k, width)).astype(np.float32), idx))
    return out


def _reference(case, legacy, init, dense_grads):
    """The real Keras optimizer on the dense gradients (the core's dense step where Keras
    has no such optimizer)."""
    module = tf_keras.optimizers.legacy if legacy else keras.optimizers
    if case.keras is None or not hasattr(module, case.keras):
        return core_dense_run(case, init, dense_grads, legacy=legacy)
    var = tf.Variable(init)
    opt = getattr(module, case.keras)(**case.kwargs)
    for g in dense_grads:
        opt.apply_gradients([(tf.constant(g), var)])
    return var.numpy()


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("legacy", [False, True], ids=["keras3", "legacy"])
@pytest.mark.parametrize("case", BRIDGED)
def test_exact_mode_equals_dense_keras_for_every_optimizer(case, legacy, mode):
    """Sparse steps with a short history (the ring forces intermediate flushes); then
    ``catch_up`` brings given rows to the dense result, and ``flush`` every row."""
    rng = np.random.default_rng(5)
    rows, width, steps = 12, 3, 12
    init = rng.normal(size=(rows, width)).astype(np.float32)
    batches = _sparse_steps(rng, rows, width, steps)
    var = tf.Variable(init)
    opt = bridge_class(case, legacy)(sparse_mode="exact", exact_history=8, **case.kwargs)

    def step(values, indices):
        opt.apply_gradients([(tf.IndexedSlices(values, indices, [rows, width]), var)])
    step = tf.function(step) if mode == "function" else step
    for values, idx in batches:
        step(tf.constant(values), tf.constant(idx, tf.int64))
    dense = []
    for values, idx in batches:
        g = np.zeros_like(init)
        np.add.at(g, idx, values)
        dense.append(g)
    expected = _reference(case, legacy, init, dense)
    # Rows touched before the last two steps but not in them are behind until caught up.
    stale = np.setdiff1d(np.concatenate([i for _, i in batches[:-2]]),
                         np.concatenate([i for _, i in batches[-2:]]))
    assert stale.size >= 3

    def catch_up(ids):
        opt.catch_up(var, ids)          # (a tf.function runs the returned op: it is stateful)
    catch_up = tf.function(catch_up) if mode == "function" else catch_up
    catch_up(tf.constant(np.repeat(stale[:3], 2)))
    rel_close(var.numpy()[stale[:3]], expected[stale[:3]], np.float32)

    def flush():
        opt.flush()
    (tf.function(flush) if mode == "function" else flush)()
    rel_close(var.numpy(), expected, np.float32)


def test_embedding_lookup_catches_up_then_gathers_and_keeps_the_gradient_sparse():
    """In a tf.function the gather reads after the catch-up (a control dependency on it),
    and the table's gradient is an IndexedSlices."""
    table = tf.Variable(np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32))
    opt = sparseopt_tf.Adam(0.1, sparse_mode="exact")
    opt.build([table])

    @tf.function
    def lookup(ids):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(sparseopt_tf.embedding_lookup(table, ids, opt))
        return tape.gradient(loss, table)

    grad = lookup(tf.constant([3, 7, 3]))
    assert isinstance(grad, tf.IndexedSlices)
    graph = lookup.get_concrete_function(tf.TensorSpec([None], tf.int32)).graph
    gather = next(op for op in graph.get_operations() if op.type == "GatherV2")
    assert any("sparseopt_catch_up" in op.name for op in _ancestors(gather))


def _ancestors(op):
    """Every op ``op`` waits for, through data inputs and control dependencies."""
    seen, todo = set(), [op]
    while todo:
        current = todo.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def test_embedding_layer_in_a_custom_loop_uses_the_given_optimizer():
    """Outside ``fit`` (no compiled optimizer), ``optimizer=`` tells the layer whom to ask."""
    x, y = _data(3, n=96)
    results = []
    for exact in (True, False):
        keras.utils.set_random_seed(0)
        opt = (sparseopt_tf.Adam(0.01, sparse_mode="exact") if exact
               else _dense_keras("Adam", learning_rate=0.01))
        emb = sparseopt_tf.Embedding(ROWS, DIM, optimizer=opt if exact else None)
        head = keras.layers.Dense(1)
        model = keras.Sequential([keras.Input((LOOKUPS,), dtype="int32"), emb, keras.layers.Flatten(), head])
        opt.build(model.trainable_variables)

        @tf.function
        def step(ids, target, model=model, opt=opt):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((model(ids) - target) ** 2)
            opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

        for i in range(0, 96, 32):
            step(tf.constant(x[i:i + 32]), tf.constant(y[i:i + 32]))
        if exact:
            opt.flush()
        results.append([w.numpy() for w in model.weights])
    for a, b in zip(*results):
        rel_close(a, b, np.float32)


def test_catch_ups_and_exact_steps_write_in_place_in_o_of_the_rows():
    """The forward pass's catch-up hands the table over as a step does: under ``fit`` the
    table's buffer never moves (TensorFlow made no copy), and eagerly a catch-up and a
    step allocate nothing of the table's size (a 25.6 MB table)."""
    import tracemalloc

    from tests.tf.test_handover import DIM as WIDE, ROWS as MANY, _address
    keras.utils.set_random_seed(0)
    ids = keras.Input(shape=(2,), dtype="int32")
    emb = sparseopt_tf.Embedding(MANY, WIDE)
    model = keras.Model(ids, keras.layers.Dense(1)(keras.layers.Flatten()(emb(ids))))
    model.compile(optimizer=sparseopt_tf.Adam(0.01, sparse_mode="exact"), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.integers(0, MANY, (256, 2)).astype(np.int32)
    y = rng.normal(size=(256, 1)).astype(np.float32)
    model.fit(x[:64], y[:64], batch_size=64, verbose=0)          # trace, compile, build
    addresses = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            addresses.append(_address(emb.embeddings.value))

    model.fit(x, y, batch_size=64, verbose=0, callbacks=[Record()])
    assert len(addresses) == 4 and len(set(addresses)) == 1

    table = emb.embeddings.value
    opt = model.optimizer
    grad = tf.IndexedSlices(tf.ones((8, WIDE)), tf.constant(x[:4].reshape(-1)), [MANY, WIDE])
    opt.apply([grad, tf.zeros((2 * WIDE, 1)), tf.zeros((1,))], model.trainable_variables)
    assert opt._host.exact.pending()                         # the catch-up below has work
    tracemalloc.start()
    opt.catch_up(table, tf.constant(x[4:8].reshape(-1)))
    opt.apply([grad, tf.zeros((2 * WIDE, 1)), tf.zeros((1,))], model.trainable_variables)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < MANY * WIDE * 4 // 20, peak
    assert _address(table) == addresses[0]


# ------------------------------------------------------------- flush, save, load

def _trained_with_rows_behind(embedding=sparseopt_tf.Embedding, seed=4):
    """A model trained by ``train_on_batch`` (no end-of-fit flush): rows are behind."""
    model = _keras_model(embedding)
    model.compile(optimizer=sparseopt_tf.Adam(0.01, sparse_mode="exact"), loss="mse")
    x, y = _data(seed, n=64)
    for i in range(0, 64, 16):
        model.train_on_batch(x[i:i + 16], y[i:i + 16])
    assert model.optimizer._host.exact.pending()
    return model


def _continue(model, seed=9):
    x, y = _data(seed, n=64)
    for i in range(0, 64, 16):
        model.train_on_batch(x[i:i + 16], y[i:i + 16])
    model.optimizer.flush()
    return [w.numpy() for w in model.weights] + model.optimizer.get_weights()


def _fresh():
    model = _keras_model(sparseopt_tf.Embedding)
    model.compile(optimizer=sparseopt_tf.Adam(0.01, sparse_mode="exact"), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def _assert_saved_flushed(model, restored):
    """``restored`` holds what was saved. Flushed now, ``model`` holds its current values:
    equal values prove that the save wrote flushed state."""
    model.optimizer.flush()
    for a, b in zip(model.weights + model.optimizer.variables, restored.weights + restored.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_checkpoint_saves_flushed_state_and_continues_identically(tmp_path):
    model = _trained_with_rows_behind()
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(tmp_path / "ckpt"))
    fresh = _fresh()
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).read(path).assert_consumed()
    _assert_saved_flushed(model, fresh)
    for a, b in zip(_continue(model), _continue(fresh)):
        np.testing.assert_array_equal(a, b)


def test_restoring_into_an_optimizer_with_rows_behind_starts_them_current(tmp_path):
    """A rollback: the restored values are flushed state, so the rows behind at restore
    time must not be caught up again over them."""
    model = _trained_with_rows_behind()
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(tmp_path / "ckpt"))
    fresh = _fresh()
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).read(path)
    x, y = _data(6, n=32)
    model.train_on_batch(x[:16], y[:16])
    model.train_on_batch(x[16:], y[16:])
    assert model.optimizer._host.exact.pending()
    tf.train.Checkpoint(model=model, optimizer=model.optimizer).read(path)
    for a, b in zip(_continue(model), _continue(fresh)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("embedding", [sparseopt_tf.Embedding, keras.layers.Embedding],
                         ids=["sparseopt_embedding", "keras_embedding"])
def test_keras_file_saves_flushed_state_and_continues_identically(embedding, tmp_path):
    """``model.save`` writes current tables whichever layer holds them (the optimizer's
    config, written first, flushes); the loaded exact-mode optimizer continues identically."""
    model = _trained_with_rows_behind(embedding)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.optimizer.sparse_mode == "exact" and type(loaded.get_layer("emb")) is embedding
    _assert_saved_flushed(model, loaded)
    for a, b in zip(_continue(model), _continue(loaded)):
        np.testing.assert_array_equal(a, b)


def test_save_weights_of_the_layer_flushes_first(tmp_path):
    """``save_weights`` writes no config: ``sparseopt_tf.Embedding`` flushes before it
    saves its table."""
    model = _trained_with_rows_behind()
    model.save_weights(tmp_path / "m.weights.h5")
    fresh = _fresh()
    fresh.load_weights(tmp_path / "m.weights.h5")
    _assert_saved_flushed(model, fresh)


def test_weights_round_trip_and_config():
    model = _trained_with_rows_behind()
    weights = model.optimizer.get_weights()                   # flushes (tested above)
    assert not model.optimizer._host.exact.pending()
    config = model.optimizer.get_config()
    assert config["sparse_mode"] == "exact" and config["exact_history"] == 1024
    clone = _keras_model(sparseopt_tf.Embedding)
    clone.compile(optimizer=sparseopt_tf.Adam.from_config(config), loss="mse")
    clone.optimizer.build(clone.trainable_variables)
    clone.set_weights(model.get_weights())
    clone.optimizer.set_weights(weights)
    for a, b in zip(_continue(model), _continue(clone)):
        np.testing.assert_array_equal(a, b)
    legacy = sparseopt_tf.legacy.SGD(0.1, momentum=0.9, sparse_mode="exact", exact_history=16)
    again = sparseopt_tf.legacy.SGD.from_config(legacy.get_config())
    assert (again.sparse_mode, again.exact_history) == ("exact", 16)


def test_legacy_checkpoint_round_trip_and_rollback_continue_identically(tmp_path):
    rng = np.random.default_rng(7)
    init = rng.normal(size=(30, 4)).astype(np.float32)
    batches = [(rng.normal(size=(5, 4)).astype(np.float32), rng.integers(0, 30, 5)) for _ in range(10)]

    def train(opt, var, part):
        for values, idx in part:
            opt.apply_gradients([(tf.IndexedSlices(values, tf.constant(idx), [30, 4]), var)])

    var, opt = tf.Variable(init), sparseopt_tf.legacy.Adam(0.01, sparse_mode="exact")
    train(opt, var, batches[:5])
    assert opt._host.exact.pending()
    path = tf.train.Checkpoint(var=var, optimizer=opt).write(str(tmp_path / "ckpt"))
    var2, opt2 = tf.Variable(tf.zeros_like(init)), sparseopt_tf.legacy.Adam(0.01, sparse_mode="exact")
    tf.train.Checkpoint(var=var2, optimizer=opt2).read(path)
    np.testing.assert_array_equal(var.numpy(), var2.numpy())  # saved after a flush
    train(opt, var, batches[5:8])
    assert opt._host.exact.pending()
    tf.train.Checkpoint(var=var, optimizer=opt).read(path)    # a rollback over rows behind
    train(opt, var, batches[5:])
    train(opt2, var2, batches[5:])
    opt.flush()
    opt2.flush()
    np.testing.assert_array_equal(var.numpy(), var2.numpy())
    for name in ("m", "v"):
        np.testing.assert_array_equal(opt.get_slot(var, name).numpy(), opt2.get_slot(var2, name).numpy())


def test_exact_flush_flushes_before_evaluation_and_prediction():
    """A plain ``keras.layers.Embedding`` does not catch up: evaluation and prediction read
    current rows only after ``ExactFlush`` (the reference: the same model flushed);
    ``sparseopt_tf.Embedding`` catches up the rows it reads by itself."""
    x, y = _data(8, n=64)
    reference = _trained_with_rows_behind(keras.layers.Embedding)
    reference.optimizer.flush()
    want_loss, want_pred = reference.evaluate(x, y, verbose=0), reference.predict(x, verbose=0)

    plain = _trained_with_rows_behind(keras.layers.Embedding)
    stale_loss = plain.evaluate(x, y, verbose=0)
    assert abs(stale_loss - want_loss) > 1e-5 * abs(want_loss)   # rows behind: not dense training
    assert plain.evaluate(x, y, verbose=0, callbacks=[sparseopt_tf.ExactFlush()]) == want_loss
    plain = _trained_with_rows_behind(keras.layers.Embedding)
    np.testing.assert_array_equal(plain.predict(x, verbose=0, callbacks=[sparseopt_tf.ExactFlush()]),
                                  want_pred)

    ours = _trained_with_rows_behind(sparseopt_tf.Embedding)
    ours_reference = _trained_with_rows_behind(sparseopt_tf.Embedding)
    ours_reference.optimizer.flush()
    rel_close(ours.evaluate(x, y, verbose=0), ours_reference.evaluate(x, y, verbose=0), np.float32)
    rel_close(ours.predict(x, verbose=0), ours_reference.predict(x, verbose=0), np.float32)


def test_a_prediction_traced_before_training_still_reads_current_rows():
    """``predict`` traced before ``fit``: the layer builds the optimizer then, so the traced
    function holds the catch-up that later calls need."""
    x, y = _data(10, n=64)
    model = _keras_model(sparseopt_tf.Embedding)
    model.compile(optimizer=sparseopt_tf.Adam(0.01, sparse_mode="exact"), loss="mse")
    model.predict(x, verbose=0)
    assert model.optimizer.built
    for i in range(0, 64, 16):
        model.train_on_batch(x[i:i + 16], y[i:i + 16])
    assert model.optimizer._host.exact.pending()
    stale = model.predict(x, verbose=0)
    model.optimizer.flush()
    np.testing.assert_array_equal(stale, model.predict(x, verbose=0))


# ---------------------------------------------------------------------- errors

@pytest.mark.parametrize("legacy", [False, True], ids=["keras3", "legacy"])
def test_exact_mode_refuses_a_non_mirroring_strategy_before_writing(legacy):
    """Exact mode runs under the mirroring strategies (tests/tf/test_distribute.py); under
    another, whose replicas do not each hold the tables, it is refused."""
    module = sparseopt_tf.legacy if legacy else sparseopt_tf
    strategy = tf.distribute.experimental.CentralStorageStrategy(["/cpu:0"])
    with strategy.scope():
        var = tf.Variable(tf.ones((6, 2)))
        opt = module.Adam(0.1, sparse_mode="exact")
    grad = tf.IndexedSlices(tf.ones((1, 2)), tf.constant([2]), [6, 2])
    with pytest.raises(sparseopt_tf.ExactModeNotSupportedError,     # (the legacy name is "Adam")
                       match=r"(?i)adam(_\d+)?: sparse_mode='exact' cannot run under CentralStorageStrategy"):
        strategy.run(lambda: opt.apply_gradients([(grad, var)]))
    np.testing.assert_array_equal(var.numpy(), np.ones((6, 2)))
    assert int(opt.iterations.numpy()) == 0


def test_xla_is_refused_with_the_optimizer_named():
    table = tf.Variable(tf.zeros((10, 2)))
    opt = sparseopt_tf.Adam(sparse_mode="exact")
    opt.build([table])

    @tf.function(jit_compile=True)
    def lookup(ids):
        return sparseopt_tf.embedding_lookup(table, ids, opt)

    with pytest.raises(Exception, match=r"adam(_\d+)?: .*XLA cannot compile.*jit_compile=False"):
        lookup(tf.constant([1]))


def test_catch_up_errors_name_the_problem_and_write_nothing():
    table, other = tf.Variable(tf.zeros((10, 2))), tf.Variable(tf.zeros((3, 2)))
    opt = sparseopt_tf.Adam(0.1, sparse_mode="exact")

    @tf.function(autograph=False)          # (autograph would re-raise as its StagingError)
    def lookup(ids):
        return sparseopt_tf.embedding_lookup(table, ids, opt)

    with pytest.raises(so.errors.UnknownSlotError, match=r"adam(_\d+)?: catch_up in a tf.function needs the "
                                                         r"optimizer built"):
        lookup(tf.constant([1]))
    opt.build([table])
    opt.apply_gradients([(tf.IndexedSlices(tf.ones((1, 2)), tf.constant([1]), [10, 2]), table)])
    opt.apply_gradients([(tf.IndexedSlices(tf.ones((1, 2)), tf.constant([2]), [10, 2]), table)])
    before = [table.numpy()] + [opt.get_slot(table, n).numpy() for n in ("m", "v")]
    with pytest.raises(so.errors.IndexOutOfRangeError, match=r"indices must lie in \[0, 10\); got 10"):
        opt.catch_up(table, tf.constant([1, 10]))
    with pytest.raises(so.errors.UnknownSlotError, match="has no slots"):
        opt.catch_up(other, tf.constant([0]))
    after = [table.numpy()] + [opt.get_slot(table, n).numpy() for n in ("m", "v")]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("legacy", [False, True], ids=["keras3", "legacy"])
def test_bad_exact_arguments_are_refused(legacy):
    module = sparseopt_tf.legacy if legacy else sparseopt_tf
    with pytest.raises(so.errors.HyperparameterError, match="sparse_mode must be one of"):
        module.Adam(sparse_mode="eager")
    with pytest.raises(so.errors.HyperparameterError, match="exact_history must be an int >= 2"):
        module.Adam(sparse_mode="exact", exact_history=1)
