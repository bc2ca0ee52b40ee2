"""The path a Keras user takes first (README quick start, ``examples/recommender_keras.py``).

``sparseopt_tf.Adam(sparse_mode="exact")`` with ``sparseopt_tf.Embedding`` in ``model.fit``,
then ``model.evaluate`` / ``model.predict`` with no callback: what they return equals the
same model trained by ``keras.optimizers.Adam`` on densified gradients (dense training;
Keras 3's Adam given the ``IndexedSlices`` itself squares a batch's duplicate rows before
summing them, which is not dense training). Two mechanisms make this hold without
``ExactFlush``: ``fit`` ends with ``finalize_variable_values``, which flushes, and the
layer catches up the rows every lookup reads (also in the validation inside ``fit``,
between epochs, when rows are behind).
"""

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import numpy as np  # noqa: E402

import sparseopt_tf  # noqa: E402
from tests.tf.helpers import rel_close  # noqa: E402

USERS, ITEMS, DIM = 300, 2000, 8
LEARNING_RATE = 0.01


class DenseAdam(keras.optimizers.Adam):
    """``keras.optimizers.Adam`` given dense gradients: the reference (dense training)."""

    def apply(self, grads, trainable_variables=None):
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]
        return super().apply(grads, trainable_variables)


def _data(seed, n):
    """(user, item) pairs with labels; items Zipf-like, so batches repeat rows and most rows idle."""
    rng = np.random.default_rng(seed)
    items = np.minimum(rng.zipf(1.3, n) - 1, ITEMS - 1).astype(np.int32)
    users = rng.integers(0, USERS, n).astype(np.int32)
    y = (rng.random(n) < 0.5).astype(np.float32)
    return {"user": users, "item": items}, y


def _model(embedding, optimizer):
    """The example's recommender, small: user . item + item bias, from seeded weights."""
    keras.utils.set_random_seed(0)
    user = keras.Input(shape=(), dtype="int32", name="user")
    item = keras.Input(shape=(), dtype="int32", name="item")
    u = embedding(USERS, DIM, name="user_embedding")(user)
    v = embedding(ITEMS, DIM, name="item_embedding")(item)
    bias = keras.layers.Flatten()(embedding(ITEMS, 1, name="item_bias")(item))
    logit = keras.layers.Add()([keras.layers.Dot(axes=1)([u, v]), bias])
    model = keras.Model({"user": user, "item": item}, logit)
    model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    return model


def _exact():
    return _model(sparseopt_tf.Embedding, sparseopt_tf.Adam(LEARNING_RATE, sparse_mode="exact"))


def _dense():
    return _model(keras.layers.Embedding, DenseAdam(LEARNING_RATE))


X, Y = _data(0, 512)
X_VAL, Y_VAL = _data(1, 256)


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_evaluate_and_predict_right_after_fit_equal_dense_keras(run_eagerly):
    ours, dense = _exact(), _dense()
    ours.run_eagerly = run_eagerly
    for model in (ours, dense):
        model.fit(X, Y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    rel_close(ours.evaluate(X_VAL, Y_VAL, verbose=0), dense.evaluate(X_VAL, Y_VAL, verbose=0), np.float32)
    rel_close(ours.predict(X_VAL, verbose=0), dense.predict(X_VAL, verbose=0), np.float32)
    rel_close(ours.evaluate(X, Y, verbose=0), dense.evaluate(X, Y, verbose=0), np.float32)

    lazy = _model(keras.layers.Embedding, sparseopt_tf.Adam(LEARNING_RATE))
    lazy.fit(X, Y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    want = dense.evaluate(X_VAL, Y_VAL, verbose=0)
    assert abs(lazy.evaluate(X_VAL, Y_VAL, verbose=0) - want) > 1e-4 * want, \
        "the data must leave rows idle, or this test shows nothing"


def test_validation_inside_fit_equals_dense_keras():
    """Between epochs rows are behind (fit flushes only at its end): the validation's
    lookups catch up the rows they read."""
    ours, dense = _exact(), _dense()
    history = [m.fit(X, Y, batch_size=32, epochs=3, shuffle=False, verbose=0, validation_data=(X_VAL, Y_VAL),
                     validation_batch_size=64).history for m in (ours, dense)]
    for key in ("loss", "val_loss"):
        rel_close(history[0][key], history[1][key], np.float32)
    rel_close(ours.predict(X_VAL, verbose=0), dense.predict(X_VAL, verbose=0), np.float32)


def test_evaluate_and_predict_after_train_on_batch_read_caught_up_rows():
    """Without fit's final flush (``train_on_batch`` steps): rows stay behind, and
    ``evaluate``/``predict`` still read what dense training has."""
    ours, dense = _exact(), _dense()
    for i in range(0, 256, 32):
        for model in (ours, dense):
            model.train_on_batch({k: v[i:i + 32] for k, v in X.items()}, Y[i:i + 32])
    assert ours.optimizer._host.exact.pending()
    loss, prediction = ours.evaluate(X_VAL, Y_VAL, verbose=0), ours.predict(X_VAL, verbose=0)
    rel_close(loss, dense.evaluate(X_VAL, Y_VAL, verbose=0), np.float32)
    rel_close(prediction, dense.predict(X_VAL, verbose=0), np.float32)
    assert ours.optimizer._host.exact.pending()               # the reads caught up only their rows
    ours.optimizer.flush()
    assert ours.evaluate(X_VAL, Y_VAL, verbose=0) == loss
    np.testing.assert_array_equal(ours.predict(X_VAL, verbose=0), prediction)


def test_a_plain_keras_embedding_in_exact_mode_is_not_dense_training():
    """What the README and docs/src/exact_tf.md warn about: ``keras.layers.Embedding``
    reads rows that are behind in every forward pass, so the gradients differ from dense
    training's; evaluation right after ``fit`` reads flushed rows, but of another model."""
    plain, dense = _model(keras.layers.Embedding, sparseopt_tf.Adam(LEARNING_RATE, sparse_mode="exact")), _dense()
    for model in (plain, dense):
        model.fit(X, Y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    assert not plain.optimizer._host.exact.pending()          # fit's end flushed every row
    want = dense.evaluate(X_VAL, Y_VAL, verbose=0)                # outside the 1e-5 of the tests above
    assert abs(plain.evaluate(X_VAL, Y_VAL, verbose=0) - want) > 2e-5 * abs(want)
    with pytest.raises(AssertionError):
        rel_close(plain.get_layer("item_embedding").embeddings.numpy(),
                  dense.get_layer("item_embedding").embeddings.numpy(), np.float32)


def _fit_warnings(embedding, sparse_mode, legacy=False):
    import warnings
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50, size=(64, 2)).astype(np.int32)
    y = rng.normal(size=(64, 1)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if legacy:
            import tf_keras
            opt = sparseopt_tf.legacy.Adam(0.01, sparse_mode=sparse_mode)
            layer = (sparseopt_tf.legacy.Embedding(50, 4, input_length=2, optimizer=opt)
                     if embedding == "ours" else tf_keras.layers.Embedding(50, 4, input_length=2))
            model = tf_keras.Sequential([layer, tf_keras.layers.Flatten(), tf_keras.layers.Dense(1)])
        else:
            inputs = keras.Input((2,), dtype="int32")
            layer = (sparseopt_tf.Embedding if embedding == "ours" else keras.layers.Embedding)(50, 4)
            model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(layer(inputs))))
            opt = sparseopt_tf.Adam(0.01, sparse_mode=sparse_mode)
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    return [str(w.message) for w in caught if "caught up before they are read" in str(w.message)]


@pytest.mark.parametrize("legacy", [False, True], ids=["keras3", "legacy"])
def test_exact_mode_with_a_plain_embedding_warns_once(legacy):
    """A plain Embedding reads stale rows in exact mode (see the test above): one warning
    names the table and the fix; sparseopt_tf's Embedding, and lazy mode, give none."""
    warned = _fit_warnings("plain", "exact", legacy)
    assert len(warned) == 1 and "sparseopt_tf.Embedding" in warned[0]
    assert _fit_warnings("ours", "exact", legacy) == []
    assert _fit_warnings("plain", "lazy", legacy) == []
