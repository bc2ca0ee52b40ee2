"""Compile-time variants of a rule: the same functions with some module constants fixed.

A flag of ``c`` is a runtime branch, which is free for cheap arithmetic (the compiler
turns it into a select) but not when one side is expensive: Ftrl's ``math.pow``
branch is speculated by the vectorizer, so every element pays for a scalar ``pow``
even when the flag picks ``sqrt``. A variant re-binds the rule module's functions
(:func:`sparseopt.kernels._specialize.specialize`) with a module constant fixed, so
the compiler drops the other side. It is a module object like the rule itself, with
its own ``__rule_key__``, so every kernel family compiles and caches it as a rule of
its own.

The variant is chosen per step, from that step's coefficients (:func:`for_step`), where
a kernel runs one step: so it always agrees with the flag it fixes, also when a
hyperparameter changes between steps. Exact mode's catch-up replays past steps with
their own coefficients and runs the rule itself.
"""

import types

from sparseopt.kernels._specialize import rule_key, specialize


def variant(rule_module, name, **constants):
    """``rule_module`` with ``constants`` bound in its functions' globals."""
    out = types.ModuleType(f"{rule_module.__name__}_{name}", rule_module.__doc__)
    for key, value in vars(rule_module).items():
        if key.startswith("__"):
            continue
        if isinstance(value, types.FunctionType) and value.__module__ == rule_module.__name__:
            value = specialize(value, name, **constants)
            value.__name__ = value.__qualname__ = key  # the same names as the rule's
        setattr(out, key, value)
    for key, value in constants.items():
        setattr(out, key, value)
    out.__rule_key__ = f"{rule_key(rule_module)}_{name}"
    return out


def for_step(rule_module, c):
    """The rule to compile for one step with coefficients ``c``: the rule's
    ``variant_for(c)`` where it has one, else the rule."""
    choose = vars(rule_module).get("variant_for")  # no AttributeError raised and caught per step
    return rule_module if choose is None else choose(c)
