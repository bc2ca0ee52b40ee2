"""Backends: where a variable's arrays live and how its steps run there.

The core (:mod:`sparseopt.optimizer`, :mod:`sparseopt.slots`, :mod:`sparseopt._exact`,
:mod:`sparseopt._rollback`, :mod:`sparseopt.saving`) never asks which kind of array it
holds: it asks :func:`backend_for` once, keeps the answer (``VariableState.backend``),
and calls the backend's functions, listed by :class:`Backend`. There are two:

* :mod:`sparseopt.backends.cpu`: NumPy arrays, the Numba CPU kernels;
* :mod:`sparseopt.backends.cuda`: CUDA arrays (Numba device arrays, or anything with
  ``__cuda_array_interface__``: CuPy arrays, torch CUDA tensors), the Numba CUDA
  kernels. Importing it imports no ``numba.cuda``: that happens when a CUDA array is
  first seen, so ``import sparseopt`` needs neither a GPU nor numba-cuda.

A backend is a module whose functions make up the protocol (as a Keras backend is).
"""

from typing import Protocol

import numpy as np

from sparseopt.backends import cpu, cuda
from sparseopt.backends._detect import is_device_array

__all__ = ["Backend", "backend_for", "host_array", "is_device_array"]


class Backend(Protocol):
    """What the core asks of a backend for a variable's arrays (each backend module
    defines these names).

    ``on_device``: whether the arrays live on a device: its checks end on the host only
    after :meth:`finish_validation` reads the device's range checks back, and its
    updates launch kernels (``update.on_device``).

    The update objects :meth:`validate` returns have ``map_values(fn)`` and ``norm()``
    (clipping on the de-duplicated rows), ``run(rule, state, c, wd, has_wd)`` and
    ``run_rowwise(rule, state, row_slots, c, wd, has_wd)`` (the elementwise and the
    row-reduction kernels), ``constrain(var, fn)``, and the class attributes
    ``on_device`` and ``sparse``.
    """

    on_device: bool

    def check_variable(self, var, name):
        """Raise the error of a variable that its kernels cannot update in place (dtype,
        layout, read-only), naming ``name``."""

    def variable_kind(self, var):
        """``"bfloat16"`` or ``"float16"`` for a 16-bit variable, else None."""

    def validate(self, g, var, name, store):
        """The update of one checked ``(gradient, variable)`` pair: the gradient checked
        against the variable (raising before anything is written), a sparse one planned
        (on a device: launched, read by :meth:`finish_validation`). ``store``: the
        optimizer's per-variable scratch."""

    def finish_validation(self, updates, batch):
        """Finish the checks of a step's ``updates`` (raising the first bad one's error);
        ``batch``: plan the sparse gradients of one step together where they can be."""

    def slot_storage(self, var, initial_values, slot_kind=None):
        """One contiguous array ``(len(initial_values), *var.shape)`` beside ``var``, filled
        slot by slot: the variable's dtype, float32 for a 16-bit variable, bfloat16 where
        ``slot_kind`` is ``"bfloat16"``."""

    def slot_view(self, storage, i):
        """Slot ``i`` of a storage, a view (also for a 0-d variable)."""

    def row_slot_storage(self, var, initial_values):
        """A row-wise rule's row slots: one contiguous ``(len(initial_values), rows)`` array in
        the variable's math dtype, filled slot by slot."""

    def to_device(self, array):
        """A host array as this backend keeps one (an added slot)."""

    def to_host(self, array):
        """A host copy of one of this backend's arrays."""

    def host_array(self, array):
        """One of this backend's arrays on the host: itself where it is a host array, else a copy."""

    def copy_from_host(self, array, host):
        """``array[...] = host`` (the same shape; cast as NumPy's ``same_kind``)."""

    def dtype_of(self, array):
        """An array's dtype, as a NumPy dtype."""

    def table_key(self, rule, state, update, dtype, has_wd):
        """The key under which a lazy sparse update runs with the other updates of the key
        in one region or launch (:func:`run_tables`), or None: it runs on its own."""

    def run_tables(self, rule, group, c, wd, has_wd, row_names):
        """The ``(state, update)`` pairs ``group`` of one :meth:`table_key`, two or more, in one
        region or launch: the same bits as ``update.run`` one by one."""

    def exact_device(self, var, hist, tab, lowp):
        """Exact mode's per-variable device half (``ExactState.device``), or None: its
        bookkeeping lives on the host."""

    def exact_rows(self, store, state, indices, stream, validate_rows):
        """``(rows, count)``: the unique rows of ``indices`` for a catch-up, checked as a
        sparse gradient's indices before anything is written (``validate_rows(state,
        indices)``: the host's check)."""


_NDARRAY = np.ndarray


def backend_for(array):
    """The backend of ``array``: :mod:`~sparseopt.backends.cpu` for a NumPy array,
    :mod:`~sparseopt.backends.cuda` for a CUDA array (:func:`is_device_array`), None for
    anything else (the caller says what it expected)."""
    if type(array) is _NDARRAY or isinstance(array, _NDARRAY):
        return cpu
    if is_device_array(array):
        return cuda
    return None


def host_array(array):
    """``array`` on the host: a NumPy array as it is, a CUDA array copied, anything else
    through ``np.asarray``."""
    backend = backend_for(array)
    return np.asarray(array) if backend is None else backend.host_array(array)
