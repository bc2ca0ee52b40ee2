"""W4, scaled down: the 26 Criteo-Kaggle-like tables of issue 21 in one ``apply_gradients`` call.

asv repeats a step back to back, so these are warm-cache figures that track regressions of the
fixed cost per table; the cold-cache comparison (probe, 1-table control, FBGEMM's TBE, the Keras
DLRM) is ``asv_benchmarks/w4_bench.py``.
"""

import numpy as np

from .common import make_optimizer, make_table, sparse_batches

import sparseopt as so

#: The 26 categorical cardinalities of Criteo Kaggle (DLRM's preprocessing of the Kaggle set).
CRITEO_KAGGLE = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
                 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)

CAP = 100_000      # rows per table at most here (w4_bench.py: 2,000,000)
WIDTH = 16
LOOKUPS = 4096     # per table per step
BATCHES = 4


class ManyTablesStep:
    """26 tables (``tables=26``) or one table of the same total rows and lookups (``tables=1``)."""

    params = (["adam", "adagrad", "sgd_momentum"], [26, 1])
    param_names = ["optimizer", "tables"]
    timeout = 180

    def setup(self, optimizer, tables):
        cards = [min(c, CAP) for c in CRITEO_KAGGLE]
        batches = [sparse_batches(c, WIDTH, LOOKUPS, BATCHES, np.float32, seed=t + 1)
                   for t, c in enumerate(cards)]
        if tables == 26:
            self.vars = [make_table(c, WIDTH, np.float32, t) for t, c in enumerate(cards)]
            self.pairs = [[(so.IndexedSlices(*batches[t][b], v.shape), v) for t, v in enumerate(self.vars)]
                          for b in range(BATCHES)]
        else:
            offsets = np.concatenate([[0], np.cumsum(cards)])
            table = make_table(int(offsets[-1]), WIDTH, np.float32, 0)
            self.vars = [table]
            self.pairs = [[(so.IndexedSlices(np.concatenate([batches[t][b][0] for t in range(len(cards))]),
                                             np.concatenate([batches[t][b][1] + offsets[t]
                                                             for t in range(len(cards))]),
                                             table.shape), table)] for b in range(BATCHES)]
        self.opt = make_optimizer(optimizer)
        self.step = 0
        for pairs in self.pairs:  # JIT compile (or load from cache) and fault the pages in
            self.opt.apply_gradients(pairs)

    def time_apply_gradients(self, optimizer, tables):
        self.step += 1
        self.opt.apply_gradients(self.pairs[self.step % BATCHES])
