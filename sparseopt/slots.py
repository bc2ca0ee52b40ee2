"""Slot storage: one contiguous array per variable holds all of its rule's slots.

For a variable of shape ``S`` whose rule keeps slots ``("m", "v")``, the optimizer
allocates one C-contiguous array of shape ``(2, *S)``; ``get_slot(var, "m")`` is the
view ``storage[0]``; it starts on a 64-byte cache line (:func:`aligned_empty`), so rows
whose bytes are a multiple of 64 each lie on whole lines. The kernels read and write
``storage`` directly. Slots added by
``add_slot`` that the rule does not use are separate arrays.

A 16-bit variable (bfloat16, float16) keeps float32 slots, the dtype of its math, or
bfloat16 slots (``slot_dtype="bfloat16"``), and the kernels update its ``uint16`` view
(and that of bfloat16 slots; :mod:`sparseopt.kernels.lowp`).
"""

import math

import numpy as np

from sparseopt import errors
from sparseopt.kernels import cpu, lowp


#: Alignment of the slot storage: a cache line. NumPy aligns its data to 16 bytes, so a
#: 256-byte float32 row of a random sparse step touches 5 lines (4 when aligned) and a
#: 128-byte bfloat16 row 3 (2 when aligned).
ALIGNMENT = 64


def aligned_empty(shape, dtype, alignment=ALIGNMENT):
    """An uninitialized C-contiguous array whose data starts on an ``alignment``-byte boundary
    (a view of a slightly larger byte buffer, which it keeps alive)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class VariableState:
    """What the optimizer keeps for one variable."""

    __slots__ = ("var", "name", "storage", "nslots", "slots", "slot_rows", "kernel_slot_names",
                 "_kernel_views", "kind", "slot_kind", "math_dtype", "lowp", "rounding_key")

    def __init__(self, var, name, kernel_slots, initial_value, rule_slots, slot_dtype=None):
        """``slot_dtype``: ``"bfloat16"`` for bfloat16 slots of a 16-bit variable (else
        ignored: float32 slots for a 16-bit variable, the variable's dtype otherwise)."""
        self.var = var
        self.name = name
        self.nslots = len(kernel_slots)
        self.slot_rows = cpu.slot_rows(tuple(rule_slots), tuple(kernel_slots))
        self.kernel_slot_names = tuple(kernel_slots)
        self.slots = {}
        self._kernel_views = {}  # (rule slots, shape) -> kernel_arrays(...)
        # A 16-bit variable: its kind, and this step's rounding (set by the optimizer
        # before each step: (kind, stochastic) and the step's key).
        if isinstance(var, np.ndarray):
            self.kind = lowp.kind(var.dtype)
        else:  # a CUDA array (its dtype may not be NumPy's)
            from sparseopt import _cuda
            self.kind = _cuda.variable_kind(var)
        self.slot_kind = "bfloat16" if self.kind and slot_dtype == "bfloat16" else None
        self.lowp = None
        self.rounding_key = 0
        if not isinstance(var, np.ndarray):  # a CUDA array: its slots live on its device
            self.storage = _cuda.slot_storage(var, [initial_value(n) for n in kernel_slots], self.slot_kind)
            # the variable's (a CUDA array's may not be NumPy's); float32 for a 16-bit one
            self.math_dtype = np.float32 if self.kind else self.storage.dtype.type
            for i, slot_name in enumerate(kernel_slots):
                self.slots[slot_name] = _cuda.slot_view(self.storage, i)
            return
        #: The dtype of the kernels' math and coefficients: float32 for a 16-bit variable.
        self.math_dtype = np.float32 if self.kind else var.dtype.type
        slot_dtype = lowp.BFLOAT16 if self.slot_kind else self.math_dtype
        self.storage = aligned_empty((self.nslots,) + var.shape, slot_dtype)
        for i, slot_name in enumerate(kernel_slots):
            view = self.storage[i, ...]  # a view also for a 0-d variable (storage[i] is a scalar copy)
            view.fill(initial_value(slot_name))
            self.slots[slot_name] = view

    def kernel_arrays(self, rule_slots, shape):
        """``(p, (s0, s1, s2), used)``: the variable and its kernel slots reshaped to
        ``shape`` (views), in ``rule_slots`` order (see :func:`sparseopt.kernels.cpu.place`).

        Kept per ``(rule_slots, shape)``: the views stay valid (the variable and the slot
        storage are never reallocated), and making them costs more than the step's other
        Python work with cold caches.
        """
        def make():
            p = (lowp.as_bits(self.var) if self.kind else self.var).reshape(shape)
            kept = {name: (lowp.as_bits(self.slots[name]) if self.slot_kind else self.slots[name]).reshape(shape)
                    for name in self.kernel_slot_names}
            slots, used = cpu.place(rule_slots, kept, p)
            return p, slots, used
        return self.kernel_views((rule_slots, shape), make)

    def kernel_step(self, c):
        """``(lowp, c)``: the kernels' ``lowp`` argument and coefficients for this step
        (for a 16-bit variable, ``c`` with the step's rounding key)."""
        if self.kind is None:
            return None, c
        return self.lowp, lowp.keyed(c, self.rounding_key)

    def kernel_views(self, key, make):
        """``make()``, kept per ``key``: for views of the variable and its slots, which
        stay valid for the state's life."""
        views = self._kernel_views.get(key)
        if views is None:
            views = self._kernel_views[key] = make()
        return views

    def add_extra_slot(self, slot_name, initializer="zeros", shape=None):
        shape = tuple(self.var.shape) if shape is None else tuple(shape)
        dtype = self.storage.dtype  # the variable's (float32 for a 16-bit one), a NumPy dtype also for CUDA arrays
        if callable(initializer):
            value = np.asarray(initializer(shape, dtype))
            if value.shape != shape:
                raise errors.ShapeMismatchError(
                    f"{self.name!r}: initializer of slot {slot_name!r} gave shape {value.shape}; "
                    f"expected {shape}")
            array = np.ascontiguousarray(value, dtype=dtype).copy()
        elif initializer in ("zeros", "ones"):
            array = (np.zeros if initializer == "zeros" else np.ones)(shape, dtype)
        elif isinstance(initializer, (int, float)) and not isinstance(initializer, bool):
            array = np.full(shape, initializer, dtype)
        else:
            raise errors.HyperparameterError(
                f"{self.name!r}: unknown initializer {initializer!r} for slot {slot_name!r} "
                "(use 'zeros', 'ones', a number or a callable (shape, dtype) -> array)")
        if not isinstance(self.var, np.ndarray):
            from sparseopt import _cuda
            array = _cuda.to_device(array)
        self.slots[slot_name] = array
