"""Every example runs in its fast mode, so none can rot; the shared MovieLens loader reads every format."""

import importlib.util
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


movielens = load("_movielens")


# ------------------------------------------------------------- MovieLens files


def fake_ratings(num_users=300, num_items=400, per_user=60, groups=6, seed=0):
    """Learnable MovieLens-like ratings: users rate items of their own taste group 4-5 stars, others 1-3.

    Ids are sparse and unordered (as in the real files), timestamps plausible.
    """
    rng = np.random.default_rng(seed)
    user_ids = 1 + 3 * np.arange(num_users)
    item_ids = np.sort(rng.choice(200_000, num_items, replace=False)) + 1
    user_group, item_group = rng.integers(0, groups, num_users), rng.integers(0, groups, num_items)
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    popularity = rng.permutation(popularity / popularity.sum())
    rows = []
    for u in range(num_users):
        items = rng.choice(num_items, per_user, replace=False, p=popularity)
        liked = (item_group[items] == user_group[u]) | (rng.random(per_user) < 0.1)
        stars = np.where(liked, rng.choice([4.0, 4.5, 5.0], per_user), rng.choice([1.0, 2.0, 2.5, 3.0], per_user))
        for i, r in zip(items, stars):
            rows.append((int(user_ids[u]), int(item_ids[i]), float(r), 964_982_703 + int(rng.integers(0, 10**7))))
    order = rng.permutation(len(rows))
    return [rows[k] for k in order]


def write_ratings(path, rows, fmt):
    """``rows`` as ml-latest-small's ratings.csv, ml-1m's ratings.dat or ml-100k's u.data."""
    if fmt == "csv":
        lines = ["userId,movieId,rating,timestamp"] + [f"{u},{i},{r:g},{t}" for u, i, r, t in rows]
    elif fmt == "dat":
        lines = [f"{u}::{i}::{int(r)}::{t}" for u, i, r, t in rows]
    else:
        lines = [f"{u}\t{i}\t{int(r)}\t{t}" for u, i, r, t in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def ratings_csv(tmp_path_factory):
    return write_ratings(tmp_path_factory.mktemp("ml") / "ratings.csv", fake_ratings(), "csv")


SMALL = [(10, 500, 4.0, 1000), (3, 7, 5.0, 1001), (10, 7, 2.5, 1002), (42, 500, 3.5, 1003), (3, 12, 4.5, 1004)]


@pytest.mark.parametrize("fmt, name", [("csv", "ratings.csv"), ("dat", "ratings.dat"), ("udata", "u.data")])
def test_loader_reads_each_format_and_remaps_ids(tmp_path, fmt, name):
    rows = SMALL if fmt == "csv" else [(u, i, float(int(r)), t) for u, i, r, t in SMALL]
    r = movielens.load_ratings(write_ratings(tmp_path / name, rows, fmt))
    assert len(r) == 5 and r.num_users == 3 and r.num_items == 3
    np.testing.assert_array_equal(r.user_ids, [3, 10, 42])          # dense index -> file id, ascending
    np.testing.assert_array_equal(r.item_ids, [7, 12, 500])
    np.testing.assert_array_equal(r.users, [1, 0, 1, 2, 0])
    np.testing.assert_array_equal(r.items, [2, 0, 0, 2, 1])
    np.testing.assert_array_equal(r.user_ids[r.users], [u for u, _, _, _ in rows])
    np.testing.assert_array_equal(r.ratings, [x for _, _, x, _ in rows])
    np.testing.assert_array_equal(r.timestamps, [t for _, _, _, t in rows])
    assert r.users.dtype == r.items.dtype == np.int32 and r.ratings.dtype == np.float32


def test_loader_reads_the_downloaded_zip_and_directory(tmp_path):
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    write_ratings(folder / "ratings.csv", SMALL, "csv")
    (folder / "movies.csv").write_text("movieId,title,genres\n7,Seven (1995),Thriller\n")
    archive = tmp_path / "ml-latest-small.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(folder / "movies.csv", "ml-latest-small/movies.csv")
        z.write(folder / "ratings.csv", "ml-latest-small/ratings.csv")
    for path in (archive, tmp_path):
        r = movielens.load_ratings(path)
        assert len(r) == 5 and list(r.item_ids) == [7, 12, 500]


def test_clicks_split_and_triples(ratings_csv):
    r = movielens.load_ratings(ratings_csv)
    users, items = movielens.clicks(r, min_rating=4.0)
    assert users.size == int(np.sum(r.ratings >= 4.0)) and 0 < users.size < len(r)
    (tu, ti), (hu, hi) = movielens.split(users, items, held_out_fraction=0.1, seed=3)
    assert hu.size == round(0.1 * users.size) and tu.size + hu.size == users.size
    pairs = sorted(zip(tu.tolist() + hu.tolist(), ti.tolist() + hi.tolist()))
    assert pairs == sorted(zip(users.tolist(), items.tolist()))     # a partition
    (tu2, _), _ = movielens.split(users, items, held_out_fraction=0.1, seed=3)
    np.testing.assert_array_equal(tu, tu2)                          # seeded
    u, p, n = movielens.held_out_triples(hu, hi, r.num_items, seed=0)
    assert n.shape == p.shape and n.min() >= 0 and n.max() < r.num_items
    batch = movielens.ClickSampler(tu, ti, r.num_users, r.num_items).batch(np.random.default_rng(0), 64)
    assert [a.shape for a in batch] == [(64,)] * 3


@pytest.mark.parametrize("content, message", [
    ("user,item,rating,time\n1,2,3,4\n", "expected a header"),
    ("userId,movieId,rating,timestamp\n1,2,3.5,4\n1,x,3,4\n", "not a MovieLens ratings file"),
    ("1::2::3\n", "not a MovieLens ratings file"),
    ("userId,movieId,rating,timestamp\n", "no ratings"),
])
def test_loader_names_the_bad_file(tmp_path, content, message):
    path = tmp_path / "ratings.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        movielens.load_ratings(path)
    assert str(path) in str(info.value)


def test_loader_missing_ratings_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        movielens.load_ratings(tmp_path)


# ---------------------------------------------------------------- the examples


def test_custom_optimizer_checks_its_formula_and_trains(capsys):
    load("custom_optimizer").main(["--steps", "30"])
    out = capsys.readouterr().out
    assert "vs its float64 formula" in out and "sparse_mode='exact'" in out


def test_matrix_factorization_numpy_trains(capsys):
    result = load("matrix_factorization_numpy").main(["--quick"])
    assert result["last_loss"] < result["first_loss"] - 0.003
    assert result["auc"] > 0.55  # random ranking scores 0.5
    assert "held-out AUC" in capsys.readouterr().out


def test_matrix_factorization_numpy_trains_bfloat16_tables(capsys):
    pytest.importorskip("ml_dtypes")
    result = load("matrix_factorization_numpy").main(["--quick", "--table-dtype", "bfloat16"])
    assert result["last_loss"] < result["first_loss"] - 0.003
    assert result["auc"] > 0.55
    assert "(bfloat16 tables, stochastic rounding, float32 slots)" in capsys.readouterr().out


def test_matrix_factorization_numpy_memory_per_row(capsys):
    """Measured on the optimizers' slot arrays; expected from the dtypes' sizes."""
    pytest.importorskip("ml_dtypes")
    memory = load("matrix_factorization_numpy").main(["--memory", "--dim", "64"])
    assert memory["Adam"] == (64 * 4 * 3, 64 * 2 + 2 * 64 * 4, 64 * 2 * 3)
    assert memory["SGD"] == (64 * 4, 64 * 2, 64 * 2)
    assert memory["RowwiseAdagrad"] == (64 * 4 + 4, 64 * 2 + 4, 64 * 2 + 4)  # its row state stays float32
    assert len(memory) == 14 and "| Adam(amsgrad=True) | m, v, vhat | 1024 B |" in capsys.readouterr().out


def test_matrix_factorization_numpy_on_movielens(ratings_csv, capsys):
    result = load("matrix_factorization_numpy").main(["--quick", "--ratings", str(ratings_csv)])
    assert result["last_loss"] < result["first_loss"]
    assert result["auc"] > 0.6
    assert "training clicks (rating >= 4)" in capsys.readouterr().out


def test_recommender_keras_trains_compares_and_plots(tmp_path, capsys):
    pytest.importorskip("tensorflow")
    plot = tmp_path / "plot.png"
    result = load("recommender_keras").main(["--quick", "--plot", str(plot)])
    assert result["last_loss"] < result["first_loss"] - 0.01
    assert result["held_out_loss"] < result["held_out_loss_before"]
    assert abs(result["auc_before"] - 0.5) < 0.05 and result["auc"] > 0.6
    assert result["step_seconds"] > 0 and result["keras_step_seconds"] > 0
    compared = result["compared"]
    assert list(compared) == ["keras.optimizers.Adam", "sparseopt_tf.Adam exact", "sparseopt_tf.Adam lazy"]
    keras_, exact, lazy = (compared[k]["train_loss"] for k in compared)
    assert abs(exact - keras_) < 0.01 and abs(lazy - keras_) < 0.01    # 8 steps: all close to the start
    out = capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is None:      # the bench extra brings it
        assert "no plot: matplotlib is not installed" in out and not plot.exists()
    else:
        assert result["plot"] == str(plot)
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    assert "val_auc" in out                                       # Keras' progress lines
    assert 'sparseopt_tf.Adam(sparse_mode="exact")' in out
    assert "x lazy)" in out and "Exact mode is dense training" in out
    assert "Pick lazy mode" in out and "TF-Addons' LazyAdam" in out


def test_recommender_keras_bfloat16_tables(capsys):
    pytest.importorskip("tensorflow")
    result = load("recommender_keras").main(
        ["--quick", "--table-dtype", "bfloat16", "--epochs", "1", "--compare-steps", "2", "--plot", ""])
    assert result["table_dtype"] == "bfloat16"
    assert result["held_out_loss"] < result["held_out_loss_before"] and result["auc"] > 0.6
    compared = result["compared"]
    assert list(compared) == ["sparseopt_tf.Adam, float32", "sparseopt_tf.Adam, bf16 stochastic",
                              "sparseopt_tf.Adam, bf16 nearest", "keras.optimizers.Adam, bf16"]
    base = compared["sparseopt_tf.Adam, float32"]["train_loss"]
    for label in list(compared)[1:3]:       # 2 steps from the same weights: all near the start
        assert abs(compared[label]["train_loss"] - base) < 0.01
    out = capsys.readouterr().out
    assert "bfloat16 item table" in out and "AUC - float32" in out


def test_recommender_keras_on_movielens(ratings_csv, tmp_path):
    pytest.importorskip("tensorflow")
    result = load("recommender_keras").main(
        ["--quick", "--ratings", str(ratings_csv), "--epochs", "15", "--compare-steps", "0", "--plot", ""])
    assert result["last_loss"] < result["first_loss"]
    assert result["auc"] > 0.6
    assert "plot" not in result and "step_seconds" not in result


def test_keras_custom_loop_resumes_identically(capsys):
    pytest.importorskip("tensorflow")
    result = load("keras_custom_loop").main(["--quick"])
    assert result["resumed_identical"] is True
    assert result["last_loss"] < result["first_loss"] - 0.05
    assert result["auc"] > 0.6
    assert "bit for bit: True" in capsys.readouterr().out


def test_keras_custom_loop_on_movielens(ratings_csv, tmp_path):
    pytest.importorskip("tensorflow")
    result = load("keras_custom_loop").main(
        ["--quick", "--ratings", str(ratings_csv), "--checkpoint-dir", str(tmp_path / "ckpt")])
    assert result["resumed_identical"] is True
    assert os.path.exists(result["checkpoint"] + ".index")


def _gpu_present():
    try:
        import torch
        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def test_cuda_embeddings_runs_or_skips_cleanly():
    """Without a GPU: a clear message and exit status 0; with one: it trains."""
    result = subprocess.run([sys.executable, str(EXAMPLES / "cuda_embeddings.py"), "--quick"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    if _gpu_present():
        assert "held-out AUC" in result.stdout
    else:
        assert "skipped, no GPU backend is available" in result.stdout
        assert "--cpu" in result.stdout


def test_cuda_embeddings_code_path_on_cpu_tensors():
    pytest.importorskip("torch")
    result = load("cuda_embeddings").main(["--cpu", "--quick"])
    assert result["last_loss"] < result["first_loss"] - 0.01
    assert result["auc"] > 0.6
    assert result["torch_sparse_adam_step_seconds"] > 0
