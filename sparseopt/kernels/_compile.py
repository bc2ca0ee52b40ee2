"""The compiled rule: a plain Python rule's functions, compiled for one target.

Rules (:mod:`sparseopt.rules`) are plain Python and import no Numba. A kernel asks here for
a rule's function compiled for its target (:func:`function`):

* ``"cpu"``: ``numba.njit(**_config.CPU_RULE_FLAGS)``, inlined into the CPU kernels;
* ``"cuda"``: ``numba.cuda.jit(device=True)``, called from the CUDA kernels.

Where the target needs other objects than the rule's module holds, the function's globals are
re-bound (:func:`sparseopt.kernels._specialize.specialize`: a copy of the function with other
globals, which Numba freezes as compile-time constants; no closure, so the kernels stay
cacheable on disk):

* a **helper** it reads from the rule's package (a module such as
  :mod:`sparseopt.rules._idle`, or a plain function) becomes that helper compiled for the
  same target, its own helpers in turn (the same notion of "helper" as the cache key's,
  :func:`sparseopt.kernels._specialize.rule_key`);
* ``rebind`` fixes module constants in the functions of a module (the CPU catch-up's short
  series: ``_idle.SERIES_TERMS``), and a variant's constants in the rule's own (below);
* on the CUDA simulator, which runs device functions as Python on NumPy scalars, ``math``
  becomes :class:`SimulatorMath` (float32 math stays float32, as in compiled code).

**Variants.** A rule may declare ``VARIANTS = {name: {CONSTANT: value, ...}}`` and
``variant_for(c) -> name or None`` (:mod:`sparseopt.rules.ftrl`). :func:`for_step` picks, from
one step's coefficients, the rule or :func:`variant` ``(rule, name)``: a rule of its own (the
rule's declarations, with its own ``__rule_key__``, so every kernel family compiles and
caches it apart) whose functions compile with those constants fixed, so that the compiler
drops the branch they decide.
"""

import functools
import math
import os
import types

import numba
import numpy as np

from sparseopt import _config
from sparseopt.kernels import _slots
from sparseopt.kernels._specialize import rule_key, rule_package, specialize

CPU = "cpu"
CUDA = "cuda"


def simulator():
    """Whether CUDA code runs on Numba's simulator (``NUMBA_ENABLE_CUDASIM``)."""
    if getattr(numba.config, "ENABLE_CUDASIM", 0):
        return True
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


class SimulatorMath:
    """``math`` for rules run by the CUDA simulator, which calls them with NumPy scalars.

    There ``math.sqrt(np.float32(x))`` is a Python float, and ``sqrt(a) / sqrt(b)``
    would be divided in float64 and rounded once, where compiled code (CPU or
    GPU) rounds each square root to float32 first. Here every function returns
    its first argument's dtype: ``sqrt`` is NumPy's (correctly rounded, as the
    compiled one), the others are computed in float64 and rounded, which agrees
    with Numba's CPU ``pow`` and ``exp`` but for rare last-bit differences (the
    GPU's libdevice differs too).
    """

    sqrt = staticmethod(np.sqrt)

    def __getattr__(self, name):
        fn = getattr(math, name)
        if not callable(fn):
            return fn

        def typed(x, *args):
            result = fn(x, *args)
            return type(x)(result) if isinstance(x, np.floating) and isinstance(result, float) else result
        return typed


_SIMULATOR_MATH = SimulatorMath()


@functools.lru_cache(maxsize=None)
def function(rule, name, target=CPU, default=None, rebind=()):
    """The rule's function ``name`` (``default`` where the rule has none) compiled for
    ``target`` (:data:`CPU` or :data:`CUDA`), memoized.

    ``rebind``: ``((module, ((constant, value), ...)), ...)``: module constants fixed in the
    functions of that module (a variant's own are added). ``rule`` is a rule module, a
    :func:`variant` or a :class:`sparseopt.Rule`'s ``module``.
    """
    namespace = vars(rule)
    fn = namespace.get(name, default)
    if fn is None:
        raise AttributeError(f"rule {rule.__name__!r} has no function {name!r}")
    base = namespace.get("__variant_of__")
    if base is not None:
        rebind = tuple(rebind) + ((base, namespace["__variant_constants__"]),)
    return _compiled(fn, target, rule_package(rule), tuple(rebind))


#: A rule function's arguments other than slots, and the adapter that calls it on the kernels'
#: tuples of slot values (:mod:`sparseopt.kernels._slots`), by name.
_STAGES = {"update": (3, "UPDATE"), "reduce_terms": (3, "REDUCE_TERMS"), "idle_apply": (5, "IDLE_APPLY"),
           "row_update": (2, "ROW_UPDATE")}


@functools.lru_cache(maxsize=None)
def on_tuples(rule, name, target, n_kernel, n_kernel_rows=None, rebind=()):
    """The rule's function ``name`` (``update``, ``reduce_terms``, ``idle_apply`` or
    ``row_update``) called on the kernels' tuples of slot values, compiled for ``target`` (a
    rule without ``idle_apply``: one that always fails, so that exact mode replays):
    ``n_kernel`` slot values (``n_kernel_rows`` row values for a row-wise rule's ``update``, and
    for ``row_update``) however many the rule's function takes (:func:`sparseopt.kernels._slots.rule_call`
    and the others). ``rebind`` as for :func:`function`."""
    fixed, bound = _STAGES[name]
    if name == "idle_apply" and name not in vars(rule):  # no closed form: the catch-up replays
        return _decorator(target)(specialize(_slots.no_idle(n_kernel), target))
    fn = function(rule, name, target, rebind=rebind)
    slots = vars(rule)["SLOTS"]
    rows = vars(rule).get("ROW_SLOTS", ())
    if name == "row_update":
        template = _slots.row_rule_call(_slots.rule_slot_count(rule, name, fixed, rows), n_kernel)
    elif name == "update" and n_kernel_rows is not None:
        n_rule = _slots.rule_slot_count(rule, name, fixed, slots + rows, former=6)
        if n_rule == len(slots) + len(rows):
            template = _slots.rule_call(len(slots), n_kernel, len(rows), n_kernel_rows)
        else:  # written for the former three and three: (p, g, s0, s1, s2, r0, r1, r2, c)
            template = _slots.rule_call(3, n_kernel, 3, n_kernel_rows)
    elif name == "update":
        template = _slots.rule_call(_slots.rule_slot_count(rule, name, fixed, slots), n_kernel)
    elif name == "reduce_terms":
        template = _slots.reduce_terms_call(_slots.rule_slot_count(rule, name, fixed, slots), n_kernel)
    else:
        template = _slots.idle_call(bound, _slots.rule_slot_count(rule, name, fixed, slots), n_kernel)
    return _decorator(target)(specialize(template, f"{rule_key(rule)}_{target}", **{bound: fn}))


def _decorator(target):
    if target == CPU:
        return numba.njit(**_config.CPU_RULE_FLAGS)
    from numba import cuda  # imported by the CUDA kernels only: `import sparseopt` touches no CUDA
    return cuda.jit(device=True)


def _global_names(code):
    """The global (and attribute) names ``code`` and the code nested in it read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _within(module_name, package):
    return isinstance(module_name, str) and module_name.startswith(package + ".")


@functools.lru_cache(maxsize=None)
def _compiled(fn, target, package, rebind):
    """``fn`` compiled for ``target``, its globals re-bound as the module docstring says."""
    found = fn.__globals__
    updates = {}
    for name in _global_names(fn.__code__) & found.keys():
        value = found[name]
        if isinstance(value, types.ModuleType):
            if value is math and target == CUDA and simulator():
                updates[name] = _SIMULATOR_MATH
            elif _within(value.__name__, package):
                updates[name] = _namespace(value, target, package, rebind)
        elif isinstance(value, types.FunctionType) and _within(value.__module__, package):
            updates[name] = _compiled(value, target, package, rebind)
    for module, constants in rebind:
        if fn.__module__ == module.__name__:
            updates.update(constants)
    if updates:
        fn = specialize(fn, target, **updates)
    return _decorator(target)(fn)


@functools.lru_cache(maxsize=None)
def _namespace(module, target, package, rebind):
    """A helper module as the compiled functions see it: its functions compiled for
    ``target``, its constants (those ``rebind`` fixes re-bound)."""
    out = types.ModuleType(f"{module.__name__}_{target}", module.__doc__)
    for key, value in vars(module).items():
        if key.startswith("__"):
            continue
        if isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
            value = _compiled(value, target, package, rebind)
        setattr(out, key, value)
    for fixed, constants in rebind:
        if fixed is module:
            for key, value in constants:
                setattr(out, key, value)
    return out


@functools.lru_cache(maxsize=None)
def variant(rule, name):
    """The rule's compile-time variant ``name`` (``rule.VARIANTS[name]``: the module constants
    fixed in it), as a rule of its own: memoized, so a variant's kernels are made once."""
    constants = rule.VARIANTS[name]
    out = types.ModuleType(f"{rule.__name__}_{name}", rule.__doc__)
    for key, value in vars(rule).items():
        if not key.startswith("__"):
            setattr(out, key, value)
    for key, value in constants.items():
        setattr(out, key, value)
    out.__rule_key__ = f"{rule_key(rule)}_{name}"
    out.__variant_of__ = rule
    out.__variant_constants__ = tuple(constants.items())
    return out


def for_step(rule, c):
    """The rule to compile for one step with coefficients ``c``: the variant that the rule's
    ``variant_for(c)`` names, else the rule. Asked per step: chosen from that step's
    coefficients, a variant always agrees with the flag it fixes, also when a
    hyperparameter changes between steps. (Exact mode's catch-up replays past steps with
    their own coefficients and runs the rule itself.)"""
    choose = vars(rule).get("variant_for")  # no AttributeError raised and caught per step
    if choose is None:
        return rule
    name = choose(c)
    return rule if name is None else variant(rule, name)
