"""Row-wise sparse steps: the lazy update of a few thousand rows of a large table.

asv repeats a step back to back, so these are warm-cache figures that track
regressions; the cold-cache comparison with other libraries is ``peers.py``.
"""

import numpy as np

from .common import OPTIMIZERS, SPARSE_MODES, make_optimizer, make_table, sparse_batches

import sparseopt as so
from sparseopt.kernels import dedup

TABLE_ROWS = 1 << 18
BATCHES = 4


class SparseStep:
    """``apply_gradients`` with one ``IndexedSlices`` gradient (Zipf(1.05) row ids)."""

    params = (list(OPTIMIZERS), [1024, 16384], [16, 64], ["float32", "float64"], SPARSE_MODES)
    param_names = ["optimizer", "touched_rows", "width", "dtype", "sparse_mode"]
    timeout = 120

    def setup(self, optimizer, touched_rows, width, dtype, sparse_mode):
        self.table = make_table(TABLE_ROWS, width, dtype)
        self.opt = make_optimizer(optimizer, sparse_mode=sparse_mode)
        self.grads = [so.IndexedSlices(v, i, self.table.shape)
                      for v, i in sparse_batches(TABLE_ROWS, width, touched_rows, BATCHES, dtype)]
        self.step = 0
        for g in self.grads:  # JIT compile (or load from cache) and fault the pages in
            self.opt.apply_gradients([(g, self.table)])

    def time_apply_gradients(self, optimizer, touched_rows, width, dtype, sparse_mode):
        self.step += 1
        self.opt.apply_gradients([(self.grads[self.step % BATCHES], self.table)])


class DedupPlan:
    """The de-duplication plan alone (``sparseopt.kernels.dedup.plan_rows``)."""

    params = ([1024, 16384, 65536],)
    param_names = ["lookups"]

    def setup(self, lookups):
        self.indices = [i for _, i in sparse_batches(TABLE_ROWS, 1, lookups, BATCHES)]
        self.step = 0
        dedup.plan_rows(self.indices[0], TABLE_ROWS)

    def time_plan_rows(self, lookups):
        self.step += 1
        dedup.plan_rows(self.indices[self.step % BATCHES], TABLE_ROWS)


class SlotMemory:
    """Memory of the optimizer state: slots are contiguous arrays of the table's shape."""

    params = (list(OPTIMIZERS), ["float32", "float64"])
    param_names = ["optimizer", "dtype"]
    rows, width = 1 << 18, 64

    def setup(self, optimizer, dtype):
        self.table = np.zeros((self.rows, self.width), dtype)
        self.table.fill(1.0)  # fault the pages in before the measurement

    def peakmem_build(self, optimizer, dtype):
        make_optimizer(optimizer).build([self.table])

    def peakmem_first_sparse_step(self, optimizer, dtype):
        opt = make_optimizer(optimizer)
        values = np.ones((1024, self.width), dtype)
        opt.apply_gradients([(so.IndexedSlices(values, np.arange(1024), self.table.shape),
                              self.table)])

    def track_slot_bytes_per_table_byte(self, optimizer, dtype):
        opt = make_optimizer(optimizer)
        opt.build([self.table])
        return sum(w.nbytes for w in opt.variables()[1:]) / self.table.nbytes

    track_slot_bytes_per_table_byte.unit = "x table"
