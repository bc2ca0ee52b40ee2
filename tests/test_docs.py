"""The API reference builds from the docstrings, without warnings, with a page per optimizer."""

import pathlib
import subprocess
import sys

import pytest

import sparseopt
from sparseopt import optimizers

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "docs" / "mkdocs.yml"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                             "-f", str(CONFIG), "-d", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mkdocs build failed:\n{result.stdout}\n{result.stderr}"
    return out


@pytest.mark.parametrize("name", optimizers.__all__)
def test_every_optimizer_has_a_page(site, name):
    page = site / "api" / "optimizers" / name.lower() / "index.html"
    assert page.exists(), f"no docs page for sparseopt.{name}: add docs/src/api/optimizers/{name.lower()}.md"
    html = page.read_text()
    assert f'id="sparseopt.{name}"' in html              # the class, rendered from its docstring
    assert "learning_rate" in html                      # its arguments
    assert f'id="{getattr(sparseopt, name)._rule.__name__}"' in html   # and its rule's formula


@pytest.mark.parametrize("page, anchors", [
    ("api/optimizer", ["sparseopt.Optimizer", "sparseopt.Optimizer.apply_gradients",
                       "sparseopt.Optimizer.get_slot", "sparseopt.Optimizer.set_weights"]),
    ("api/indexed_slices", ["sparseopt.IndexedSlices"]),
    ("api/engine", ["sparseopt.engine.StepConfig", "sparseopt.engine.StepConfig.slot_layout",
                    "sparseopt.engine.HostVariable", "sparseopt.engine.ExactBook",
                    "sparseopt.engine.run_step"]),
    ("api/schedules", ["sparseopt.schedules.ExponentialDecay", "sparseopt.schedules.CosineDecayRestarts"]),
    ("api/saving", ["sparseopt.saving.save", "sparseopt.saving.load"]),
    ("custom_rules", ["sparseopt.custom.Rule", "sparseopt.custom.Rule.optimizer_class",
                      "sparseopt.custom.IdleSteps", "sparseopt.custom.idle_columns"]),
    ("api/errors", ["sparseopt.errors.WeightsMismatchError", "sparseopt.errors.ConfigError"]),
    ("api/sparseopt_tf", ["sparseopt_tf.optimizers.Optimizer", "sparseopt_tf.optimizers.keras_optimizer"]),
])
def test_reference_pages(site, page, anchors):
    html = (site / page / "index.html").read_text()
    for anchor in anchors:
        assert f'id="{anchor}"' in html, f"{anchor} missing from {page}"


def test_doctest_examples_render_as_code(site):
    html = (site / "api" / "optimizers" / "nadam" / "index.html").read_text()
    assert "<blockquote>" not in html and "u_product = 0.9" in html
    assert ":class:" not in html
