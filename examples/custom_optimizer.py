"""Your own optimizer in a few lines: AdaBelief as a `sparseopt.Rule`.

AdaBelief (Zhuang et al., 2020) is Adam whose second moment tracks the "belief"
`(g - m)^2` instead of `g^2`. Written once as a scalar rule, it gets every path the
built-in optimizers have: dense and row-wise sparse steps on the CPU and CUDA kernels,
`sparse_mode="lazy"` and `"exact"`, clipping, weight decay, schedules and checkpoints
(and with TensorFlow, a Keras 3 class: `sparseopt_tf.keras_optimizer(AdaBelief)`).

The script checks it against AdaBelief's formula in float64 NumPy (dense steps, and
exact mode's sparse steps, which must equal dense training), then trains a small
embedding table with sparse gradients in both sparse modes.

Run:  python examples/custom_optimizer.py
"""

import argparse
import math

import numpy as np

import sparseopt as so


def coefficients(step, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-16):
    """Once per step, on the host: the bias corrections folded into the step size."""
    return {"lr_m": learning_rate / (1.0 - beta_1 ** step),     # lr / (1 - beta_1^t)
            "v_scale": 1.0 / (1.0 - beta_2 ** step),            # 1 / (1 - beta_2^t)
            "one_minus_beta_1": 1.0 - beta_1,
            "one_minus_beta_2": 1.0 - beta_2,
            "epsilon": epsilon}


def update(p, g, m, s, c):
    """One element: the parameter, its gradient, one value per slot, the coefficients."""
    m = m + (g - m) * c.one_minus_beta_1
    belief = g - m
    s = s + (belief * belief - s) * c.one_minus_beta_2 + c.epsilon
    p = p - c.lr_m * m / (math.sqrt(s * c.v_scale) + c.epsilon)
    return p, m, s


ADABELIEF = so.Rule("adabelief", slots=("m", "s"), coefficients=coefficients, update=update)
AdaBelief = ADABELIEF.optimizer_class("AdaBelief")


def reference(p, g, m, s, t, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-16):
    """AdaBelief's algorithm, as the paper writes it, in float64 NumPy."""
    m = beta_1 * m + (1 - beta_1) * g
    s = beta_2 * s + (1 - beta_2) * (g - m) ** 2 + epsilon
    m_hat, s_hat = m / (1 - beta_1 ** t), s / (1 - beta_2 ** t)
    return p - learning_rate * m_hat / (np.sqrt(s_hat) + epsilon), m, s


def check_against_formula(rng, rows=50, width=4, steps=20):
    """Dense steps and exact-mode sparse steps against the float64 formula; returns the
    largest relative difference of each."""
    p0 = rng.normal(size=(rows, width))
    batches = [(rng.integers(0, rows, 8), rng.normal(size=(8, width))) for _ in range(steps)]
    expected, m, s = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    dense, sparse = p0.copy(), p0.copy()
    dense_opt, exact_opt = AdaBelief(learning_rate=0.01), AdaBelief(learning_rate=0.01, sparse_mode="exact")
    for t, (idx, values) in enumerate(batches, start=1):
        g = np.zeros_like(p0)
        np.add.at(g, idx, values)
        # sparseopt holds the learning rate in float32, as Keras does
        expected, m, s = reference(expected, g, m, s, t, learning_rate=float(np.float32(0.01)))
        dense_opt.apply_gradients([(g, dense)])
        exact_opt.apply_gradients([(so.IndexedSlices(values, idx, p0.shape), sparse)])
    exact_opt.flush()
    scale = np.abs(expected).max()
    return np.abs(dense - expected).max() / scale, np.abs(sparse - expected).max() / scale


def train(sparse_mode, rng_seed=0, rows=2000, width=16, steps=200, batch=256):
    """A table fitted to random targets with sparse (row-wise) gradients; returns the loss."""
    rng = np.random.default_rng(rng_seed)
    target = rng.normal(size=(rows, width)).astype(np.float32)
    table = np.zeros((rows, width), np.float32)
    opt = AdaBelief(learning_rate=0.05, sparse_mode=sparse_mode)
    for _ in range(steps):
        idx = (rng.zipf(1.3, batch) - 1) % rows
        grad = (table[idx] - target[idx]) / batch       # the gradient of a mean squared error
        opt.apply_gradients([(so.IndexedSlices(grad, idx, table.shape), table)])
    if sparse_mode == "exact":
        opt.flush()
    return float(np.mean((table - target) ** 2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    dense_error, exact_error = check_against_formula(np.random.default_rng(0))
    print(f"AdaBelief vs its float64 formula: dense {dense_error:.1e}, exact-mode sparse {exact_error:.1e}")
    assert dense_error < 1e-10 and exact_error < 1e-10
    for mode in ("lazy", "exact"):
        print(f"sparse_mode={mode!r}: final loss {train(mode, steps=args.steps):.4f}")


if __name__ == "__main__":
    main()
