"""The rule contract (:mod:`sparseopt.rules`): rules are plain Python, their kind is read in
one place, their variants are data that the kernels' side compiles."""

import ast
import math
import pathlib
import types

import pytest

import sparseopt as so
from sparseopt import rules
from sparseopt.kernels import _compile
from sparseopt.rules import _idle

RULES = pathlib.Path(rules.__file__).resolve().parent
FORBIDDEN = ("numba", "sparseopt.kernels")


def _imports(source):
    """The absolute names that ``source``, a module of ``sparseopt.rules``, imports anywhere,
    ``from X import y`` giving ``X.y`` (so ``from sparseopt import kernels`` is caught)."""
    package = "sparseopt.rules"
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            found += [f"{base}.{alias.name}" for alias in node.names]
    return found


def _forbidden(names):
    return [n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)]


@pytest.mark.parametrize("source", [
    "import numba", "import numba.cuda as cuda", "from numba import njit",
    "from sparseopt.kernels._specialize import specialize", "from sparseopt import kernels",
    "from ..kernels import cpu", "def f():\n    import numba\n",
])
def test_the_scan_finds_each_way_to_import_numba_or_the_kernels(source):
    assert _forbidden(_imports(source))


def test_rules_import_neither_numba_nor_the_kernels():
    """Every module of ``sparseopt/rules`` (any depth of its AST, relative imports resolved)."""
    files = sorted(RULES.glob("*.py"))
    assert {"__init__.py", "_idle.py", "adam.py", "ftrl.py"} <= {f.name for f in files}
    bad = {f.name: _forbidden(_imports(f.read_text())) for f in files}
    assert {name: found for name, found in bad.items() if found} == {}


def test_kind_is_what_a_rule_declares():
    expected = {"rowwise_adagrad": rules.ROW, "lamb": rules.REDUCTION, "adafactor": rules.FACTORED}
    for name in rules.__all__:
        module = getattr(rules, name)
        if isinstance(module, types.ModuleType):
            assert rules.kind(module) == expected.get(name, rules.ELEMENT), name
    # a variant is of its rule's kind; a sparseopt.Rule presents itself as a rule module
    assert rules.kind(_compile.variant(rules.ftrl, "sqrt")) == rules.ELEMENT

    def coefficients(step, learning_rate=0.1):
        return {"lr": learning_rate}

    def update(p, g, c):
        return (p - c.lr * g,)

    def terms(p, g, c):
        return g, p * p, g * g

    def scale(sum_t0, sum_t1, c):
        return c.lr

    def apply(p, d, scale, c):
        return p - scale * d

    assert rules.kind(so.Rule("plain", (), coefficients, update).module) == rules.ELEMENT
    normed = so.Rule("normed", (), coefficients, reduction=(terms, scale, apply))
    assert rules.kind(normed.module) == rules.REDUCTION
    both = types.ModuleType("both")
    both.ROW_SLOTS, both.REDUCTION = ("r",), True
    with pytest.raises(TypeError, match="'both' declares the kinds"):
        rules.kind(both)


def test_ftrl_variant_compiles_with_its_constant_fixed():
    """The variant's ``update``, compiled by the kernels' side, takes the square root whatever
    the step's flag says (the constant decides at compile time); the rule's follows the flag.
    Expected values: the formula of :mod:`sparseopt.rules.ftrl` in float64."""
    sqrt = _compile.variant(rules.ftrl, "sqrt")
    assert sqrt is _compile.variant(rules.ftrl, "sqrt") and sqrt.SQRT_ONLY and not rules.ftrl.SQRT_ONLY
    c = rules.ftrl.coefficients(0.5, -0.7, 0.0, 0.0, 0.0, 0.0)   # use_sqrt 0: the pow branch
    assert c.use_sqrt == 0
    p, g, n, z = 0.3, 0.2, 0.4, 0.1

    def expected(power):
        n_new = n + g * g
        z_new = z + g - (n_new ** power - n ** power) / c.learning_rate * p
        return (-z_new) / (n_new ** power / c.learning_rate + c.two_l2)

    got_sqrt = _compile.function(sqrt, "update")(p, g, n, z, c)[0]
    got_rule = _compile.function(rules.ftrl, "update")(p, g, n, z, c)[0]
    assert math.isclose(got_sqrt, expected(0.5), rel_tol=1e-14)
    assert math.isclose(got_rule, expected(0.7), rel_tol=1e-14)
    assert not math.isclose(expected(0.5), expected(0.7), rel_tol=1e-3)


def test_idle_columns_are_named_offsets():
    cols = _idle.columns(one=1, series=_idle.SERIES_COLUMNS, last=2)
    assert cols == (0, 1, 2, 2 + _idle.SERIES_COLUMNS, 4 + _idle.SERIES_COLUMNS)
    assert cols.decay == _idle.DECAY == 0 and cols.series == 2 and cols.count == 4 + _idle.SERIES_COLUMNS
    for name in ("adadelta", "adagrad", "adam", "adamax", "lion", "nadam", "rmsprop", "sgd"):
        rule = getattr(rules, name)
        assert rule.IDLE_COLUMNS == rule.COLUMNS.count, name
