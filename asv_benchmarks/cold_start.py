"""The first step of every optimizer, lazy and exact, in fresh interpreters (issue 20, item 13).

Each measurement is a fresh interpreter with an empty ``NUMBA_CACHE_DIR`` (a cold cache:
Numba compiles every kernel the step needs and writes it to the cache): ``import
sparseopt`` is timed, then the first sparse step (100,000 x 64 float32 table, 4,096
lookups, optimizer built beforehand). ``--profile`` also prints, per fresh interpreter,
the compile time of each function Numba compiled (its ``numba:compile`` events).

    python asv_benchmarks/cold_start.py [--repeats 3] [--optimizers adam,ftrl] [--profile]

Prints a Markdown table: median (min-max) wall seconds of the first step, lazy and exact,
and the median CPU seconds of the interpreter during it (Numba compiles on one thread, so
on a loaded machine the CPU time is close to what the wall time would be on a quiet one).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

#: name: constructor call (``sparse_mode`` is added).
OPTIMIZERS = {
    "SGD": "so.SGD(0.01)",
    "SGD momentum": "so.SGD(0.01, momentum=0.9)",
    "Adam": "so.Adam(1e-3)",
    "AdamW": "so.AdamW(1e-3)",
    "Adagrad": "so.Adagrad(1e-3)",
    "RMSprop": "so.RMSprop(1e-3)",
    "Adadelta": "so.Adadelta(1e-3)",
    "Adamax": "so.Adamax(1e-3)",
    "Nadam": "so.Nadam(1e-3)",
    "Ftrl": "so.Ftrl(1e-3)",
    "Lion": "so.Lion(1e-4)",
    "RowwiseAdagrad": "so.RowwiseAdagrad(1e-3)",
}

CHILD = """
import json, os, sys, time
t0 = time.perf_counter()
import numpy as np
import sparseopt as so
t_import = time.perf_counter() - t0
events = []
if {profile!r}:
    from numba.core import event

    class Listener(event.Listener):
        def on_start(self, e):
            self.start = getattr(self, "start", {{}})
            self.start[id(e.data["dispatcher"])] = time.perf_counter()

        def on_end(self, e):
            d = e.data["dispatcher"]
            events.append((d.py_func.__qualname__, time.perf_counter() - self.start.pop(id(d))))

    event.register("numba:compile", Listener())
rng = np.random.default_rng(0)
table = rng.normal(size=(100_000, 64)).astype(np.float32)
opt = {ctor}
opt.build([table])
g = so.IndexedSlices(rng.normal(size=(4096, 64)).astype(np.float32), rng.integers(0, 100_000, 4096),
                     table.shape)
t0, c0 = time.perf_counter(), time.process_time()
opt.apply_gradients([(g, table)])
t_step, c_step = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps(dict(import_s=t_import, step_s=t_step, cpu_s=c_step, events=events)))
"""


def run_child(ctor, profile):
    cache = tempfile.mkdtemp(prefix="sparseopt-cold-")
    try:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        env.pop("SPARSEOPT_NUMBA_CACHE", None)
        proc = subprocess.run([sys.executable, "-c", CHILD.format(ctor=ctor, profile=profile)],
                              capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-1000:])
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--modes", default="lazy,exact")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    names = [n for n in args.optimizers.split(",") if n]
    modes = args.modes.split(",")
    results = {}
    print(f"1-minute load at the start: {os.getloadavg()[0]:.2f}", flush=True)
    for _ in range(args.repeats):
        for name in names:
            for mode in modes:
                ctor = OPTIMIZERS[name][:-1] + f", sparse_mode={mode!r})"
                r = run_child(ctor, args.profile)
                results.setdefault((name, mode), []).append(r)
                print(f"  {name} {mode}: import {r['import_s']:.2f} s, first step {r['step_s']:.2f} s "
                      f"(CPU {r['cpu_s']:.2f} s), load {os.getloadavg()[0]:.1f}", flush=True)
                if args.profile:
                    for qualname, seconds in sorted(r["events"], key=lambda e: -e[1])[:8]:
                        print(f"      {seconds:6.2f} s  {qualname}")
    print(f"1-minute load at the end: {os.getloadavg()[0]:.2f}")
    print()
    print("| optimizer | " + " | ".join(f"{m}: wall s, median (min-max) | {m}: CPU s, median"
                                       for m in modes) + " |")
    print("|---|" + "---|---|" * len(modes))
    for name in names:
        cells = []
        for mode in modes:
            steps = [r["step_s"] for r in results[(name, mode)]]
            cpu = [r["cpu_s"] for r in results[(name, mode)]]
            cells.append(f"{statistics.median(steps):.2f} ({min(steps):.2f}-{max(steps):.2f}) "
                         f"| {statistics.median(cpu):.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    imports = [r["import_s"] for rs in results.values() for r in rs]
    print(f"\nimport sparseopt (with numpy): median {statistics.median(imports):.2f} s "
          f"({min(imports):.2f}-{max(imports):.2f}), {len(imports)} interpreters")


if __name__ == "__main__":
    main()
