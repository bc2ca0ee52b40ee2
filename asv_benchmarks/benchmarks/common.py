"""What the asv suite and ``peers.py`` share: the optimizers under test and the workloads.

Add an optimizer to every benchmark (asv and the peer comparison) with one line in
:data:`OPTIMIZERS`. The benchmarks run the sparseopt of the checkout they live in
(the repository root is put first on ``sys.path``), so ``asv run -E existing`` from a
clean checkout measures that checkout, not some other installed copy.
"""

import functools
import os
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import sparseopt as so  # noqa: E402  (after the path is set)

#: name -> factory of a sparseopt optimizer; ``**kw`` are the base-class options
#: (``sparse_mode`` ...). One line per optimizer: the asv suite and peers.py use them all.
OPTIMIZERS = {
    "sgd_momentum": lambda **kw: so.SGD(learning_rate=0.01, momentum=0.9, **kw),
    "adam": lambda **kw: so.Adam(learning_rate=1e-3, **kw),
    "adagrad": lambda **kw: so.Adagrad(learning_rate=1e-3, **kw),
    "adamw": lambda **kw: so.AdamW(learning_rate=1e-3, **kw),
    "rmsprop": lambda **kw: so.RMSprop(learning_rate=1e-3, **kw),
    "adadelta": lambda **kw: so.Adadelta(learning_rate=1e-3, **kw),
    "adamax": lambda **kw: so.Adamax(learning_rate=1e-3, **kw),
    "nadam": lambda **kw: so.Nadam(learning_rate=1e-3, **kw),
    "ftrl": lambda **kw: so.Ftrl(learning_rate=1e-3, **kw),
    "lion": lambda **kw: so.Lion(learning_rate=1e-4, **kw),
}

#: The sparse modes the benchmarks cover.
SPARSE_MODES = ["lazy", "exact"]

ZIPF_S = 1.05


def make_optimizer(name, **kw):
    """A fresh sparseopt optimizer from :data:`OPTIMIZERS`."""
    return OPTIMIZERS[name](**kw)


def slot_count(name):
    """How many slot arrays (of the variable's shape) ``name`` keeps."""
    table = np.zeros((2, 1), np.float32)
    opt = make_optimizer(name)
    opt.build([table])
    return sum(1 for w in opt.variables()[1:] if w.shape == table.shape)


@functools.lru_cache(maxsize=4)
def _zipf_cdf(num_rows, s):
    weights = np.arange(1, num_rows + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return cdf


@functools.lru_cache(maxsize=4)
def _rank_to_row(num_rows, seed):
    # The hot rows are scattered over the table, as hashed ids are in practice.
    return np.random.default_rng(seed).permutation(num_rows)


def zipf_indices(rng, num_rows, n, s=ZIPF_S, seed=1234):
    """``n`` row ids in ``[0, num_rows)`` with ``P(rank k) ~ k**-s`` (bounded Zipf), int64."""
    ranks = np.searchsorted(_zipf_cdf(num_rows, s), rng.random(n), side="right")
    np.minimum(ranks, num_rows - 1, out=ranks)
    return _rank_to_row(num_rows, seed)[ranks].astype(np.int64)


def sparse_batches(num_rows, width, lookups, count, dtype=np.float32, seed=0, s=ZIPF_S):
    """``count`` distinct seeded batches ``(values (lookups, width), indices (lookups,))``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        indices = zipf_indices(rng, num_rows, lookups, s)
        values = rng.standard_normal((lookups, width), dtype=np.float32).astype(dtype, copy=False)
        out.append((values, indices))
    return out


def dense_batches(shape, count, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
            for _ in range(count)]


def make_table(num_rows, width, dtype=np.float32, seed=0):
    """A table of small values (``N(0, 0.01)``), C-contiguous."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((num_rows, width), dtype=np.float32)
    table *= 0.01
    return table.astype(dtype, copy=False)


def unique_count(indices):
    return int(np.unique(indices).size)


def python_prelude():
    """Code that makes this checkout's sparseopt importable in a fresh interpreter."""
    return f"import sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\n"


#: Code that makes SciPy unimportable, as on a machine where only sparseopt's own
#: requirements are installed (none of them needs SciPy). Numba imports SciPy's BLAS module
#: when its CPU target starts (``numba.np.arraymath``) if SciPy is there, which costs a
#: fresh process about 0.2 s before any kernel runs.
HIDE_SCIPY = """
import importlib.abc as _abc
class _NoScipy(_abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "scipy" or name.startswith("scipy."):
            raise ImportError("SciPy hidden (a machine without SciPy)")
sys.meta_path.insert(0, _NoScipy())
"""


def first_step_code(name, gradient="sparse", cache_dir=None, rows=100_000, width=64, lookups=4096,
                    hide_scipy=False):
    """``(stmt, setup)`` for a fresh interpreter: setup imports and builds, stmt is the first step.

    ``cache_dir``: the ``NUMBA_CACHE_DIR`` the interpreter uses (an empty folder gives a
    cold cache; ``None`` makes a fresh empty one). ``hide_scipy``: run as on a machine
    without SciPy (:data:`HIDE_SCIPY`).
    """
    if cache_dir is None:  # a fresh, empty cache folder, removed when the interpreter exits
        cache_line = ("import atexit, shutil, tempfile\n"
                      "_cache = tempfile.mkdtemp(prefix='sparseopt-cold-')\n"
                      "atexit.register(shutil.rmtree, _cache, True)\n"
                      "os.environ['NUMBA_CACHE_DIR'] = _cache\n")
    else:
        cache_line = f"os.environ['NUMBA_CACHE_DIR'] = {str(cache_dir)!r}\n"
    setup = python_prelude() + (HIDE_SCIPY if hide_scipy else "") + "import os\n" + cache_line + f"""
import numpy as np
import sparseopt as so
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from common import make_optimizer, sparse_batches, make_table
table = make_table({rows}, {width})
opt = make_optimizer({name!r})
opt.build([table])
values, indices = sparse_batches({rows}, {width}, {lookups}, 1)[0]
if {gradient!r} == "sparse":
    grad = so.IndexedSlices(values, indices, table.shape)
else:
    grad = np.ones_like(table)
"""
    stmt = "opt.apply_gradients([(grad, table)])"
    return stmt, setup


def populate_cache(cache_dir, names=None, gradients=("sparse", "dense")):
    """Compile the kernels of ``names`` into ``cache_dir`` in a child interpreter."""
    import subprocess

    code = []
    for name in names or OPTIMIZERS:
        for gradient in gradients:
            stmt, setup = first_step_code(name, gradient, cache_dir, rows=1000, lookups=64)
            code.append(setup + stmt)
    for snippet in code:
        subprocess.run([sys.executable, "-c", snippet], check=True, env=dict(os.environ))
    return str(cache_dir)


def evict_buffer(nbytes=None):
    """A buffer larger than the last-level cache (3x L3, at least 64 MiB), for :func:`evict`."""
    if nbytes is None:
        nbytes = max(64 << 20, 3 * last_level_cache_bytes())
    buf = np.empty(nbytes // 8, np.float64)
    buf.fill(0.0)
    return buf


def evict(buf, value=[0.0]):
    """Write the whole of ``buf`` (untimed, between steps) so every step starts cold."""
    value[0] += 1.0
    buf.fill(value[0])


def last_level_cache_bytes():
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in base.glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:], 1)
        digits = size.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or (32 << 20)
