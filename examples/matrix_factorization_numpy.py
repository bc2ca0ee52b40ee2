"""A matrix-factorization recommender on plain NumPy arrays, trained with sparseopt.

The data is synthetic and seeded: 1,000,000 items whose popularity follows a Zipf
law, and users who, among a few popular candidates, click the one that best matches
their hidden taste. The model learns a user table and an item table with a BPR loss
(the clicked item should score above a random one). Each step touches a few thousand
rows of the tables: their gradients are `sparseopt.IndexedSlices`, and `sparseopt.Adam`
updates only those rows (lazy mode), in place.

With `--ratings PATH` it trains on a MovieLens ratings file instead (`ratings.csv` of
ml-latest-small and the other recent releases, `ratings.dat` of ml-1m, `u.data` of
ml-100k, or the downloaded directory or zip): a rating of 4 or more is a click, a random
10% of the clicks is held out, and negatives are uniformly random items (`_movielens.py`).

With `--table-dtype bfloat16` (or `float16`) both tables are 16-bit: the forward and
backward passes read their rows widened to float32, and `sparseopt.Adam` computes each
update in float32 and rounds it back, stochastically (`--no-stochastic-rounding`: to
nearest, where updates smaller than half a bfloat16 step are lost); its slots stay
float32 (`--slot-dtype bfloat16` halves them too). `--memory` prints the bytes per
table row (parameter and optimizer state) of every optimizer for each table dtype.

Run:  python examples/matrix_factorization_numpy.py            (about a minute)
      python examples/matrix_factorization_numpy.py --quick    (small, seconds)
      python examples/matrix_factorization_numpy.py --table-dtype bfloat16
      python examples/matrix_factorization_numpy.py --ratings ml-latest-small/ratings.csv
"""

import argparse
import os
import sys
import time

import numpy as np

import sparseopt as so

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared loader beside this file
import _movielens  # noqa: E402
from _synthetic import ZipfClicks  # noqa: E402


def table_dtype(name):
    """The NumPy dtype of ``--table-dtype``: bfloat16 is ml_dtypes' (installed with TensorFlow or JAX)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise SystemExit("--table-dtype bfloat16 needs the ml_dtypes package: pip install ml_dtypes")
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def rows32(table, ids):
    """Rows ``ids`` of a table as float32 (16-bit rows widened: exact)."""
    return table[ids].astype(np.float32, copy=False)


def bpr_loss_and_grads(user_table, item_table, users, pos, neg, l2):
    """BPR loss -mean(log sigmoid(s_pos - s_neg)) and its sparse float32 gradients."""
    pu, qi, qj = rows32(user_table, users), rows32(item_table, pos), rows32(item_table, neg)
    x = np.einsum("bd,bd->b", pu, qi - qj)
    loss = float(np.mean(np.logaddexp(0.0, -x)))
    dx = (-1.0 / (1.0 + np.exp(x)) / x.size).astype(np.float32)[:, None]  # d loss / d x
    g_user = dx * (qi - qj) + l2 * pu
    g_items = np.concatenate([dx * pu + l2 * qi, -dx * pu + l2 * qj])
    return loss, [so.IndexedSlices(g_user, users, user_table.shape),
                  so.IndexedSlices(g_items, np.concatenate([pos, neg]), item_table.shape)]


def auc(user_table, item_table, users, pos, neg):
    """Share of held-out triples where the clicked item scores above the negative (0.5 = random)."""
    pu = rows32(user_table, users)
    s_pos = np.einsum("bd,bd->b", pu, rows32(item_table, pos))
    s_neg = np.einsum("bd,bd->b", pu, rows32(item_table, neg))
    return float(np.mean(s_pos > s_neg) + 0.5 * np.mean(s_pos == s_neg))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratings", metavar="PATH", help="a MovieLens ratings file, directory or zip "
                        "(default: synthetic Zipf clicks)")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--table-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--slot-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="Adam's m and v for 16-bit tables (float32 tables keep float32 slots)")
    parser.add_argument("--no-stochastic-rounding", dest="stochastic_rounding", action="store_false",
                        help="16-bit tables: round each update to nearest (even) instead of stochastically")
    parser.add_argument("--memory", action="store_true",
                        help="print the bytes per table row of every optimizer and exit")
    parser.add_argument("--quick", action="store_true", help="a small run (for tests)")
    args = parser.parse_args(argv)
    if args.memory:
        return print_memory_per_row(args.dim)
    if args.quick:
        args.items, args.users, args.batch, args.steps = 20_000, 2_000, 2048, 150

    if args.ratings:
        ratings = _movielens.load_ratings(args.ratings)
        (train_users, train_items), (test_users, test_items) = _movielens.split(
            *_movielens.clicks(ratings, min_rating=4.0), held_out_fraction=0.1, seed=args.seed)
        args.users, args.items = ratings.num_users, ratings.num_items
        data = _movielens.ClickSampler(train_users, train_items, args.users, args.items)
        held_out = _movielens.held_out_triples(test_users, test_items, args.items, seed=args.seed + 2)
        print(f"{args.ratings}: {len(ratings):,} ratings, {train_users.size:,} training clicks "
              f"(rating >= 4), {test_users.size:,} held out")
    else:
        data = ZipfClicks(args.users, args.items, seed=args.seed)
        held_out = data.batch(np.random.default_rng(args.seed + 2), 20_000)
    rng = np.random.default_rng(args.seed + 1)
    dtype = table_dtype(args.table_dtype)
    # the same float32 draws for every --table-dtype, rounded to nearest (a 16-bit table)
    user_table = (0.1 * rng.normal(size=(args.users, args.dim))).astype(np.float32).astype(dtype)
    item_table = (0.1 * rng.normal(size=(args.items, args.dim))).astype(np.float32).astype(dtype)
    low = args.table_dtype != "float32"
    opt = so.Adam(learning_rate=args.learning_rate,
                  **(dict(stochastic_rounding=args.stochastic_rounding, seed=args.seed,
                          slot_dtype=args.slot_dtype) if low else {}))
    rounding = (f", {'stochastic rounding' if args.stochastic_rounding else 'round-to-nearest'}, "
                f"{args.slot_dtype} slots") if low else ""
    print(f"sparseopt {so.__version__}: {args.items:,} x {args.dim} item table, {args.users:,} users, "
          f"batch {args.batch:,}, {args.steps} steps of lazy sparse Adam ({args.table_dtype} tables{rounding})")
    print(f"held-out AUC before training: {auc(user_table, item_table, *held_out):.3f} (random = 0.5)")

    first_losses, last_losses, step_times = [], [], []
    report_every = max(args.steps // 6, 1)
    for step in range(1, args.steps + 1):
        users, pos, neg = data.batch(rng, args.batch)
        loss, grads = bpr_loss_and_grads(user_table, item_table, users, pos, neg, l2=1e-2 / args.batch)
        t0 = time.perf_counter()
        opt.apply_gradients(zip(grads, [user_table, item_table]))
        step_times.append(time.perf_counter() - t0)
        (first_losses if step <= report_every else last_losses).append(loss)
        if step % report_every == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss:.4f}  held-out AUC {auc(user_table, item_table, *held_out):.3f}  "
                  f"optimizer step {1e3 * np.median(step_times[-report_every:]):.2f} ms")

    final_auc = auc(user_table, item_table, *held_out)
    first, last = float(np.mean(first_losses)), float(np.mean(last_losses[-report_every:]))
    print(f"\nloss {first:.4f} -> {last:.4f}; held-out AUC {final_auc:.3f} (random 0.5); "
          f"median optimizer step {1e3 * np.median(step_times[1:]):.2f} ms "
          f"(first step, with Numba compile or cache load: {step_times[0]:.2f} s)")
    return {"first_loss": first, "last_loss": last, "auc": final_auc}


#: Every optimizer of the core, with the options that change its state (momentum, AMSGrad, ...).
OPTIMIZERS = {
    "SGD": lambda **kw: so.SGD(0.1, **kw),
    "SGD(momentum=0.9)": lambda **kw: so.SGD(0.1, momentum=0.9, **kw),
    "Adam": lambda **kw: so.Adam(1e-3, **kw),
    "Adam(amsgrad=True)": lambda **kw: so.Adam(1e-3, amsgrad=True, **kw),
    "AdamW": lambda **kw: so.AdamW(1e-3, **kw),
    "Adagrad": lambda **kw: so.Adagrad(0.1, **kw),
    "RMSprop": lambda **kw: so.RMSprop(1e-3, **kw),
    "RMSprop(momentum=0.9, centered=True)": lambda **kw: so.RMSprop(1e-3, momentum=0.9, centered=True, **kw),
    "Adadelta": lambda **kw: so.Adadelta(1.0, **kw),
    "Adamax": lambda **kw: so.Adamax(1e-3, **kw),
    "Nadam": lambda **kw: so.Nadam(1e-3, **kw),
    "Ftrl": lambda **kw: so.Ftrl(0.1, **kw),
    "Lion": lambda **kw: so.Lion(1e-4, **kw),
    "RowwiseAdagrad": lambda **kw: so.RowwiseAdagrad(0.1, **kw),
}


def bytes_per_row(make, dim, dtype, slot_dtype=None, rows=4):
    """Parameter and optimizer-state bytes per row of a ``(rows, dim)`` table of ``dtype``:
    measured on the slot arrays the optimizer allocates for it (``build``)."""
    table = np.zeros((rows, dim), dtype)
    opt = make(**({"slot_dtype": slot_dtype} if slot_dtype else {}))
    opt.build([table])
    state = sum(opt.get_slot(table, name).nbytes for name in opt.get_slot_names())
    return (table.nbytes + state) / rows, opt.get_slot_names()


def print_memory_per_row(dim):
    """A Markdown table: bytes per table row for every optimizer, float32 and 16-bit tables."""
    bf16 = table_dtype("bfloat16")
    print("| optimizer | slots | float32 table | bfloat16 or float16 table | bfloat16 table + bfloat16 slots |")
    print("|---|---|---|---|---|")
    out = {}
    for name, make in OPTIMIZERS.items():
        f32, slots = bytes_per_row(make, dim, np.float32)
        b16 = bytes_per_row(make, dim, bf16)[0]
        b16s = bytes_per_row(make, dim, bf16, "bfloat16")[0]
        out[name] = (f32, b16, b16s)
        print(f"| {name} | {', '.join(slots) or '-'} | {f32:.0f} B | {b16:.0f} B ({b16 / f32:.2f}x) | "
              f"{b16s:.0f} B ({b16s / f32:.2f}x) |")
    return out


if __name__ == "__main__":
    main()
