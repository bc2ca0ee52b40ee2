"""sparseopt_tf.legacy.<Name> (Keras 2 OptimizerV2) against tf_keras.optimizers.legacy.<Name>."""

import pytest

tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")

import numpy as np  # noqa: E402

import sparseopt as so  # noqa: E402
import sparseopt_tf  # noqa: E402
from tests.optimizer_table import CASES, IDS  # noqa: E402
from tests.tf.helpers import BRIDGED, bridge_class, core_dense_run, rel_close, sparse_batches  # noqa: E402

STEPS = 20


def _run(opt, var, grads, mode):
    def step(g):
        opt.apply_gradients([(g, var)])
    if mode == "function":
        step = tf.function(step)
    for g in grads:
        step(g)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("case", BRIDGED)
def test_dense_matches_tf_keras_legacy(case, mode):
    rng = np.random.default_rng(0)
    init = rng.normal(size=(11, 4)).astype(np.float32)
    grads = [tf.constant(rng.normal(size=init.shape).astype(np.float32)) for _ in range(STEPS)]
    ours, theirs = tf.Variable(init), tf.Variable(init)
    opt = bridge_class(case, legacy=True)(**case.kwargs)
    assert isinstance(opt, tf_keras.optimizers.legacy.Optimizer)
    _run(opt, ours, grads, mode)
    if case.keras is None or not hasattr(tf_keras.optimizers.legacy, case.keras):
        # No tf_keras class (RowwiseAdagrad, Lion, AdamW): the core is the reference.
        rel_close(ours.numpy(), core_dense_run(case, init, grads, legacy=True), np.float32)
        return
    _run(getattr(tf_keras.optimizers.legacy, case.keras)(**case.kwargs), theirs, grads, mode)
    rel_close(ours.numpy(), theirs.numpy(), np.float32)


@pytest.mark.parametrize("case", BRIDGED)
def test_sparse_is_lazy_and_matches_core(case):
    rng = np.random.default_rng(2)
    init = rng.normal(size=(30, 3)).astype(np.float32)
    var, core_var = tf.Variable(init), init.copy()
    opt = bridge_class(case, legacy=True)(**case.kwargs)
    # The lazy reference: the core with the same (legacy) math.
    core_opt = case.make(_legacy=True) if getattr(case.cls, "_has_legacy_math", False) else case.make()

    @tf.function
    def step(values, indices):
        opt.apply_gradients([(tf.IndexedSlices(values, indices, [30, 3]), var)])

    for values, idx in sparse_batches(rng, 20, 3, STEPS, k=5):
        step(tf.constant(values), tf.constant(idx))
        core_opt.apply_gradients([(so.IndexedSlices(values, idx), core_var)])
    np.testing.assert_array_equal(var.numpy()[20:], init[20:])
    rel_close(var.numpy(), core_var, np.float32)
    for name in core_opt.get_slot_names():
        rel_close(opt.get_slot(var, name).numpy(), core_opt.get_slot(core_var, name), np.float32)


@pytest.mark.parametrize("kwargs", [dict(clipnorm=0.5), dict(clipvalue=0.1), dict(global_clipnorm=0.3),
                                    dict(decay=0.1)])
def test_gradient_processing_and_decay_match(kwargs):
    rng = np.random.default_rng(5)
    init = rng.normal(size=(6, 3)).astype(np.float32)
    grads = [tf.constant(rng.normal(size=init.shape).astype(np.float32)) for _ in range(5)]
    ours, theirs = tf.Variable(init), tf.Variable(init)
    _run(sparseopt_tf.legacy.Adam(0.05, **kwargs), ours, grads, "function")
    _run(tf_keras.optimizers.legacy.Adam(0.05, **kwargs), theirs, grads, "function")
    rel_close(ours.numpy(), theirs.numpy(), np.float32)


def test_callables_schedules_aggregator_transformers_constraints():
    calls = []

    def transformer(grads_and_vars):
        calls.append("transformer")
        return [(g * 2.0, v) for g, v in grads_and_vars]

    def aggregator(grads_and_vars):
        calls.append("aggregator")
        return grads_and_vars

    schedule = tf_keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    beta_1 = tf.Variable(0.8)
    kw = dict(learning_rate=schedule, beta_1=lambda: beta_1, gradient_aggregator=aggregator,
              gradient_transformers=[transformer])
    init = np.ones((4, 2), np.float32)
    ours = tf.Variable(init, constraint=lambda w: tf.clip_by_value(w, 0.95, 2.0))
    theirs = tf.Variable(init, constraint=lambda w: tf.clip_by_value(w, 0.95, 2.0))
    for opt, var in ((sparseopt_tf.legacy.Adam(**kw), ours), (tf_keras.optimizers.legacy.Adam(**kw), theirs)):
        for i in range(4):
            opt.apply_gradients([(tf.fill((4, 2), 0.1 * (i + 1)), var)])
    assert calls.count("aggregator") == 8 and calls.count("transformer") == 8
    rel_close(ours.numpy(), theirs.numpy(), np.float32)
    assert ours.numpy().min() >= 0.95


def test_unaggregated_gradients_and_minimize():
    var = tf.Variable([1.0, 2.0])
    opt = sparseopt_tf.legacy.SGD(0.1)
    opt.apply_gradients([(tf.constant([1.0, 1.0]), var)], experimental_aggregate_gradients=False)
    np.testing.assert_allclose(var.numpy(), [0.9, 1.9])
    opt.minimize(lambda: tf.reduce_sum(var * var), var_list=lambda: [var])
    np.testing.assert_allclose(var.numpy(), [0.9 - 0.18, 1.9 - 0.38], rtol=1e-6)
    assert int(opt.iterations.numpy()) == 2


def test_get_updates_in_a_graph():
    with tf.Graph().as_default():
        var = tf.compat.v1.Variable([1.0, 2.0], use_resource=True)
        loss = tf.reduce_sum(var * var)
        opt = sparseopt_tf.legacy.SGD(0.1)
        assert len(opt.get_gradients(loss, [var])) == 1
        updates = opt.get_updates(loss, [var])
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            sess.run(updates)
            np.testing.assert_allclose(sess.run(var), [0.8, 1.6], rtol=1e-6)


def test_tf_keras_model_fit_with_embedding():
    """tf_keras Embedding reads rows with ResourceGather (copy-on-read variables): still in place."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, size=(64, 3)).astype(np.int32)
    y = rng.normal(size=(64, 1)).astype(np.float32)
    results = []
    for run_eagerly in (False, True):
        tf_keras.utils.set_random_seed(0)
        model = tf_keras.Sequential([tf_keras.layers.Embedding(40, 4, input_length=3),
                                     tf_keras.layers.Flatten(), tf_keras.layers.Dense(1)])
        model.build((None, 3))
        init = model.layers[0].embeddings.numpy()
        model.compile(optimizer=sparseopt_tf.legacy.Adam(0.01), loss="mse", run_eagerly=run_eagerly)
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        table = model.layers[0].embeddings.numpy()
        np.testing.assert_array_equal(table[20:], init[20:])
        assert not np.array_equal(table[:20], init[:20])
        results.append([w.numpy() for w in model.trainable_weights])
    for a, b in zip(*results):
        rel_close(a, b, np.float32)


@pytest.mark.parametrize("mode", ["eager", "function"])
def test_adagrad_epsilon_placement_differs_between_legacy_and_keras3(mode):
    """tf_keras' legacy Adagrad divides by sqrt(acc) + epsilon, Keras 3's by sqrt(acc + epsilon).

    With an empty accumulator and a large epsilon the two differ by far more than the
    tolerance; each bridge class follows its own reference (dense and sparse).
    """
    import keras
    rng = np.random.default_rng(6)
    init = rng.normal(size=(7, 3)).astype(np.float32)
    grads = [rng.normal(size=init.shape).astype(np.float32) for _ in range(STEPS)]
    kwargs = dict(learning_rate=0.1, initial_accumulator_value=0.0, epsilon=0.5)
    results = {}
    for key, opt in (("legacy", sparseopt_tf.legacy.Adagrad(**kwargs)),
                     ("tf_keras", tf_keras.optimizers.legacy.Adagrad(**kwargs)),
                     ("keras3", sparseopt_tf.Adagrad(**kwargs)),
                     ("keras", keras.optimizers.Adagrad(**kwargs))):
        var = tf.Variable(init)
        _run(opt, var, [tf.constant(g) for g in grads], mode)
        results[key] = var.numpy()
    rel_close(results["legacy"], results["tf_keras"], np.float32)
    rel_close(results["keras3"], results["keras"], np.float32)
    assert np.max(np.abs(results["legacy"] - results["keras3"])) > 1e-2
    # The sparse path runs the same legacy rule: rows touched every step follow tf_keras' dense update.
    var, theirs = tf.Variable(init), tf.Variable(init)
    opt, ref = sparseopt_tf.legacy.Adagrad(**kwargs), tf_keras.optimizers.legacy.Adagrad(**kwargs)
    for g in grads:
        opt.apply_gradients([(tf.IndexedSlices(tf.constant(g), tf.range(7), [7, 3]), var)])
        ref.apply_gradients([(tf.constant(g), theirs)])
    rel_close(var.numpy(), theirs.numpy(), np.float32)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("case", BRIDGED)
def test_one_hand_over_per_step_bit_identical_to_one_per_variable(case, mode):
    """The legacy classes hand all of a step's variables to the kernels in one
    ``numpy_function`` (one per device and dtype); a subclass that overrides
    ``_resource_apply_dense`` (an OptimizerV2 hook) gets tf_keras' per-variable calls.
    Both give the same bits."""
    from sparseopt_tf import _handover
    rng = np.random.default_rng(5)
    init = [rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)]
    batches = sparse_batches(rng, 8, 3, 4, k=5)
    dense = [rng.normal(size=(4,)).astype(np.float32) for _ in range(4)]
    base = bridge_class(case, legacy=True)
    calls = []

    class PerVariable(base):
        def _resource_apply_dense(self, grad, var, apply_state=None):
            calls.append(var.name)
            return super()._resource_apply_dense(grad, var, apply_state)

    results, hand_overs = [], []
    for cls in (base, PerVariable):
        variables = [tf.Variable(x) for x in init]
        opt = cls(**case.kwargs)

        def step(values, indices, g):
            opt.apply_gradients([(tf.IndexedSlices(values, indices, tf.constant([8, 3], tf.int64)),
                                  variables[0]), (g, variables[1])])

        if mode == "function":
            step = tf.function(step)
        before = sum(_handover.stats.values())
        for (values, idx), g in zip(batches, dense):
            step(tf.constant(values), tf.constant(idx), tf.constant(g))
        hand_overs.append(sum(_handover.stats.values()) - before)
        assert int(opt.iterations.numpy()) == 4
        results.append([v.numpy() for v in variables])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    assert hand_overs == [4, 8]
    assert len(calls) == 4 if mode == "eager" else calls     # in a tf.function: when traced


@pytest.mark.parametrize("name", ["sgd_momentum", "adam", "rowwise_adagrad"])
def test_weight_decay_is_applied_as_the_core_applies_it(name):
    """tf_keras' legacy classes take no ``weight_decay`` (a TypeError); ours take it for every
    optimizer, as Keras 3 does, decoupled: a dense and a sparse step equal the core's with the
    same ``weight_decay`` (the core: ``p -= p * f32(weight_decay) * lr``, tests/test_optimizers.py),
    bit for bit, and ``get_config`` keeps it. (It was dropped silently, AdamW's aside.)"""
    case = CASES[IDS.index(name)]
    legacy = {"_legacy": True} if getattr(case.cls, "_has_legacy_math", False) else {}
    rng = np.random.default_rng(4)
    init = rng.normal(size=(12, 3)).astype(np.float32)
    dense = rng.normal(size=init.shape).astype(np.float32)
    values, idx = rng.normal(size=(4, 3)).astype(np.float32), np.array([1, 5, 5, 9])

    def core_run(**extra):
        out = init.copy()
        core_opt = case.make(**legacy, **extra)
        core_opt.apply_gradients([(dense, out)])
        core_opt.apply_gradients([(so.IndexedSlices(values, idx), out)])
        return out

    var = tf.Variable(init)
    opt = bridge_class(case, legacy=True)(**case.kwargs, weight_decay=0.004)
    opt.apply_gradients([(tf.constant(dense), var)])
    opt.apply_gradients([(tf.IndexedSlices(tf.constant(values), tf.constant(idx), [12, 3]), var)])
    np.testing.assert_array_equal(var.numpy(), core_run(weight_decay=0.004))
    assert not np.array_equal(var.numpy(), core_run())      # the decay moved the weights
    assert opt.get_config()["weight_decay"] == 0.004
    assert type(opt).from_config(opt.get_config()).weight_decay == 0.004
