"""The bridge's exact mode at lazy cost where the idle step is the identity.

``sparseopt_tf`` runs the core's exact step (:func:`sparseopt._exact.run`) through its
``ExactBook``: for Adagrad and plain SGD without weight decay the book keeps no state,
and ``model.fit`` ends with lazy mode's weights, bit for bit.
"""

import functools

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
tf_keras = pytest.importorskip("tf_keras")

import numpy as np  # noqa: E402

import sparseopt_tf  # noqa: E402
import sparseopt_tf.legacy  # noqa: E402

ROWS, DIM, LOOKUPS = 500, 8, 4


def _data(seed=0, n=192):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, ROWS, size=(n, LOOKUPS)).astype(np.int32)
    x[::7, 1] = x[::7, 0]
    return x, rng.normal(size=(n, 1)).astype(np.float32)


def _model(k, embedding):
    k.utils.set_random_seed(0)
    ids = k.Input(shape=(LOOKUPS,), dtype="int32")
    x = embedding(ROWS, DIM, name="emb")(ids)
    return k.Model(ids, k.layers.Dense(1, name="head")(k.layers.Flatten()(x)))


def _fit(k, embedding, opt):
    x, y = _data()
    model = _model(k, embedding)
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    return model


@pytest.mark.parametrize("name, kwargs", [("Adagrad", dict(learning_rate=0.1)),
                                          ("SGD", dict(learning_rate=0.05))], ids=["adagrad", "sgd"])
def test_keras3_exact_takes_the_shortcut_and_equals_lazy(name, kwargs):
    cls = getattr(sparseopt_tf, name)
    exact_opt = cls(sparse_mode="exact", **kwargs)
    exact = _fit(keras, sparseopt_tf.Embedding, exact_opt)
    lazy = _fit(keras, keras.layers.Embedding, cls(**kwargs))
    assert exact_opt._host.exact.states == {}
    for a, b in zip(exact.trainable_weights, lazy.trainable_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_keras3_exact_with_weight_decay_keeps_the_book():
    opt = sparseopt_tf.Adagrad(0.1, weight_decay=0.01, sparse_mode="exact")
    _fit(keras, sparseopt_tf.Embedding, opt)
    assert opt._host.exact.states != {}


def test_legacy_exact_takes_the_shortcut_and_equals_lazy():
    exact_opt = sparseopt_tf.legacy.Adagrad(0.1, sparse_mode="exact")
    exact = _fit(tf_keras, tf_keras.layers.Embedding, exact_opt)
    lazy = _fit(tf_keras, tf_keras.layers.Embedding, sparseopt_tf.legacy.Adagrad(0.1))
    assert exact_opt._host.exact.states == {}
    for a, b in zip(exact.trainable_weights, lazy.trainable_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _count_catch_ups(monkeypatch):
    """Count the catch-up hand-overs traced (or run eagerly) by either bridge."""
    import sparseopt_tf.optimizers as keras3_module
    calls = []
    real = keras3_module._catch_up

    def counting(host, job, refs, indices, name):
        calls.append(job.name)
        return real(host, job, refs, indices, name)

    monkeypatch.setattr(keras3_module, "_catch_up", counting)
    monkeypatch.setattr(sparseopt_tf.legacy, "_catch_up", counting)
    return calls


def _keras3_embedding(opt):
    return sparseopt_tf.Embedding


def _legacy_embedding(opt):           # tf_keras does not tell a layer its model: given here
    return functools.partial(sparseopt_tf.legacy.Embedding, optimizer=opt)


@pytest.mark.parametrize("k, embedding, cls", [
    (keras, _keras3_embedding, sparseopt_tf.Adagrad),
    (tf_keras, _legacy_embedding, sparseopt_tf.legacy.Adagrad)], ids=["keras3", "legacy"])
def test_traced_lookups_leave_out_the_catch_up_where_the_idle_step_is_the_identity(
        monkeypatch, k, embedding, cls):
    """Adagrad without weight decay: ``model.fit``'s traced lookups hand nothing over (no
    catch-up op at all) and the model equals lazy mode's bit for bit; with weight decay
    (the idle step shrinks rows) the lookups keep their catch-up."""
    calls = _count_catch_ups(monkeypatch)
    opt = cls(0.1, sparse_mode="exact")
    exact = _fit(k, embedding(opt), opt)
    assert calls == []
    opt = cls(0.1)
    lazy = _fit(k, embedding(opt), opt)
    for a, b in zip(exact.trainable_weights, lazy.trainable_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    opt = cls(0.1, weight_decay=0.01, sparse_mode="exact")
    _fit(k, embedding(opt), opt)
    assert calls and set(calls) == {"emb/embeddings:0"}


def test_a_hyperparameter_tensor_keeps_the_catch_up(monkeypatch):
    """``epsilon`` as a variable may change after tracing: not decided while tracing."""
    calls = _count_catch_ups(monkeypatch)
    _fit(keras, sparseopt_tf.Embedding,
         sparseopt_tf.Adagrad(0.1, epsilon=tf.Variable(1e-7, dtype=tf.float64), sparse_mode="exact"))
    assert calls


def test_rows_left_behind_by_another_function_are_brought_current():
    """A function traced without the catch-up (no weight decay: each traced step bakes in
    the weight decay it was traced with, as Keras' do) and another traced after weight
    decay was set share the optimizer: after each step of the second every row is brought
    current (with a warning), so the first function's lookups read what they read where
    the catch-up is kept (``epsilon`` as a variable of the same value: not decided while
    tracing)."""
    def run(epsilon):
        table = keras.Variable(np.random.default_rng(1).normal(size=(ROWS, DIM)).astype(np.float32),
                               name="table")
        opt = sparseopt_tf.Adagrad(0.1, epsilon=epsilon, sparse_mode="exact")
        opt.build([table])
        ids = np.random.default_rng(2).integers(0, ROWS, size=(6, 16)).astype(np.int32)

        def step(i):
            with tf.GradientTape() as tape:
                rows = sparseopt_tf.embedding_lookup(table, tf.gather(ids, i), opt)
                loss = tf.reduce_sum(rows * rows)
            opt.apply_gradients([(tape.gradient(loss, table), table)])
            return loss

        plain = tf.function(step)
        plain(tf.constant(0))                        # traced with weight decay 0
        opt.weight_decay = 0.05
        decayed = tf.function(step)
        losses = [decayed(tf.constant(1)), decayed(tf.constant(2)), plain(tf.constant(3)),
                  plain(tf.constant(4))]
        opt.flush()
        return [float(x) for x in losses], table.numpy()

    with pytest.warns(UserWarning, match="rows of .* behind"):
        skipped_losses, skipped_table = run(1e-7)
    kept_losses, kept_table = run(tf.Variable(1e-7, dtype=tf.float64))
    np.testing.assert_allclose(skipped_losses, kept_losses, rtol=1e-6)
    np.testing.assert_allclose(skipped_table, kept_table, rtol=1e-6, atol=1e-7)
