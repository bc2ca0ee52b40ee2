"""Keras 3's own optimizer tests, run against ``sparseopt_tf`` (SPEC §6: "Keras' own
optimizer tests pass against our classes except documented deliberate differences").

The tests are not copied: each ``keras/src/optimizers/<name>_test.py`` of the installed
``keras`` package is loaded as a private module (not the one ``import`` would give, so
nothing here changes it for anyone else), with Keras' optimizer classes rebound to ours:

* ``<name>_test.py`` imports its class by name (``from keras.src.optimizers.adam import
  Adam``): the private module's ``Adam`` becomes ``sparseopt_tf.Adam``;
* ``optimizer_test.py``, ``optimizer_sparse_test.py``, ``loss_scale_optimizer_test.py`` and
  ``multi_optimizer_test.py`` use ``from keras.src import optimizers`` (some at import time,
  in their parameter tables): while the private module is executed, ``keras.src`` lends it
  :data:`REBOUND`, a copy of ``keras.src.optimizers`` whose classes, ``get`` and
  ``deserialize`` are ours (Keras' ``Optimizer``, ``LossScaleOptimizer`` and
  ``MultiOptimizer`` stay Keras'). The attribute is restored right after.

pytest collects one subclass of each Keras test class. The test modules of optimizers
sparseopt does not have (Muon, ScheduleFreeAdamW) are not loaded, and
their cases in the shared tables are skipped (:data:`NOT_OURS`). :data:`EXPECTED` lists
the tests that fail on purpose: each is a documented deliberate difference, marked
``xfail(strict=True)`` (it must keep failing, with an ``AssertionError``: if it passes,
the difference is gone and the entry must go) and pinned by a test of ours that checks
our behaviour. :data:`PENDING` would list failures that another change is fixing
(``xfail(strict=False)``).

With Keras 3.15.1: 198 of Keras' tests pass, 7 are expected failures, 8 are skipped (of
``stateless_apply``, which Keras itself skips on TensorFlow). Keras'
``test_sparse_correctness_adafactor`` passes but checks little on TensorFlow: its "dense"
gradient (``ops.convert_to_tensor(..., sparse=False)`` of an ``IndexedSlices``) stays an
``IndexedSlices``, so both sides take the sparse step.
"""

import functools
import importlib.util
import pathlib
import types

import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import keras.src  # noqa: E402
from keras.src import optimizers as keras_optimizers  # noqa: E402
from keras.src.saving import serialization_lib  # noqa: E402

import sparseopt_tf  # noqa: E402

pytestmark = pytest.mark.tf

_KERAS_TESTS = pathlib.Path(keras_optimizers.__file__).parent

#: Our class for each Keras optimizer class of the same name (``keras.optimizers.Lamb`` is
#: public but not in ``keras.src.optimizers``' namespace).
OURS = {name: getattr(sparseopt_tf, name) for name in sparseopt_tf.optimizers.__all__
        if name != "Optimizer" and (hasattr(keras_optimizers, name) or hasattr(keras.optimizers, name))}
_OURS_BY_KEY = {name.lower(): cls for name, cls in OURS.items()}


def _deserialize(config, custom_objects=None):
    """``keras.optimizers.deserialize``, resolving Keras' optimizer names to our classes."""
    objects = {**keras_optimizers.ALL_OBJECTS_DICT, **_OURS_BY_KEY}
    config = dict(config)
    if config["class_name"].lower() in objects:
        config["class_name"] = config["class_name"].lower()
    return serialization_lib.deserialize_keras_object(config, module_objects=objects,
                                                      custom_objects=custom_objects)


def _get(identifier):
    """``keras.optimizers.get``, resolving names and configs to our classes."""
    if identifier is None:
        return None
    if isinstance(identifier, str):
        identifier = {"class_name": identifier, "config": {}}
    obj = _deserialize(identifier) if isinstance(identifier, dict) else identifier
    if isinstance(obj, keras_optimizers.Optimizer):
        return obj
    raise ValueError(f"Could not interpret optimizer identifier: {identifier}")


#: ``keras.src.optimizers`` as the rebound test modules see it.
REBOUND = types.ModuleType("keras.src.optimizers")
REBOUND.__dict__.update({k: v for k, v in vars(keras_optimizers).items() if not k.startswith("__")})
REBOUND.__dict__.update(OURS, get=_get, deserialize=_deserialize)


def _load(name, **rebind):
    """A private copy of Keras' test module ``name``, executed with ``keras.src.optimizers``
    rebound (see the module docstring), with the names ``rebind`` set afterwards."""
    spec = importlib.util.spec_from_file_location(f"_keras_own_{name}", _KERAS_TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    original = keras.src.optimizers
    keras.src.optimizers = REBOUND
    try:
        spec.loader.exec_module(module)
    finally:
        keras.src.optimizers = original
    for attr, value in rebind.items():
        setattr(module, attr, value)
    return module


_IN_PLACE = (
    "Keras' test recognises a sparse update by mocking the optimizer's `assign` methods and "
    "expects this optimizer to pass them an IndexedSlices; ours hands the touched rows to the "
    "kernels, which write them in place and never call `assign` (a deliberate difference: no "
    "full-table pass). Pinned by tests/tf/test_keras3.py::"
    "test_sparse_step_writes_in_place_and_never_calls_assign and tests/tf/test_handover.py::"
    "test_sparse_step_writes_in_place_without_a_full_table_tensor.")

#: ``{"TestClass::test": reason}``: the deliberate differences, ``xfail(strict=True)``.
EXPECTED = {
    **{f"OptimizerSparseTest::test_sparse_gradients_{case}": _IN_PLACE
       for case in ("adadelta", "adafactor", "adagrad", "rmsprop", "sgd", "loss_scale_optimizer_sgd")},
    "NadamTest::test_build_with_empty_var_list": (
        "Nadam's host state `_u_product` is a float64 variable (the core's precision for the "
        "product over every step); Keras keeps it in the variables' dtype (floatx here). "
        "Pinned by tests/tf/test_keras3.py::"
        "test_nadam_builds_without_variables_and_names_its_host_state_as_keras."),
}

#: ``{"TestClass::test": reason}``: failures that another change fixes (scalar variables in
#: graph steps, TF1 graphs), ``xfail(strict=False)``. None at present.
PENDING = {}

#: Keras optimizers that sparseopt does not have: their cases in Keras' parameter tables
#: (``optimizers.get("muon")``, ``optimizers.Muon``) are skipped.
_WRAPPERS = {"optimizer", "lossscaleoptimizer", "multioptimizer", "optimizermap"}
NOT_OURS = sorted(set(keras_optimizers.ALL_OBJECTS_DICT) - set(_OURS_BY_KEY) - _WRAPPERS)

_used = set()


def _mark_for(base, attr, method):
    key = f"{base.__name__}::{attr}"
    if key in EXPECTED:
        _used.add(key)
        return pytest.mark.xfail(strict=True, raises=AssertionError, reason=EXPECTED[key])
    if key in PENDING:
        _used.add(key)
        return pytest.mark.xfail(strict=False, reason=PENDING[key])
    params = f"{attr} {getattr(method, '__x_params_repr__', '')}".lower()
    for name in NOT_OURS:
        if name in params:
            return pytest.mark.skip(reason=f"keras.optimizers: sparseopt has no {name!r} optimizer")
    return None


def _subclass(base):
    """A subclass of the Keras test class ``base`` for pytest to collect, its test methods
    marked as :data:`EXPECTED`, :data:`PENDING` and :data:`NOT_OURS` say."""
    namespace = {"__module__": __name__, "__qualname__": base.__name__}
    for attr in dir(base):
        if not attr.startswith("test"):
            continue
        method = getattr(base, attr)
        mark = _mark_for(base, attr, method)
        if mark is None:
            continue

        @functools.wraps(method)
        def marked(self, method=method):
            return method(self)

        namespace[attr] = mark(marked)
    return type(base.__name__, (base,), namespace)


_FILES = {                      # test module: the names it imports and we rebind
    "adadelta_test": ["Adadelta"], "adafactor_test": ["Adafactor"], "adagrad_test": ["Adagrad"],
    "adam_test": ["Adam"], "adamax_test": ["Adamax"], "adamw_test": ["AdamW"], "ftrl_test": ["Ftrl"],
    "lamb_test": ["Lamb"], "lion_test": ["Lion"], "nadam_test": ["Nadam"], "rmsprop_test": ["RMSprop"],
    "sgd_test": ["SGD"], "optimizer_test": [], "optimizer_sparse_test": [],
    "loss_scale_optimizer_test": ["SGD"], "multi_optimizer_test": [],
}

#: Test modules the installed keras does not ship (a build without its tests).
MISSING = [f for f in _FILES if not (_KERAS_TESTS / f"{f}.py").is_file()]

for _file, _names in _FILES.items():
    if _file in MISSING:
        continue
    _module = _load(_file, **{n: OURS[n] for n in _names})
    for _attr, _obj in vars(_module).items():
        if (isinstance(_obj, type) and issubclass(_obj, keras.src.testing.TestCase)
                and _obj.__module__ == _module.__name__ and _attr.endswith("Test")):
            globals()[_attr] = _subclass(_obj)
del _file, _names, _module, _attr, _obj


def test_keras_ships_the_tests_run_here():
    if MISSING:
        pytest.skip(f"the installed keras ({keras.__version__}) does not ship {MISSING}")


def test_every_listed_difference_names_a_keras_test():
    """An entry of EXPECTED or PENDING that names no test of the installed Keras is stale."""
    if MISSING:
        pytest.skip(f"the installed keras does not ship {MISSING}")
    assert set(EXPECTED) | set(PENDING) <= _used, sorted((set(EXPECTED) | set(PENDING)) - _used)


def test_rebinding_does_not_leak():
    """Keras' modules are unchanged: the rebound names live in private copies only."""
    import keras.src.optimizers.adam_test as keras_adam_test     # Keras' own module, imported normally

    assert keras.src.optimizers is keras_optimizers
    assert keras_optimizers.Adam is not sparseopt_tf.Adam
    assert keras_adam_test.Adam is keras_optimizers.Adam
    assert keras.optimizers.get("adam").__class__ is keras.optimizers.Adam
