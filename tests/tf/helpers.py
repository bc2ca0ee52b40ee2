"""Shared helpers of the TensorFlow bridge tests (imported after TensorFlow is known to exist)."""

import numpy as np

from tests.conftest import rel_close  # noqa: F401  (re-exported)
from tests.optimizer_table import CASES, IDS  # noqa: F401


def _bridged_params():
    import pytest

    from sparseopt_tf import _spec
    specs = _spec.optimizer_specs()
    params = []
    for case in CASES:
        reason = specs[case.cls.__name__].unsupported()
        marks = [pytest.mark.skip(reason=f"not bridged yet: {reason}")] if reason else []
        params.append(pytest.param(case, id=case.id, marks=marks))
    return params


#: The optimizer table as pytest params; optimizers the bridge cannot run yet are skipped.
BRIDGED = _bridged_params()


def bridge_class(case, legacy=False):
    import sparseopt_tf
    module = sparseopt_tf.legacy if legacy else sparseopt_tf
    return getattr(module, case.cls.__name__)


def core_dense_run(case, init, grads, legacy=False):
    """The core optimizer of ``case`` on a copy of ``init`` with the dense ``grads``
    (the reference for an optimizer Keras does not have, such as ``RowwiseAdagrad``)."""
    legacy = legacy and getattr(case.cls, "_has_legacy_math", False)
    opt = case.make(_legacy=True) if legacy else case.make()
    var = np.array(init, copy=True)
    for g in grads:
        opt.apply_gradients([(np.asarray(g), var)])
    return var


def sparse_batches(rng, num_rows, width, steps, k, all_rows=False, dtype=np.float32):
    """``steps`` (values, indices) pairs with duplicates; ``all_rows`` touches every row each step."""
    out = []
    for _ in range(steps):
        idx = rng.integers(0, num_rows, k)
        if all_rows:
            idx = np.concatenate([np.arange(num_rows), idx])
        rng.shuffle(idx)
        out.append((rng.normal(size=(idx.size, width)).astype(dtype), idx.astype(np.int64)))
    return out


def free_ports(n):
    """``n`` loopback ports that were free a moment ago (for servers a test starts)."""
    import socket
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
