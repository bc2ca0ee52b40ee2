"""All-or-nothing steps with constraints: what a step may write, kept so it can be undone.

Every input is validated before a step writes anything, except what only exists after
the kernels ran: a user constraint runs on the updated values, and may raise or return
something unusable (``None``, another shape). When ``apply_gradients`` gets constraints
it first takes a :class:`Snapshot` of what the step will write (only then: a step
without constraints pays nothing), and restores it if a constraint fails, so the
variables, every slot, ``iterations`` and the exact-mode bookkeeping are as they were.

What is kept, per variable of the step:

* a sparse gradient of a NumPy variable: its touched rows of the variable, of the slot
  storage and of the row-slot storage (row-wise rules): proportional to the batch;
* a dense gradient, or a CUDA variable: the whole variable and its slots (a CUDA
  variable's are copied to the host: constraints on CUDA variables cost a round trip);
* exact mode: the variable's step count, ``has_wd``, the history record the step
  writes, and ``last`` of the touched rows. The touched rows (every row for a dense
  gradient) are first brought current, a change of representation that the dense
  rule cannot see, so that what is kept and restored is a consistent state.
"""

from sparseopt import _exact


class _Kept:
    __slots__ = ("state", "rows", "var", "storage", "row_storage", "ex", "ex_existed", "steps",
                 "has_wd", "record", "last")


class Snapshot:
    """What ``updates`` (the base class's ``(state, update)`` pairs) may write."""

    def __init__(self, opt, updates, is_sparse):
        self.opt = opt
        self.kept = []
        exact = opt.sparse_mode == "exact"
        row_storage = getattr(opt, "_row_storage", {})
        for state, update in updates:
            var = state.var
            backend = state.backend
            k = _Kept()
            k.state = state
            # (a CUDA variable's sparse update is not a host one: it is kept whole)
            k.rows = update.rows if is_sparse(update) else None
            ex = opt._exact_states.get(id(var)) if exact else None
            k.ex, k.ex_existed = ex, ex is not None
            if ex is not None and ex.pending():
                if k.rows is None:
                    _exact.catch_up_rows(opt, state, ex)
                elif k.rows.size:
                    _exact.catch_up_rows(opt, state, ex, k.rows)
            rs = row_storage.get(id(var))
            if k.rows is None:
                k.var, k.storage = backend.to_host(var), backend.to_host(state.storage)
                k.row_storage = None if rs is None else backend.to_host(rs)
            else:
                k.var, k.storage = var[k.rows], state.storage[:, k.rows]
                k.row_storage = None if rs is None else rs[:, k.rows]
            if ex is not None:
                k.steps, k.has_wd = ex.steps, ex.has_wd
                k.record = ex.hist[(ex.steps + 1) % ex.history].copy()
                if ex.device is not None:
                    k.last = backend.to_host(ex.device.last)
                else:
                    k.last = None if k.rows is None else ex.last[k.rows]
            self.kept.append(k)

    def restore(self):
        """Put back everything kept (device code cannot fail half-way: this cannot either)."""
        opt = self.opt
        row_storage = getattr(opt, "_row_storage", {})
        for k in self.kept:
            state = k.state
            var = state.var
            backend = state.backend
            rs = row_storage.get(id(var))
            if k.rows is None:
                backend.copy_from_host(var, k.var)
                backend.copy_from_host(state.storage, k.storage)
                if rs is not None and k.row_storage is not None:
                    backend.copy_from_host(rs, k.row_storage)
            else:
                var[k.rows] = k.var
                state.storage[:, k.rows] = k.storage
                if rs is not None and k.row_storage is not None:
                    rs[:, k.rows] = k.row_storage
            if not k.ex_existed:
                opt._exact_states.pop(id(var), None)
                continue
            ex = k.ex
            if ex is None:
                continue
            index = (k.steps + 1) % ex.history
            ex.hist[index] = k.record
            if ex.device is not None:
                ex.device.write_record(ex.hist, index)
                backend.copy_from_host(ex.device.last, k.last)
            elif k.last is not None:
                ex.last[k.rows] = k.last
            # Rows flushed during the step stay current at the old step count: keep a
            # raised floor, but never above the restored count.
            ex.floor = min(ex.floor, k.steps)
            ex.steps = k.steps
            ex.has_wd = k.has_wd
            ex.tables_at = -1
