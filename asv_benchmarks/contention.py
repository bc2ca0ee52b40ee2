"""A sparse step while another process keeps a core busy (issue 20, item 12).

A parallel region waits for every thread of Numba's pool; when another process holds a
core, the region waits for a scheduler slice. This script times lazy sparse steps of a
few sizes with the thread count sparseopt picks per step (``auto``: from the step's work,
:data:`sparseopt._config.MIN_WORK_PER_THREAD`, then measured, ``ADAPTIVE``; ``work only``:
from the work alone), with one thread and with every thread,
interleaved step by step in one process (a fresh random order per step), once on the
machine as it is and once with ``--busy`` processes spinning (``while True: pass``), and
prints a Markdown table of medians and ratios.

    python asv_benchmarks/contention.py [--steps 60] [--busy 1]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import sparseopt as so
from sparseopt import _config

#: (label, table rows, width, lookups per step), Zipf-like indices (s = 1.05).
SIZES = [
    ("small: 100,000 x 64, 1,024 lookups", 100_000, 64, 1_024),
    ("medium: 1,000,000 x 64, 4,096 lookups", 1_000_000, 64, 4_096),
    ("W1: 1,000,000 x 64, 16,384 lookups", 1_000_000, 64, 16_384),
    ("W2: 4,000,000 x 32, 65,536 lookups", 4_000_000, 32, 65_536),
    ("tiny (the smoke test): 1,000 x 8, 64 lookups", 1_000, 8, 64),
]

#: name: (MIN_WORK_PER_THREAD, ADAPTIVE); None: the default.
VARIANTS = {"auto": (None, True), "work only": (None, False), "1 thread": (1 << 62, False),
            "every thread": (1, False)}


def zipf_batches(rng, rows, width, k, count):
    ranks = np.arange(1, rows + 1, dtype=np.float64)
    p = ranks ** -1.05
    p /= p.sum()
    perm = rng.permutation(rows)
    return [(rng.normal(size=(k, width)).astype(np.float32), perm[rng.choice(rows, size=k, p=p)])
            for _ in range(count)]


def measure(rows, width, k, steps, rng):
    """Median and max ms per variant for lazy Adam steps on one table."""
    table = np.zeros((rows, width), np.float32)
    batches = zipf_batches(rng, rows, width, k, 8)
    opts = {name: so.Adam(1e-3) for name in VARIANTS}
    tables = {name: table.copy() for name in VARIANTS}
    evict = np.empty(min(8 << 20, 64 * rows * width), np.float32)
    default, adaptive = _config.MIN_WORK_PER_THREAD, _config.ADAPTIVE
    times = {name: [] for name in VARIANTS}
    threads = {}
    enter, chosen = _config.enter_step, []

    def spy(work, stats=None):  # which thread count each step of ``auto`` ran on
        token = enter(work, stats)
        if stats is opts["auto"]._guard.threads and token is not None:
            chosen.append(token[2])
        return token
    _config.enter_step = spy
    try:
        for step in range(steps + 3):
            values, idx = batches[step % len(batches)]
            g = so.IndexedSlices(values, idx, (rows, width))
            for name in rng.permutation(list(VARIANTS)):
                min_work, _config.ADAPTIVE = VARIANTS[name]
                _config.MIN_WORK_PER_THREAD = min_work or default
                evict.fill(step)  # cold caches, as in training
                t0 = time.perf_counter()
                opts[name].apply_gradients([(g, tables[name])])
                dt = time.perf_counter() - t0
                if step >= 3:
                    times[name].append(dt * 1e3)
            threads.setdefault("auto", _threads_for(opts["auto"], g, tables["auto"], default))
    finally:
        _config.MIN_WORK_PER_THREAD, _config.ADAPTIVE = default, adaptive
        _config.enter_step = enter
    several = sum(n > 1 for n in chosen[3:]) / max(1, len(chosen[3:]))
    return ({name: (statistics.median(v), max(v)) for name, v in times.items()}, threads["auto"],
            several)


def _threads_for(opt, g, table, default):
    """The thread count ``auto`` picks for this step."""
    import numba
    from sparseopt.backends import cpu
    update = cpu.SparseUpdate.validate(g, table, "t")
    update.plan(table)
    state = opt._states[id(table)]
    work = cpu.work([(state, update)], opt._exact_states)
    return max(1, min(numba.get_num_threads(), work // default)), work


def spin(count):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--busy", type=int, default=1, help="spinning processes in the busy run")
    parser.add_argument("--sizes", default="0,1,2", help="indices into SIZES (3: W2, 4.6 GB)")
    args = parser.parse_args(argv)
    import numba
    numba.get_num_threads()
    print(f"numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads, layer "
          f"{_config.threading_layer()}, nproc {os.cpu_count()}, "
          f"MIN_WORK_PER_THREAD {_config.MIN_WORK_PER_THREAD}", flush=True)
    rows_out = []
    for i in (int(x) for x in args.sizes.split(",")):
        label, rows, width, k = SIZES[i]
        for busy in (0, args.busy):
            procs = spin(busy)
            try:
                time.sleep(0.5 if busy else 0)
                load0 = os.getloadavg()[0]
                result, (picked, work), several = measure(rows, width, k, args.steps,
                                                          np.random.default_rng(i))
                load1 = os.getloadavg()[0]
            finally:
                for p in procs:
                    p.kill()
                    p.wait()
            auto, fixed = result["auto"], result["work only"]
            one, every = result["1 thread"], result["every thread"]
            line = (f"| {label} | {busy} | {load0:.1f}-{load1:.1f} | {picked} ({work / 1e6:.1f} M) "
                    f"| {100 * several:.0f} % | {auto[0]:.3f} ({auto[1]:.1f}) | {fixed[0]:.3f} ({fixed[1]:.1f}) "
                    f"| {one[0]:.3f} ({one[1]:.1f}) | {every[0]:.3f} ({every[1]:.1f}) "
                    f"| {every[0] / auto[0]:.2f} | {one[0] / auto[0]:.2f} |")
            print(line, flush=True)
            rows_out.append(line)
    print()
    print("| step | spinning processes | 1-min load during | threads by work (work, elements) "
          "| auto: steps on several threads | auto: ms median (max) | work only | 1 thread | every thread "
          "| every thread / auto | 1 thread / auto |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows_out))


if __name__ == "__main__":
    main()
