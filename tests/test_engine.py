"""``Optimizer.step_config()``: the step of a configured optimizer for a host that keeps the
variables, slots and host state itself (what the TensorFlow bridge runs).

The reference is the optimizer's own ``apply_gradients`` on copies of the same arrays: a
host that keeps its arrays and runs ``validate``, ``next_scalar_state``, ``coefficients``,
``set_rounding`` and ``run`` must leave the same bits in the variables and slots, and
nothing at all when a gradient is bad.
"""

import ml_dtypes
import numpy as np
import pytest

import sparseopt
from sparseopt import engine, errors

#: One configuration per way a host's step differs: slots kept or not, a slot's initial
#: value, host state (Nadam), per-row slots (RowwiseAdagrad), weight decay.
CASES = {
    "sgd": lambda: sparseopt.SGD(0.1),
    "sgd_momentum": lambda: sparseopt.SGD(0.1, momentum=0.9, nesterov=True),
    "adagrad": lambda: sparseopt.Adagrad(0.1, initial_accumulator_value=0.25),
    "adamw": lambda: sparseopt.AdamW(0.01, weight_decay=0.004, amsgrad=True),
    "nadam": lambda: sparseopt.Nadam(0.01),
    "rowwise_adagrad": lambda: sparseopt.RowwiseAdagrad(0.1, weight_decay=0.01),
}


class Host:
    """Keeps the variables, their slots and the host state in its own arrays."""

    def __init__(self, config, variables):
        self.config = config
        self.iterations = 0
        self.state = [value for _, value in config.scalar_state]
        self.vars = variables
        self.slots = []
        self.row_slots = []
        for var in variables:
            dtype, row_dtype = config.slot_dtypes(var.dtype)
            self.slots.append({n: np.full(var.shape, config.slot_initial_values[n], dtype)
                               for n in config.slot_names})
            self.row_slots.append({n: np.full(var.shape[:1], config.slot_initial_values[n], row_dtype)
                                   for n in config.row_slot_names} if config.rowwise else None)

    def apply(self, grads):
        config = self.config
        step = self.iterations + 1
        items = [(engine.HostVariable(var, f"table{i}", self.slots[i], self.row_slots[i],
                                      has_wd=True, slot_dtype=config.slot_dtype), g)
                 for i, (g, var) in enumerate(zip(grads, self.vars))]
        updates = config.validate(items)
        hypers = config.hypers(self.iterations)
        state = config.next_scalar_state(hypers, step, self.state)
        coefficients = config.coefficients({**hypers, **state}, step)
        config.set_rounding(updates, step)
        config.run(updates, coefficients, config.weight_decay(hypers["learning_rate"]),
                   lambda s: s.has_wd)
        self.state = [state[name] for name, _ in config.scalar_state]
        self.iterations = step


def _tables(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(50, 4)).astype(dtype), rng.normal(size=(30, 8)).astype(dtype),
            rng.normal(size=(7,)).astype(dtype)]


def _grads(step, dtype):
    rng = np.random.default_rng(100 + step)
    return [sparseopt.IndexedSlices(rng.normal(size=(12, 4)).astype(dtype), rng.integers(0, 50, 12)),
            sparseopt.IndexedSlices(rng.normal(size=(9, 8)).astype(dtype), rng.integers(0, 30, 9)),
            rng.normal(size=(7,)).astype(dtype)]


@pytest.mark.parametrize("name, dtype", [(name, np.float32) for name in sorted(CASES)] + [
    ("adamw", ml_dtypes.bfloat16), ("rowwise_adagrad", ml_dtypes.bfloat16)])  # 16-bit: the step's rounding
def test_a_host_step_leaves_the_optimizers_own_bits(name, dtype):
    opt = CASES[name]()
    mine = _tables(dtype)
    theirs = [v.copy() for v in mine]
    host = Host(opt.step_config(), theirs)
    for step in range(3):
        grads = _grads(step, dtype)
        opt.apply_gradients(list(zip(grads, mine)))
        host.apply(grads)
    config = host.config
    for i, var in enumerate(mine):
        assert np.array_equal(var.view(np.uint8), theirs[i].view(np.uint8)), f"table{i}"
        for slot in config.slot_names:
            assert np.array_equal(opt.get_slot(var, slot), host.slots[i][slot]), (slot, i)
        for slot in config.row_slot_names:
            assert np.array_equal(opt.get_slot(var, slot), host.row_slots[i][slot]), (slot, i)
    # and the steps moved them (the test would pass on a no-op otherwise)
    assert not np.array_equal(mine[0], _tables(dtype)[0])


def test_what_the_config_says_is_what_the_optimizer_keeps():
    adagrad = sparseopt.Adagrad(0.1, initial_accumulator_value=0.25)
    var = np.zeros((3, 2), np.float32)
    adagrad.build([var])
    config = adagrad.step_config()
    assert config.slot_names == ("accumulator",) and config.slot_used == (True, False, False)
    assert config.slot_initial_values == {"accumulator": 0.25}
    assert np.all(adagrad.get_slot(var, "accumulator") == 0.25)
    assert config.scalar_state == () and not config.rowwise

    rmsprop = sparseopt.RMSprop(0.1, centered=True).step_config()
    assert rmsprop.slot_names == ("rms", "mg") and rmsprop.slot_used == (True, False, True)

    nadam = sparseopt.Nadam(0.01)
    config = nadam.step_config()
    assert [n for n, _ in config.scalar_state] == ["u_product"]
    # the next state is the optimizer's own (its first step's), and asking leaves the
    # optimizer's state as it was
    expected = config.next_scalar_state(config.hypers(0), 1, [1.0])
    assert nadam.get_weights()[1] == 1.0
    nadam.apply_gradients([(np.ones(4, np.float32), np.ones(4, np.float32))])
    assert expected == {"u_product": nadam.get_weights()[1]} and expected["u_product"] != 1.0

    rowwise = sparseopt.RowwiseAdagrad(0.1).step_config()
    assert rowwise.rowwise and rowwise.slot_names == () and rowwise.row_slot_names == ("accumulator",)


def test_a_bad_gradient_of_a_host_step_raises_before_anything_is_written():
    config = sparseopt.Adam(0.1).step_config()
    tables = _tables(np.float32)
    host = Host(config, tables)
    before = [v.copy() for v in tables] + [s.copy() for slots in host.slots for s in slots.values()]
    grads = _grads(0, np.float32)
    grads[1] = sparseopt.IndexedSlices(grads[1].values, np.full(9, 30))   # row 30 of 30 rows
    with pytest.raises(errors.IndexOutOfRangeError, match="table1"):
        host.apply(grads)
    after = [v for v in tables] + [s for slots in host.slots for s in slots.values()]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert host.iterations == 0


def test_the_bridge_reads_no_private_name_of_a_core_optimizer():
    """The TensorFlow bridge runs a core optimizer through ``step_config()`` and public
    attributes: no ``core._x`` / ``self._core._x`` / ``config._x`` in its sources, but for
    the two settings the legacy classes give the core they make (tf_keras' Nadam
    ``decay``, and the step's ``momentum`` taken with the coefficients). (``_spec`` reads
    the core classes' declarations, ``_hyper_names`` and the like, to learn each class.)"""
    import ast
    import pathlib

    allowed = {("legacy.py", "_schedule_decay"), ("legacy.py", "_coefficients")}
    bridge = pathlib.Path(__file__).resolve().parent.parent / "bridges" / "sparseopt_tf"
    found = []
    for path in sorted(bridge.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_")):
                continue
            owner = node.value
            owner = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)
            if owner in ("core", "_core", "config") and (path.name, node.attr) not in allowed:
                found.append(f"{path.name}:{node.lineno}: {owner}.{node.attr}")
    assert bridge.is_dir() and not found, found


def test_validate_raises_the_first_bad_item_in_order():
    """``then`` (a host's error in making the state of the item after ``items``) raises only
    when every item before it is good: a bad index of an earlier item comes first."""
    config = sparseopt.SGD(0.1).step_config()
    tables = _tables(np.float32)[:2]
    good = _grads(0, np.float32)[:2]
    bad = [good[0], sparseopt.IndexedSlices(good[1].values, np.full(9, 30))]   # row 30 of 30
    items = lambda grads: [(engine.HostVariable(v, f"table{i}", {}), g)  # noqa: E731
                           for i, (v, g) in enumerate(zip(tables, grads))]
    later = errors.ShapeMismatchError("the third item's slot")
    with pytest.raises(errors.IndexOutOfRangeError, match="table1"):
        config.validate(items(bad), later)
    with pytest.raises(errors.ShapeMismatchError, match="third item"):
        config.validate(items(good), later)
    assert len(config.validate(items(good))) == 2
