"""16-bit tables against float32 tables, side by side: W1 lazy Adam (issue 18).

Run from the repository root::

    python asv_benchmarks/lowp_bench.py [--steps 60] [--report asv_benchmarks/reports/cpu.md]
    python asv_benchmarks/lowp_bench.py --rows 2000 --lookups 64 --steps 3     # a smoke run

In one process, on W1 (1,000,000 x 64, 16,384 Zipf(1.05) lookups per step, float32
gradients, several batches cycled), it times the lazy sparse Adam step of a float32
table and of the same table in bfloat16 (float32 slots, stochastic rounding and
round-to-nearest; bfloat16 slots, both roundings) and float16 (float32 slots,
stochastic rounding). The implementations take turns step
by step in a fresh random order, and an untimed 128 MB write before every timed step
evicts the caches, so every step is a cold-cache step as in training. It prints a
Markdown section (medians, min/max, ratio to the float32 step, and the bytes a step must
move by the floor of PERF.md) and, with ``--report``, puts it into that file in place
of an earlier one (``peers.py`` keeps the section when it rewrites cpu.md).
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
import ml_dtypes  # noqa: E402

ROWS, WIDTH, LOOKUPS = 1_000_000, 64, 16_384
TITLE = "## Low-precision tables: W1 lazy Adam, bfloat16 and float16 against float32"

#: label -> (table dtype, optimizer options)
IMPLS = {
    "float32 table": (np.float32, {}),
    "bfloat16 table, stochastic rounding": (ml_dtypes.bfloat16, {}),
    "bfloat16 table, round-to-nearest": (ml_dtypes.bfloat16, {"stochastic_rounding": False}),
    "float16 table, stochastic rounding": (np.float16, {}),
    "bfloat16 table + bfloat16 slots, stochastic rounding": (ml_dtypes.bfloat16, {"slot_dtype": "bfloat16"}),
    "bfloat16 table + bfloat16 slots, round-to-nearest": (ml_dtypes.bfloat16, {"slot_dtype": "bfloat16",
                                                                               "stochastic_rounding": False}),
}


def step_bytes(batches, width, itemsize, slot_itemsize, nslots):
    """PERF.md's byte floor of one step, averaged over the batches (index traffic left out)."""
    total = 0
    for values, idx in batches:
        k = np.unique(idx).size
        total += values.size * values.itemsize + k * width * 2 * (itemsize + nslots * slot_itemsize)
    return total / len(batches)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--report", default=None)
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--lookups", type=int, default=LOOKUPS)
    args = parser.parse_args(argv)
    rows = args.rows

    batches = common.sparse_batches(rows, WIDTH, args.lookups, 8, seed=0)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((rows, WIDTH), dtype=np.float32)
    runs = {}
    for label, (dtype, options) in IMPLS.items():
        table = base.astype(dtype)
        opt = so.Adam(learning_rate=1e-3, seed=1, **options)
        runs[label] = (table, opt)
    buf = np.zeros(32 * 1024 * 1024, np.float32)
    state = {label: 0 for label in runs}

    def step(label):
        table, opt = runs[label]
        values, idx = batches[state[label] % len(batches)]
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
            t0 = time.perf_counter()
            step(label)
            times[label].append(time.perf_counter() - t0)
    elapsed = time.time() - t_start

    ref = statistics.median(times["float32 table"])
    bytes32 = step_bytes(batches, WIDTH, 4, 4, 2)
    workload = "W1" if (rows, args.lookups) == (ROWS, LOOKUPS) else f"{rows:,} x {WIDTH}, {args.lookups:,} lookups"
    lines = [TITLE, "",
             f"Issue 18. `python asv_benchmarks/lowp_bench.py --steps {args.steps}` ({workload}); "
             f"{platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, Numba threads {numba.get_num_threads()}, {args.steps} interleaved cold-cache steps "
             f"each ({elapsed:.0f} s). Float32 gradients. Targets (issue 18): bfloat16 table + float32 slots within "
             f"0.9x of the float32 step, + bfloat16 slots within 0.65x.", "",
             "| table | median ms | min ms | max ms | ratio to float32 | bytes per step (floor) | bytes ratio |",
             "|---|---|---|---|---|---|---|"]
    for label, (dtype, _) in IMPLS.items():
        t = times[label]
        med = statistics.median(t)
        slot_size = 2 if "slot_dtype" in IMPLS[label][1] else 4
        nbytes = step_bytes(batches, WIDTH, np.dtype(dtype).itemsize, slot_size, 2)
        lines.append(f"| {label} | {med * 1e3:.2f} | {min(t) * 1e3:.2f} | {max(t) * 1e3:.2f} | "
                     f"{med / ref:.2f}x | {nbytes / 1e6:.2f} MB | {nbytes / bytes32:.2f}x |")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.report:
        _replace_section(Path(args.report), lines)


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
