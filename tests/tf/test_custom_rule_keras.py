"""A user's ``sparseopt.Rule`` in Keras 3: ``sparseopt_tf.keras_optimizer`` gives its class
the bridge's paths (``tf.function`` steps on dense and ``IndexedSlices`` gradients,
``model.fit``, ``.keras`` files), with the core class's results; and in tf_keras,
``sparseopt_tf.legacy.keras_optimizer`` its ``OptimizerV2`` class."""

import importlib.util
import pathlib

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402

import sparseopt as so  # noqa: E402
import sparseopt_tf  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "custom_optimizer", pathlib.Path(__file__).resolve().parents[2] / "examples" / "custom_optimizer.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)
KerasAdaBelief = sparseopt_tf.keras_optimizer(example.AdaBelief)


@pytest.mark.filterwarnings("ignore:.*caught up before they are read")   # read after flush()
@pytest.mark.parametrize("sparse_mode", ["lazy", "exact"])
def test_graph_steps_equal_the_core_class(sparse_mode):
    """The same dense and sparse gradients through ``tf.function`` and through the core
    class on NumPy arrays: the same kernels, the same bits."""
    rng = np.random.default_rng(0)
    table0, bias0 = rng.normal(size=(30, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)
    steps = [(rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 30, 6),
              rng.normal(size=(4,)).astype(np.float32)) for _ in range(5)]
    table, bias = tf.Variable(table0), tf.Variable(bias0)
    opt = KerasAdaBelief(learning_rate=0.01, beta_2=0.99, sparse_mode=sparse_mode)

    @tf.function
    def step(values, indices, g_bias):
        opt.apply_gradients([(tf.IndexedSlices(values, indices, tf.constant([30, 4], tf.int64)), table),
                             (g_bias, bias)])

    core_table, core_bias = table0.copy(), bias0.copy()
    core = example.AdaBelief(learning_rate=0.01, beta_2=0.99, sparse_mode=sparse_mode)
    for values, indices, g_bias in steps:
        step(tf.constant(values), tf.constant(indices), tf.constant(g_bias))
        core.apply_gradients([(so.IndexedSlices(values, indices, table0.shape), core_table), (g_bias, core_bias)])
    if sparse_mode == "exact":
        opt.flush()
        core.flush()
    np.testing.assert_array_equal(table.numpy(), core_table)
    np.testing.assert_array_equal(bias.numpy(), core_bias)
    np.testing.assert_array_equal(opt.get_config()["beta_2"], 0.99)


def test_model_fit_and_a_keras_file_continue_identically(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 50, size=(64, 3)).astype(np.int32)
    y = rng.normal(size=(64, 1)).astype(np.float32)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(50, 4),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    model.compile(optimizer=KerasAdaBelief(learning_rate=0.02), loss="mse")
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert not np.array_equal(model.get_weights()[0], before[0])
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    assert type(again.optimizer) is KerasAdaBelief and int(again.optimizer.iterations) == 4
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    again.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_only_core_optimizer_classes_are_accepted():
    with pytest.raises(TypeError, match="subclass of sparseopt.Optimizer"):
        sparseopt_tf.keras_optimizer(keras.optimizers.Adam)


def _graph_steps_equal_the_core(opt, core, seed):
    """Three ``tf.function`` steps of ``opt`` (a bridge class's optimizer) on a table's
    ``IndexedSlices`` and a kernel's dense gradient leave the same bits as ``core`` (a core
    optimizer) given the same gradients; returns the tables (bridge, core)."""
    rng = np.random.default_rng(seed)
    table0, kernel0 = rng.normal(size=(30, 4)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
    table, kernel = tf.Variable(table0), tf.Variable(kernel0)

    @tf.function
    def step(values, indices, g_kernel):
        opt.apply_gradients([(tf.IndexedSlices(values, indices, tf.constant([30, 4], tf.int64)), table),
                             (g_kernel, kernel)])

    core_table, core_kernel = table0.copy(), kernel0.copy()
    for _ in range(3):
        values, indices = rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 30, 6)
        g_kernel = rng.normal(size=(4, 3)).astype(np.float32)
        step(tf.constant(values), tf.constant(indices), tf.constant(g_kernel))
        core.apply_gradients([(so.IndexedSlices(values, indices, table0.shape), core_table), (g_kernel, core_kernel)])
    np.testing.assert_array_equal(table.numpy(), core_table)
    np.testing.assert_array_equal(kernel.numpy(), core_kernel)
    assert not np.array_equal(core_table, table0)
    return table, core_table


def test_a_rule_with_a_reduction_stage_in_a_graph_step():
    """A user's LAMB (the built-in Lamb's functions as a ``Rule`` with a reduction stage)
    through ``tf.function``: the core class's bits, dense and sparse; and no exact mode."""
    from sparseopt.rules import lamb

    def coefficients(step, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        return lamb.coefficients(learning_rate, beta_1, beta_2, epsilon, step)
    core_class = so.Rule("mylamb", lamb.SLOTS, coefficients,
                         reduction=(lamb.reduce_terms, lamb.reduce_scale, lamb.reduce_apply)).optimizer_class()
    KerasLamb = sparseopt_tf.keras_optimizer(core_class)
    _graph_steps_equal_the_core(KerasLamb(learning_rate=0.01), core_class(learning_rate=0.01), seed=1)
    with pytest.raises(so.errors.HyperparameterError, match="no sparse_mode='exact'"):
        KerasLamb(sparse_mode="exact")


def test_a_rule_with_a_row_stage_in_a_graph_step():
    """A user's rule with per-row slots (``tests/test_custom_rule.py``'s RowRMS) through
    ``tf.function``: the core class's bits, sparse and dense, and its row slot a ``(rows,)``
    Keras variable; no exact mode."""
    from tests.test_custom_rule import ROWRMS
    core_class = ROWRMS.optimizer_class("RowRMS")
    KerasRowRMS = sparseopt_tf.keras_optimizer(core_class)
    opt, core = KerasRowRMS(learning_rate=0.05, weight_decay=0.01), core_class(learning_rate=0.05, weight_decay=0.01)
    table, core_table = _graph_steps_equal_the_core(opt, core, seed=2)
    assert opt.get_slot(table, "v").shape == (30,)
    np.testing.assert_array_equal(opt.get_slot(table, "v").numpy(), core.get_slot(core_table, "v"))
    with pytest.raises(so.errors.HyperparameterError, match="no sparse_mode='exact'"):
        KerasRowRMS(sparse_mode="exact")


@pytest.mark.parametrize("sparse_mode", ["lazy", "exact"])
def test_a_rule_with_four_slots_in_a_graph_step(sparse_mode):
    """A rule with more than three slots (``tests/test_many_slots.py``'s Adan) through
    ``tf.function`` in Keras 3 and in tf_keras: the core class's bits, sparse and dense, each
    of the four slots a Keras slot variable."""
    from tests.test_many_slots import ADAN, Adan
    tf_keras = pytest.importorskip("tf_keras")
    KerasAdan = sparseopt_tf.keras_optimizer(Adan)
    opt = KerasAdan(learning_rate=0.05, sparse_mode=sparse_mode)
    core = Adan(learning_rate=0.05, sparse_mode=sparse_mode)
    table, core_table = _graph_steps_equal_the_core(opt, core, seed=4)
    for name in ADAN.slots:
        if sparse_mode == "exact":
            opt.flush()
            core.flush()
        np.testing.assert_array_equal(opt.get_slot(table, name).numpy(), core.get_slot(core_table, name))
    hypers = {k: float(np.float32(v)) for k, v in ADAN.hyperparameters.items()}
    hypers.update(learning_rate=float(np.float32(0.05)), sparse_mode=sparse_mode)
    Legacy = sparseopt_tf.legacy.keras_optimizer(Adan)
    assert issubclass(Legacy, tf_keras.optimizers.legacy.Optimizer)
    _graph_steps_equal_the_core(Legacy(learning_rate=0.05, sparse_mode=sparse_mode), Adan(**hypers), seed=5)


def test_a_rule_with_idle_steps_in_exact_mode_in_a_graph_step():
    """A user's rule with exact mode's closed form (``sparseopt.IdleSteps``: the built-in SGD's,
    ``tests/test_custom_rule.py``) through ``tf.function`` in exact mode: the core class's bits."""
    from tests.test_custom_rule import _heavy_ball_rule, _sgd_idle
    core_class = _heavy_ball_rule(_sgd_idle()).optimizer_class("HeavyBall")
    KerasHeavyBall = sparseopt_tf.keras_optimizer(core_class)
    opt = KerasHeavyBall(learning_rate=0.05, weight_decay=0.01, sparse_mode="exact")
    core = core_class(learning_rate=0.05, weight_decay=0.01, sparse_mode="exact")
    table, core_table = _graph_steps_equal_the_core(opt, core, seed=6)
    opt.flush()
    core.flush()
    np.testing.assert_array_equal(table.numpy(), core_table)


@pytest.mark.parametrize("which", ["adabelief", "rowrms"])
def test_legacy_class_of_a_rule_in_a_graph_step(which):
    """``sparseopt_tf.legacy.keras_optimizer``: the OptimizerV2 class of a user's rule (an
    elementwise one, and one with a row stage) steps as the core class does given the
    hyperparameters OptimizerV2 keeps (``_set_hyper``: float32 variables), bit for bit, on
    ``IndexedSlices`` and dense gradients in a ``tf.function``."""
    from tests.test_custom_rule import ROWRMS
    tf_keras = pytest.importorskip("tf_keras")
    core_class = example.AdaBelief if which == "adabelief" else ROWRMS.optimizer_class("RowRMS")
    Legacy = sparseopt_tf.legacy.keras_optimizer(core_class)
    assert issubclass(Legacy, tf_keras.optimizers.legacy.Optimizer) and Legacy.__name__ == core_class.__name__
    hypers = {k: float(np.float32(v)) for k, v in core_class.rule.hyperparameters.items()}
    hypers["learning_rate"] = float(np.float32(0.05))
    _graph_steps_equal_the_core(Legacy(learning_rate=0.05), core_class(**hypers), seed=3)
    with pytest.raises(TypeError, match="legacy.keras_optimizer: expected a subclass of sparseopt.Optimizer"):
        sparseopt_tf.legacy.keras_optimizer(tf_keras.optimizers.legacy.Adam)


def test_legacy_class_of_a_rule_through_model_fit_and_an_h5_file(tmp_path):
    """The legacy class of a user's rule in a tf_keras model: ``fit``, ``model.save('.h5')``
    and ``load_model`` (found by its registered name), then both continue identically."""
    tf_keras = pytest.importorskip("tf_keras")
    Legacy = sparseopt_tf.legacy.keras_optimizer(example.AdaBelief)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 50, size=(64, 3)).astype(np.int32)
    y = rng.normal(size=(64, 1)).astype(np.float32)
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([tf_keras.Input((3,), dtype="int32"), tf_keras.layers.Embedding(50, 4),
                                 tf_keras.layers.Flatten(), tf_keras.layers.Dense(1)])
    model.compile(optimizer=Legacy(learning_rate=0.02), loss="mse")
    before = model.get_weights()[0].copy()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert not np.array_equal(model.get_weights()[0], before)
    model.save(tmp_path / "m.h5")
    again = tf_keras.models.load_model(tmp_path / "m.h5")
    assert type(again.optimizer) is Legacy and int(again.optimizer.iterations) == 4
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    again.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
