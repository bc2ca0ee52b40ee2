"""sparseopt's CUDA kernels beside torch's CUDA optimizers, on one NVIDIA GPU.

Workloads (PERF.md, "GPU"):

* sparse steps on a 10,000,000 x 128 float32 table with 262,144 Zipf lookups
  (s = 1.05, hot rows scattered over the table, four batches cycled): Adam,
  Adagrad, SGD with momentum, RowwiseAdagrad (the row-reduction kernels), and Adam
  in ``sparse_mode="exact"`` (catch-up fused into the row update; the table's
  ``flush()`` is not in the timed steps);
* a dense 8192 x 8192 float32 Adam step.

Peers, in the same process and on the same data: ``torch.optim.SparseAdam``,
``torch.optim.Adagrad`` and ``torch.optim.SGD(momentum=0.9)`` with sparse COO
gradients (coalesced inside the timed step, as sparseopt de-duplicates inside
its step), and ``torch.optim.Adam(fused=True)`` for the dense step. The floor of
each workload is its bytes (PERF.md) over the bandwidth of a measured
device-to-device copy. Each step is timed with CUDA events after warm-up (the
events enclose the whole step, host work and launches included); the table gives
the median, min and max over the timed steps and writes
``asv_benchmarks/reports/gpu.md`` with the device's name.

Run on a machine with a GPU, numba-cuda and (for the peers) a CUDA build of torch::

    python asv_benchmarks/gpu/bench_gpu.py            # full sizes, writes reports/gpu.md
    python asv_benchmarks/gpu/bench_gpu.py --quick    # small sizes, report to stdout
    NUMBA_ENABLE_CUDASIM=1 python asv_benchmarks/gpu/bench_gpu.py --smoke  # plumbing only

Without a GPU it exits with a message (status 2); importing it does nothing.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
REPORT = REPO_ROOT / "asv_benchmarks" / "reports" / "gpu.md"

FULL = dict(rows=10_000_000, width=128, lookups=262_144, batches=4, dense=8192, warmup=3, steps=20)
QUICK = dict(rows=200_000, width=128, lookups=16_384, batches=4, dense=2048, warmup=2, steps=10)
SMOKE = dict(rows=500, width=8, lookups=64, batches=2, dense=16, warmup=1, steps=2)

SEMANTICS = {
    "sparseopt": "lazy: touched rows only, duplicates summed in position order, global step",
    "torch SparseAdam": "lazy: touched rows only, coalesced gradient, global step count",
    "torch Adagrad (sparse)": "touched rows only (coalesced gradient)",
    "torch SGD momentum (sparse)": "torch's momentum form (b = mu b + g; p -= lr b); whole-table buffer",
    "torch Adam fused": "dense Adam, one fused kernel",
}
#: Semantics of sparseopt's rows where they are not the lazy default.
WORKLOAD_SEMANTICS = {
    "sparse rowwise_adagrad": "lazy, one accumulator per row (FBGEMM EXACT_ROWWISE_ADAGRAD)",
    "sparse adam_exact": "exact: dense Adam's results, idle rows caught up when touched",
}


class NoGPU(RuntimeError):
    pass


# ------------------------------------------------------------------ environment


def _require_gpu(smoke=False):
    """``numba.cuda`` on a real GPU, or :class:`NoGPU` with the reason."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0") and not smoke:
        raise NoGPU("NUMBA_ENABLE_CUDASIM is set: the simulator's timings mean nothing")
    try:
        from numba import cuda
    except ImportError as exc:
        raise NoGPU(f"numba's CUDA target is missing ({exc}); pip install 'sparseopt[cuda]'") from None
    if not cuda.is_available():
        reason = ""
        try:
            reason = str(cuda.cuda_error() or "")
        except Exception:
            pass
        raise NoGPU(f"no CUDA GPU or driver found {reason}".strip())
    return cuda


def _torch_cuda():
    """torch, if a CUDA build with a device is installed; else None (the peers are skipped)."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _common():
    sys.path.insert(0, str(REPO_ROOT / "asv_benchmarks" / "benchmarks"))
    sys.path.insert(0, str(REPO_ROOT))
    import common
    return common


# ----------------------------------------------------------------------- timing


class _Timer:
    """CUDA-event timing of one callable; the events bracket the whole step on the stream."""

    def __init__(self, cuda, torch):
        self.cuda = cuda
        self.torch = torch

    def run(self, step, warmup, steps):
        for i in range(warmup):
            step(i)
        self.sync()
        times = []
        for i in range(steps):
            if self.torch is not None:
                start = self.torch.cuda.Event(enable_timing=True)
                end = self.torch.cuda.Event(enable_timing=True)
                start.record()
                step(warmup + i)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start, end = self.cuda.event(), self.cuda.event()
                start.record()
                step(warmup + i)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        return times

    def sync(self):
        self.cuda.synchronize()
        try:  # free what the finished benchmark held now, not at Numba's next threshold
            self.cuda.current_context().deallocations.clear()
        except Exception:
            pass
        if self.torch is not None:
            self.torch.cuda.synchronize()


def measure_copy_bandwidth(cuda, nbytes=2 << 30, repeats=10):
    """Bytes per second of a device-to-device copy (read + write counted)."""
    n = nbytes // 4
    src = cuda.device_array(n, np.float32)
    dst = cuda.device_array(n, np.float32)
    dst.copy_to_device(src)
    cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = cuda.event(), cuda.event()
        start.record()
        dst.copy_to_device(src)
        end.record()
        end.synchronize()
        best = min(best, max(start.elapsed_time(end), 1e-6) / 1e3)
    del src, dst
    return 2 * nbytes / best


def sparse_bytes(lookups, unique, width, nslots, itemsize=4):
    """PERF.md's floor: gradient rows read once, touched rows of parameter and slots read and written."""
    return lookups * width * itemsize + unique * width * itemsize * 2 * (1 + nslots) + 8 * lookups * 4


def dense_bytes(size, nslots, itemsize=4):
    return size * itemsize * (1 + 2 * (1 + nslots))


# -------------------------------------------------------------------- workloads


SPARSE = {  # name: (sparseopt factory, element slots, torch optimizer factory or None)
    "adam": (lambda so: so.Adam(learning_rate=1e-3), 2,
             lambda torch, p: ("torch SparseAdam", torch.optim.SparseAdam([p], lr=1e-3))),
    "adagrad": (lambda so: so.Adagrad(learning_rate=1e-3), 1,
                lambda torch, p: ("torch Adagrad (sparse)", torch.optim.Adagrad([p], lr=1e-3))),
    "sgd_momentum": (lambda so: so.SGD(learning_rate=0.01, momentum=0.9), 1,
                     lambda torch, p: ("torch SGD momentum (sparse)",
                                       torch.optim.SGD([p], lr=0.01, momentum=0.9))),
    "rowwise_adagrad": (lambda so: so.RowwiseAdagrad(learning_rate=1e-3), 0, None),
    "adam_exact": (lambda so: so.Adam(learning_rate=1e-3, sparse_mode="exact"), 2, None),
}


def bench_sparse(cuda, torch, timer, size, rows_out):
    common = _common()  # puts the repository on sys.path first
    import sparseopt as so
    host = common.sparse_batches(size["rows"], size["width"], size["lookups"], size["batches"])
    uniques = [common.unique_count(idx) for _, idx in host]
    table0 = common.make_table(size["rows"], size["width"])
    batches = [(cuda.to_device(v), cuda.to_device(i)) for v, i in host]
    for name, (make, nslots, make_peer) in SPARSE.items():
        floor_bytes = sparse_bytes(size["lookups"], statistics.mean(uniques), size["width"], nslots)
        table = cuda.to_device(table0)
        opt = make(so)
        opt.build([table])

        def step(i, opt=opt, table=table):
            values, indices = batches[i % len(batches)]
            opt.apply_gradients([(so.IndexedSlices(values, indices, table.shape), table)])

        times = timer.run(step, size["warmup"], size["steps"])
        rows_out.append((f"sparse {name}", "sparseopt", times, floor_bytes))
        del opt, table
        timer.sync()
        if torch is None or make_peer is None:
            continue
        p = torch.nn.Parameter(torch.as_tensor(table0, device="cuda"))
        label, peer = make_peer(torch, p)
        tgrads = [torch.sparse_coo_tensor(torch.as_tensor(i, device="cuda").unsqueeze(0),
                                          torch.as_tensor(v, device="cuda"), p.shape)
                  for v, i in host]

        def peer_step(i, p=p, peer=peer, tgrads=tgrads):
            p.grad = tgrads[i % len(tgrads)]
            peer.step()

        try:
            times = timer.run(peer_step, size["warmup"], size["steps"])
            rows_out.append((f"sparse {name}", label, times, floor_bytes))
        except (RuntimeError, ValueError, NotImplementedError) as exc:  # refuses sparse gradients
            rows_out.append((f"sparse {name}", f"{label}: {str(exc).splitlines()[0][:80]}", None,
                             floor_bytes))
        del p, peer, tgrads
        torch.cuda.empty_cache()


def bench_dense(cuda, torch, timer, size, rows_out):
    common = _common()  # puts the repository on sys.path first
    import sparseopt as so
    shape = (size["dense"], size["dense"])
    host = common.dense_batches(shape, 2)
    p0 = common.make_table(*shape)
    floor_bytes = dense_bytes(p0.size, 2)
    var = cuda.to_device(p0)
    grads = [cuda.to_device(g) for g in host]
    opt = so.Adam(learning_rate=1e-3)
    opt.build([var])

    def step(i, opt=opt, grads=grads, var=var):
        opt.apply_gradients([(grads[i % 2], var)])

    rows_out.append(("dense adam", "sparseopt", timer.run(step, size["warmup"], size["steps"]), floor_bytes))
    del var, grads, opt
    timer.sync()
    if torch is None:
        return
    p = torch.nn.Parameter(torch.as_tensor(p0, device="cuda"))
    tgrads = [torch.as_tensor(g, device="cuda") for g in host]
    peer = torch.optim.Adam([p], lr=1e-3, fused=True)

    def peer_step(i, p=p, tgrads=tgrads, peer=peer):
        p.grad = tgrads[i % 2]
        peer.step()

    rows_out.append(("dense adam", "torch Adam fused", timer.run(peer_step, size["warmup"], size["steps"]),
                     floor_bytes))
    del p, tgrads, peer
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------- report


def device_name(cuda, torch):
    if torch is not None:
        return torch.cuda.get_device_name()
    try:
        name = cuda.get_current_device().name
    except AttributeError:  # the simulator
        return "CUDA simulator (timings meaningless)"
    return name.decode() if isinstance(name, bytes) else str(name)


def render(rows, bandwidth, name, size):
    ours = {w: statistics.median(t) for w, impl, t, _ in rows if impl == "sparseopt" and t}
    lines = [
        "# sparseopt on the GPU",
        "",
        f"Device: **{name}**. Measured device-to-device copy bandwidth: {bandwidth / 1e9:.0f} GB/s "
        "(read + write). Generated by `python asv_benchmarks/gpu/bench_gpu.py` on "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"Sparse: {size['rows']:,} x {size['width']} float32 table, {size['lookups']:,} Zipf lookups "
        f"(s = 1.05), {size['batches']} batches cycled. Dense: {size['dense']} x {size['dense']} float32. "
        f"CUDA-event times over {size['steps']} steps after {size['warmup']} warm-up steps, in ms.",
        "",
        "| workload | implementation | median | min | max | floor | x floor | vs sparseopt | semantics |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for workload, impl, times, floor_bytes in rows:
        floor_ms = floor_bytes / bandwidth * 1e3
        base = impl.split(":")[0]
        semantics = SEMANTICS.get(base, "")
        if workload.startswith("dense") and base == "sparseopt":
            semantics = "dense Adam, one elementwise kernel"
        elif base == "sparseopt":
            semantics = WORKLOAD_SEMANTICS.get(workload, semantics)
        if not times:
            lines.append(f"| {workload} | {impl} | - | - | - | {floor_ms:.3f} | - | - | {semantics} |")
            continue
        med = statistics.median(times)
        ratio = med / ours[workload] if ours.get(workload) else float("nan")
        lines.append(f"| {workload} | {impl} | {med:.3f} | {min(times):.3f} | {max(times):.3f} | "
                     f"{floor_ms:.3f} | {med / floor_ms:.1f} | {ratio:.2f} | {semantics} |")
    lines += ["", "Floor: PERF.md's bytes (gradient rows read, touched rows of the parameter and "
              "its slots read and written, 32 bytes of index traffic per lookup; dense: every "
              "element read and written) over the measured copy bandwidth.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; print the report only")
    parser.add_argument("--out", type=Path, default=None, help=f"report path (default {REPORT})")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, also on the CUDA simulator: checks the script, times nothing")
    args = parser.parse_args(argv)
    try:
        cuda = _require_gpu(args.smoke)
    except NoGPU as exc:
        print(f"bench_gpu.py needs an NVIDIA GPU: {exc}", file=sys.stderr)
        return 2
    torch = _torch_cuda()
    if torch is None:
        print("torch with CUDA is not available: the peers are skipped", file=sys.stderr)
    size = SMOKE if args.smoke else QUICK if args.quick else FULL
    timer = _Timer(cuda, torch)
    bandwidth = measure_copy_bandwidth(cuda, nbytes=(1 << 20) if args.smoke else (256 << 20)
                                       if args.quick else (2 << 30))
    rows = []
    bench_sparse(cuda, torch, timer, size, rows)
    bench_dense(cuda, torch, timer, size, rows)
    report = render(rows, bandwidth, device_name(cuda, torch), size)
    print(report)
    out = args.out if args.out is not None else (None if args.quick or args.smoke else REPORT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
