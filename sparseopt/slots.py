"""Slot storage: one contiguous array per variable holds all of its rule's slots.

For a variable of shape ``S`` whose rule keeps slots ``("m", "v")``, the optimizer
allocates one C-contiguous array of shape ``(2, *S)``; ``get_slot(var, "m")`` is the
view ``storage[0]``. The variable's backend (:func:`sparseopt.backends.backend_for`) makes
the storage beside the variable: a NumPy variable's starts on a 64-byte cache line
(:func:`sparseopt.backends.cpu.aligned_empty`), so rows whose bytes are a multiple of 64
each lie on whole lines; a CUDA variable's lives on its device. The kernels read and write
``storage`` directly. Slots added by ``add_slot`` that the rule does not use are separate
arrays.

A 16-bit variable (bfloat16, float16) keeps float32 slots, the dtype of its math, or
bfloat16 slots (``slot_dtype="bfloat16"``), and the kernels update its ``uint16`` view
(and that of bfloat16 slots; :mod:`sparseopt.kernels.lowp`).
"""

import numpy as np

from sparseopt import backends, errors
from sparseopt.kernels import cpu, lowp


def _backend_for(var):
    """``var``'s backend; anything but an array gets the CUDA backend, whose check raises
    its error (as before the backends had a seam)."""
    return backends.backend_for(var) or backends.cuda


class VariableState:
    """What the optimizer keeps for one variable."""

    __slots__ = ("var", "name", "backend", "storage", "nslots", "slots", "slot_rows", "kernel_slot_names",
                 "_kernel_views", "kind", "slot_kind", "math_dtype", "lowp", "rounding_key")

    def __init__(self, var, name, kernel_slots, initial_value, rule_slots, slot_dtype=None):
        """``slot_dtype``: ``"bfloat16"`` for bfloat16 slots of a 16-bit variable (else
        ignored: float32 slots for a 16-bit variable, the variable's dtype otherwise)."""
        self.var = var
        self.name = name
        self.backend = backend = _backend_for(var)
        self.nslots = len(kernel_slots)
        self.slot_rows = cpu.slot_rows(tuple(rule_slots), tuple(kernel_slots))
        self.kernel_slot_names = tuple(kernel_slots)
        self.slots = {}
        self._kernel_views = {}  # (rule slots, shape) -> kernel_arrays(...)
        # A 16-bit variable: its kind, and this step's rounding (set by the optimizer
        # before each step: (kind, stochastic) and the step's key).
        self.kind = backend.variable_kind(var)  # (a CUDA array's dtype may not be NumPy's)
        self.slot_kind = "bfloat16" if self.kind and slot_dtype == "bfloat16" else None
        self.lowp = None
        self.rounding_key = 0
        self.storage = backend.slot_storage(var, [initial_value(n) for n in kernel_slots], self.slot_kind)
        #: The dtype of the kernels' math and coefficients: the variable's (as a NumPy type, also
        #: for a CUDA array), float32 for a 16-bit variable.
        self.math_dtype = np.float32 if self.kind else self.storage.dtype.type
        for i, slot_name in enumerate(kernel_slots):
            self.slots[slot_name] = backend.slot_view(self.storage, i)

    def __getstate__(self):
        """The state without its backend, a module (which ``copy.deepcopy`` cannot copy)."""
        return {name: getattr(self, name) for name in self.__slots__
                if name != "backend" and hasattr(self, name)}

    def __setstate__(self, state):
        for name, value in state.items():
            setattr(self, name, value)
        self.backend = _backend_for(self.var)

    def kernel_arrays(self, rule_slots, shape):
        """``(p, slots, used)``: the variable and its kernel slots (a tuple) reshaped to
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
        self.slots[slot_name] = self.backend.to_device(array)
