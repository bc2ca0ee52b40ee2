"""Which arrays are CUDA arrays: the test :func:`sparseopt.backends.backend_for` picks by.

A module of its own, below the backends, so that :mod:`sparseopt.backends.cpu` and
:mod:`sparseopt.backends.cuda` can ask it (a gradient on the wrong device) without
importing the package that picks between them. Imports nothing but NumPy.
"""

import numpy as np


def is_device_array(x):
    """Whether ``x`` is a CUDA array (a Numba device array or a ``__cuda_array_interface__`` exporter).

    Imports nothing; a NumPy array, a list or a CPU tensor is not one.
    """
    if isinstance(x, np.ndarray):
        return False
    if getattr(type(x), "__cuda_ndarray__", False):
        return True
    try:
        return hasattr(x, "__cuda_array_interface__")
    except Exception:  # e.g. a torch CUDA tensor that requires grad: a CUDA array that cannot export
        return True
