"""Slow, obvious float64 NumPy references, written from the formulas (Keras 3).

Each reference takes the parameter, the dense gradient, a dict of slot arrays (all
float64, updated in place and returned), the 1-based step and the hyperparameters,
and returns the new parameter. ``tests/test_references_keras.py`` checks every one
against the real ``keras.optimizers.<Name>`` when TensorFlow is installed, so each
expected number in the suite has an origin.

Keras 3 rounds some hyperparameters to float32 even for float64 variables (see
``sparseopt/rules/_floatx.py``); the references do the same, with ``f32``, at the
same places, so that float64 agreement with Keras holds to 1e-10.

The ``legacy_*`` references reproduce ``tf_keras.optimizers.legacy.<Name>`` (Keras 2's
``OptimizerV2``), written from TensorFlow's ``ResourceApply*`` kernels: there every
hyperparameter set with ``_set_hyper`` (learning rate, betas, rho, momentum, the Ftrl
strengths) is a float32 variable, while ``epsilon`` and the initial accumulator values
keep full precision. ``tests/test_references_keras_legacy.py`` checks them.
"""

import numpy as np


def f32(x):
    return float(np.float32(x))


def sgd(p, g, s, t, learning_rate=0.01, momentum=0.0, nesterov=False):
    if momentum == 0:
        return p - learning_rate * g
    b = s.setdefault("momentum", np.zeros_like(p))
    momentum = f32(momentum)
    b[...] = momentum * b - learning_rate * g
    if nesterov:
        return p + momentum * b - learning_rate * g
    return p + b


def adam(p, g, s, t, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False):
    m = s.setdefault("m", np.zeros_like(p))
    v = s.setdefault("v", np.zeros_like(p))
    m[...] = beta_1 * m + (1 - beta_1) * g
    v[...] = beta_2 * v + (1 - beta_2) * g * g
    alpha = learning_rate * np.sqrt(1 - f32(beta_2) ** t) / (1 - f32(beta_1) ** t)
    if amsgrad:
        vhat = s.setdefault("vhat", np.zeros_like(p))
        vhat[...] = np.maximum(vhat, v)
        return p - alpha * m / (np.sqrt(vhat) + epsilon)
    return p - alpha * m / (np.sqrt(v) + epsilon)


def adagrad(p, g, s, t, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7):
    a = s.setdefault("accumulator", np.full_like(p, slot_initial_value("accumulator", locals())))
    a[...] = a + g * g
    return p - learning_rate * g / np.sqrt(a + epsilon)


def adamw(p, g, s, t, weight_decay=0.004, **hp):
    """Keras 3's AdamW: Adam after the decoupled decay ``p -= p * wd * lr``."""
    return weight_decayed(adam, weight_decay)(p, g, s, t, **hp)


def rmsprop(p, g, s, t, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False):
    rms = s.setdefault("rms", np.zeros_like(p))
    rms[...] = rho * rms + (1 - rho) * g * g
    if centered:
        mg = s.setdefault("mg", np.zeros_like(p))
        mg[...] = rho * mg + (1 - rho) * g
        denominator = rms - mg * mg + epsilon
    else:
        denominator = rms + epsilon
    increment = learning_rate * g / np.sqrt(denominator)
    if momentum > 0:
        mom = s.setdefault("momentum", np.zeros_like(p))
        mom[...] = momentum * mom + increment
        return p - mom
    return p - increment


def adadelta(p, g, s, t, learning_rate=0.001, rho=0.95, epsilon=1e-7):
    acc_g = s.setdefault("accumulated_grad", np.zeros_like(p))
    acc_d = s.setdefault("accumulated_delta", np.zeros_like(p))
    acc_g[...] = rho * acc_g + (1 - rho) * g * g
    delta = -np.sqrt(acc_d + epsilon) * g / np.sqrt(acc_g + epsilon)
    acc_d[...] = rho * acc_d + (1 - rho) * delta * delta
    return p + learning_rate * delta


def adamax(p, g, s, t, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    m = s.setdefault("m", np.zeros_like(p))
    u = s.setdefault("v", np.zeros_like(p))
    m[...] = m + (g - m) * (1 - beta_1)
    u[...] = np.maximum(beta_2 * u, np.abs(g))
    return p - learning_rate * m / ((1 - f32(beta_1) ** t) * (u + epsilon))


def nadam(p, g, s, t, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    # Keras 3 keeps u_product (the product of the momentum schedule) as optimizer
    # state, advanced once per step with the unrounded beta_1 and 0.96; the update
    # casts beta_1, beta_2 and 0.96 to the variable's dtype (through float32).
    u_product = 1.0
    for i in range(1, t + 1):
        u_product = u_product * beta_1 * (1.0 - 0.5 * 0.96 ** i)
    b1, b2, decay = f32(beta_1), f32(beta_2), f32(0.96)
    u_t = b1 * (1 - 0.5 * decay ** t)
    u_next = b1 * (1 - 0.5 * decay ** (t + 1))
    m = s.setdefault("m", np.zeros_like(p))
    v = s.setdefault("v", np.zeros_like(p))
    m[...] = b1 * m + (1 - b1) * g
    v[...] = b2 * v + (1 - b2) * g * g
    m_hat = u_next * m / (1 - u_product * u_next) + (1 - u_t) * g / (1 - u_product)
    v_hat = v / (1 - b2 ** t)
    return p - learning_rate * m_hat / (np.sqrt(v_hat) + epsilon)


def ftrl(p, g, s, t, learning_rate=0.001, learning_rate_power=-0.5, initial_accumulator_value=0.1,
         l1_regularization_strength=0.0, l2_regularization_strength=0.0,
         l2_shrinkage_regularization_strength=0.0, beta=0.0):
    n = s.setdefault("accumulator", np.full_like(p, f32(initial_accumulator_value)))
    z = s.setdefault("linear", np.zeros_like(p))
    lr, power = learning_rate, -learning_rate_power
    l1 = l1_regularization_strength
    l2 = l2_regularization_strength + beta / (2 * lr)
    g_shrunk = g + 2 * l2_shrinkage_regularization_strength * p
    n_new = n + g * g
    z[...] = z + g_shrunk - (n_new ** power - n ** power) / lr * p
    n[...] = n_new
    return np.where(np.abs(z) > l1, (np.sign(z) * l1 - z) / (n_new ** power / lr + 2 * l2), 0.0)


def lion(p, g, s, t, learning_rate=0.001, beta_1=0.9, beta_2=0.99):
    b1, b2 = f32(beta_1), f32(beta_2)
    m = s.setdefault("momentum", np.zeros_like(p))
    p = p - learning_rate * np.sign(b1 * m + (1 - b1) * g)
    m[...] = b2 * m + (1 - b2) * g
    return p


def rowwise_adagrad(p, g, s, t, learning_rate=0.01, initial_accumulator_value=0.0, epsilon=1e-8):
    """FBGEMM's EXACT_ROWWISE_ADAGRAD: one accumulator per row (the first axis)."""
    rows = p.shape[0] if p.ndim else 1
    g_rows = g.reshape(rows, -1)
    acc = s.setdefault("accumulator", np.full(p.shape[:1], f32(initial_accumulator_value)))
    acc[...] = acc + np.mean(g_rows * g_rows, axis=1).reshape(acc.shape)
    scale = learning_rate / (np.sqrt(acc.reshape(rows, 1)) + epsilon)
    return p - (scale * g_rows).reshape(p.shape)


# ------------------------------------------------------------------------------------
# tf_keras.optimizers.legacy (OptimizerV2): float32 hyperparameters (``_set_hyper``),
# full-precision epsilon and initial accumulators, TensorFlow's kernel formulas.

def legacy_sgd(p, g, s, t, learning_rate=0.01, momentum=0.0, nesterov=False):
    # ResourceApplyKerasMomentum: the same velocity form as Keras 3 (momentum float32).
    return sgd(p, g, s, t, learning_rate=learning_rate, momentum=momentum, nesterov=nesterov)


def legacy_adam(p, g, s, t, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False):
    # ResourceApplyAdam(WithAmsgrad): the betas are float32 also in 1 - beta.
    b1, b2 = f32(beta_1), f32(beta_2)
    m = s.setdefault("m", np.zeros_like(p))
    v = s.setdefault("v", np.zeros_like(p))
    m[...] = m + (g - m) * (1 - b1)
    v[...] = v + (g * g - v) * (1 - b2)
    alpha = learning_rate * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    if amsgrad:
        vhat = s.setdefault("vhat", np.zeros_like(p))
        vhat[...] = np.maximum(vhat, v)
        v = vhat
    return p - m * alpha / (np.sqrt(v) + epsilon)


def legacy_adagrad(p, g, s, t, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7):
    # ResourceApplyAdagradV2: epsilon *outside* the square root.
    a = s.setdefault("accumulator", np.full_like(p, initial_accumulator_value))
    a[...] = a + g * g
    return p - learning_rate * g / (np.sqrt(a) + epsilon)


def legacy_rmsprop(p, g, s, t, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False):
    rho, momentum = f32(rho), f32(momentum)
    rms = s.setdefault("rms", np.zeros_like(p))
    rms[...] = rho * rms + (1 - rho) * g * g
    if centered:
        mg = s.setdefault("mg", np.zeros_like(p))
        mg[...] = rho * mg + (1 - rho) * g
        denominator = rms - mg * mg
    else:
        denominator = rms
    if momentum > 0:
        # ResourceApply(Centered)RMSProp: epsilon inside the square root.
        mom = s.setdefault("momentum", np.zeros_like(p))
        mom[...] = momentum * mom + learning_rate * g / np.sqrt(denominator + epsilon)
        return p - mom
    # Without momentum, Python ops: epsilon outside the square root.
    return p - learning_rate * g / (np.sqrt(denominator) + epsilon)


def legacy_adadelta(p, g, s, t, learning_rate=0.001, rho=0.95, epsilon=1e-7):
    rho = f32(rho)
    acc_g = s.setdefault("accumulated_grad", np.zeros_like(p))
    acc_d = s.setdefault("accumulated_delta", np.zeros_like(p))
    acc_g[...] = acc_g * rho + g * g * (1 - rho)
    update = np.sqrt(acc_d + epsilon) / np.sqrt(acc_g + epsilon) * g
    acc_d[...] = acc_d * rho + update * update * (1 - rho)
    return p - update * learning_rate


def legacy_adamax(p, g, s, t, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    b1, b2 = f32(beta_1), f32(beta_2)
    m = s.setdefault("m", np.zeros_like(p))
    u = s.setdefault("v", np.zeros_like(p))
    m[...] = m + (g - m) * (1 - b1)
    u[...] = np.maximum(b2 * u, np.abs(g))
    return p - learning_rate / (1 - b1 ** t) * (m / (u + epsilon))


def legacy_nadam(p, g, s, t, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    # The momentum schedule of Dozat's paper with schedule_decay 0.004:
    # mu_t = beta_1 (1 - 0.5 * 0.96 ** (0.004 t)), and the cache m_cache = prod mu_i.
    b1, b2, decay = f32(beta_1), f32(beta_2), f32(0.96)

    def mu(i):
        return b1 * (1 - 0.5 * decay ** (0.004 * i))

    m_cache = 1.0
    for i in range(1, t + 1):
        m_cache = m_cache * mu(i)
    m = s.setdefault("m", np.zeros_like(p))
    v = s.setdefault("v", np.zeros_like(p))
    m[...] = b1 * m + (1 - b1) * g
    v[...] = b2 * v + (1 - b2) * g * g
    m_bar = (1 - mu(t)) * g / (1 - m_cache) + mu(t + 1) * m / (1 - m_cache * mu(t + 1))
    return p - learning_rate * m_bar / (np.sqrt(v / (1 - b2 ** t)) + epsilon)


def legacy_ftrl(p, g, s, t, learning_rate=0.001, learning_rate_power=-0.5, initial_accumulator_value=0.1,
                l1_regularization_strength=0.0, l2_regularization_strength=0.0,
                l2_shrinkage_regularization_strength=0.0, beta=0.0):
    # ResourceApplyFtrl(V2): every strength float32, the accumulator starts unrounded.
    n = s.setdefault("accumulator", np.full_like(p, initial_accumulator_value))
    z = s.setdefault("linear", np.zeros_like(p))
    lr, power = learning_rate, -f32(learning_rate_power)
    l1 = f32(l1_regularization_strength)
    l2 = f32(l2_regularization_strength) + f32(beta) / (2 * lr)
    g_shrunk = g + 2 * f32(l2_shrinkage_regularization_strength) * p
    n_new = n + g * g
    z[...] = z + g_shrunk - (n_new ** power - n ** power) / lr * p
    n[...] = n_new
    return np.where(np.abs(z) > l1, (np.sign(z) * l1 - z) / (n_new ** power / lr + 2 * l2), 0.0)


def lamb(p, g, s, t, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Keras 3's Lamb: Adam's moments, ``u = m_hat / (sqrt(v_hat) + epsilon)``, then
    ``p -= lr * ||p|| / ||u|| * u`` (ratio 1 where a norm is 0), norms over all of ``p``."""
    m = s.setdefault("m", np.zeros_like(p))
    v = s.setdefault("v", np.zeros_like(p))
    m[...] = m + (g - m) * (1 - beta_1)
    v[...] = v + (g * g - v) * (1 - beta_2)
    u = (m / (1 - f32(beta_1) ** t)) / (np.sqrt(v / (1 - f32(beta_2) ** t)) + epsilon)
    w_norm, u_norm = np.sqrt(np.sum(p * p)), np.sqrt(np.sum(u * u))
    ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
    return p - ratio * learning_rate * u


def lamb_rows(p, g, s, t, **hp):
    """:func:`lamb` on each row of ``p`` on its own (the sparse rule: per-row norms)."""
    out = np.empty_like(p)
    for r in range(p.shape[0]):
        row = {k: v[r] for k, v in s.items()} if s else {}
        out[r] = lamb(p[r], g[r], row, t, **hp)
        for k, v in row.items():
            s.setdefault(k, np.zeros_like(p))[r] = v
    return out


def adafactor(p, g, s, t, learning_rate=0.001, beta_2_decay=-0.8, epsilon_1=1e-30, epsilon_2=1e-3,
              clip_threshold=1.0):
    """Keras 3's Adafactor: ``v`` for rank < 2; for rank >= 2 the row and column statistics
    ``r`` (shape less the last axis), ``c`` (less the second last) and ``v = r / mean(r) (x) c``;
    ``u = g / sqrt(v)`` clipped by ``rms(u) / clip_threshold``, scaled by
    ``max(epsilon_2, rms(p)) * min(lr, 1 / sqrt(t))``."""
    rho = min(learning_rate, 1 / np.sqrt(t))
    beta = 1 - float(t) ** beta_2_decay
    q = g * g + epsilon_1
    if p.ndim < 2:
        v = s.setdefault("v", np.zeros_like(p))
        v[...] = beta * v + (1 - beta) * q
    else:
        r = s.setdefault("r", np.zeros(p.shape[:-1]))
        c = s.setdefault("c", np.zeros(p.shape[:-2] + p.shape[-1:]))
        r[...] = beta * r + (1 - beta) * q.mean(axis=-1)
        c[...] = beta * c + (1 - beta) * q.mean(axis=-2)
        v = (r / r.mean(axis=-1, keepdims=True))[..., None] * c[..., None, :]
    u = g / np.sqrt(v)
    u = u / max(1.0, np.sqrt(np.mean(u * u)) / clip_threshold)
    return p - max(epsilon_2, np.sqrt(np.mean(p * p))) * rho * u


def run_adafactor_lazy(reference, p0, sparse_grads, **hp):
    """Adafactor's sparse rule (:func:`run_lazy`'s, with its slots): duplicates summed,
    then ``reference`` (:func:`adafactor`, maybe :func:`weight_decayed`) on the touched rows
    as a table of their own, with their ``v`` (a vector), their ``r`` and the shared ``c``
    (a 2-D table), or their ``r`` and ``c`` (rank >= 3). Returns ``(p, slots)``."""
    p = np.asarray(p0, np.float64).copy()
    slots = {}
    for t, (values, indices) in enumerate(sparse_grads, start=1):
        rows, inverse = np.unique(np.asarray(indices), return_inverse=True)
        summed = np.zeros((rows.size,) + p.shape[1:])
        np.add.at(summed, inverse.reshape(-1), np.asarray(values, np.float64))
        if p.ndim < 2:
            names = ("v",)
            whole = {"v": slots.setdefault("v", np.zeros_like(p))}
        else:
            names = ("r",) if p.ndim == 2 else ("r", "c")
            whole = {"r": slots.setdefault("r", np.zeros(p.shape[:-1])),
                     "c": slots.setdefault("c", np.zeros(p.shape[:-2] + p.shape[-1:]))}
        sub = {k: (v[rows].copy() if k in names else v) for k, v in whole.items()}
        p[rows] = reference(p[rows], summed, sub, t, **hp)
        for k in names:
            whole[k][rows] = sub[k]
    return p, slots


def weight_decayed(reference, weight_decay):
    """Keras 3's decoupled weight decay before the update: ``p -= p * wd * lr``."""
    def step(p, g, s, t, **hp):
        lr = hp.get("learning_rate", 0.001)
        return reference(p - p * f32(weight_decay) * lr, g, s, t, **hp)
    return step


def run_dense(reference, p0, grads, **hp):
    """Apply ``reference`` for each gradient in turn (steps 1, 2, ...); returns (p, slots)."""
    p = np.asarray(p0, np.float64).copy()
    slots = {}
    for t, g in enumerate(grads, start=1):
        p = reference(p, np.asarray(g, np.float64), slots, t, **hp)
    return p, slots


def slot_initial_value(slot_name, hp, legacy=False):
    """The value a slot starts at (zeros unless the optimizer says otherwise)."""
    if slot_name == "accumulator":
        value = hp.get("initial_accumulator_value", 0.1)
        # Keras 3's Constant initializer holds the value in float32, also for float64
        # slots; tf_keras' constant_initializer (legacy) keeps it exact.
        return value if legacy else f32(value)
    return 0.0


def run_lazy(reference, p0, sparse_grads, **hp):
    """Lazy sparse semantics: duplicates summed, then the dense rule on the touched rows only.

    ``sparse_grads`` is a list of ``(values, indices)``. Slots are full arrays; each
    step runs the dense reference on copies of the touched rows and writes them back.
    """
    p = np.asarray(p0, np.float64).copy()
    slots = {}
    for t, (values, indices) in enumerate(sparse_grads, start=1):
        rows, inverse = np.unique(np.asarray(indices), return_inverse=True)
        summed = np.zeros((rows.size,) + p.shape[1:])
        np.add.at(summed, inverse.reshape(-1), np.asarray(values, np.float64))
        sub = {k: v[rows].copy() for k, v in slots.items()}
        p[rows] = reference(p[rows], summed, sub, t, **hp)
        for k, v in sub.items():
            if k not in slots:  # per-element (rows, ...) or per-row (rows,) slots
                slots[k] = np.full((p.shape[0],) + v.shape[1:],
                                   slot_initial_value(k, hp, reference.__name__.startswith("legacy_")))
            slots[k][rows] = v
    return p, slots
