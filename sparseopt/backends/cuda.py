"""The CUDA backend: CUDA variables' wrapping, slot storage and update steps.

The steps cover elementwise rules (dense and row-wise sparse kernels), row-wise rules
such as RowwiseAdagrad (:meth:`DenseUpdate.run_rowwise`, :meth:`SparseUpdate.run_rowwise`:
the row-reduction kernels, with the row slots in their own device storage,
:func:`row_slot_storage`), and the device half of ``sparse_mode="exact"``
(:class:`ExactDevice`, driven by :mod:`sparseopt._exact`). It implements
:class:`sparseopt.backends.Backend`; :func:`sparseopt.backends.backend_for` picks it.

A variable is a CUDA array when it is a Numba device array or exports
``__cuda_array_interface__`` (CuPy arrays, torch CUDA tensors, ...;
:func:`sparseopt.backends.is_device_array`). It is updated
in place, its slots live on the same device in one contiguous device array, and
``get_slot`` returns Numba device views of it (zero-copy for any consumer of the
interface, e.g. ``torch.as_tensor(slot, device="cuda")``).

This module is imported with :mod:`sparseopt`, but it imports ``numba.cuda`` only
when a CUDA array is first seen, so ``import sparseopt`` needs neither a GPU, nor
a driver, nor numba-cuda. A CUDA array without them raises
:class:`CudaUnavailableError` saying which is missing. On a GPU, use numba-cuda
(``pip install 'sparseopt[cuda]'``); the CUDA target inside recent numba releases
is deprecated and cannot compile every rule (a warning says so).

:class:`DenseUpdate` and :class:`SparseUpdate` mirror the CPU steps of
:mod:`sparseopt.backends.cpu` (``validate``, ``plan``, ``map_values``, ``norm``,
``run``, ``constrain``). A step makes no host round trip beyond its launches,
except one read of a small ``info`` array per sparse gradient (the index range
check and the number of unique rows: device code cannot raise, so the host must
look before anything is written; one read for a step's tables planned together), and one
scalar per variable when clipping by
norm (``clipnorm``, ``global_clipnorm``), whose comparison runs on the host. Exact
mode adds host-to-device copies only (a coefficient record per step, the idle tables
in use), and ``catch_up`` reads its indices' ``info`` as a sparse gradient does.

Streams: the kernels of a variable run on the stream its gradient names in
``__cuda_array_interface__`` (CuPy, torch: their current stream), or on the
default stream; when the variable's or the indices' stream differs, the streams
are joined with events, never by blocking the host. Run one variable's steps on
one stream (its de-duplication scratch is reused from step to step).

Several GPUs: the slots of a variable are allocated, and its kernels launched, on
the device that holds it, where the array says which (``.device`` of torch and
CuPy arrays); otherwise on the current device.

Table-batched steps (issue 21): the sparse gradients of one ``apply_gradients`` call that
share a device, a launch stream and an index dtype are planned together (one launch
sequence over ``(table, row)`` keys, one read of the range checks: :func:`finish_validation`),
and the lazy updates of those that share a kernel configuration run in one launch
(:func:`run_tables`), with the per-table path's bits. Row-wise rules, exact mode and updates
whose duplicates were summed (clipping) run their own kernels, on views of the shared plan.

16-bit variables (:mod:`sparseopt.kernels.lowp`): a float16 variable is any float16 CUDA
array (typestr ``<f2``); a bfloat16 one is a Numba device array of ``ml_dtypes.bfloat16``
or an interface exporter whose typestr is ``<V2`` (torch's for ``torch.bfloat16``, and
``ml_dtypes.bfloat16``'s ``dtype.str``; no other 2-byte void is a float). The kernels
update the variable's ``uint16`` view (:func:`bits`), with the CPU's element code, slots
float32 (or bfloat16 bits), row slots float32; a 16-bit gradient is widened to float32 on
the device first (exact: the bits of the CPU, whose kernels widen each row as they read it).
"""

import contextlib
import math
import os
import warnings

import numpy as np

from sparseopt import _validation, errors
from sparseopt.backends._detect import is_device_array
from sparseopt.indexed_slices import IndexedSlices
from sparseopt.kernels import cpu, lowp

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FLOAT32 = np.dtype(np.float32)
_UINT16 = np.dtype(np.uint16)


CudaUnavailableError = errors.CudaUnavailableError

#: CUDA arrays live on a device (:class:`sparseopt.backends.Backend`).
on_device = True


# ---------------------------------------------------------------- lazy numba.cuda


class _Runtime:
    """``numba.cuda`` and the CUDA kernel modules, loaded on first use."""

    def __init__(self):
        try:
            from numba import cuda
        except ImportError as exc:  # numba without its CUDA target
            raise CudaUnavailableError(
                "sparseopt: got a CUDA array, but numba's CUDA target is not installed; "
                "install it with: pip install 'sparseopt[cuda]' (the numba-cuda package)") from exc
        self.simulator = _simulator_enabled()
        if not self.simulator and not cuda.is_available():
            reason = ""
            try:
                err = cuda.cuda_error()
                reason = f" ({err})" if err else ""
            except Exception:  # pragma: no cover - older numba
                pass
            raise CudaUnavailableError(
                "sparseopt: got a CUDA array, but CUDA is not available: no GPU or no CUDA "
                f"driver was found{reason}. Use NumPy arrays for the CPU kernels.")
        if not self.simulator and "numba_cuda" not in (getattr(cuda, "__file__", "") or ""):
            warnings.warn(
                "sparseopt: numba's built-in CUDA target is deprecated and cannot compile every "
                "rule (max() for example); install numba-cuda: pip install 'sparseopt[cuda]'",
                RuntimeWarning, stacklevel=4)
        from sparseopt.kernels import cuda as kernels
        from sparseopt.kernels import cuda_dedup, cuda_exact
        self.cuda = cuda
        self.kernels = kernels
        self.dedup = cuda_dedup
        self.exact = cuda_exact
        self.streams = {}
        if self.simulator:
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
            self.fake_array = FakeCUDAArray

    def stream(self, ptr):
        """The Numba stream for an interface's stream handle (``None``: the default stream, 0)."""
        if ptr is None or self.simulator:
            return 0
        stream = self.streams.get(ptr)
        if stream is None:
            stream = self.streams[ptr] = self.cuda.external_stream(ptr)
        return stream


def _simulator_enabled():
    try:
        from numba import config
        if getattr(config, "ENABLE_CUDASIM", 0):
            return True
    except ImportError:  # pragma: no cover
        pass
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


_runtime = None


def runtime():
    """The loaded CUDA runtime (raises :class:`CudaUnavailableError` with the reason if there is none)."""
    global _runtime
    if _runtime is None:
        _runtime = _Runtime()
    return _runtime


# ------------------------------------------------------------------- wrapping


class _HostView:
    """``__array_interface__`` over an interface's pointer (the simulator's "device" is host memory)."""

    def __init__(self, desc, owner):
        self.owner = owner  # the array NumPy builds keeps this view, and so the owner, alive
        self.__array_interface__ = {
            "data": tuple(desc["data"]), "shape": tuple(desc["shape"]),
            "typestr": desc["typestr"], "strides": desc.get("strides"), "version": 3}


class _Wrapped:
    """A CUDA array as Numba sees it, with its stream handle, read-only flag and device."""

    __slots__ = ("array", "stream", "readonly", "device")

    def __init__(self, array, stream, readonly, device):
        self.array = array
        self.stream = stream
        self.readonly = readonly
        self.device = device


def _device_index(obj):
    """The GPU an array says it lives on (torch ``.device.index``, CuPy ``.device.id``), or None."""
    dev = getattr(obj, "device", None)
    for attr in ("index", "id"):
        value = getattr(dev, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _on_device(rt, index):
    if index is None or rt.simulator:
        return contextlib.nullcontext()
    return rt.cuda.gpus[index]


def wrap(obj, name, what):
    """``obj`` as a :class:`_Wrapped` Numba device array (zero-copy)."""
    rt = runtime()
    if getattr(type(obj), "__cuda_ndarray__", False):  # a Numba (or simulator) device array
        stream = getattr(obj, "stream", 0)
        handle = None
        if not rt.simulator and stream:
            handle = getattr(obj, "__cuda_array_interface__", {}).get("stream")
        return _Wrapped(obj, handle, False, None)
    try:
        desc = obj.__cuda_array_interface__
    except Exception as exc:
        raise errors.ArrayLayoutError(
            f"{name!r}: cannot read the CUDA array interface of the {what}: {exc}") from None
    desc = dict(desc)
    stream = desc.pop("stream", None)
    readonly = bool(desc["data"][1])
    device = _device_index(obj)
    if desc.get("mask") is not None:
        raise errors.ArrayLayoutError(f"{name!r}: masked CUDA arrays are not supported ({what})")
    try:
        dtype = np.dtype(desc["typestr"])
    except TypeError:
        raise errors.DtypeMismatchError(
            f"{name!r}: the {what} has an unsupported CUDA dtype {desc['typestr']!r}") from None
    bfloat16 = dtype.kind == "V" and dtype.itemsize == 2 and lowp.BFLOAT16 is not None
    if dtype.kind not in "fiu" and not bfloat16:
        raise errors.DtypeMismatchError(f"{name!r}: the {what} has an unsupported dtype {dtype}")
    if rt.simulator:
        array = rt.fake_array(np.asarray(_HostView(desc, obj)))
    else:
        with _on_device(rt, device):
            array = rt.cuda.from_cuda_array_interface(desc, owner=obj, sync=False)
    if bfloat16:  # "<V2": torch's bfloat16 (and ml_dtypes' dtype.str); no other 2-byte float is a void
        array = array.view(lowp.BFLOAT16)
    return _Wrapped(array, stream, readonly, device)


def _contiguous(array):
    return array.is_c_contiguous()


def bits(array):
    """A 16-bit (bfloat16, float16) device array's ``uint16`` view, what the kernels update;
    any other array as it is."""
    return array.view(_UINT16) if lowp.kind(array.dtype) else array


def check_variable(var, name):
    """Check a CUDA variable: float32, float64, bfloat16 or float16; C-contiguous, writeable.
    Returns its :class:`_Wrapped` (``array`` of the variable's dtype)."""
    w = wrap(var, name, "variable")
    if w.array.dtype not in _FLOAT_DTYPES and not lowp.kind(w.array.dtype):
        raise errors.DtypeMismatchError(
            f"{name!r}: variables must be float32, float64, bfloat16 (ml_dtypes) or float16; "
            f"got {w.array.dtype}")
    if not _contiguous(w.array):
        raise errors.ArrayLayoutError(
            f"{name!r}: variables must be C-contiguous (they are updated in place); "
            f"got strides {tuple(w.array.strides)}")
    if w.readonly:
        raise errors.ArrayLayoutError(f"{name!r}: the variable is read-only")
    return w


def _wrap_gradient_part(obj, var_w, name, what):
    if not is_device_array(obj):
        raise errors.DeviceMismatchError(
            f"{name!r}: the variable is a CUDA array but the {what} "
            f"{'are' if what.endswith('s') else 'is'} a host {type(obj).__name__}; "
            f"put the {what} on the variable's device")
    device = _device_index(obj)
    if device is not None and var_w.device is not None and device != var_w.device:
        raise errors.DeviceMismatchError(
            f"{name!r}: the variable is on GPU {var_w.device} but the {what} is on GPU {device}")
    w = wrap(obj, name, what)
    if not _contiguous(w.array):
        raise errors.ArrayLayoutError(
            f"{name!r}: the {what} must be C-contiguous on the device; got strides "
            f"{tuple(w.array.strides)} (make a contiguous copy, e.g. .contiguous())")
    return w


def _launch_stream(rt, primary, *others):
    """The stream to launch on (``primary``'s), made to wait for the others' work with events."""
    stream = rt.stream(primary)
    for other in others:
        if other is not None and other != primary and not rt.simulator:
            event = rt.cuda.event(timing=False)
            event.record(stream=rt.stream(other))
            event.wait(stream=stream)
    return stream


def _release_to(rt, stream, var_stream_handle, launch_handle):
    """Make the variable's stream wait for the update, when it is not the launch stream."""
    if var_stream_handle is not None and var_stream_handle != launch_handle and not rt.simulator:
        event = rt.cuda.event(timing=False)
        event.record(stream=stream)
        event.wait(stream=rt.stream(var_stream_handle))


def _read_scalar(array, stream):
    """Copy a small device array to the host (a synchronization point)."""
    if isinstance(stream, int):
        return array.copy_to_host()
    host = array.copy_to_host(stream=stream)
    stream.synchronize()
    return host


# ----------------------------------------------------------------- slot storage


def variable_kind(var):
    """``"bfloat16"`` or ``"float16"`` for a 16-bit CUDA variable, else None (see :func:`wrap`)."""
    return lowp.kind(check_variable(var, "variable").array.dtype)


def _math_dtype(dtype):
    """The dtype of a variable's math and of its float slots: float32 for a 16-bit variable."""
    return _FLOAT32 if lowp.kind(dtype) else np.dtype(dtype)


def _fill(rt, flat, value):
    """``flat[:] = value`` on the default stream, a bfloat16 array through its bits
    (``value`` rounded to nearest, as NumPy fills a host bfloat16 array)."""
    k = rt.kernels
    threads = k.launch_config().threads
    if lowp.kind(flat.dtype):
        value = np.array(value, flat.dtype).view(_UINT16)[()]
        flat = flat.view(_UINT16)
    else:
        value = flat.dtype.type(value)
    k.fill[k.blocks_for(flat.size, threads), threads, 0](flat, value)


def slot_storage(var, initial_values, slot_kind=None):
    """One contiguous device array ``(len(initial_values), *var.shape)``, filled slot by slot.

    Its dtype is the variable's, float32 for a 16-bit variable, or bfloat16 where
    ``slot_kind`` is ``"bfloat16"`` (a 16-bit variable's ``slot_dtype``)."""
    rt = runtime()
    w = check_variable(var, "variable")
    shape = tuple(w.array.shape)
    dtype = _math_dtype(w.array.dtype)
    if slot_kind and lowp.kind(w.array.dtype):
        dtype = lowp.BFLOAT16
    nslots = len(initial_values)
    with _on_device(rt, w.device):
        storage = rt.cuda.device_array((nslots,) + shape, dtype)
        size = math.prod(shape)
        if nslots and size:
            flat = storage.reshape((nslots, size))
            for i, value in enumerate(initial_values):
                _fill(rt, flat[i], value)
            # Once per variable: the fills (default stream) finish before any stream reads the slots.
            rt.cuda.synchronize()
    return storage


def row_slot_storage(var, initial_values):
    """The row slots of a row-wise rule: one contiguous device array ``(len(initial_values), rows)``
    (rows: the variable's first axis; a 0-d variable is one row), filled slot by slot; of the
    variable's math dtype (float32 for a 16-bit variable, as on the CPU)."""
    rt = runtime()
    w = check_variable(var, "variable")
    rows = int(w.array.shape[0]) if w.array.ndim else 1
    with _on_device(rt, w.device):
        storage = rt.cuda.device_array((len(initial_values), rows), _math_dtype(w.array.dtype))
        for i, value in enumerate(initial_values):
            _fill(rt, storage[i], value)
        rt.cuda.synchronize()  # as slot_storage: the fills finish before any stream reads them
    return storage


def slot_view(storage, i):
    """Slot ``i`` of a storage: a device view (also for 0-d variables)."""
    if storage.ndim > 1:
        return storage[i]
    return storage[i:i + 1].reshape(())


def to_device(array):
    """A host array copied to the current device."""
    return runtime().cuda.to_device(np.ascontiguousarray(array))


def to_host(array):
    """A host copy of a device array (of a NumPy array: a copy)."""
    if isinstance(array, np.ndarray):
        return array.copy()
    if getattr(type(array), "__cuda_ndarray__", False):
        return array.copy_to_host()
    return wrap(array, "array", "array").array.copy_to_host()


def host_array(array):
    """A host copy of a device array (:func:`to_host`)."""
    return to_host(array)


def copy_from_host(device_array, host):
    """``device_array[...] = host`` (same shape; cast as NumPy's ``same_kind``)."""
    host = np.ascontiguousarray(np.asarray(host).astype(device_array.dtype, casting="same_kind"))
    device_array.copy_to_device(host.reshape(device_array.shape))


def dtype_of(array):
    """A CUDA array's dtype: its interface's typestr (torch's and CuPy's dtypes are not
    NumPy's), or a Numba simulator array's own."""
    try:
        typestr = array.__cuda_array_interface__["typestr"]
    except AttributeError:
        return np.dtype(array.dtype)
    return np.dtype(typestr)


# ------------------------------------------------------------------- scratch


class Scratch:
    """Per-variable device scratch, reused from step to step (grown by doubling)."""

    def __init__(self):
        self._planner = None
        self._buffers = {}
        self._iota = None

    def planner(self):
        if self._planner is None:
            self._planner = runtime().dedup.Planner()
        return self._planner

    def buffer(self, key, size, dtype):
        """A flat device buffer of at least ``size`` elements (its first ``size``)."""
        dtype = np.dtype(dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.size < size or buf.dtype != dtype:
            cap = max(size, 2 * (buf.size if buf is not None else 0), 1)
            buf = self._buffers[key] = runtime().cuda.device_array(cap, dtype)
        return buf[:size]

    def iota(self, size, stream):
        """``arange(size)`` (int64) on the device."""
        if self._iota is None or self._iota.size < size:
            rt = runtime()
            cap = max(size, 2 * (self._iota.size if self._iota is not None else 0), 16)
            self._iota = rt.cuda.device_array(cap, np.int64)
            threads = rt.kernels.launch_config().threads
            rt.kernels.iota[rt.kernels.blocks_for(cap, threads), threads, stream](self._iota)
        return self._iota[:size]


def scratch_for(store, var):
    """The :class:`Scratch` of ``var`` in the optimizer's per-variable scratch dict."""
    scratch = store.get(id(var))
    if not isinstance(scratch, Scratch):
        scratch = store[id(var)] = Scratch()
    return scratch


# ------------------------------------------------------------ gradient maps


def _elementwise(fn):
    """``(op, arg)`` of a gradient map the device can run (see ``optimizer._Elementwise``)."""
    op = getattr(fn, "op", None)
    if op in ("clip", "scale"):
        return op, fn.arg
    raise TypeError(f"CUDA gradients take only sparseopt's clipping maps; got {fn!r}")


def _apply_elementwise(rt, fn, src, dst, stream):
    op, arg = _elementwise(fn)
    k = rt.kernels
    threads = k.launch_config().threads
    kernel = k.clip if op == "clip" else k.scale
    if dst.size:
        kernel[k.blocks_for(dst.size, threads), threads, stream](src, dst, dst.dtype.type(arg))


def _norm(rt, scratch, flat, stream):
    partial = scratch.buffer("norm", rt.kernels.launch_config().threads, np.float64)
    rt.kernels.sum_squares(flat, partial, stream)
    return math.sqrt(float(_read_scalar(partial[:1], stream)[0]))


# ------------------------------------------------------------------ updates


def _kernel_slots(state, rule, p):
    """The kernel's tuple of slot arrays (device views shaped like ``p``; bfloat16 slots as their
    ``uint16`` bits) and their ``used`` flags."""
    kept = {name: bits(state.slots[name].reshape(p.shape)) for name in state.kernel_slot_names}
    return cpu.place(rule.SLOTS, kept, p)


def _rounding(state, c):
    """``(lowp_config, c)`` of a kernel on ``state``'s variable: ``(None, c)``, or for a 16-bit
    variable its rounding and ``c`` with the step's key (``VariableState.kernel_step``)."""
    step = getattr(state, "kernel_step", None)
    return (None, c) if step is None else step(c)


def _widened(rt, scratch, key, array, stream):
    """A gradient as the kernels read it: float32 for a 16-bit one (widened, exactly, into
    scratch ``key``; the CPU kernels widen each row as they read it, the same values), else ``array``."""
    kind = lowp.kind(array.dtype)
    if kind is None:
        return array
    flat = array.reshape((array.size,))
    out = scratch.buffer(key, array.size, _FLOAT32)
    if array.size:
        k = rt.kernels
        threads = k.launch_config().threads
        k.widen_kernel(kind)[k.blocks_for(array.size, threads), threads, stream](flat.view(_UINT16), out)
    return out.reshape(tuple(array.shape))


def _run_rows(rt, rule, state, row_slots, p, values, plan, c, wd, has_wd, stream):
    """One step of a row-wise rule (:func:`sparseopt.kernels.cuda.row_kernel`) on ``p`` ``(rows, d)``.

    ``row_slots``: ``{name: device view}`` of the kept row slots; ``plan``:
    ``(rows, offsets, order, k)``, with ``k = None`` for a dense gradient ``values``
    ``(rows, d)`` (then ``rows``, ``offsets``, ``order`` are int64 placeholders).
    """
    k = rt.kernels
    num_rows, width = p.shape
    dense = plan[3] is None
    count = num_rows if dense else plan[3]
    if width == 0 or count == 0:  # no columns, or no touched row: nothing to reduce or update
        return
    slots, used = _kernel_slots(state, rule, p)
    flat = p.reshape((p.size,))  # a placeholder for row slots the configuration does not keep
    kept = {name: view.reshape((num_rows,)) for name, view in row_slots.items()}
    rslots, row_used = cpu.place(rule.ROW_SLOTS, kept, flat)
    cfg = k.launch_config()
    rounding, c = _rounding(state, c)
    dtype = np.dtype(state.math_dtype) if rounding is not None else p.dtype
    kernel = k.row_kernel(rule, used, row_used, has_wd, dense, dtype, cfg.row_threads, rounding)
    lanes, per_block = k.row_layout(width)
    kernel[k.blocks_for(count, per_block), (lanes, per_block), stream](
        p, slots, rslots, *plan[:3], values, count, c, wd, dtype.type(width))


class DenseUpdate:
    """A dense CUDA gradient for a CUDA variable (see :class:`sparseopt.backends.cpu.DenseUpdate`)."""

    on_device = True
    sparse = False
    __slots__ = ("var", "values", "stream", "handles", "owned", "scratch", "device", "shape", "dtype")

    def __init__(self, var, values, stream, handles, scratch, device, shape, dtype, owned=False):
        self.var = var  # flat; a 16-bit variable's uint16 bits
        self.values = values  # flat, in the math dtype (a 16-bit gradient widened)
        self.stream = stream
        self.handles = handles
        self.owned = owned
        self.scratch = scratch
        self.device = device
        self.shape = shape
        self.dtype = dtype  # the variable's

    @classmethod
    def validate(cls, g, var, name, store):
        rt = runtime()
        vw = check_variable(var, name)
        gw = _wrap_gradient_part(g, vw, name, "gradient")
        _validation.check_gradient_dtype(name, vw.array, gw.array.dtype)
        if tuple(gw.array.shape) != tuple(vw.array.shape):
            raise errors.ShapeMismatchError(
                f"{name!r}: gradient shape {tuple(gw.array.shape)} differs from the variable's "
                f"{tuple(vw.array.shape)}")
        size = vw.array.size
        scratch = scratch_for(store, var)
        with _on_device(rt, vw.device):
            stream = _launch_stream(rt, gw.stream, vw.stream)
            values = _widened(rt, scratch, "widened", gw.array, stream)
        return cls(bits(vw.array).reshape((size,)), values.reshape((size,)), stream, (gw.stream, vw.stream),
                   scratch, vw.device, tuple(vw.array.shape), vw.array.dtype, owned=values is not gw.array)

    def plan(self):
        pass

    def finish(self):
        pass

    def map_values(self, fn):
        rt = runtime()
        dst = self.values
        if not self.owned:
            dst = self.scratch.buffer("dense", self.values.size, self.values.dtype)
        with _on_device(rt, self.device):
            _apply_elementwise(rt, fn, self.values, dst, self.stream)
        self.values = dst
        self.owned = True

    def norm(self):
        rt = runtime()
        with _on_device(rt, self.device):
            return _norm(rt, self.scratch, self.values, self.stream)

    def run(self, rule, state, c, wd, has_wd):
        rt = runtime()
        n = self.var.size
        if n == 0:
            return
        k = rt.kernels
        slots, used = _kernel_slots(state, rule, self.var)
        rounding, c = _rounding(state, c)
        kernel = k.dense_kernel(rule, used, has_wd, rounding)
        threads = k.launch_config().threads
        with _on_device(rt, self.device):
            kernel[k.blocks_for(n, threads), threads, self.stream](self.var, self.values, slots, c, wd)
            _release_to(rt, self.stream, self.handles[1], self.handles[0])

    def run_rowwise(self, rule, state, row_slots, c, wd, has_wd):
        """:meth:`run` for a row-wise rule: every row, through the row-reduction kernel."""
        rt = runtime()
        rows = self.shape[0] if self.shape else 1
        width = self.var.size // rows if rows else 0
        with _on_device(rt, self.device):
            none = self.scratch.iota(1, self.stream)
            _run_rows(rt, rule, state, row_slots, self.var.reshape((rows, width)),
                      self.values.reshape((rows, width)), (none, none, none, None), c, wd, has_wd,
                      self.stream)
            _release_to(rt, self.stream, self.handles[1], self.handles[0])

    def constrain(self, var, fn):
        rt = runtime()
        out = fn(var)
        if out is var:
            return
        ow = _wrap_gradient_part(out, _Wrapped(None, None, False, self.device), "constraint", "result")
        if ow.array.size != self.var.size or ow.array.dtype != self.dtype:
            raise errors.ShapeMismatchError(
                f"constraint returned shape {tuple(ow.array.shape)}, dtype {ow.array.dtype}; "
                f"expected the variable's ({self.var.size} elements of {self.dtype})")
        k = rt.kernels
        threads = k.launch_config().threads
        with _on_device(rt, self.device):
            k.copy[k.blocks_for(self.var.size, threads), threads, self.stream](
                bits(ow.array).reshape((self.var.size,)), self.var)


class SparseUpdate:
    """An ``IndexedSlices`` of CUDA arrays for a CUDA variable (see
    :class:`sparseopt.backends.cpu.SparseUpdate`)."""

    on_device = True
    sparse = True
    __slots__ = ("var", "values", "indices", "name", "stream", "handles", "scratch", "device",
                 "num_rows", "row_shape", "rows", "offsets", "order", "k", "summed", "dtype", "store",
                 "table_plan")

    def __init__(self, var, values, indices, name, stream, handles, scratch, device, row_shape, dtype):
        self.var = var  # (rows, width); a 16-bit variable's uint16 bits
        self.dtype = dtype  # the variable's
        self.values = values  # (n, width), in the math dtype (16-bit gradient values widened)
        self.indices = indices
        self.name = name
        self.stream = stream
        self.handles = handles
        self.scratch = scratch
        self.device = device
        self.num_rows = var.shape[0]
        self.row_shape = row_shape
        self.k = 0
        self.summed = False
        self.store = None  # the optimizer's scratch dict (a table-batched plan's scratch lives there)
        self.table_plan = None  # (planner, where the table's unique rows start), when planned with others

    @classmethod
    def validate(cls, g, var, name, store):
        rt = runtime()
        vw = check_variable(var, name)
        values_w = _wrap_gradient_part(g.values, vw, name, "gradient values")
        indices_w = _wrap_gradient_part(g.indices, vw, name, "indices")
        values, indices, v = values_w.array, indices_w.array, vw.array
        _validation.check_sparse_layout(name, v, values, indices, g.dense_shape)
        row_shape = tuple(v.shape[1:])
        width = math.prod(row_shape)
        scratch = scratch_for(store, var)
        with _on_device(rt, vw.device):
            stream = _launch_stream(rt, values_w.stream, indices_w.stream, vw.stream)
            values = _widened(rt, scratch, "widened", values.reshape((values.shape[0], width)), stream)
        update = cls(bits(v).reshape((v.shape[0], width)), values, indices, name, stream,
                     (values_w.stream, vw.stream), scratch, vw.device, row_shape, v.dtype)
        update.store = store
        return update

    def plan(self):
        """Launch the range check and the de-duplication (results are read by :meth:`finish`)."""
        if self.indices.size:
            with _on_device(runtime(), self.device):
                self.scratch.planner().enqueue(self.indices, self.num_rows, self.stream)

    def finish(self):
        """Read the plan's ``info`` (one small copy) and raise if an index is out of range."""
        if not self.indices.size:
            self.k = 0
            return
        planner = self.scratch.planner()
        with _on_device(runtime(), self.device):
            bad, k = planner.read_info(self.stream)
            if bad >= 0:
                value = int(_read_scalar(self.indices[bad:bad + 1], self.stream)[0])
                raise errors.IndexOutOfRangeError(
                    f"{self.name!r}: indices must lie in [0, {self.num_rows}); "
                    f"got {value} at position {bad}")
        self.k = k
        self.rows, self.offsets, self.order = planner.result(k)

    def _row_launch(self, count):
        k = runtime().kernels
        lanes, per_block = k.row_layout(self.values.shape[1])
        return k.blocks_for(count, per_block), (lanes, per_block)

    def _sum_duplicates(self):
        if self.summed:
            return
        rt = runtime()
        k, width = self.k, self.values.shape[1]
        out = self.scratch.buffer("summed", k * width, self.values.dtype).reshape((k, width))
        with _on_device(rt, self.device):
            if k:
                blocks, block = self._row_launch(k)
                rt.kernels.segment_sum[blocks, block, self.stream](
                    self.values, self.offsets, self.order, k, out)
            ids = self.scratch.iota(k + 1, self.stream)
        self.values = out
        self.offsets, self.order = ids, ids[:k]
        self.summed = True
        self.table_plan = None

    def map_values(self, fn):
        self._sum_duplicates()
        rt = runtime()
        flat = self.values.reshape((self.values.size,))
        with _on_device(rt, self.device):
            _apply_elementwise(rt, fn, flat, flat, self.stream)

    def norm(self):
        self._sum_duplicates()
        rt = runtime()
        with _on_device(rt, self.device):
            return _norm(rt, self.scratch, self.values.reshape((self.values.size,)), self.stream)

    def run(self, rule, state, c, wd, has_wd):
        if self.k == 0:
            return
        rt = runtime()
        slots, used = _kernel_slots(state, rule, self.var)
        rounding, c = _rounding(state, c)
        kernel = rt.kernels.sparse_kernel(rule, used, has_wd, rounding)
        blocks, block = self._row_launch(self.k)
        with _on_device(rt, self.device):
            kernel[blocks, block, self.stream](self.var, slots, self.rows, self.offsets, self.order,
                                               self.values, self.k, c, wd)
            _release_to(rt, self.stream, self.handles[1], self.handles[0])

    def run_rowwise(self, rule, state, row_slots, c, wd, has_wd):
        """:meth:`run` for a row-wise rule: the unique rows, through the row-reduction kernel."""
        if self.k == 0:
            return
        rt = runtime()
        with _on_device(rt, self.device):
            _run_rows(rt, rule, state, row_slots, self.var, self.values,
                      (self.rows, self.offsets, self.order, self.k), c, wd, has_wd, self.stream)
            _release_to(rt, self.stream, self.handles[1], self.handles[0])

    def constrain(self, var, fn):
        """``var[rows] = fn(var[rows])``: ``fn`` gets a Numba device array of the touched rows."""
        if self.k == 0:
            return
        rt = runtime()
        k = rt.kernels
        width = self.var.shape[1]
        threads = k.launch_config().threads
        touched = self.scratch.buffer("constrain", self.k * width, self.var.dtype).reshape((self.k, width))
        with _on_device(rt, self.device):
            k.gather_rows[k.blocks_for(self.k * width, threads), threads, self.stream](
                self.var, self.rows, self.k, touched)
            if touched.dtype != self.dtype:  # a 16-bit variable's bits: fn gets its dtype
                touched = touched.view(self.dtype)
            out = fn(touched.reshape((self.k,) + self.row_shape))
            ow = _wrap_gradient_part(out, _Wrapped(None, None, False, self.device), "constraint", "result")
            if ow.array.size != self.k * width or ow.array.dtype != self.dtype:
                raise errors.ShapeMismatchError(
                    f"constraint returned shape {tuple(ow.array.shape)}, dtype {ow.array.dtype}; "
                    f"expected {(self.k,) + self.row_shape} of {self.dtype}")
            k.scatter_rows[k.blocks_for(self.k * width, threads), threads, self.stream](
                bits(ow.array).reshape((self.k, width)), self.rows, self.k, self.var)


# ------------------------------------------------------------------ exact mode


class ExactDevice:
    """The device half of a CUDA variable's exact-mode bookkeeping (``sparse_mode="exact"``).

    :class:`sparseopt._exact.ExactState` keeps the step counts, the coefficient ring
    ``hist`` and the idle tables ``tab`` on the host, as for a NumPy variable; this
    keeps ``last`` (int64 per row) on the variable's device, and device copies of
    ``hist`` (written one record per step: a few bytes) and of ``tab`` (the rows of
    the windows in use, after the host recomputes them), and launches the kernels of
    :mod:`sparseopt.kernels.cuda_exact`. Copies go host to device on the stream of the
    variable's last step, with no synchronization; nothing is read back.
    """

    __slots__ = ("device", "stream", "last", "hist", "tab", "lowp", "host_hist")

    def __init__(self, var, hist, tab, lowp=None):
        """``lowp``: a 16-bit variable's rounding (:class:`sparseopt._exact.ExactState`'s), else None."""
        rt = runtime()
        self.lowp = lowp
        self.host_hist = hist  # the host ring (the rounding key of a catch-up's last step)
        w = check_variable(var, "variable")
        rows = int(w.array.shape[0]) if w.array.ndim else 1
        self.device = w.device
        self.stream = 0  # the stream of the variable's last step; flush and catch_up use it
        with _on_device(rt, self.device):
            self.last = rt.cuda.device_array(rows, np.int64)
            k = rt.kernels
            threads = k.launch_config().threads
            k.fill[k.blocks_for(rows, threads), threads, 0](self.last, 0)
            self.hist = rt.cuda.to_device(_aligned_records(hist))
            self.tab = rt.cuda.to_device(tab)
            rt.cuda.synchronize()  # once per variable, as slot_storage

    def _copy(self, device_array, host_array):
        if isinstance(self.stream, int):
            device_array.copy_to_device(host_array)
        else:
            device_array.copy_to_device(host_array, stream=self.stream)

    def write_record(self, hist, index):
        """Mirror ``hist[index]`` (just written on the host)."""
        with _on_device(runtime(), self.device):
            self._copy(self.hist[index:index + 1], _aligned_records(hist[index:index + 1]))

    def copy_tables(self, tab, lo, hi):
        """Mirror the rows ``L % H`` of ``tab`` for the windows ``L`` in ``[lo, hi]`` (at most two runs of the ring)."""
        size = tab.shape[0]
        start, count = lo % size, min(hi - lo + 1, size)
        with _on_device(runtime(), self.device):
            first = min(count, size - start)
            self._copy(self.tab[start:start + first], tab[start:start + first])
            if count > first:
                self._copy(self.tab[:count - first], tab[:count - first])

    def _arrays(self, rule, state):
        """The variable ``(rows, width)`` as a device array, its kernel slots and their ``used`` flags."""
        var = bits(check_variable(state.var, state.name).array)
        rows = self.last.size
        p = var.reshape((rows, var.size // rows if rows else 0))
        slots, used = _kernel_slots(state, rule, p)
        return p, slots, used

    def sparse_step(self, rule, state, update, floor, hi, c, wd, has_wd, c_idle, zero, tol):
        """Step ``hi + 1`` of a sparse update (:class:`SparseUpdate`, planned), its rows first
        caught up from their last steps; then ``last[rows] = hi + 1``."""
        rt = runtime()
        slots, used = _kernel_slots(state, rule, update.var)
        blocks, block = update._row_launch(update.k)
        rounding, c = _rounding(state, c)
        kernel = rt.exact.sparse_kernel(rule, used, has_wd, rounding)
        with _on_device(rt, self.device):
            kernel[blocks, block, update.stream](
                update.var, slots, update.rows, update.offsets, update.order, update.values, update.k,
                self.last, floor, hi, self.hist, self.tab, c, wd, c_idle, zero, tol)
            self.set_last((update.rows, update.k), hi + 1, update.stream)
            _release_to(rt, update.stream, update.handles[1], update.handles[0])

    def catch_up(self, rule, state, rows, floor, hi, has_wd, c_idle, zero, tol):
        """Catch ``rows`` (``(device rows, k)``, unique; ``None``: every row) up to step ``hi``;
        the listed rows' ``last`` becomes ``hi`` (a full pass leaves it: the caller raises ``floor``)."""
        rt = runtime()
        p, slots, used = self._arrays(rule, state)
        if p.size == 0:
            return
        every = rows is None
        ids, k = (self.last, p.shape[0]) if every else rows
        lanes, per_block = rt.kernels.row_layout(p.shape[1])
        with _on_device(rt, self.device):
            rt.exact.catch_up_kernel(rule, used, has_wd, self.lowp)[
                rt.kernels.blocks_for(k, per_block), (lanes, per_block), self.stream](
                p, slots, ids, k, every, self.last, floor, hi, self.hist, self.tab, c_idle, zero, tol)
            if not every:
                self.set_last(rows, hi, self.stream)

    def decay_rows(self, rule, state, rows, floor, hi, has_wd):
        """Row-wise rules: bring ``rows`` (as :meth:`catch_up`) to step ``hi``, which changes
        them only by the idle steps' weight decay."""
        rt = runtime()
        p, _, _ = self._arrays(rule, state)
        every = rows is None
        ids, k = (self.last, p.shape[0]) if every else rows
        kernels = rt.kernels
        threads = kernels.launch_config().threads
        with _on_device(rt, self.device):
            if has_wd and p.size:
                grid = kernels.blocks_for(k * p.shape[1], threads), threads, self.stream
                key = (np.uint64(0) if self.lowp is None else
                       self.host_hist[hi % self.host_hist.shape[0]]["rounding_key"])
                rt.exact.decay_rows(self.lowp)[grid](p, ids, k, every, self.last, floor, hi,
                                                     self.tab, key)
            if not every:
                self.set_last(rows, hi, self.stream)

    def set_last(self, rows, value, stream):
        """``last[rows] = value`` for ``rows`` = ``(device rows, k)``."""
        rt = runtime()
        ids, k = rows
        threads = rt.kernels.launch_config().threads
        with _on_device(rt, self.device):
            rt.exact.set_last[rt.kernels.blocks_for(k, threads), threads, stream](self.last, ids, k, value)


def _aligned_records(hist):
    """History records with their fields aligned, as device code reads them: a 16-bit
    variable's float32 record ends in a uint64 ``rounding_key``, which the packed host
    layout leaves at an offset of 4 mod 8 (a misaligned load that the CUDA target refuses)."""
    dtype = np.dtype([(name, hist.dtype.fields[name][0]) for name in hist.dtype.names], align=True)
    return hist if dtype == hist.dtype else np.ascontiguousarray(hist.astype(dtype))


def exact_device(var, hist, tab, lowp_config):
    """The device half of ``var``'s exact-mode bookkeeping (:class:`ExactDevice`)."""
    return ExactDevice(var, hist, tab, lowp_config)


def exact_rows(store, state, indices, stream, validate_rows=None):
    """``(rows, k)``: the unique rows of ``indices`` for :meth:`sparseopt.Optimizer.catch_up`
    on a CUDA variable, ``rows`` as ``(device rows, k)``: checked as a sparse gradient's
    indices (type, shape, range; one small read of the range check) before anything is
    written (on the device: ``validate_rows``, the host's check, is not used).

    ``indices``: a CUDA array, or host indices (copied to the device: they are small).
    ``stream``: the variable's last step's (:class:`ExactDevice`), which may still be
    reading the de-duplication scratch that this plan reuses.
    """
    rt = runtime()
    name = state.name
    vw = check_variable(state.var, name)
    if is_device_array(indices):
        idx = _wrap_gradient_part(indices, vw, name, "indices").array
    else:
        idx = np.asarray(indices)
    count = idx.shape[0] if idx.ndim else 0
    values = np.broadcast_to(np.zeros((), vw.array.dtype), (count,) + tuple(vw.array.shape[1:]))
    _validation.check_sparse_layout(name, vw.array, values, idx, None)  # values: shape and dtype only
    if isinstance(idx, np.ndarray):
        if idx.dtype.itemsize < 4 or idx.dtype == np.uint32:
            idx = idx.astype(np.int64)
        idx = to_device(idx)
    if idx.size == 0:
        return (None, 0), 0
    planner = scratch_for(store, state.var).planner()
    num_rows = vw.array.shape[0]
    with _on_device(rt, vw.device):
        planner.enqueue(idx, num_rows, stream)
        bad, k = planner.read_info(stream)
        if bad >= 0:
            value = int(_read_scalar(idx[bad:bad + 1], stream)[0])
            raise errors.IndexOutOfRangeError(
                f"{name!r}: indices must lie in [0, {num_rows}); got {value} at position {bad}")
    return (planner.result(k)[0], k), k


def validate(g, var, name, store):
    """The CUDA update of one ``(gradient, variable)`` pair, validated (a sparse one is
    planned by :func:`finish_validation`)."""
    if isinstance(g, IndexedSlices):
        return SparseUpdate.validate(g, var, name, store)
    return DenseUpdate.validate(g, var, name, store)


def finish_validation(updates, batch=False):
    """Plan every sparse CUDA update and read back the range checks; raises before anything
    is written (the first bad table in pair order, at its first bad position, as if each
    were planned in turn).

    ``batch``: sparse updates that share a device, a launch stream and an index dtype are
    planned together (:class:`sparseopt.kernels.cuda_dedup.TablePlanner`: one launch
    sequence and one read for all of them; each gets a view of the shared plan), and
    :func:`run_tables` updates them in one launch. Otherwise each is planned on its own.
    """
    sparse = [u for u in updates if type(u) is SparseUpdate]
    groups = {}
    if batch:
        for u in sparse:
            if u.indices.size:
                groups.setdefault((u.device, id(u.stream), u.indices.dtype), []).append(u)
    together = {}
    for group in groups.values():
        if len(group) > 1:
            plan = _plan_tables(group)
            for t, u in enumerate(group):
                together[id(u)] = (plan, t)
    for u in sparse:
        if id(u) not in together:
            u.plan()
    read = {}
    for u in sparse:
        found = together.get(id(u))
        if found is None:
            u.finish()
            continue
        plan, t = found
        result = read.get(id(plan))
        if result is None:
            result = read[id(plan)] = _read_tables(plan)
        bad, ustart = result
        planner, starts, group = plan
        if bad >= 0 and starts[t] <= bad < starts[t + 1]:
            local = bad - int(starts[t])
            with _on_device(runtime(), u.device):
                value = int(_read_scalar(u.indices[local:local + 1], u.stream)[0])
            raise errors.IndexOutOfRangeError(
                f"{u.name!r}: indices must lie in [0, {u.num_rows}); got {value} at position {local}")
        if bad < 0:
            u.rows, u.offsets, u.order, u.k = planner.table_result(ustart, t)
            u.table_plan = (planner, int(ustart[t]))


def address(array):
    """The device address of a device array's first element."""
    if runtime().simulator:
        return array._ary.ctypes.data if hasattr(array, "_ary") else np.asarray(array).ctypes.data
    return array.__cuda_array_interface__["data"][0]


def _plan_tables(group):
    """Launch the shared plan of the sparse updates ``group`` (see :func:`finish_validation`)."""
    rt = runtime()
    first = group[0]
    key = ("cuda tables", first.device, id(first.stream), first.indices.dtype)  # one per plan group of a step
    planner = first.store.get(key)
    if planner is None:
        planner = first.store[key] = rt.dedup.TablePlanner()
    dd = rt.dedup
    tables = len(group)
    meta = np.zeros((4, tables + 1), np.int64)
    for t, u in enumerate(group):
        meta[dd.T_ADDRESS, t] = address(u.indices)
        meta[dd.T_ROWS, t] = u.num_rows
    meta[dd.T_START, 1:] = np.cumsum([u.indices.size for u in group])
    meta[dd.T_KEY, 1:] = np.cumsum([u.num_rows for u in group])
    with _on_device(rt, first.device):
        planner.meta = to_device(meta)  # kept until the next plan: the launches read it
        planner.enqueue_tables(planner.meta, first.indices, int(meta[dd.T_START, tables]),
                               int(meta[dd.T_KEY, tables]), first.stream)
    return planner, meta[dd.T_START], group


def _read_tables(plan):
    planner, _, group = plan
    with _on_device(runtime(), group[0].device):
        return planner.read_tables(group[0].stream)


def table_key(rule, state, update, dtype, has_wd):
    """What lazy sparse CUDA updates must share to run in one launch (:func:`run_tables`),
    or None: the rule, math dtype, weight decay and kept slots, planned together (the same
    plan), not re-planned since (clipping sums the duplicates), and the same 16-bit kind and
    slot dtype."""
    if type(update) is not SparseUpdate or update.table_plan is None or not update.k:
        return None
    plan = (id(update.table_plan[0]), getattr(state, "kind", None), getattr(state, "slot_kind", None))
    return rule, dtype, has_wd, (state.kernel_slot_names, plan), None, None


def run_tables(rule, group, c, wd, has_wd, row_names=None):
    """The lazy sparse updates ``group`` (``[(state, update)]``, two or more, one
    :func:`table_key`) in one launch (:func:`sparseopt.kernels.cuda.batched_sparse_kernel`):
    the same element steps and gradient sums, so the same bits, as ``update.run`` one by one.
    ``row_names``: None (row-wise rules run their own kernels)."""
    rt = runtime()
    k = rt.kernels
    first = group[0][1]
    planner = first.table_plan[0]
    meta = None
    gstart = np.zeros(len(group) + 1, np.int64)
    used = like_s = None
    widest = 1
    for t, (state, u) in enumerate(group):
        slots, used = _kernel_slots(state, rule, u.var)
        if meta is None:  # the slots' addresses are the last columns (sparseopt.kernels.cuda.B_COLUMNS)
            meta = np.empty((len(group), k.B_COLUMNS + len(slots)), np.int64)
            like_s = next((s for s, kept in zip(slots, used) if kept), slots[0])
        rows, width = u.var.shape
        widest = max(widest, width)
        meta[t] = (address(u.var), address(u.values), rows, width, u.values.shape[0], u.table_plan[1],
                   *[address(s) for s in slots])
        gstart[t + 1] = gstart[t] + u.k
    rounding, c = _rounding(group[0][0], c)
    kernel = k.batched_sparse_kernel(rule, used, has_wd, rounding)
    lanes, per_block = k.row_layout(widest)
    with _on_device(rt, first.device):
        planner.run_meta = to_device(np.concatenate([meta.reshape(-1), gstart]))  # kept, as planner.meta
        dmeta = planner.run_meta[:meta.size].reshape(meta.shape)
        dgstart = planner.run_meta[meta.size:]
        kernel[k.blocks_for(int(gstart[-1]), per_block), (lanes, per_block), first.stream](
            dmeta, dgstart, len(group), planner.local, planner.offsets, planner.order, first.var, like_s,
            first.values, c, wd)
        for _, u in group:
            _release_to(rt, first.stream, u.handles[1], u.handles[0])
