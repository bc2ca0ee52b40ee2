"""16-bit tables against float32 tables, side by side: W1 lazy Adam (issue 18).

Run from the repository root::

    python asv_benchmarks/lowp_bench.py [--steps 60] [--report asv_benchmarks/reports/cpu.md]
    python asv_benchmarks/lowp_bench.py --rows 2000 --lookups 64 --steps 3     # a smoke run

In one process, on W1 (1,000,000 x 64, 16,384 Zipf(1.05) lookups per step, float32
gradients, several batches cycled), it times the lazy sparse Adam step of a float32
table and of the same table in bfloat16 (float32 slots, stochastic rounding and
round-to-nearest; bfloat16 slots, both roundings) and float16 (float32 slots,
stochastic rounding), and two bfloat16 configurations again with bfloat16 gradients (what
a 16-bit model's backward pass hands over). The implementations take turns step
by step in a fresh random order, and an untimed 128 MB write before every timed step
evicts the caches, so every step is a cold-cache step as in training. Every configuration
runs on the same thread count (Numba's, or ``--threads``): with the adaptive choice
(:mod:`sparseopt._config`) each optimizer would pick its own from its own timings. It
prints a Markdown section (medians, min/max, ratio to the float32 step, the bytes a step
must move by the floor of PERF.md, and the 64-byte cache lines those bytes lie on, counted
from the arrays' actual addresses: random rows are read and written by whole lines, and a
row that does not start on a line touches one more; the tables, like the optimizer's slot
storage, start on a line; bfloat16 gradients are read as they are, each row widened as the
kernel reads it) and, with ``--report``, puts it into
that file in place of an earlier one (``peers.py`` keeps the section when it rewrites cpu.md).
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "benchmarks"))
import common  # noqa: E402

so = common.so
from sparseopt import _config  # noqa: E402
from sparseopt.backends.cpu import aligned_empty  # noqa: E402
import ml_dtypes  # noqa: E402

ROWS, WIDTH, LOOKUPS = 1_000_000, 64, 16_384
TITLE = "## Low-precision tables: W1 lazy Adam, bfloat16 and float16 against float32"

BF16 = np.dtype(ml_dtypes.bfloat16)

#: label -> (table dtype, optimizer options, gradient dtype)
IMPLS = {
    "float32 table": (np.float32, {}, np.float32),
    "bfloat16 table, stochastic rounding": (BF16, {}, np.float32),
    "bfloat16 table, round-to-nearest": (BF16, {"stochastic_rounding": False}, np.float32),
    "float16 table, stochastic rounding": (np.float16, {}, np.float32),
    "bfloat16 table + bfloat16 slots, stochastic rounding": (BF16, {"slot_dtype": "bfloat16"}, np.float32),
    "bfloat16 table + bfloat16 slots, round-to-nearest": (BF16, {"slot_dtype": "bfloat16",
                                                                 "stochastic_rounding": False}, np.float32),
    "bfloat16 table, stochastic rounding, bfloat16 gradients": (BF16, {}, BF16),
    "bfloat16 table + bfloat16 slots, stochastic rounding, bfloat16 gradients": (BF16, {"slot_dtype": "bfloat16"},
                                                                                 BF16),
}


def step_bytes(batches, width, itemsize, slot_itemsize, nslots):
    """PERF.md's byte floor of one step, averaged over the batches (index traffic left out)."""
    total = 0
    for values, idx in batches:
        k = np.unique(idx).size
        total += values.size * values.itemsize + k * width * 2 * (itemsize + nslots * slot_itemsize)
    return total / len(batches)


def lines(address, row_bytes, rows):
    """The 64-byte cache lines that rows ``rows`` of an array at ``address`` (rows of
    ``row_bytes``) lie on, counted per row (a line shared by two rows counts twice)."""
    start = address + np.asarray(rows, np.int64) * row_bytes
    return int(np.sum((start + row_bytes - 1) // 64 - start // 64 + 1))


def step_lines(batches, table, opt):
    """Cache lines a step reads (gradient rows) and reads and writes (each unique row of the
    table and of its slots), from the arrays' addresses, averaged over the batches."""
    total = 0
    slots = [opt.get_slot(table, name) for name in opt.get_slot_names()]
    for values, idx in batches:
        unique = np.unique(idx)
        total += lines(values.ctypes.data, values[0].nbytes, np.arange(len(values)))
        total += sum(lines(a.ctypes.data, a[0].nbytes, unique) for a in [table] + slots)
    return total / len(batches)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--report", default=None)
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--lookups", type=int, default=LOOKUPS)
    parser.add_argument("--threads", type=int, default=None, help="Numba threads (default: Numba's count)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="with --threads 1: time each step by the thread's CPU time (time.thread_time), "
                             "which leaves out the time a loaded machine gives to other processes")
    args = parser.parse_args(argv)
    if args.cpu_time and args.threads != 1:
        parser.error("--cpu-time needs --threads 1 (the other threads' time would not be counted)")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    rows = args.rows
    _config.ADAPTIVE = False  # the same thread count for every configuration
    if args.threads:
        so.set_num_threads(args.threads)

    batches = {np.dtype(np.float32): common.sparse_batches(rows, WIDTH, args.lookups, 8, seed=0)}
    batches[BF16] = [(values.astype(BF16), idx) for values, idx in batches[np.dtype(np.float32)]]
    rng = np.random.default_rng(0)
    base = rng.standard_normal((rows, WIDTH), dtype=np.float32)
    runs = {}
    for label, (dtype, options, _) in IMPLS.items():
        table = aligned_empty(base.shape, dtype)  # on whole cache lines, as the slots are
        table[...] = base.astype(dtype)
        opt = so.Adam(learning_rate=1e-3, seed=1, **options)
        opt.build([table])
        runs[label] = (table, opt)
    buf = np.zeros(32 * 1024 * 1024, np.float32)
    state = {label: 0 for label in runs}

    def step(label):
        table, opt = runs[label]
        grads = batches[np.dtype(IMPLS[label][2])]
        values, idx = grads[state[label] % len(grads)]
        state[label] += 1
        opt.apply_gradients([(so.IndexedSlices(values, idx, (rows, WIDTH)), table)])

    for label in runs:  # compile and warm up
        for _ in range(3):
            step(label)
    times = {label: [] for label in runs}
    order = list(runs)
    t_start = time.time()
    for _ in range(args.steps):
        rng.shuffle(order)
        for label in order:
            buf += 1.0
            t0 = clock()
            step(label)
            times[label].append(clock() - t0)
    elapsed = time.time() - t_start

    ref = statistics.median(times["float32 table"])
    bytes32 = step_bytes(batches[np.dtype(np.float32)], WIDTH, 4, 4, 2)
    lines32 = step_lines(batches[np.dtype(np.float32)], *runs["float32 table"])
    workload = "W1" if (rows, args.lookups) == (ROWS, LOOKUPS) else f"{rows:,} x {WIDTH}, {args.lookups:,} lookups"
    threads = min(args.threads or numba.get_num_threads(), numba.get_num_threads())
    command = "python asv_benchmarks/lowp_bench.py --steps " + str(args.steps) + \
        (f" --threads {args.threads}" if args.threads else "") + (" --cpu-time" if args.cpu_time else "")
    title = TITLE + (f", {args.threads} thread{'s' if args.threads > 1 else ''}" if args.threads else "")
    out = [title + (" (CPU time)" if args.cpu_time else ""), "",
           f"Issue 18. `{command}` ({workload}); {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPUs, Numba threads {threads}, {args.steps} interleaved cold-cache steps "
           f"each ({elapsed:.0f} s). Float32 gradients unless the row says bfloat16 (read as "
           f"bfloat16 by the kernel); tables and slots 64-byte aligned. Targets (issue 18): bfloat16 table + float32 slots within "
           f"0.9x of the float32 step, + bfloat16 slots within 0.65x. Where the time goes, the example's "
           f"quality and the memory per row: [lowp.md](lowp.md).", "",
           "| table | median ms | min ms | max ms | ratio to float32 | bytes per step (floor) | bytes ratio "
           "| cache lines per step | lines ratio |",
           "|---|---|---|---|---|---|---|---|---|"]
    for label, (dtype, options, gradient_dtype) in IMPLS.items():
        t = times[label]
        med = statistics.median(t)
        slot_size = 2 if "slot_dtype" in options else 4
        nbytes = step_bytes(batches[np.dtype(gradient_dtype)], WIDTH, np.dtype(dtype).itemsize, slot_size, 2)
        nlines = step_lines(batches[np.dtype(gradient_dtype)], *runs[label])
        out.append(f"| {label} | {med * 1e3:.2f} | {min(t) * 1e3:.2f} | {max(t) * 1e3:.2f} | "
                   f"{med / ref:.2f}x | {nbytes / 1e6:.2f} MB | {nbytes / bytes32:.2f}x | "
                   f"{nlines / 1e3:.1f} k | {nlines / lines32:.2f}x |")
    out.append("")
    text = "\n".join(out)
    print(text)
    if args.report:
        _replace_section(Path(args.report), out)


def _replace_section(path, lines):
    """Put ``lines`` (a ``## `` section) into the Markdown file ``path``, in place of the
    section with the same title (or at the end)."""
    try:
        old = path.read_text().split("\n")
    except OSError:
        old = []
    out, skipping, placed = [], False, False
    for line in old:
        if line.startswith("## "):
            skipping = line == lines[0]
            if skipping and not placed:
                out.extend(lines)
                placed = True
        if not skipping:
            out.append(line)
    if not placed:
        if out and out[-1] != "":
            out.append("")
        out.extend(lines)
    path.write_text("\n".join(out))


if __name__ == "__main__":
    main()
