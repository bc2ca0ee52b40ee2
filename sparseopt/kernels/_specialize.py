"""Turn a generic kernel template into a kernel for one rule, cacheable on disk.

Numba caches a function by its module, qualified name and bytecode. A closure
over a rule's dispatcher cannot be cached (the dispatcher pickles differently in
every process), so a template refers to its rule and its constants as *globals*,
and :func:`specialize` re-binds the template's code to a fresh globals dict per
rule. Numba freezes globals as compile-time constants, so ``if NSLOTS > 1:``
costs nothing. Each specialization gets its own qualified name, which includes a
hash of the rule's source: a changed rule gets a fresh cache entry, never a stale one.

Numba checks a cached kernel only against the file its template lives in, not against
the files of the helpers it inlines (an exact-mode kernel of ``exact.py`` inlines
``cpu.py``'s element step and the rules' ``_idle`` series). So every specialized name
also carries :data:`SOURCE_KEY`, a hash of all the package's kernel and rule sources and
of the compile flags: after an edit or an upgrade that changes any of them, every kernel
compiles afresh (``tests/test_reliability.py`` shows it in a subprocess).
"""

import hashlib
import inspect
import pathlib
import sys
import types


def _source_key():
    """A hash of every source file whose code a kernel may inline: the modules of
    ``sparseopt.kernels`` and ``sparseopt.rules``, and ``sparseopt._config`` (the flags)."""
    package = pathlib.Path(__file__).resolve().parent.parent
    files = sorted([*package.glob("kernels/*.py"), *package.glob("rules/*.py"), package / "_config.py"])
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:8]


#: Part of every specialized kernel's name (see the module docstring).
SOURCE_KEY = _source_key()


def rule_key(rule_module):
    """A short name for a rule module, with a hash of its source and of the sources of
    the helper modules it inlines (a variant, :func:`sparseopt.kernels._compile.variant`,
    and a :class:`sparseopt.Rule` carry their own)."""
    key = getattr(rule_module, "__rule_key__", None)
    if key is not None:
        return key
    digest = hashlib.sha1()
    for module in [rule_module] + _helper_modules(rule_module):
        try:
            digest.update(inspect.getsource(module).encode())
        except (OSError, TypeError):  # pragma: no cover - rules defined interactively
            digest.update(repr(module).encode())
    name = rule_module.__name__.rsplit(".", 1)[-1]
    return f"{name}_{digest.hexdigest()[:10]}"


def rule_package(rule_module):
    """The package a rule's helpers come from (its module's package): what
    :mod:`sparseopt.kernels._compile` compiles with a rule's functions, and the key covers."""
    return rule_module.__name__.rsplit(".", 1)[0]


def _helper_modules(rule_module):
    """The other modules whose code a rule's kernels inline: every module, or module of a
    function, that the rule's namespace holds from the package it lives in (the exact-mode
    helpers of ``sparseopt.rules._idle``, ...). A change there must change the cache key:
    a kernel cached with old helper code would compute the old math, silently."""
    package = rule_package(rule_module)
    names = set()
    for value in vars(rule_module).values():
        if isinstance(value, types.ModuleType):
            name = value.__name__
        else:
            name = getattr(getattr(value, "py_func", value), "__module__", None)
        if isinstance(name, str) and name.startswith(package + ".") and name != rule_module.__name__:
            names.add(name)
    return [sys.modules[n] for n in sorted(names) if n in sys.modules]


def specialize(template, suffix, **constants):
    """A copy of ``template`` whose globals also hold ``constants``, named
    ``<template>_<suffix>_<SOURCE_KEY>``."""
    glb = dict(template.__globals__)
    glb.update(constants)
    fn = types.FunctionType(template.__code__, glb, f"{template.__name__}_{suffix}_{SOURCE_KEY}",
                            template.__defaults__, template.__closure__)
    fn.__qualname__ = fn.__name__
    fn.__module__ = template.__module__
    fn.__doc__ = template.__doc__
    return fn
