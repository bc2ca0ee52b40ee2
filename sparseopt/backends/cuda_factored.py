"""The device half of a factored rule's step (``Adafactor`` on CUDA arrays).

:class:`sparseopt.optimizers.adafactor._FactoredUpdate` hands a validated (and clipped)
CUDA update here (:class:`sparseopt.backends.cuda.DenseUpdate` or
:class:`~sparseopt.backends.cuda.SparseUpdate`); the kernels are
:mod:`sparseopt.kernels.cuda_factored`, launched on the update's stream. The unit is the
CPU's (:class:`~sparseopt.optimizers.adafactor._FactoredUpdate`): the whole variable for a
dense gradient; for a sparse one the touched rows as a table of their own, gathered into
device scratch with their statistics (duplicates summed first, in the CPU's order), stepped,
and scattered back: work and scratch proportional to the batch. A 2-D table's column
statistics are one for all rows and are stepped in place.

:func:`statistics` allocates a variable's ``r`` and ``c`` on its device.
"""

import math

from sparseopt.backends import cuda


def statistics(var, shapes):
    """Zero-filled device arrays of ``shapes`` (a factored rule's statistics), of the
    variable's dtype, on its device (as :func:`sparseopt.backends.cuda.row_slot_storage`)."""
    rt = cuda.runtime()
    w = cuda.check_variable(var, "variable")
    out = []
    with cuda._on_device(rt, w.device):
        for shape in shapes:
            array = rt.cuda.device_array(tuple(shape), w.array.dtype)
            if array.size:
                cuda._fill(rt, array.reshape((array.size,)), 0.0)
            out.append(array)
        rt.cuda.synchronize()  # as slot_storage: the fills finish before any stream reads them
    return out


def run(rule_module, state, update, c, wd, has_wd):
    """One step of ``update`` (a CUDA update of ``state``'s variable, float32 or float64)."""
    if math.prod(update.var.shape) == 0:
        return
    sparse = type(update) is cuda.SparseUpdate
    if sparse and update.k == 0:
        return
    rt = cuda.runtime()
    with cuda._on_device(rt, update.device):
        if sparse:
            _run_sparse(rt, rule_module, state, update, c, wd, has_wd)
        else:
            _run_dense(rule_module, state, update, c, wd, has_wd)
        cuda._release_to(rt, update.stream, update.handles[1], update.handles[0])


def _scratch(update):
    """``scratch(key, shape)``: the update's variable's device scratch of the math dtype."""
    dtype = update.values.dtype

    def get(key, shape):
        return update.scratch.buffer(("factored", key), math.prod(shape), dtype).reshape(shape)
    return get


def _step(rule_module, p, g, stats, c, wd, has_wd, scratch, stream):
    """``p``, ``g`` of the unit's shape (rank < 2: flat, ``stats`` = ``(v,)``; else ``(B, R,
    C)``, ``stats`` = ``(r, col)`` as ``(B, R)`` and ``(B, C)``)."""
    from sparseopt.kernels import cuda_factored
    dtype = type(wd)
    if len(stats) == 1:
        cuda_factored.plain_step(rule_module, has_wd, p, g, stats[0], c, wd, dtype(p.size), scratch, stream)
        return
    nb, nr, nc = p.shape
    cuda_factored.factored_step(rule_module, has_wd, p, g, stats[0], stats[1], c, wd, dtype(nr), dtype(nc),
                                dtype(p.size), scratch, stream)


def _run_dense(rule_module, state, update, c, wd, has_wd):
    shape = update.shape
    size = update.var.size
    if len(shape) < 2:
        stats = (state.slots["v"].reshape((size,)),)
        p, g = update.var, update.values
    else:
        nr, nc = shape[-2], shape[-1]
        nb = size // (nr * nc)
        p, g = update.var.reshape((nb, nr, nc)), update.values.reshape((nb, nr, nc))
        stats = (state.slots["r"].reshape((nb, nr)), state.slots["c"].reshape((nb, nc)))
    _step(rule_module, p, g, stats, c, wd, has_wd, _scratch(update), update.stream)


def _run_sparse(rt, rule_module, state, update, c, wd, has_wd):
    update._sum_duplicates()  # the touched rows' summed gradients, in update.rows order
    k, rows, stream = update.k, update.rows, update.stream
    kernels = rt.kernels
    threads = kernels.launch_config().threads
    scratch = _scratch(update)
    num_rows = update.num_rows
    row_shape = update.row_shape

    def gather(src, key):  # the touched rows of a (num_rows, width) array
        out = scratch(key, (k, src.shape[1]))
        kernels.gather_rows[kernels.blocks_for(out.size, threads), threads, stream](src, rows, k, out)
        return out

    def scatter(src, dst):
        kernels.scatter_rows[kernels.blocks_for(src.size, threads), threads, stream](src, rows, k, dst)

    var = update.var  # (num_rows, width)
    p = gather(var, "rows")
    g = update.values  # (k, width)
    if not row_shape:  # a vector: the dense rule on the touched elements, with their v
        v = state.slots["v"].reshape((num_rows, 1))
        v_unit = gather(v, "v")
        _step(rule_module, p.reshape((k,)), g.reshape((k,)), (v_unit.reshape((k,)),), c, wd, has_wd,
              scratch, stream)
        scatter(v_unit, v)
    else:
        nc = row_shape[-1]
        r = state.slots["r"].reshape((num_rows, math.prod(row_shape[:-1])))
        col = state.slots["c"]
        r_unit = gather(r, "r")
        if len(row_shape) == 1:  # a 2-D table: its touched rows are one matrix; c is shared
            nb, nr = 1, k
            c_unit = col.reshape((1, nc))
        else:  # rank >= 3: each row is matrices of its own, with its own r and c
            nb, nr = k * math.prod(row_shape[:-2]), row_shape[-2]
            c_unit = gather(col.reshape((num_rows, col.size // num_rows)), "c")
        _step(rule_module, p.reshape((nb, nr, nc)), g.reshape((nb, nr, nc)),
              (r_unit.reshape((nb, nr)), c_unit.reshape((nb, nc))), c, wd, has_wd, scratch, stream)
        scatter(r_unit, r)
        if len(row_shape) > 1:
            scatter(c_unit, col.reshape((num_rows, col.size // num_rows)))
    scatter(p, var)

