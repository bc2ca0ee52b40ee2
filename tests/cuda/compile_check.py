"""Compile every CUDA kernel for a real GPU target (PTX), without a GPU.

The CUDA simulator runs kernels as Python and checks no types; this script types
and compiles each kernel family, for every rule of the optimizer table and both
float dtypes, with NVVM (``numba.cuda.compile_ptx``: no driver needed, only the
CUDA toolkit's NVVM and libdevice, e.g. from the ``nvidia-cuda-nvcc-cu12`` wheel
with ``CUDA_HOME`` pointing at its ``nvidia/cuda_nvcc`` folder).

It needs numba-cuda (the maintained CUDA target, the ``cuda`` extra), NVVM,
libdevice and NVRTC. Run: ``python tests/cuda/compile_check.py`` (it prints
``compiled N kernels``); ``tests/test_cuda_simulator.py`` runs it, and skips it
when this script exits 77 (no complete toolchain here; it says what is missing).
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import cuda, types  # noqa: E402

CC = (8, 0)


def toolchain_problem():
    """Why PTX cannot be compiled here (None when it can)."""
    if "numba_cuda" not in (cuda.__file__ or ""):
        return ("numba's built-in CUDA target is deprecated (it cannot compile max() for "
                "example); install numba-cuda: pip install 'sparseopt[cuda]'")
    try:
        from numba.cuda.cudadrv import nvvm
        if not nvvm.is_available():
            return "NVVM is not installed"
        _pretend_device()

        def probe(x):
            x[0] = 1.0

        cuda.compile_ptx(probe, (arr(np.float32, 1),), cc=CC)
    except Exception as exc:  # a missing NVRTC or libdevice, an old toolkit...
        return f"the CUDA toolchain is incomplete: {type(exc).__name__}: {exc}"
    return None


def arr(dtype, ndim):
    return types.Array(numba.from_dtype(np.dtype(dtype)), ndim, "C")


def _pretend_device():
    """Device functions compile for the current device's compute capability; with no
    driver, say it is ``CC`` (only ``compute_capability`` is read)."""
    from numba.cuda import dispatcher

    class _Device:
        compute_capability = CC

    dispatcher.get_current_device = lambda: _Device()


def slots(used, kept, placeholder):
    """The type of a kernel's tuple of slot arrays (:func:`sparseopt.kernels.cpu.place`)."""
    return types.Tuple([kept if u else placeholder for u in used])


def kernel_used(names, rule_slots):
    """The ``used`` flags of :func:`sparseopt.kernels.cpu.place` for the kept ``names``."""
    from sparseopt.kernels import _slots
    used = tuple(name in names for name in rule_slots)
    return used + (False,) * (_slots.count(rule_slots) - len(used))


def compile_one(dispatcher, sig):
    fn = getattr(dispatcher, "py_func", dispatcher)
    cuda.compile_ptx(fn, sig, cc=CC)


def compile_low_precision(kc, i64):
    """The 16-bit variables' kernels (``uint16`` bits, float32 math, the step's rounding key
    in the coefficients) of a few representative rules, and the gradient widening."""
    from sparseopt import _exact
    from sparseopt.kernels import cuda_exact as ce
    from sparseopt.kernels import lowp
    from tests.optimizer_table import CASES
    count = 0
    u16, f32, f1, f2 = arr(np.uint16, 1), types.float32, arr(np.float32, 1), arr(np.float32, 2)
    b2 = arr(np.uint16, 2)
    for case in CASES:
        if case.id not in ("sgd_momentum", "adam", "rowwise_adagrad"):
            continue
        opt = case.make()
        rule = opt._rule
        hypers = opt._resolved_hypers()
        c = lowp.keyed(opt._coefficients(hypers, 1), 1)
        ctype = numba.typeof(type(c)(*(np.float32(x) for x in c[:-1]), c[-1]))
        used = kernel_used(opt._slot_names(), rule.SLOTS)
        for config in (("bfloat16", True, None), ("float16", True, None), ("bfloat16", False, "bfloat16")):
            slot2 = slots(used, b2 if config[2] else f2, b2)
            if hasattr(rule, "ROW_SLOTS"):
                row_used = kernel_used(opt._row_slot_names(), rule.ROW_SLOTS)
                for dense in (True, False):
                    compile_one(kc.row_kernel(rule, used, row_used, True, dense, np.float32, 256, config),
                                (b2, slot2, slots(row_used, f1, f1), i64, i64, i64, f2, types.int64, ctype,
                                 f32, f32))
                    count += 1
                continue
            slot1 = slots(used, u16 if config[2] else f1, u16)
            compile_one(kc.dense_kernel(rule, used, True, config), (u16, f1, slot1, ctype, f32))
            compile_one(kc.sparse_kernel(rule, used, True, config),
                        (b2, slot2, i64, i64, i64, f2, types.int64, ctype, f32))
            count += 2
            if config[0] == "bfloat16" and config[1]:  # exact mode: the fused and the catch-up kernels
                record = _exact.record_dtype(rule, np.float32, True)  # as the device mirrors it: aligned
                record = np.dtype([(name, record.fields[name][0]) for name in record.names], align=True)
                hist = types.Array(numba.from_dtype(record), 1, "C")
                tab, i8, f8 = arr(np.float64, 2), types.int64, types.float64
                compile_one(ce.sparse_kernel(rule, used, True, config),
                            (b2, slot2, i64, i64, i64, f2, i8, i64, i8, i8, hist, tab,
                             ctype, f32, ctype, f32, f8))
                compile_one(ce.catch_up_kernel(rule, used, True, config),
                            (b2, slot2, i64, i8, types.boolean, i64, i8, i8, hist, tab,
                             ctype, f32, f8))
                count += 2
    for kind in ("bfloat16", "float16"):
        compile_one(kc.widen_kernel(kind), (u16, f1))
        compile_one(ce.decay_rows((kind, True)), (b2, i64, types.int64, types.boolean, i64, types.int64,
                                                  types.int64, arr(np.float64, 2), types.uint64))
        count += 2
    return count


def compile_reductions(kc, i64):
    """The kernels of a rule with a reduction stage (Lamb; not in the optimizer table, whose
    generic suites include exact mode): dense (terms, scale, apply) and sparse, float32 and
    float64, with and without weight decay, and a bfloat16 table's."""
    import sparseopt as so
    from sparseopt.kernels import lowp
    opt = so.Lamb()
    rule = opt._rule
    coefficients = opt._coefficients(opt._resolved_hypers(), 1)
    used = (True, True)
    count = 0
    configs = [(np.float32, np.float32, None, has_wd) for has_wd in (False, True)]
    configs += [(np.float64, np.float64, None, has_wd) for has_wd in (False, True)]
    configs.append((np.uint16, np.float32, ("bfloat16", True, None), True))
    for storage, dtype, lowp_config, has_wd in configs:
        c = type(coefficients)(*(np.dtype(dtype).type(x) for x in coefficients))
        if lowp_config is not None:
            c = lowp.keyed(c, 1)
        ctype, scal = numba.typeof(c), numba.from_dtype(np.dtype(dtype))
        p1, p2, m1, m2 = arr(storage, 1), arr(storage, 2), arr(dtype, 1), arr(dtype, 2)
        kernel = functools.partial(kc._reduce_kernel, rule_module=rule, used=used, has_wd=has_wd,
                                   lowp_config=lowp_config, dtype=dtype)
        compile_one(kernel(kc._reduce_terms_template, threads=256),
                    (p1, m1, slots(used, m1, p1), ctype, scal, m1, m2))
        compile_one(kernel(kc._reduce_scale_template, threads=1), (m2, m1, ctype))
        compile_one(kernel(kc._reduce_apply_template, threads=256), (p1, slots(used, m1, p1), ctype, scal, m1, m1))
        compile_one(kernel(kc._reduce_rows_template, threads=256),
                    (p2, slots(used, m2, p2), i64, i64, i64, m2, types.int64, ctype, scal, m2))
        count += 4
    return count


def compile_batched(kc, dd, i64):
    """The table-batched kernels (issue 21): the shared plan's, and the one-launch update of a
    few representative rules, float32 and a 16-bit table (slots reached by address)."""
    from sparseopt.kernels import lowp
    from tests.optimizer_table import CASES
    count = 0
    i2 = arr(np.int64, 2)
    for idx in (np.int32, np.int64):
        compile_one(dd._prepare_tables(np.dtype(idx)), (i2, types.int64, arr(idx, 1), i64, i64, i64))
        count += 1
    compile_one(dd._localize, (i64, i2, types.int64, i64, i64, i64))
    count += 1
    for case in CASES:
        if case.id not in ("sgd_momentum", "adam", "adagrad"):
            continue
        opt = case.make()
        rule = opt._rule
        c = opt._coefficients(opt._resolved_hypers(), 1)
        used = kernel_used(opt._slot_names(), rule.SLOTS)
        c32 = type(c)(*(np.float32(x) for x in c))
        f2 = arr(np.float32, 2)
        compile_one(kc.batched_sparse_kernel(rule, used, True),
                    (i2, i64, types.int64, i64, i64, i64, f2, f2, f2, numba.typeof(c32), types.float32))
        keyed = lowp.keyed(c32, 1)
        compile_one(kc.batched_sparse_kernel(rule, used, True, ("bfloat16", True, None)),
                    (i2, i64, types.int64, i64, i64, i64, arr(np.uint16, 2), f2, f2, numba.typeof(keyed),
                     types.float32))
        count += 2
    return count


def compile_many_slots(kc, i64):
    """A rule with more than three slots (``tests/test_many_slots.py``'s Adan, four), dense and
    sparse, float32 and a bfloat16 table with bfloat16 slots (rounded with a further hash)."""
    from sparseopt.kernels import lowp
    from tests.test_many_slots import ADAN, Adan
    opt = Adan()
    rule = opt._rule
    c = opt._coefficients(opt._resolved_hypers(), 1)
    c32 = type(c)(*(np.float32(x) for x in c))
    used = kernel_used(ADAN.slots, rule.SLOTS)
    f1, f2, u1, u2 = arr(np.float32, 1), arr(np.float32, 2), arr(np.uint16, 1), arr(np.uint16, 2)
    compile_one(kc.dense_kernel(rule, used, True), (f1, f1, slots(used, f1, f1), numba.typeof(c32), types.float32))
    compile_one(kc.sparse_kernel(rule, used, True),
                (f2, slots(used, f2, f2), i64, i64, i64, f2, types.int64, numba.typeof(c32), types.float32))
    keyed = numba.typeof(lowp.keyed(c32, 1))
    config = ("bfloat16", True, "bfloat16")
    compile_one(kc.dense_kernel(rule, used, True, config), (u1, f1, slots(used, u1, u1), keyed, types.float32))
    compile_one(kc.sparse_kernel(rule, used, True, config),
                (u2, slots(used, u2, u2), i64, i64, i64, f2, types.int64, keyed, types.float32))
    return 4


def compile_factored():
    """The kernels of a factored rule (Adafactor; not in the optimizer table, whose generic
    suites include exact mode): the flat unit's and the matrices', float32 and float64; the
    two that apply weight decay also without it (float32)."""
    import sparseopt as so
    from sparseopt.kernels import cuda_factored as cf
    opt = so.Adafactor()
    rule = opt._rule
    coefficients = opt._coefficients(opt._resolved_hypers(), 1)
    i8 = types.int64
    count = 0
    for dtype in (np.float32, np.float64):
        c = type(coefficients)(*(np.dtype(dtype).type(x) for x in coefficients))
        ctype, scal = numba.typeof(c), numba.from_dtype(np.dtype(dtype))
        f1, f2, f3 = arr(dtype, 1), arr(dtype, 2), arr(dtype, 3)
        for has_wd in ((False, True) if dtype == np.float32 else (True,)):
            compile_one(cf.kernel(cf._plain_lanes_template, rule, has_wd, dtype, 256),
                        (f1, f1, f1, ctype, scal, i8, f2))
            compile_one(cf.kernel(cf._row_terms_template, rule, has_wd, dtype, 256),
                        (f3, f3, f2, ctype, scal, scal, f2))
            count += 2
        compile_one(cf.kernel(cf._row_directions_template, rule, False, dtype, 256), (f3, f2, f2, f1, scal, f2))
        plain = functools.partial(cf.kernel, rule_module=rule, has_wd=False, dtype=None, threads=None)
        compile_one(plain(cf._plain_parts_template), (f2, i8, i8, scal, f2))
        compile_one(plain(cf._scale_template), (f1, f1, scal, ctype, f1))
        compile_one(plain(cf._plain_apply_template), (f1, f1, f1, f1))
        compile_one(plain(cf._column_partials_template), (f3, ctype, i8, scal, f2))
        compile_one(plain(cf._block_sums_template), (f2, i8, scal, f1))
        compile_one(plain(cf._column_stats_template), (f2, f1, f2, ctype, i8, scal, f1))
        compile_one(plain(cf._factored_apply_template), (f3, f3, f2, f2, f1, f1))
        count += 8
    return count


def main():
    problem = toolchain_problem()
    if problem:
        print(f"nothing compiled: {problem}")
        return 77
    from sparseopt import _exact
    from sparseopt.kernels import cuda as kc
    from sparseopt.kernels import cuda_dedup as dd
    from sparseopt.kernels import cuda_exact as ce
    from tests.optimizer_table import CASES, LEGACY_CASES

    count = 0
    i64 = arr(np.int64, 1)
    seen = set()
    for case in CASES + LEGACY_CASES:
        opt = case.make()
        rule = opt._rule
        hypers = opt._resolved_hypers()
        hypers.update(getattr(opt, "_next_scalar_state", lambda h, s: {})(hypers, 1))
        coefficients = opt._coefficients(hypers, 1)
        used = kernel_used(opt._slot_names(), rule.SLOTS)
        for dtype in (np.float32, np.float64):
            key = (rule.__name__, used, np.dtype(dtype).name)
            if key in seen:
                continue
            seen.add(key)
            c = type(coefficients)(*(np.dtype(dtype).type(x) for x in coefficients))
            ctype = numba.typeof(c)
            scal = numba.from_dtype(np.dtype(dtype))
            for has_wd in (False, True):
                flat, rows2 = arr(dtype, 1), arr(dtype, 2)
                if hasattr(rule, "ROW_SLOTS"):  # the row-reduction kernels, dense and sparse
                    row_used = kernel_used(opt._row_slot_names(), rule.ROW_SLOTS)
                    for dense in (True, False):
                        compile_one(kc.row_kernel(rule, used, row_used, has_wd, dense, dtype, 256),
                                    (rows2, slots(used, rows2, rows2), slots(row_used, flat, flat), i64, i64,
                                     i64, rows2, types.int64, ctype, scal, scal))
                        count += 1
                    continue
                compile_one(kc.dense_kernel(rule, used, has_wd), (flat, flat, slots(used, flat, flat), ctype, scal))
                compile_one(kc.sparse_kernel(rule, used, has_wd),
                            (rows2, slots(used, rows2, rows2), i64, i64, i64, rows2, types.int64, ctype, scal))
                # exact mode: the fused catch-up + update, and the catch-up of flush/catch_up
                hist = types.Array(numba.from_dtype(_exact.record_dtype(rule, dtype)), 1, "C")
                tab, i8, f8 = arr(np.float64, 2), types.int64, types.float64
                compile_one(ce.sparse_kernel(rule, used, has_wd),
                            (rows2, slots(used, rows2, rows2), i64, i64, i64, rows2, i8, i64, i8, i8, hist,
                             tab, ctype, scal, ctype, scal, f8))
                compile_one(ce.catch_up_kernel(rule, used, has_wd),
                            (rows2, slots(used, rows2, rows2), i64, i8, types.boolean, i64, i8, i8, hist, tab,
                             ctype, scal, f8))
                count += 4
    count += compile_low_precision(kc, i64)
    count += compile_batched(kc, dd, i64)
    count += compile_reductions(kc, i64)
    count += compile_factored()
    count += compile_many_slots(kc, i64)
    for dtype in (np.float32, np.float64):
        scal = numba.from_dtype(np.dtype(dtype))
        f1 = arr(dtype, 1)
        compile_one(kc.segment_sum, (arr(dtype, 2), i64, i64, types.int64, arr(dtype, 2)))
        compile_one(kc.fill, (f1, scal))
        compile_one(kc.copy, (f1, f1))
        compile_one(kc.clip, (f1, f1, scal))
        compile_one(kc.scale, (f1, f1, scal))
        compile_one(kc.gather_rows, (arr(dtype, 2), i64, types.int64, arr(dtype, 2)))
        compile_one(kc.scatter_rows, (arr(dtype, 2), i64, types.int64, arr(dtype, 2)))
        compile_one(kc.sum_kernel(256, True), (f1, arr(np.float64, 1)))
        compile_one(ce.decay_rows(), (arr(dtype, 2), i64, types.int64, types.boolean, i64, types.int64,
                                      types.int64, arr(np.float64, 2), types.uint64))
        count += 9
    compile_one(kc.sum_kernel(256, False), (arr(np.float64, 1), arr(np.float64, 1)))
    compile_one(kc.fill, (i64, types.int64))
    compile_one(kc.iota, (i64,))
    compile_one(ce.set_last, (i64, i64, types.int64, types.int64))
    for idx in (np.int32, np.int64, np.uint32, np.int16):
        compile_one(dd._prepare, (arr(idx, 1), types.int64, i64, i64, i64))
        count += 1
    compile_one(dd._radix_count, (i64, types.int64, types.int64, i64))
    compile_one(dd._radix_scatter, (i64, i64, types.int64, types.int64, i64, i64, i64))
    compile_one(dd._scan_block_kernel(256), (i64, i64, types.int64, i64))
    compile_one(dd._scan_add, (i64, types.int64, i64))
    compile_one(dd._heads, (i64, i64))
    compile_one(dd._segments, (i64, i64, i64, i64, i64))
    count += 11
    print(f"compiled {count} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
