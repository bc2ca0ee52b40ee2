"""Generic CUDA kernels: any rule, dense elementwise or row-wise sparse (``numba.cuda``).

The same scalar rule that :mod:`sparseopt.kernels.cpu` inlines into its parallel
loops is compiled here with ``cuda.jit(device=True)`` and called from two kernel
families; the kernels own memory access, the rule supplies only the element update.

* **Dense**: a grid-stride loop, one element per thread per iteration: loads and
  stores coalesce, and any size runs with a bounded grid.
* **Row-wise sparse**: each unique row is owned by one group of ``blockDim.x``
  threads (a warp or a block, chosen from the row width), which walk the row's
  columns, so a warp reads a contiguous run of the row. The gradient of the row is
  the sum of its duplicate value rows in increasing position order, fused into the
  update (the plan comes from :mod:`sparseopt.kernels.cuda_dedup`), exactly as
  the CPU kernel sums them: no atomics, every element is written by one thread.
  The price of that order: a hot row's duplicates are one serial chain per column
  (four loads kept in flight), where a tree reduction would round differently.
* **Table-batched** (:func:`batched_sparse_kernel`): the row-wise sparse kernel over the
  unique rows of several tables in one launch, each table's arrays reached by address.
* **Reduction rules** (Lamb: ``reduce_terms``, ``reduce_scale``, ``reduce_apply``): two passes
  with two sums between them, over the variable (dense: three launches) or each unique row
  (sparse: one launch); see "reduction rules" below.
* **Row reduction** (row-wise rules such as RowwiseAdagrad, dense or sparse): the
  same thread groups, one per row; each thread sums the rule's ``row_term`` over its
  columns, the group adds those partial sums in a shared-memory tree of fixed shape,
  one thread updates the row slots, a barrier, then the element pass. Deterministic
  (no atomics), but the row sum's order differs from the CPU kernel's left-to-right
  loop: the row mean, and what depends on it, agree with the CPU to a few ulps.

Both call ``STEP``, the element step of the CPU kernels (weight decay, load,
rule, store; :mod:`sparseopt.kernels.cpu`), compiled as a device function with
the same constants, and take the slots as one tuple ``S`` of arrays in the rule's
order (a placeholder where a slot is not kept; :mod:`sparseopt.kernels._slots`). The reduction templates
refer to ``THREADS`` (their shared-memory size). :func:`specialize` binds these
globals, and Numba freezes them as compile-time constants.

16-bit variables (bfloat16, float16): ``STEP`` is the CPU's 16-bit element step
(:mod:`sparseopt.kernels.lowp`'s load and rounded store, its conversions and random bits,
called from device code), on the variable's ``uint16`` bits; see :func:`_helpers`.

This module imports ``numba.cuda``; :mod:`sparseopt.backends.cuda` imports it only when a
CUDA array is first seen. On a GPU it needs numba-cuda (the ``cuda`` extra): the
CUDA target that ships inside recent numba is deprecated and cannot compile
``max()``. ``tests/cuda/compile_check.py`` compiles every kernel to PTX without a GPU.

Floating point: Numba compiles CUDA code without fast-math (IEEE division and
square root, no flush-to-zero), but NVVM contracts ``a * b + c`` into a fused
multiply-add, as nvcc does by default; the CPU kernels do not. On a GPU, results
therefore agree with the CPU kernels to within the rounding of those products
(a few ulps), and are bit-identical from run to run. The CUDA simulator evaluates
the rule in NumPy scalars, with ``math`` functions that keep float32 in float32
(:class:`sparseopt.kernels._compile.SimulatorMath`), and reproduces the CPU bits.
"""

import dataclasses
import functools

import numba
import numpy as np
from numba import cuda, types
from numba.extending import overload

from sparseopt import _config
from sparseopt.kernels import _compile, _slots, cpu, lowp
from sparseopt.kernels._specialize import rule_key, specialize

STEP = None                          # bound per specialization: the element step
THREADS = SQUARE = None              # bound per launch configuration
ROW_TERM = ROW_SLOTS = DENSE = DTYPE = VALUE = None  # bound per row-wise specialization
WIDEN = None  # bound per 16-bit kind (widen_kernel)

#: ``cuda.jit`` flags of every kernel (no fast-math: NaN must propagate).
KERNEL_FLAGS = dict(cache=_config.CACHE)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How kernels are launched; tests shrink it so that several blocks run on the simulator.

    Attributes:
        threads: threads per block of the elementwise, scan and reduction kernels
            (a power of two).
        row_threads: threads per block of the row kernels.
        max_lanes: the most threads that share one row (a multiple of 32 on a GPU).
        max_blocks: grid size cap; grid-stride loops cover the rest.
        sort_items: keys per thread in the radix sort's count and scatter passes.
        scan_items: elements per thread in a block of the prefix scan.
    """

    threads: int = 256
    row_threads: int = 256
    max_lanes: int = 128
    max_blocks: int = 32768
    sort_items: int = 8
    scan_items: int = 8


_launch = LaunchConfig()


def launch_config():
    """The current :class:`LaunchConfig`."""
    return _launch


def set_launch_config(**changes):
    """Change the launch configuration (for tests and tuning); returns the previous one."""
    global _launch
    previous = _launch
    _launch = dataclasses.replace(_launch, **changes)
    if _launch.threads & (_launch.threads - 1):
        _launch = previous
        raise ValueError(f"threads must be a power of two; got {changes.get('threads')}")
    return previous


def blocks_for(n, threads):
    """Grid size for ``n`` work items at ``threads`` per block, capped (grid-stride loops do the rest)."""
    return max(1, min((n + threads - 1) // threads, _launch.max_blocks))


def row_layout(width):
    """``(lanes, rows_per_block)`` for rows of ``width`` elements: a warp-multiple of lanes per row."""
    cfg = _launch
    lanes = min(cfg.max_lanes, cfg.row_threads)
    while lanes > 32 and lanes // 2 >= width:
        lanes //= 2
    return lanes, max(1, cfg.row_threads // lanes)


# ------------------------------------------------------------------ rule kernels


def _dense_template(p, g, S, c, wd_lr):
    """``p``, ``g`` and the slots: flat ``(n,)``. Grid-stride over elements."""
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    n = p.size
    while i < n:
        STEP(p, S, i, g[i], wd_lr, c, wd_lr)
        i += stride


@cuda.jit(device=True)
def _row_sum(values, order, lo, hi, j):
    """Column ``j`` of a unique row's gradient: ``values[order[lo:hi], j]`` summed left to
    right, as on the CPU, four rows loaded ahead so that a hot row's long chain of
    duplicates is not bound by one load at a time."""
    gj = values[order[lo], j]
    q = lo + 1
    while q + 4 <= hi:
        v0 = values[order[q], j]
        v1 = values[order[q + 1], j]
        v2 = values[order[q + 2], j]
        v3 = values[order[q + 3], j]
        gj += v0
        gj += v1
        gj += v2
        gj += v3
        q += 4
    while q < hi:
        gj += values[order[q], j]
        q += 1
    return gj


def _sparse_template(p, S, rows, offsets, order, values, k, c, wd_lr):
    """Row-wise update of the ``k`` unique ``rows`` of ``p`` and the slots (all ``(num_rows, d)``).

    Thread ``(x, y)`` of a block owns columns ``x, x + blockDim.x, ...`` of unique
    row ``blockIdx.x * blockDim.y + y`` (then grid-stride). The gradient of unique
    row ``u`` is ``values[order[offsets[u]]] + values[order[offsets[u] + 1]] + ...``
    summed left to right, as on the CPU; four rows are loaded ahead so that a hot
    row's long chain of duplicates is not bound by one load at a time.
    """
    d = p.shape[1]
    lanes = cuda.blockDim.x
    u = numba.int64(cuda.blockIdx.x) * cuda.blockDim.y + cuda.threadIdx.y
    ustride = numba.int64(cuda.gridDim.x) * cuda.blockDim.y
    while u < k:
        r = rows[u]
        lo = offsets[u]
        hi = offsets[u + 1]
        j = numba.int64(cuda.threadIdx.x)
        while j < d:
            gj = _row_sum(values, order, lo, hi, j)
            STEP(p, S, (r, j), gj, wd_lr, c, wd_lr)
            j += lanes
        u += ustride


#: Whether CUDA code runs on Numba's simulator; ``math`` for the rules there
#: (:mod:`sparseopt.kernels._compile`, which compiles the rules for the device).
_simulator = _compile.simulator
_SimulatorMath = _compile.SimulatorMath


def _rule_function(rule_module, name="update"):
    """The rule's function ``name`` as a device function (``update``; a row-wise rule's
    ``row_term`` and ``row_update``, a reduction rule's ``reduce_*`` too), with the helpers it
    calls (:mod:`sparseopt.kernels._compile`)."""
    return _compile.function(rule_module, name, _compile.CUDA)


def _simulated_lowp(lowp_constants):
    """:mod:`sparseopt.kernels.lowp`'s functions for the simulator, which calls the device
    functions as Python: the same compiled (CPU) functions, their results given back the
    dtype they have in compiled code (a dispatcher boxes a float32 as a Python float and a
    uint64 as a Python int, which would change the math that follows)."""
    def typed(fn, dtype):
        def call(*args):
            return dtype(fn(*args))
        return call
    out = {name: typed(lowp_constants[name], dtype) for name, dtype in
           (("WIDEN", np.float32), ("NARROW", np.uint16), ("WIDEN_SLOT", np.float32)) if name in lowp_constants}
    out.update(element_bits=typed(lowp.element_bits, np.uint64), mix=typed(lowp.mix, np.uint64),
               f32_to_bf16=typed(lowp.f32_to_bf16, np.uint16))
    return out


def device_flat_index(p, at):
    """:func:`sparseopt.kernels.lowp.flat_index` for the device code: the same index, but
    lowp's ``inline="always"`` overload does not lower on the CUDA target (NVVM path of
    numba-cuda 0.30: ``mul(omitted, omitted)``), so the device gets a plain overload."""
    return lowp.flat_index(p, at)


if not _simulator():
    @overload(device_flat_index, target="cuda")
    def _device_flat_index(p, at):
        if isinstance(at, types.Integer):
            return lambda p, at: at
        return lambda p, at: at[0] * p.shape[1] + at[1]


def _conversions(kind):
    """``(widen, narrow)`` of a 16-bit kind as the device code calls them."""
    widen, narrow = lowp.CONVERSIONS[kind]
    if _simulator():
        sim = _simulated_lowp(dict(WIDEN=widen, NARROW=narrow))
        return sim["WIDEN"], sim["NARROW"]
    return widen, narrow


def _lowp_constants(lowp_config):
    """The constants of a 16-bit configuration's load and rounded store as device code
    (:func:`sparseopt.kernels.cpu.lowp_constants`; the simulator's typed functions there)."""
    constants = cpu.lowp_constants(lowp_config)
    constants["flat_index"] = device_flat_index
    if _simulator():
        constants.update(_simulated_lowp(constants))
    return constants


@functools.lru_cache(maxsize=None)
def _helpers(rule_module, used, has_wd, row_count=None, lowp_config=None):
    """``(suffix, constants)``: the CPU kernels' element step (:func:`sparseopt.kernels.cpu._step_template`)
    and its parts as device functions (``STEP``; ``VALUE``, the parameter's element as the rule sees it).

    ``row_count``: for a row-wise rule, how many row values its ``update`` is given (the
    kernel's row slots, :func:`sparseopt.kernels._slots.count`); else None.
    ``lowp_config``: None, or ``(kind, stochastic, slot_kind)`` of a 16-bit variable
    (:func:`sparseopt.kernels.cpu._specialized_helpers`): the variable, and bfloat16 slots,
    are ``uint16`` bits, loaded and stored by :mod:`sparseopt.kernels.lowp`'s templates.
    """
    rowwise = row_count is not None
    suffix = (f"{rule_key(rule_module)}_{''.join('1' if u else '0' for u in used)}"
              f"{'_wd' if has_wd else ''}{'_row' if rowwise else ''}")
    constants = dict(RULE=_compile.on_tuples(rule_module, "update", _compile.CUDA, len(used), row_count),
                     HAS_WD=bool(has_wd), ROWWISE=rowwise, LOWP=lowp_config is not None)
    if lowp_config is None:
        suffix += "_cuda"
        value = cpu._value_template
    else:
        suffix += cpu.lowp_suffix(lowp_config) + "_cuda"
        constants.update(_lowp_constants(lowp_config))
        value = lowp._value_template
    constants.update(cpu.load_store(used, lowp_config, constants, suffix, cuda.jit(device=True)))
    constants["VALUE"] = cuda.jit(device=True)(specialize(value, suffix, **constants))
    constants["STEP"] = cuda.jit(device=True)(specialize(cpu._step_template, suffix, **constants))
    return suffix, constants


def _step(rule_module, used, has_wd, lowp_config=None):
    """``(suffix, STEP)`` of :func:`_helpers` (an elementwise rule's)."""
    suffix, constants = _helpers(rule_module, tuple(used), has_wd, None, lowp_config)
    return suffix, constants["STEP"]


def _rule_kernel(template, rule_module, used, has_wd, lowp_config):
    suffix, step = _step(rule_module, tuple(used), has_wd, lowp_config)
    return cuda.jit(**KERNEL_FLAGS)(specialize(template, suffix, STEP=step))


@functools.lru_cache(maxsize=None)
def dense_kernel(rule_module, used, has_wd, lowp_config=None):
    """``kernel[blocks, threads, stream](p, g, S, c, wd_lr)`` on flat contiguous device arrays.

    ``S``: the tuple of slot arrays and ``used``, whether the configuration keeps each (see
    :func:`sparseopt.kernels.cpu.place`; a slot not kept gets a placeholder).
    ``lowp_config``: None, or a 16-bit variable's rounding (:func:`_helpers`): then ``p``
    (and bfloat16 slots) are ``uint16`` views, ``g`` float32, and ``c`` carries the
    step's ``rounding_key`` (:func:`sparseopt.kernels.lowp.keyed`). For a rule with a reduction
    stage, :func:`reduce_dense_kernel`'s launcher (the same launch and arguments).
    """
    if cpu.has_reduction(rule_module):
        return reduce_dense_kernel(rule_module, used, has_wd, lowp_config)
    return _rule_kernel(_dense_template, rule_module, used, has_wd, lowp_config)


@functools.lru_cache(maxsize=None)
def sparse_kernel(rule_module, used, has_wd, lowp_config=None):
    """``kernel[blocks, (lanes, rows), stream](p, S, rows, offsets, order, values, k, c, wd_lr)``
    (``lowp_config``: as :func:`dense_kernel`'s; a rule with a reduction stage:
    :func:`reduce_sparse_kernel`'s launcher)."""
    if cpu.has_reduction(rule_module):
        return reduce_sparse_kernel(rule_module, used, has_wd, lowp_config)
    return _rule_kernel(_sparse_template, rule_module, used, has_wd, lowp_config)


def _widen_template(src, dst):
    """``dst[i] = WIDEN(src[i])``: 16-bit bits (flat ``uint16``) to float32, grid-stride."""
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < dst.size:
        dst[i] = WIDEN(src[i])
        i += stride


@functools.lru_cache(maxsize=None)
def widen_kernel(kind):
    """``kernel[blocks, threads, stream](src, dst)``: a 16-bit array's ``uint16`` bits
    widened to float32 (exact) by :mod:`sparseopt.kernels.lowp`'s conversion of ``kind``."""
    return cuda.jit(**KERNEL_FLAGS)(specialize(_widen_template, kind, WIDEN=_conversions(kind)[0]))


# ------------------------------------------------------------ table-batched steps
#
# One launch for the lazy sparse updates of several tables of one kernel configuration
# (issue 21), which may differ in rows and width: the arrays of table ``t`` are reached by
# address (a row of ``meta``), as the CPU's batched kernels reach theirs
# (:mod:`sparseopt.kernels.cpu`), and indexed flat (``row * width + column``: the flat index
# of the per-table kernels' ``(row, column)``, so the same random bits for 16-bit tables).

#: Columns of a batched step's ``meta`` (int64): the addresses of the parameter and of the
#: gradient values; the table's rows, width and gradient rows; where its unique rows start in
#: the plan; then (its last ``NS`` columns) the addresses of the slots (a kept slot's, else the
#: parameter's, never touched).
B_P, B_VALUES, B_ROWS, B_WIDTH, B_N, B_U0 = range(6)
B_COLUMNS = 6
POINTER = SLOT_VIEWS = NS = None  # bound per batched kernel: :func:`table_pointer`


def _sim_pointer(address, like, n):
    """The simulator's :func:`table_pointer`: ``n`` elements of ``like``'s dtype at ``address``
    (the simulator's device memory is host memory)."""
    import ctypes
    n = int(n)
    if n <= 0:
        return np.empty(0, like.dtype)
    return np.frombuffer((ctypes.c_char * (n * like.dtype.itemsize)).from_address(int(address)), like.dtype, n)


@functools.lru_cache(maxsize=None)
def table_pointer():
    """``POINTER(address, like, n)``: the ``n`` elements of ``like``'s dtype at ``address``, as
    device code indexes them (a typed pointer on a GPU)."""
    if _simulator():
        return _sim_pointer
    from sparseopt.kernels.dedup import pointer

    def device_pointer(address, like, n):
        return pointer(address, like)
    return cuda.jit(device=True)(device_pointer)


@cuda.jit(device=True)
def _flat_row_sum(values, d, order, lo, hi, j):
    """:func:`_row_sum` on flat ``values`` of width ``d``: the same additions in the same order."""
    gj = values[order[lo] * d + j]
    q = lo + 1
    while q + 4 <= hi:
        v0 = values[order[q] * d + j]
        v1 = values[order[q + 1] * d + j]
        v2 = values[order[q + 2] * d + j]
        v3 = values[order[q + 3] * d + j]
        gj += v0
        gj += v1
        gj += v2
        gj += v3
        q += 4
    while q < hi:
        gj += values[order[q] * d + j]
        q += 1
    return gj


@cuda.jit(device=True)
def table_of(starts, tables, i):
    """The last ``t < tables`` with ``starts[t] <= i`` (``starts`` non-decreasing): the table
    whose range ``starts[t]:starts[t + 1]`` holds ``i`` (empty tables are skipped). Shared by
    the table-batched update kernels and :mod:`sparseopt.kernels.cuda_dedup`."""
    lo = 0
    hi = tables
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if starts[mid] <= i:
            lo = mid
        else:
            hi = mid
    return lo


def _batched_template(meta, gstart, tables, rows, offsets, order, like_p, like_s, like_v, c, wd_lr):
    """:func:`_sparse_template` over the unique rows of ``tables`` tables in one launch: row
    ``u`` of the group (table ``t``'s are ``gstart[t]:gstart[t + 1]``) is the plan's unique
    row ``meta[t, B_U0] + u - gstart[t]``; its table's arrays come from ``meta``; ``like_*``:
    arrays of the parameter's, slots' and values' dtypes."""
    lanes = cuda.blockDim.x
    k = gstart[tables]
    u = numba.int64(cuda.blockIdx.x) * cuda.blockDim.y + cuda.threadIdx.y
    ustride = numba.int64(cuda.gridDim.x) * cuda.blockDim.y
    while u < k:
        t = table_of(gstart, tables, u)
        d = meta[t, B_WIDTH]
        size = meta[t, B_ROWS] * d
        p = POINTER(meta[t, B_P], like_p, size)
        S = SLOT_VIEWS(meta, t, meta.shape[1] - NS, like_s, size)
        values = POINTER(meta[t, B_VALUES], like_v, meta[t, B_N] * d)
        g = meta[t, B_U0] + u - gstart[t]
        base = rows[g] * d
        first = offsets[g]
        end = offsets[g + 1]
        j = numba.int64(cuda.threadIdx.x)
        while j < d:
            gj = _flat_row_sum(values, d, order, first, end, j)
            STEP(p, S, base + j, gj, wd_lr, c, wd_lr)
            j += lanes
        u += ustride


@functools.lru_cache(maxsize=None)
def batched_sparse_kernel(rule_module, used, has_wd, lowp_config=None):
    """``kernel[blocks, (lanes, rows), stream](meta, gstart, tables, rows, offsets, order, like_p,
    like_s, like_v, c, wd_lr)``: the lazy sparse updates of several tables (see
    ``_batched_template``; ``lowp_config``: as :func:`sparse_kernel`'s)."""
    suffix, step = _step(rule_module, tuple(used), has_wd, lowp_config)
    views = cuda.jit(device=True)(specialize(_slots.views(len(used), __name__), "cuda", VIEW=table_pointer()))
    return cuda.jit(**KERNEL_FLAGS)(specialize(_batched_template, suffix, STEP=step, POINTER=table_pointer(),
                                               SLOT_VIEWS=views, NS=len(used)))


# ------------------------------------------------------------- row reduction


def _row_template(p, S, R, rows, offsets, order, values, k, c, wd_lr, width):
    """One step of a row-wise rule on ``k`` rows of ``p`` ``(num_rows, d)``: every row
    (``DENSE``: row ``u`` of the dense gradient ``values``) or the unique ``rows`` of a
    plan (gradient: the duplicates ``values[order[offsets[u]:offsets[u + 1]]]`` summed
    in position order, as the CPU kernel sums them). ``R``: the row slots ``(num_rows,)``;
    ``width``: ``d`` in the variables' dtype.

    Thread ``(x, y)`` owns columns ``x, x + blockDim.x, ...`` of row
    ``blockIdx.x * blockDim.y + y`` (then grid-stride). Per row: each thread sums
    ``ROW_TERM`` over its columns in order; the ``blockDim.x`` partial sums are added
    in a shared-memory tree of fixed shape (pairs ``(i, i + ceil(n / 2))`` until one is
    left); thread 0 of the row divides by the width, runs ``ROW_RULE``, writes the row
    slots and shares the new row values (``NR`` of them); after a barrier the element pass runs
    ``STEP`` with them. The rows loop is uniform over the block (inactive rows
    still meet every barrier), so ``syncthreads`` is never divergent. ``ROW_TERM``
    reads the parameter before the step's weight decay, as on the CPU.
    """
    partial = cuda.shared.array(THREADS, DTYPE)
    shared_row = cuda.shared.array((THREADS, NR), DTYPE)
    d = p.shape[1]
    lanes = cuda.blockDim.x
    x = cuda.threadIdx.x
    y = cuda.threadIdx.y
    slot = y * lanes + x
    zero = width - width  # a zero of the variables' dtype
    first = numba.int64(cuda.blockIdx.x) * cuda.blockDim.y
    stride = numba.int64(cuda.gridDim.x) * cuda.blockDim.y
    while first < k:
        u = first + y
        active = u < k
        row = u
        lo = u
        hi = u
        acc = zero
        if active:
            if DENSE:
                row = u
            else:
                row = rows[u]
                lo = offsets[u]
                hi = offsets[u + 1]
            j = numba.int64(x)
            while j < d:
                if DENSE:
                    gj = values[u, j]
                else:
                    gj = _row_sum(values, order, lo, hi, j)
                acc += ROW_TERM(VALUE(p, (row, j)), gj, c)
                j += lanes
        partial[slot] = acc
        cuda.syncthreads()
        n = lanes
        while n > 1:
            half = (n + 1) // 2
            if x < n - half:
                partial[slot] += partial[slot + half]
            cuda.syncthreads()
            n = half
        if active and x == 0:
            SHARE(shared_row, y, ROW_SLOTS(R, row, partial[slot] / width, c))
        cuda.syncthreads()
        if active:
            rv = SHARED(shared_row, y)
            j = numba.int64(x)
            while j < d:
                if DENSE:
                    gj = values[u, j]
                else:
                    gj = _row_sum(values, order, lo, hi, j)
                STEP(p, S, (row, j), gj, rv, c, wd_lr)
                j += lanes
        first += stride


@functools.lru_cache(maxsize=None)
def row_kernel(rule_module, used, row_used, has_wd, dense, dtype, threads, lowp_config=None):
    """``kernel[blocks, (lanes, rows), stream](p, S, R, rows, offsets, order, values, k, c, wd_lr,
    width)`` for a row-wise rule (see ``_row_template``).

    ``used``, ``row_used``: which of the rule's ``SLOTS`` and ``ROW_SLOTS`` are kept
    (:func:`sparseopt.kernels.cpu.place`); ``dense``: every row, with the dense gradient
    as ``values`` (``rows``, ``offsets``, ``order`` are then not read); ``dtype``: the
    variables' math dtype (the shared-memory partial sums are kept in it, as the CPU keeps
    its row sum; float32 for a 16-bit variable); ``threads``: the most threads of a block
    (``lanes * rows``); ``lowp_config``: as :func:`dense_kernel`'s.
    """
    row_used = tuple(row_used)
    nr = len(row_used)
    suffix, constants = _helpers(rule_module, tuple(used), has_wd, nr, lowp_config)
    dtype = np.dtype(dtype)
    suffix += (f"_r{''.join('1' if u else '0' for u in row_used)}{'_dense' if dense else ''}"
               f"_{dtype.name}_t{threads}")
    device = cuda.jit(device=True)
    row_slots = device(specialize(_slots.row_slots(row_used, cpu.__name__), suffix,
                                  ROW_RULE=_compile.on_tuples(rule_module, "row_update", _compile.CUDA, nr)))
    fn = specialize(_row_template, suffix, STEP=constants["STEP"], VALUE=constants["VALUE"], THREADS=threads,
                    DTYPE=numba.from_dtype(dtype), DENSE=bool(dense),
                    ROW_TERM=_rule_function(rule_module, "row_term"), ROW_SLOTS=row_slots, NR=nr,
                    SHARE=device(specialize(_slots.share(nr, __name__), "cuda")),
                    SHARED=device(specialize(_slots.shared(nr, __name__), "cuda")))
    return cuda.jit(**KERNEL_FLAGS)(fn)


# ------------------------------------------------------------- reduction rules
#
# Rules with a reduction stage (``REDUCTION = True``, :mod:`sparseopt.rules.lamb`; the CPU
# side and the contract: :mod:`sparseopt.kernels.cpu`, "reduction rules"). The element
# passes are the CPU's (``TERMS``: load, weight decay, ``reduce_terms``, store the slots;
# ``APPLY_STEP``: the element step running ``reduce_apply``) compiled as device functions.
# Dense: three launches over the flat variable: the first pass with one pair of partial sums
# per block (each thread's elements in grid-stride order, then a shared-memory tree of fixed
# shape), one thread adding the blocks' sums in order and computing the scale, the second
# pass. Sparse: one launch, a thread group per unique row as in ``_row_template``: the first
# pass, the group's two sums in a fixed tree, the scale, a barrier, the second pass. The
# directions wait in device scratch between the passes. Deterministic (no atomics); the sums'
# order differs from the CPU's left-to-right loop, so results agree with the CPU to a few ulps.

TERMS = APPLY_STEP = REDUCE_SCALE = None  # bound per reduction specialization


@functools.lru_cache(maxsize=None)
def _reduce_helpers(rule_module, used, has_wd, lowp_config):
    """``(suffix, constants)``: ``TERMS``, ``APPLY_STEP`` and ``REDUCE_SCALE`` as device
    functions (the CPU's templates, :func:`sparseopt.kernels.cpu._reduce_helpers`)."""
    suffix = f"{rule_key(rule_module)}_{''.join('1' if u else '0' for u in used)}{'_wd' if has_wd else ''}"
    device = cuda.jit(device=True)
    constants = dict(HAS_WD=bool(has_wd), ROWWISE=True, LOWP=lowp_config is not None,
                     REDUCE_TERMS=_compile.on_tuples(rule_module, "reduce_terms", _compile.CUDA, len(used)),
                     REDUCE_APPLY=_rule_function(rule_module, "reduce_apply"))
    constants["KEPT_SLOTS"] = device(specialize(_slots.store_slots(used, cpu.__name__), suffix + "_cuda"))
    if lowp_config is None:
        suffix += "_cuda"
    else:
        suffix += cpu.lowp_suffix(lowp_config) + "_cuda"
        constants.update(_lowp_constants(lowp_config))
    apply = dict(constants)  # the second pass keeps no slot
    constants.update(cpu.load_store(used, lowp_config, constants, f"{suffix}_t", device))
    apply.update(cpu.load_store((False,) * len(used), lowp_config, apply, f"{suffix}_a", device))
    apply["RULE"] = device(specialize(cpu._apply_as_row_rule, suffix, **apply))
    constants["STORE_SLOTS"] = device(specialize(cpu._store_slots_template, suffix, **constants))
    out = dict(TERMS=device(specialize(cpu._terms_template, suffix, **constants)),
               APPLY_STEP=device(specialize(cpu._step_template, f"{suffix}_a", **apply)),
               REDUCE_SCALE=_rule_function(rule_module, "reduce_scale"))
    return suffix, out


def _reduce_terms_template(p, g, S, c, wd_lr, direction, partial):
    """Dense first pass: the grid-stride elements of ``p``; block ``b``'s two sums to ``partial[b]``."""
    sum0 = cuda.shared.array(THREADS, DTYPE)
    sum1 = cuda.shared.array(THREADS, DTYPE)
    t = cuda.threadIdx.x
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    t0 = wd_lr - wd_lr  # a zero of the math dtype (wd_lr is finite)
    t1 = t0
    while i < p.size:
        d, a, b = TERMS(p, S, i, g[i], c, wd_lr)
        direction[i] = d
        t0 += a
        t1 += b
        i += stride
    sum0[t] = t0
    sum1[t] = t1
    cuda.syncthreads()
    n = cuda.blockDim.x
    while n > 1:
        half = (n + 1) // 2
        if t < n - half:
            sum0[t] += sum0[t + half]
            sum1[t] += sum1[t + half]
        cuda.syncthreads()
        n = half
    if t == 0:
        partial[cuda.blockIdx.x, 0] = sum0[0]
        partial[cuda.blockIdx.x, 1] = sum1[0]


def _reduce_scale_template(partial, scale, c):
    """One thread: the blocks' sums added in order, then ``REDUCE_SCALE``, to ``scale[0]``."""
    if cuda.grid(1) == 0:
        t0 = partial[0, 0]
        t1 = partial[0, 1]
        for b in range(1, partial.shape[0]):
            t0 += partial[b, 0]
            t1 += partial[b, 1]
        scale[0] = REDUCE_SCALE(t0, t1, c)


def _reduce_apply_template(p, S, c, wd_lr, direction, scale):
    """Dense second pass: ``reduce_apply`` on every element with the one scale."""
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    r = (scale[0],)
    while i < p.size:
        APPLY_STEP(p, S, i, direction[i], r, c, wd_lr)
        i += stride


def _reduce_rows_template(p, S, rows, offsets, order, values, k, c, wd_lr, direction):
    """Sparse: both passes on each of the ``k`` unique rows (``direction``: ``(k, d)``
    scratch), one thread group per row as in ``_row_template``."""
    sum0 = cuda.shared.array(THREADS, DTYPE)
    sum1 = cuda.shared.array(THREADS, DTYPE)
    shared_scale = cuda.shared.array(THREADS, DTYPE)
    d = p.shape[1]
    lanes = cuda.blockDim.x
    x = cuda.threadIdx.x
    y = cuda.threadIdx.y
    slot = y * lanes + x
    zero = wd_lr - wd_lr
    first = numba.int64(cuda.blockIdx.x) * cuda.blockDim.y
    stride = numba.int64(cuda.gridDim.x) * cuda.blockDim.y
    while first < k:
        u = first + y
        active = u < k
        row = u
        t0 = zero
        t1 = zero
        if active:
            row = rows[u]
            lo = offsets[u]
            hi = offsets[u + 1]
            j = numba.int64(x)
            while j < d:
                dj, a, b = TERMS(p, S, (row, j), _row_sum(values, order, lo, hi, j), c, wd_lr)
                direction[u, j] = dj
                t0 += a
                t1 += b
                j += lanes
        sum0[slot] = t0
        sum1[slot] = t1
        cuda.syncthreads()
        n = lanes
        while n > 1:
            half = (n + 1) // 2
            if x < n - half:
                sum0[slot] += sum0[slot + half]
                sum1[slot] += sum1[slot + half]
            cuda.syncthreads()
            n = half
        if active and x == 0:
            shared_scale[y] = REDUCE_SCALE(sum0[slot], sum1[slot], c)
        cuda.syncthreads()
        if active:
            r = (shared_scale[y],)
            j = numba.int64(x)
            while j < d:
                APPLY_STEP(p, S, (row, j), direction[u, j], r, c, wd_lr)
                j += lanes
        first += stride


@functools.lru_cache(maxsize=None)
def _reduce_kernel(template, rule_module, used, has_wd, lowp_config, dtype, threads):
    suffix, constants = _reduce_helpers(rule_module, tuple(used), has_wd, lowp_config)
    dtype = np.dtype(dtype)
    fn = specialize(template, f"{suffix}_{dtype.name}_t{threads}", THREADS=threads,
                    DTYPE=numba.from_dtype(dtype), **constants)
    return cuda.jit(**KERNEL_FLAGS)(fn)


class _Launcher:
    """``launcher[grid, block, stream](*args)``, as a kernel is launched, for the steps of a
    reduction rule that take several launches (``run(grid, block, stream, *args)``)."""

    def __init__(self, run):
        self._run = run

    def __getitem__(self, config):
        grid, block, stream = config
        return functools.partial(self._run, grid, block, stream)


def reduce_dense_kernel(rule_module, used, has_wd, lowp_config=None):
    """:func:`dense_kernel` for a rule with a reduction stage: ``launcher[blocks, threads,
    stream](p, g, S, c, wd_lr)``, the three launches above over the flat variable."""
    used = tuple(used)

    def run(blocks, threads, stream, p, g, S, c, wd_lr):
        dtype = g.dtype
        direction = cuda.device_array(p.size, dtype, stream=stream)
        partial = cuda.device_array((blocks, 2), dtype, stream=stream)
        scale = cuda.device_array(1, dtype, stream=stream)
        _reduce_kernel(_reduce_terms_template, rule_module, used, has_wd, lowp_config, dtype, threads)[
            blocks, threads, stream](p, g, S, c, wd_lr, direction, partial)
        _reduce_kernel(_reduce_scale_template, rule_module, used, has_wd, lowp_config, dtype, 1)[
            1, 1, stream](partial, scale, c)
        _reduce_kernel(_reduce_apply_template, rule_module, used, has_wd, lowp_config, dtype, threads)[
            blocks, threads, stream](p, S, c, wd_lr, direction, scale)
    return _Launcher(run)


def reduce_sparse_kernel(rule_module, used, has_wd, lowp_config=None):
    """:func:`sparse_kernel` for a rule with a reduction stage: ``launcher[blocks, (lanes,
    rows), stream](p, S, rows, offsets, order, values, k, c, wd_lr)``, one launch."""
    used = tuple(used)

    def run(blocks, block, stream, p, S, rows, offsets, order, values, k, c, wd_lr):
        threads = _launch.row_threads
        direction = cuda.device_array((k, p.shape[1]), values.dtype, stream=stream)
        _reduce_kernel(_reduce_rows_template, rule_module, used, has_wd, lowp_config, values.dtype, threads)[
            blocks, block, stream](p, S, rows, offsets, order, values, k, c, wd_lr, direction)
    return _Launcher(run)


# ---------------------------------------------------- gradient and slot helpers


@cuda.jit(**KERNEL_FLAGS)
def segment_sum(values, offsets, order, k, out):
    """``out[u] = values[order[offsets[u]]] + ...``, left to right (the same sums as the row kernel)."""
    d = values.shape[1]
    lanes = cuda.blockDim.x
    u = numba.int64(cuda.blockIdx.x) * cuda.blockDim.y + cuda.threadIdx.y
    ustride = numba.int64(cuda.gridDim.x) * cuda.blockDim.y
    while u < k:
        lo = offsets[u]
        hi = offsets[u + 1]
        j = cuda.threadIdx.x
        while j < d:
            gj = _row_sum(values, order, lo, hi, j)
            out[u, j] = gj
            j += lanes
        u += ustride


@cuda.jit(**KERNEL_FLAGS)
def fill(x, value):
    """``x[:] = value`` for a flat array."""
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < x.size:
        x[i] = value
        i += stride


@cuda.jit(**KERNEL_FLAGS)
def iota(x):
    """``x[i] = i``."""
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < x.size:
        x[i] = i
        i += stride


@cuda.jit(**KERNEL_FLAGS)
def copy(src, dst):
    """``dst[:] = src`` for flat arrays of one size (casting to ``dst``'s dtype)."""
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < dst.size:
        dst[i] = src[i]
        i += stride


@cuda.jit(**KERNEL_FLAGS)
def clip(src, dst, limit):
    """``dst = clip(src, -limit, limit)``; NaN stays NaN, as with ``np.clip``."""
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < dst.size:
        v = src[i]
        if v > limit:
            v = limit
        elif v < -limit:
            v = -limit
        dst[i] = v
        i += stride


@cuda.jit(**KERNEL_FLAGS)
def scale(src, dst, factor):
    """``dst = src * factor``."""
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < dst.size:
        dst[i] = src[i] * factor
        i += stride


@cuda.jit(**KERNEL_FLAGS)
def gather_rows(src, rows, k, dst):
    """``dst[u] = src[rows[u]]`` for ``u < k`` (2-D arrays)."""
    d = src.shape[1]
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < k * d:
        u = i // d
        j = i - u * d
        dst[u, j] = src[rows[u], j]
        i += stride


@cuda.jit(**KERNEL_FLAGS)
def scatter_rows(src, rows, k, dst):
    """``dst[rows[u]] = src[u]`` for ``u < k`` (2-D arrays; ``rows`` unique)."""
    d = dst.shape[1]
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    while i < k * d:
        u = i // d
        j = i - u * d
        dst[rows[u], j] = src[u, j]
        i += stride


def _sum_template(x, partial):
    """Block ``b`` writes the float64 sum (of squares, if ``SQUARE``) of its grid-stride share of ``x`` to ``partial[b]``.

    Fixed shape: each thread sums its elements in order, then a shared-memory tree
    in a fixed order; no atomics, so the result depends only on the launch shape.
    """
    sh = cuda.shared.array(THREADS, numba.float64)
    t = cuda.threadIdx.x
    i = numba.int64(cuda.grid(1))
    stride = numba.int64(cuda.gridsize(1))
    acc = numba.float64(0)
    while i < x.size:
        v = numba.float64(x[i])
        if SQUARE:
            acc += v * v
        else:
            acc += v
        i += stride
    sh[t] = acc
    cuda.syncthreads()
    half = THREADS // 2
    while half > 0:
        if t < half:
            sh[t] += sh[t + half]
        cuda.syncthreads()
        half //= 2
    if t == 0:
        partial[cuda.blockIdx.x] = sh[0]


@functools.lru_cache(maxsize=None)
def sum_kernel(threads, square):
    """``kernel[blocks, threads, stream](x, partial)``; see ``_sum_template``."""
    fn = specialize(_sum_template, f"t{threads}{'_sq' if square else ''}", THREADS=threads, SQUARE=square)
    return cuda.jit(**KERNEL_FLAGS)(fn)


def sum_squares(x, partial, stream):
    """Launch the two passes that leave ``sum(x**2)`` (float64) in ``partial[0]``.

    ``partial`` needs ``threads`` elements. Deterministic for a given launch configuration.
    """
    threads = _launch.threads
    blocks = max(1, min((x.size + threads - 1) // threads, threads))
    sum_kernel(threads, True)[blocks, threads, stream](x, partial)
    if blocks > 1:
        sum_kernel(threads, False)[1, threads, stream](partial[:blocks], partial)


_slots.register(__name__, globals())
