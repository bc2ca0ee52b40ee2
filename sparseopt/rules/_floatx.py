"""Where Keras rounds a hyperparameter to float32.

Keras 3 (TensorFlow backend) keeps ``learning_rate`` in a float32 variable, and
``ops.cast(python_float, "float64")`` converts the Python float to a float32 tensor
before casting, so a hyperparameter that Keras passes through ``ops.cast`` is
float32-rounded even for float64 variables, while one used directly in arithmetic
keeps full precision. The rules' ``coefficients`` functions apply :func:`f32` exactly
where Keras does, so float64 results agree with Keras to 1e-10, not just 1e-7.
"""

import struct

import numpy as np

_FLOAT32 = struct.Struct("f")


def f32(x):
    """``x`` rounded to float32 (to nearest, ties to even), as a Python float.

    Through ``struct``, which rounds as a C cast does: the same bits as
    ``float(np.float32(x))`` at less than half its cost with cold caches (it runs a few
    times per step). ``struct`` refuses a finite value that rounds past float32's
    range; NumPy rounds that to infinity, as Keras' cast does.
    """
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(x))[0]
    except (OverflowError, TypeError, struct.error):
        return float(np.float32(x))
