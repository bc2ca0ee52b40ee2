"""Numba settings, in one place.

``SPARSEOPT_NUMBA_CACHE=0`` turns the on-disk kernel cache off (default on: a cold
compile of one optimizer's kernels takes seconds, loading them from the cache
milliseconds; see README "First call and caching"). Where Numba finds no writable
place for the cache (a read-only install with ``NUMBA_CACHE_DIR`` unset and no
writable user cache directory), the kernels are compiled without it, with one
:class:`CacheUnavailableWarning`: ``cache=True`` would make the decorators raise
``RuntimeError: cannot cache function ...: no locator available`` at import.

No ``fastmath``: NaN and Inf must propagate exactly as in Keras, and results must
not depend on the CPU's contraction choices.

``error_model="numpy"``: a float division by zero gives Inf or NaN as in IEEE
arithmetic (and in Keras), where Numba's default (Python's rules) raises
``ZeroDivisionError`` and puts a branch in every division. Numba compiles the body of
a ``prange`` loop this way already; the flag makes the serial helpers and the code
around the loops agree with it.
"""

import functools
import os
import threading
import time
import warnings

import numba


class CacheUnavailableWarning(RuntimeWarning):
    """No writable location for Numba's on-disk cache: kernels compile in every process."""


def _cache_location_available():
    """Whether Numba can cache a function of :mod:`sparseopt.kernels` (every cached
    kernel lives there): asks Numba's own cache locators, as ``cache=True`` does, for
    a probe function whose code claims to come from ``kernels/cpu.py``."""
    from numba.core import caching

    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "cpu.py")
    namespace = {}
    exec(compile("def _sparseopt_cache_probe():\n    pass\n", source, "exec"), namespace)
    try:
        caching.FunctionCache(namespace["_sparseopt_cache_probe"])
    except (RuntimeError, OSError):
        return False
    return True


def _cache_setting():
    if os.environ.get("SPARSEOPT_NUMBA_CACHE", "1").lower() in ("0", "false", "no"):
        return False
    if numba.config.DISABLE_JIT:  # nothing is compiled, so nothing is cached
        return False
    if not _cache_location_available():
        warnings.warn(
            "sparseopt: Numba finds no writable cache location (the package's __pycache__ "
            "folders, NUMBA_CACHE_DIR, the user cache directory), so sparseopt's kernels are "
            "compiled without the on-disk cache: the first step of every process compiles them "
            "(seconds). Set NUMBA_CACHE_DIR to a writable folder to cache them, or "
            "SPARSEOPT_NUMBA_CACHE=0 to silence this warning.", CacheUnavailableWarning)
        return False
    return True


CACHE = _cache_setting()

#: Flags of the CPU kernels that run the rules.
CPU_KERNEL_FLAGS = dict(parallel=True, cache=CACHE, nogil=True, error_model="numpy")
#: Flags of the sequential helpers (de-duplication, validation).
CPU_SERIAL_FLAGS = dict(cache=CACHE, nogil=True, error_model="numpy")
#: Flags with which a rule is compiled for inlining into the CPU kernels.
CPU_RULE_FLAGS = dict(inline="always", error_model="numpy")


# ----------------------------------------------------------------------------- threads
#
# Threading layer. sparseopt keeps Numba's choice (``NUMBA_THREADING_LAYER``, by default the
# first of TBB, OpenMP, workqueue that loads). TBB and OpenMP accept parallel regions
# launched from several Python threads at once; Numba's own ``workqueue`` (its fallback
# where neither runtime is found) aborts the process when two threads launch one at the
# same time. Under ``workqueue`` every parallel kernel of sparseopt is therefore run under
# one process-wide lock (:func:`parallel_kernel`): steps of optimizers in different threads
# then take turns instead of aborting (the layer has one pool of workers anyway).
#
# Thread count. A step's parallel region needs every thread of the pool; when another process
# holds a core, the region waits for a scheduler slice (milliseconds), ten times a small step's
# work (asv_benchmarks/reports/cpu.md, "Contention"). So a step below MIN_WORK_PER_THREAD
# elements per thread runs on one thread, with no parallel region to stall. A bigger step may use
# up to ``work // MIN_WORK_PER_THREAD`` threads, at most the cap: the smaller of
# :func:`set_num_threads`'s value and the calling thread's ``numba.get_num_threads()``. Whether
# that pays depends on the machine's load, so each optimizer measures it (ADAPTIVE): it keeps the
# time per element of its last big steps on one thread and on several, runs the faster (by their
# medians), and now and then tries the other (after 16 steps, then at doubling intervals up to 256
# while it keeps losing). The thread count never changes a result (sparseopt.kernels.cpu).

#: Elements a step must touch per thread (gradient elements plus parameter and slot
#: elements read and written) before it may use another thread.
MIN_WORK_PER_THREAD = 1 << 19
#: Whether steps big enough for several threads measure which thread count runs faster
#: (False: they always use ``work // MIN_WORK_PER_THREAD`` threads, up to the cap).
ADAPTIVE = True
_PROBE_FIRST, _PROBE_MAX, _WINDOW = 16, 256, 5

_layer = None                    # Numba's threading layer, once started
_max_threads = None              # set_num_threads(n)
_parallel_lock = threading.Lock()
_get_threads = _set_threads = None


def threading_layer():
    """The threading layer Numba runs sparseopt's parallel kernels on (``"tbb"``, ``"omp"``
    or ``"workqueue"``), starting Numba's threads if they are not yet; ``None`` under
    ``NUMBA_DISABLE_JIT=1``."""
    global _layer, _get_threads, _set_threads
    if _layer is None and not numba.config.DISABLE_JIT:
        from numba.np.ufunc import parallel
        numba.get_num_threads()  # starts the layer
        # Numba's public get/set_num_threads check and start the layer on every call (2-3 us
        # each); once it is started, the functions they call cost 0.2-0.5 us.
        _get_threads = getattr(parallel, "_get_num_threads", numba.get_num_threads)
        _set_threads = getattr(parallel, "_set_num_threads", numba.set_num_threads)
        _layer = numba.threading_layer()
    return _layer


def parallel_kernel(kernel):
    """``kernel`` (a ``parallel=True`` dispatcher), or under the ``workqueue`` threading
    layer a function that runs it under the process-wide lock."""
    if threading_layer() != "workqueue":
        return kernel

    @functools.wraps(getattr(kernel, "py_func", kernel))
    def serialized(*args):
        with _parallel_lock:
            return kernel(*args)
    serialized.kernel = kernel
    return serialized


def set_num_threads(n):
    """Cap the threads sparseopt's CPU kernels use (``None``: no cap of its own).

    A step uses as many threads as its work warrants (one for a small step: see the
    comment above), at most ``n`` and at most ``numba.get_num_threads()`` of the calling
    thread. Results are the same for any thread count.
    """
    global _max_threads
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sparseopt.set_num_threads: n must be an int >= 1 or None; got {n!r}")
    _max_threads = n


def get_num_threads():
    """The cap :func:`set_num_threads` set (``None``: Numba's thread count)."""
    return _max_threads


class StepThreads:
    """One optimizer's measurements for :func:`enter_step` (or the de-duplication plans',
    :mod:`sparseopt.kernels.dedup`): the seconds per element of its last big steps on one
    thread and on several (the median of the last :data:`_WINDOW`: one step that the
    scheduler held up does not flip the choice), and when to try the other count.
    ``several_first``: whether steps run on several threads until both are measured."""

    __slots__ = ("one", "several", "since", "interval", "seen", "several_first")

    def __init__(self, several_first=True):
        self.one = []
        self.several = []
        self.since = 0
        self.interval = _PROBE_FIRST
        self.seen = 0  # big steps so far: the first two (which compile the kernels) are not measured
        self.several_first = several_first  # which count runs before either is measured

    def __deepcopy__(self, memo):
        return StepThreads(self.several_first)


def _estimate(costs):
    return sorted(costs)[len(costs) // 2] if costs else None


def enter_step(work, stats=None, per_thread=None):
    """Set the calling thread's Numba thread count for a step that touches ``work``
    elements (``stats``: the optimizer's :class:`StepThreads`; ``per_thread``: the work
    that warrants a thread, by default :data:`MIN_WORK_PER_THREAD`); returns the token
    :func:`leave_step` takes (its third item is the thread count set)."""
    if _set_threads is None and threading_layer() is None:
        return None
    current = _get_threads()
    cap = current if _max_threads is None or _max_threads > current else _max_threads
    want = work // (MIN_WORK_PER_THREAD if per_thread is None else per_thread)
    if want > cap:
        want = cap
    probe = False
    if want < 2:
        want = 1
        stats = None
    elif stats is not None and ADAPTIVE:
        one, several = _estimate(stats.one), _estimate(stats.several)
        if one is None or several is None:  # the measured count, else the preferred one
            use_several = several is not None or (one is None and stats.several_first)
        else:
            use_several = several <= one
        stats.since += 1
        if stats.since >= stats.interval:
            stats.since = 0
            use_several = not use_several
            probe = True
        if not use_several:
            want = 1
    else:
        stats = None
    if want == current:
        current = 0
    else:
        _set_threads(want)
    return current, stats, want, probe, work, time.perf_counter()


def leave_step(token):
    """Undo :func:`enter_step`, and record the step's time per element."""
    if token is None:
        return
    restore, stats, want, probe, work, t0 = token
    if restore:
        _set_threads(restore)
    if stats is None:
        return
    cost = (time.perf_counter() - t0) / work
    stats.seen += 1
    if stats.seen <= 2:
        return
    costs = stats.one if want == 1 else stats.several
    costs.append(cost)
    if len(costs) > _WINDOW:
        del costs[0]
    if probe:  # the other count lost again: try it less often; it won: try it again soon
        one, several = _estimate(stats.one), _estimate(stats.several)
        lost = one is not None and several is not None and (several > one if want > 1 else one >= several)
        stats.interval = min(2 * stats.interval, _PROBE_MAX) if lost else _PROBE_FIRST
