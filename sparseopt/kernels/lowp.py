r"""16-bit variables: bfloat16 and float16 storage around float32 math.

A variable of dtype ``bfloat16`` (``ml_dtypes.bfloat16``) or ``float16`` is read, widened
to float32, updated by the rule in float32 (its slots are float32), and its new value is
rounded back to 16 bits, by **stochastic rounding** by default or to nearest, ties to
even. Numba has no bfloat16 type and no float16 arithmetic on the CPU, so the kernels see
the variable as ``uint16`` bits and convert with integer operations:

* bfloat16 is the upper half of a float32: widening is ``bits << 16``; narrowing adds 16
  low bits to the float32's bit pattern and keeps the upper half. Adding ``0x7FFF`` plus
  the lowest kept bit rounds to nearest even; adding 16 uniformly random bits rounds up
  with probability equal to the dropped fraction, so the rounding is unbiased
  (stochastic rounding). The same carry turns the largest finite values into infinity,
  as a float32 beyond the format's range does.
* float16 drops 13 bits of a float32 in its normal range (after re-biasing the
  exponent) and more in its subnormal range (fixed steps of :math:`2^{-24}`), with the
  same two ways to choose the bits added before the shift.

NaN stays NaN (quiet), infinities stay infinite.

**Random bits.** The bits for element ``i`` (its flat index ``row * width + column``) in
a step are the ``(i + 1)``-th output of splitmix64 started at the step's key,
:func:`element_bits`, and the step's key is a hash of the optimizer's ``seed`` and the
step number (:func:`step_key`, on the host). So each element's bits depend only on
(seed, step, row, column): not on the thread that updates it, the order of the batch,
or whether the step is dense or sparse, and a run resumed from a checkpoint (which keeps
the seed and ``iterations``) draws the same bits as the run that was not interrupted.
bfloat16 uses the lowest 16 bits of the 64; float16 the lowest 13 (normal range) or up
to 63 (subnormal range). bfloat16 slots (``slot_dtype="bfloat16"``) are rounded the same
way from the same 64 bits, slot ``k`` with bits ``16 (k + 1) .. 16 (k + 1) + 15``: one hash
per element gives all its roundings (a second hash for the slots cost two more 64-bit
multiplies per element); a rule with more than three slots rounds slots 3 and up with
16 bits each of further hashes of those 64 (:func:`sparseopt.kernels._slots.store_rounded`).
Each rounding's 16 bits are uniform, so each is unbiased; only a float16 parameter in
float16's subnormal range, which reads more than 16 bits, shares bits with its bfloat16 slots.
"""

import collections
import functools
import struct
import sys

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from sparseopt.kernels import _slots

try:  # a dependency of TensorFlow and JAX; the NumPy bfloat16 dtype
    import ml_dtypes
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes not installed: bfloat16 arrays cannot exist
    BFLOAT16 = None

FLOAT16 = np.dtype(np.float16)

#: The 16-bit variable dtypes and their kind names.
KINDS = {FLOAT16: "float16"}
if BFLOAT16 is not None:
    KINDS[BFLOAT16] = "bfloat16"

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB

# uint64 constants for the kernels (a Python int literal next to a uint64 would make
# Numba compute in float64).
_U = np.uint64
_GOLDEN, _MIX1, _MIX2 = _U(GOLDEN), _U(MIX1), _U(MIX2)
_0, _1, _10, _13, _16, _23, _27, _30, _31, _32 = (_U(v) for v in (0, 1, 10, 13, 16, 23, 27, 30, 31, 32))
_48, _63, _64, _112, _113, _125, _126 = (_U(v) for v in (48, 63, 64, 112, 113, 125, 126))
_X3FF, _X1F, _X40, _XFFF, _X1FFF, _X7FFF, _XFFFF = (_U(v) for v in (0x3FF, 0x1F, 0x40, 0xFFF, 0x1FFF, 0x7FFF,
                                                                  0xFFFF))
_X7C00, _X7E00, _X8000 = _U(0x7C00), _U(0x7E00), _U(0x8000)
_X7FFFFF, _X800000, _X7F800000, _X7FFFFFFF = _U(0x7FFFFF), _U(0x800000), _U(0x7F800000), _U(0x7FFFFFFF)
_TWO_M24 = np.float32(2.0 ** -24)


# ------------------------------------------------------------------------- host side

def mix64(z):
    """splitmix64's finalizer on a Python int (a bijection of 64-bit integers)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def step_key(seed, step):
    """The key of step ``step`` (``iterations + 1``) of an optimizer with ``seed``."""
    return mix64(mix64(seed) + step)


def kind(dtype):
    """``"bfloat16"`` or ``"float16"`` for a 16-bit variable dtype, else None."""
    try:
        return KINDS.get(np.dtype(dtype))
    except TypeError:  # not a NumPy dtype (a torch dtype, ...)
        return None


def as_bits(array):
    """A 16-bit array's ``uint16`` view (what the kernels update)."""
    return array.view(np.uint16)


def widen(array):
    """A bfloat16 or float16 array as a new float32 array (exact).

    bfloat16: one pass that reads the bits and writes them shifted (half the time of a cast
    to uint32 followed by a shift, which writes the 4-byte array twice)."""
    if array.dtype == FLOAT16:
        return array.astype(np.float32)
    out = np.empty(array.shape, np.uint32)
    np.left_shift(array.view(np.uint16), np.uint32(16), out=out, dtype=np.uint32)
    return out.view(np.float32)


def widen_bits(bits, kind):
    """:func:`widen` of the ``uint16`` bits of a 16-bit array of ``kind``."""
    return widen(bits.view(BFLOAT16 if kind == "bfloat16" else FLOAT16))


@functools.lru_cache(maxsize=None)
def _keyed_class(cls):
    """``cls`` (a rule's ``Coefficients``) with one more field, ``rounding_key``.

    Registered under its name in this module, so that pickle (Numba's cache index)
    finds it by reference."""
    name = f"{cls.__module__.replace('.', '_')}_{cls.__qualname__.replace('.', '_')}_rounded"
    keyed = collections.namedtuple(name, tuple(cls._fields) + ("rounding_key",))
    keyed.__module__ = __name__
    setattr(sys.modules[__name__], name, keyed)
    return keyed


def keyed(c, key):
    """The coefficients ``c`` with the step's rounding key (a ``uint64``) appended."""
    return _keyed_class(type(c))(*c, _U(key))


# ---------------------------------------------------------------------- kernel side

@intrinsic
def f32_bits(typingctx, x):
    """The bits of a float32 as a uint32."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, u):
    """The float32 whose bits are the low 32 bits of the integer ``u``."""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        width = signature.args[0].bitwidth
        if width > 32:
            value = builder.trunc(value, ir.IntType(32))
        elif width < 32:
            value = builder.zext(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())
    return types.float32(u), codegen


if numba.config.DISABLE_JIT:  # pragma: no cover - the kernels run as Python
    _F32 = struct.Struct("<f")
    _U32 = struct.Struct("<I")

    def f32_bits(x):  # noqa: F811
        return np.uint32(_U32.unpack(_F32.pack(np.float32(x)))[0])

    def bits_f32(u):  # noqa: F811
        return np.float32(_F32.unpack(_U32.pack(int(u) & 0xFFFFFFFF))[0])


def flat_index(p, at):
    """The flat element index of ``at`` (an int, or ``(row, column)`` of a 2-D ``p``)."""
    if isinstance(at, tuple):
        return at[0] * p.shape[1] + at[1]
    return at


@overload(flat_index, inline="always")
def _flat_index(p, at):
    if isinstance(at, types.Integer):
        return lambda p, at: at
    return lambda p, at: at[0] * p.shape[1] + at[1]


_inline = numba.njit(inline="always", error_model="numpy")


@_inline
def mix(z):
    """splitmix64's finalizer (uint64 in, uint64 out)."""
    z = (z ^ (z >> _30)) * _MIX1
    z = (z ^ (z >> _27)) * _MIX2
    return z ^ (z >> _31)


@_inline
def element_bits(key, index):
    """64 random bits for flat element ``index`` under a step's ``key``."""
    return mix(key + (_U(index) + _1) * _GOLDEN)


@_inline
def bf16_to_f32(h):
    return bits_f32(_U(h) << _16)


@_inline
def f32_to_bf16(x, r, stochastic):
    """float32 ``x`` to bfloat16 bits: stochastically with random bits ``r``, or to nearest even."""
    u = _U(f32_bits(x))
    if (u & _X7FFFFFFF) > _X7F800000:  # NaN: keep it a (quiet) NaN
        return np.uint16((u >> _16) | _X40)
    if stochastic:
        add = r & _XFFFF
    else:
        add = _X7FFF + ((u >> _16) & _1)
    return np.uint16((u + add) >> _16)


@_inline
def f16_to_f32(h):
    h = _U(h)
    sign = (h & _X8000) << _16
    e = (h >> _10) & _X1F
    m = h & _X3FF
    if e == _X1F:  # Inf, NaN
        return bits_f32(sign | _X7F800000 | (m << _13))
    if e != _0:
        return bits_f32(sign | ((e + _112) << _23) | (m << _13))
    tiny = np.float32(m) * _TWO_M24  # zero or subnormal: exact
    return bits_f32(_U(f32_bits(tiny)) | sign)


@_inline
def f32_to_f16(x, r, stochastic):
    """float32 ``x`` to float16 bits: stochastically with random bits ``r``, or to nearest even."""
    u = _U(f32_bits(x))
    sign = (u >> _16) & _X8000
    a = u & _X7FFFFFFF
    if a > _X7F800000:  # NaN: quiet, with the payload's upper bits
        return np.uint16(sign | _X7E00 | ((a >> _13) & _X3FF))
    e = a >> _23
    if e >= _113:  # float16's normal range (or beyond: infinity)
        base = a - (_112 << _23)
        if stochastic:
            add = r & _X1FFF
        else:
            add = _XFFF + ((base >> _13) & _1)
        h = (base + add) >> _13
        if h > _X7C00:
            h = _X7C00
        return np.uint16(sign | h)
    # subnormal range: steps of 2**-24; value = m * 2**(e - 150), in steps m >> s
    if e == _0:
        m = a & _X7FFFFF
        s = _125
    else:
        m = (a & _X7FFFFF) | _X800000
        s = _126 - e
    if s >= _64:
        return np.uint16(sign)
    if stochastic:
        add = r & ((_1 << s) - _1)
    else:
        add = ((_1 << (s - _1)) - _1) + ((m >> s) & _1)
    return np.uint16(sign | ((m + add) >> s))


@_inline
def same(x):
    return x


# The element templates of sparseopt.kernels.cpu for a 16-bit variable: ``p`` is its
# uint16 view, and so are bfloat16 slots (``SLOT16``; float32 slots otherwise). Its load and
# rounded store are generated for each count of slots (sparseopt.kernels._slots.load with
# ``widen=True``, and store_rounded), with these globals and those bound per specialization
# (sparseopt.kernels.cpu.lowp_constants): WIDEN, NARROW (the variable's conversions),
# STOCHASTIC, SLOT16, WIDEN_SLOT (``same`` for float32 slots).
WIDEN = NARROW = STOCHASTIC = SLOT16 = WIDEN_SLOT = None


def _value_template(p, at):
    """Element ``at`` of ``p``, widened to float32."""
    return WIDEN(p[at])


CONVERSIONS = {"bfloat16": (bf16_to_f32, f32_to_bf16), "float16": (f16_to_f32, f32_to_f16)}


_slots.register(__name__, globals())
