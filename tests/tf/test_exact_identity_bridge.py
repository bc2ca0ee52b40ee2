"""The bridge's exact mode at lazy cost where the idle step is the identity.

``sparseopt_tf`` runs the core's exact step (:func:`sparseopt._exact.run`) through its
``ExactBook``: for Adagrad and plain SGD without weight decay the book keeps no state,
and ``model.fit`` ends with lazy mode's weights, bit for bit.
"""

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
