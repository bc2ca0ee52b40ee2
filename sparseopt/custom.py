r"""Your own optimizer as one rule: the per-step scalars and the element update, in plain Python.

A :class:`Rule` takes the two functions every built-in optimizer is made of
(:mod:`sparseopt.rules`), and :meth:`Rule.optimizer_class` turns it into an optimizer
class with everything the built-in ones have: dense and row-wise sparse steps on the CPU
(Numba, ``parallel=True``) and on CUDA, ``sparse_mode="lazy"`` and ``"exact"`` (exact mode
replays a row's idle steps with a zero gradient, bit for bit the dense rule), clipping,
decoupled weight decay, schedules, ``get_config``, checkpoints (:func:`sparseopt.save`)
and, through ``sparseopt_tf.keras_optimizer``, a Keras 3 class.

* ``coefficients(step, learning_rate=..., other=..., ...)``: host math, once per step.
  Its keyword parameters are the optimizer's hyperparameters, with their defaults (each a
  float, a no-argument callable or a schedule in the optimizer, resolved to a float here;
  a parameter whose default is ``True`` or ``False`` is a flag, passed as a bool);
  ``step`` is ``iterations + 1``. It returns a ``dict`` (or a ``NamedTuple``) of floats,
  always with the same names: flags as 0.0 / 1.0.
* ``update(p, g, *slots, c)``: one element: the parameter, its gradient, one value per
  slot (any number of ``slots``, in their order) and the coefficients (``c.name``),
  returning ``(p, *slots)`` (``(p,)`` for a rule without slots). (The form of the first
  release, three slot values whatever the rule has, ``update(p, g, s0, s1, s2, c)``, is
  still accepted.) Numba compiles it for every kernel, so it is scalar arithmetic,
  comparisons, ``if`` and ``math.*``: no arrays, no NumPy, no ``raise``, and **no float
  literals** (a literal is float64 and would turn float32 math into float64: put every
  constant in the coefficients, where it arrives cast to the variable's dtype).
* or, in place of ``update``, a **reduction stage** (``reduction=(terms, scale, apply)``),
  for an update scaled by sums over a *unit* of elements (LAMB's trust ratio
  ``||p|| / ||u||``): ``terms(p, g, *slots, c) -> (d, *slots, t0, t1)`` per element
  (the new slots, a direction ``d``, and two terms summed over the unit), ``scale(sum_t0,
  sum_t1, c) -> scale`` once per unit, and ``apply(p, d, scale, c) -> p`` per element. The
  unit is the whole variable in a dense step and each touched row in a sparse step (as the
  built-in ``Lamb``, :mod:`sparseopt.rules.lamb`); such a rule has no
  ``sparse_mode="exact"`` (an idle row's dense step would depend on the whole variable).
* optionally, ``idle=IdleSteps(...)``: the closed form of the rule's idle steps for
  ``sparse_mode="exact"`` (a row's steps with a zero gradient, applied at once when the row is
  next touched, in place of replaying them one by one), in the form of the built-in rules'
  (:mod:`sparseopt.rules._idle`): see :class:`IdleSteps`.
* optionally, compile-time **variants**: ``variants={name: {CONSTANT: value}}`` and
  ``variant_for(c) -> name or None``: a module constant (a global) that the rule's functions
  read, fixed in a variant's compiled code so that the compiler drops the branch it decides;
  ``variant_for`` picks a variant from each step's coefficients (as the built-in ``Ftrl``
  compiles its square-root steps without the ``pow`` branch, :mod:`sparseopt.rules`). A variant
  must compute what the rule computes for the steps it is picked for: it is an optimization.
* with ``row_slots`` (per-row state, one value per row: FBGEMM's row-wise rules), a **row
  stage** ``row=(term, update)``: ``term(p, g, c)`` per element, averaged over the row;
  ``update(*row_slots, mean, c) -> (*row_slots,)`` once per touched row (a tuple, also of
  one); and the rule's ``update(p, g, *slots, *row_slots, c) -> (p, *slots)`` reads the row
  slots' new values (as the built-in ``RowwiseAdagrad``, :mod:`sparseopt.rules.rowwise_adagrad`).
  No ``sparse_mode="exact"``.

Example (Adam without bias correction, checked against its formula):

    >>> import math, numpy as np, sparseopt as so
    >>> def coefficients(step, learning_rate=0.1, beta=0.9, epsilon=1e-7):
    ...     return {"lr": learning_rate, "one_minus_beta": 1.0 - beta, "epsilon": epsilon}
    >>> def update(p, g, m, v, c):
    ...     m = m + (g - m) * c.one_minus_beta
    ...     v = v + (g * g - v) * c.one_minus_beta
    ...     return p - c.lr * m / (math.sqrt(v) + c.epsilon), m, v
    >>> Plain = so.Rule("plain", ("m", "v"), coefficients, update).optimizer_class("Plain")
    >>> w = np.zeros(2)
    >>> Plain(beta=0.5).apply_gradients([(np.array([2.0, -1.0]), w)])
    1
    >>> np.round(w, 6).tolist()   # m = g / 2, v = g * g / 2: -0.1 * sign(g) / sqrt(2)
    [-0.070711, 0.070711]
"""

import collections
import hashlib
import inspect
import keyword
import types
from typing import Callable, NamedTuple, Optional

from sparseopt import errors
from sparseopt.optimizer import Optimizer
from sparseopt.optimizers._rowwise import RowwiseOptimizer
from sparseopt.rules import _idle

#: The slot values a rule's functions took in the first release, whatever its slots.
_FORMER_SLOTS = 3

#: A row stage's functions (the built-in RowwiseAdagrad's ``row_term`` and ``row_update``).
_ROW_STAGE = ("term", "update")
#: A reduction stage's functions (the built-in Lamb's ``reduce_*``).
_REDUCTION_STAGE = ("terms", "scale", "apply")

# Arguments of Optimizer.__init__ that a rule's hyperparameters may not take.
_RESERVED = frozenset(inspect.signature(Optimizer.__init__).parameters) - {"learning_rate"}


def idle_columns(**widths):
    """The named columns of an idle table (:func:`sparseopt.rules._idle.columns`): ``decay``
    (column 0, the window's weight decay product, which the kernels fill), then one per keyword,
    each ``width`` columns wide; ``count`` is the table's width. Read them as ``t[COLUMNS.name]``."""
    return _idle.columns(**widths)


class IdleSteps(NamedTuple):
    """The closed form of a :class:`Rule`'s idle steps, for ``sparse_mode="exact"``.

    A row left idle over the steps ``(L, T]`` is brought to the state the dense rule would give
    it with a zero gradient when it is next touched. Without an ``IdleSteps`` the steps are
    replayed one by one (bit for bit the dense rule, at a cost per idle step); with one, each
    window is one table row of per-step scalars, computed once per step on the host, and one
    ``apply`` per element. The built-in rules' are the examples (``sparseopt/rules/sgd.py``:
    momentum; ``adam.py``: series), and :mod:`sparseopt.rules._idle` the contract:

    Attributes:
        columns: the table's named columns, from :func:`idle_columns` (column ``decay``, the
            product of the decoupled weight decay factors of the window, is filled by the kernels).
        table_init: ``table_init(t)``: the scalars of the empty window (``t[columns.decay]``
            is set to 1 already).
        table_step: ``table_step(t, t_next, rec)``: the scalars of window ``(L, T]`` from those
            of ``(L + 1, T]`` and the coefficients ``rec`` of step ``L + 1`` (``t[columns.decay]``
            is set already). Host code, run in float64.
        apply: ``apply(p, *slots, t, c, tol, zero) -> (p, *slots, ok)``: one element after the
            window ``t`` (``c``: the coefficients of step ``T``, ``tol``: half the dtype's
            machine epsilon); ``ok=False`` replays the window instead. Compiled as ``update`` is.
        constant: the coefficients the closed form takes as constant over a window (the
            optimizer catches every row up before a step that changes one).
        is_identity: optional ``is_identity(c, wd) -> bool``: whether a step with a zero
            gradient leaves every element and slot as it is, bit for bit (then a sparse step
            with no row behind is a lazy one); see :mod:`sparseopt.rules._idle`.
    """

    columns: tuple
    table_init: Callable
    table_step: Callable
    apply: Callable
    constant: tuple = ()
    is_identity: Optional[Callable] = None


class Rule:
    """An optimizer's math: ``name``, ``slots``, ``coefficients`` and ``update``, or a
    ``reduction`` stage in place of ``update``; with ``row_slots``, a ``row`` stage too;
    optionally exact mode's closed form (``idle``) and compile-time ``variants`` (see the
    module docstring).

    Attributes:
        name: the rule's name (an identifier; the default optimizer name).
        slots: the slot names, any number, in the order ``update`` takes them.
        row_slots: the per-row slot names (one value per row of the variable), in the
            order ``row``'s ``update`` and ``update`` take them; ``()`` for none.
        row: ``(term, update)`` of a rule with ``row_slots``, else ``None``.
        hyperparameters: ``{name: default}`` from ``coefficients``' keyword parameters.
        fields: the names of the coefficients, from one call of ``coefficients`` at
            step 1 with the defaults.
        reduction: ``(terms, scale, apply)``, or ``None`` for a rule with ``update``.
        idle: the :class:`IdleSteps` of exact mode, or ``None`` (idle steps replayed).
        variants: ``{name: {CONSTANT: value}}``, or ``None``; ``variant_for``: its chooser.
        module: the rule as the kernels read a rule module (``SLOTS``, ``Coefficients``,
            ``update``, ..., and a cache key from the functions' sources).
    """

    def __init__(self, name, slots, coefficients, update=None, *, reduction=None, row_slots=(), row=None,
                 idle=None, variants=None, variant_for=None):
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise errors.HyperparameterError(f"Rule: name must be an identifier; got {name!r}")
        slots = _slot_names(name, "slots", slots)
        row_slots = _slot_names(name, "row_slots", row_slots, taken=slots)
        if bool(row_slots) != (row is not None):
            raise errors.HyperparameterError(
                f"Rule {name!r}: per-row slots need a row stage: give row_slots and row=(term, update) "
                f"together; got {'row_slots' if row_slots else 'row'} alone")
        if row is not None:
            row = tuple(row) if isinstance(row, (tuple, list)) else (row,)
            if len(row) != 2:
                raise errors.HyperparameterError(
                    f"Rule {name!r}: row is (term, update), two functions; got {len(row)} items")
            if reduction is not None:
                raise errors.HyperparameterError(
                    f"Rule {name!r}: a rule has a row stage or a reduction stage, not both")
        if (update is None) == (reduction is None):
            raise errors.HyperparameterError(
                f"Rule {name!r}: give update, or reduction=(terms, scale, apply) in its place; "
                f"got {'both' if update is not None else 'neither'}")
        if reduction is not None:
            reduction = tuple(reduction) if isinstance(reduction, (tuple, list)) else (reduction,)
            if len(reduction) != 3:
                raise errors.HyperparameterError(
                    f"Rule {name!r}: reduction is (terms, scale, apply), three functions; got "
                    f"{len(reduction)} items")
        functions = [("coefficients", coefficients)] + (
            [("update", update)] if reduction is None
            else [(f"reduction's {k}", fn) for k, fn in zip(_REDUCTION_STAGE, reduction)]) + (
            [(f"row's {k}", fn) for k, fn in zip(_ROW_STAGE, row)] if row is not None else [])
        if idle is not None:
            if not isinstance(idle, IdleSteps):
                raise errors.HyperparameterError(f"Rule {name!r}: idle must be a sparseopt.IdleSteps; got {idle!r}")
            if reduction is not None or row is not None:
                raise errors.HyperparameterError(
                    f"Rule {name!r}: idle steps are exact mode's, which a rule with a "
                    f"{'reduction' if reduction is not None else 'row'} stage does not have")
            columns = idle.columns
            if not (isinstance(columns, tuple) and hasattr(columns, "_fields") and columns._fields[:1] == ("decay",)
                    and columns._fields[-1:] == ("count",) and columns.decay == _idle.DECAY):
                raise errors.HyperparameterError(
                    f"Rule {name!r}: idle's columns must come from sparseopt.idle_columns(...); got {columns!r}")
            functions += [(f"idle's {k}", getattr(idle, k)) for k in ("table_init", "table_step", "apply")] + (
                [("idle's is_identity", idle.is_identity)] if idle.is_identity is not None else [])
        for what, fn in functions:
            if not callable(fn):
                raise errors.HyperparameterError(f"Rule {name!r}: {what} must be a function; got {fn!r}")
        self.name, self.slots, self.row_slots = name, slots, row_slots
        self._coefficients, self._update, self.reduction, self.row = coefficients, update, reduction, row
        self.hyperparameters = _hyperparameters(name, coefficients)
        for (what, fn), forms in zip(functions[1:], _arguments(slots, row_slots, reduction, row, idle)):
            params = tuple(inspect.signature(fn).parameters)
            if len(params) not in [len(form) for form in forms]:
                raise errors.HyperparameterError(
                    f"Rule {name!r}: {what} takes ({', '.join(forms[0])}), {len(forms[0])} arguments; "
                    f"got ({', '.join(params)})")
        first = coefficients(1, **self.hyperparameters)
        values = first._asdict() if hasattr(first, "_asdict") else first
        if not isinstance(values, dict) or not values:
            raise errors.HyperparameterError(
                f"Rule {name!r}: coefficients must return a dict (or NamedTuple) of floats; got {first!r}")
        bad = [k for k in values if not isinstance(k, str) or not k.isidentifier() or keyword.iskeyword(k)]
        if bad:
            raise errors.HyperparameterError(f"Rule {name!r}: coefficient names must be identifiers; got {bad}")
        self.fields = tuple(values)
        if idle is not None:
            constant = tuple(idle.constant)
            unknown = [k for k in constant if k not in self.fields]
            if unknown:
                raise errors.HyperparameterError(
                    f"Rule {name!r}: idle's constant names coefficients; {unknown} are not among {self.fields}")
            idle = idle._replace(constant=constant)
        self.idle = idle
        self.variants, self.variant_for = _variants(name, variants, variant_for, [fn for _, fn in functions[1:]])
        self.module = _rule_module(self)

    def coefficients(self, step, hypers):
        """This step's coefficients as the rule's ``Coefficients`` (``hypers``: resolved floats)."""
        values = self._coefficients(step, **hypers)
        values = values._asdict() if hasattr(values, "_asdict") else values
        if not isinstance(values, dict) or tuple(values) != self.fields:
            got = tuple(values) if isinstance(values, dict) else values
            raise errors.HyperparameterError(
                f"Rule {self.name!r}: coefficients returned {got!r} at step {step}; "
                f"expected the fields {self.fields}, in that order")
        return self.module.Coefficients(*(float(values[k]) for k in self.fields))

    def optimizer_class(self, class_name=None):
        """An :class:`~sparseopt.Optimizer` subclass running this rule.

        Its constructor takes the hyperparameters (with ``coefficients``' defaults) and
        the base class's arguments (``name`` defaults to the rule's name); it saves and
        loads by ``class_name`` (default: the rule's name): pass it to
        :func:`sparseopt.load` as ``custom_objects={class_name: cls}``.
        """
        class_name = class_name or self.name
        rule = self
        base = RowwiseOptimizer if self.row is not None else Optimizer
        flags = tuple(k for k, d in self.hyperparameters.items() if isinstance(d, bool))
        hyper_names = tuple(k for k in self.hyperparameters if k not in flags)
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
                   for k, d in self.hyperparameters.items()]
        params += [inspect.Parameter("name", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=self.name),
                   inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
        signature = inspect.Signature(params)

        def __init__(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            values.pop("self")
            extra = values.pop("kwargs")
            if rule.reduction is not None and extra.get("sparse_mode") == "exact":
                raise errors.HyperparameterError(
                    f"{values['name']}: a rule with a reduction stage has no sparse_mode='exact': "
                    "the dense step of an idle row depends on sums over the whole variable; use "
                    "sparse_mode='lazy'")
            if rule.row is not None and extra.get("sparse_mode") == "exact":
                raise errors.HyperparameterError(
                    f"{values['name']}: a rule with per-row slots has no sparse_mode='exact' (exact "
                    "mode would replay its idle rows' steps, which the row stage's kernels do not); "
                    "use sparse_mode='lazy'")
            base.__init__(self, learning_rate=values.pop("learning_rate"), name=values.pop("name"), **extra)
            for key, value in values.items():
                setattr(self, key, value)

        __init__.__signature__ = signature

        def _coefficients(self, hypers, step):
            values = {k: getattr(self, k) if k in flags else hypers[k] for k in rule.hyperparameters}
            return rule.coefficients(step, values)

        def get_config(self):
            config = base.get_config(self)
            config.update({k: getattr(self, k) for k in flags})
            return config

        doc = (f"{class_name}: the optimizer of :class:`sparseopt.Rule` {self.name!r} (slots "
               f"{', '.join(self.slots) or 'none'}"
               f"{'; row slots ' + ', '.join(self.row_slots) if self.row_slots else ''}; hyperparameters "
               f"{', '.join(f'{k}={d!r}' for k, d in self.hyperparameters.items())}).")
        return type(class_name, (base,), {
            "__init__": __init__, "_coefficients": _coefficients, "get_config": get_config,
            "_rule": self.module, "_hyper_names": hyper_names,
            "_settings": {**base._settings, **{k: "flag" for k in flags}}, "rule": self, "__doc__": doc,
            "__module__": getattr(self._update, "__module__", __name__)})

    def __repr__(self):
        rows = f", row_slots={self.row_slots}" if self.row_slots else ""
        return f"Rule({self.name!r}, slots={self.slots}{rows}, hyperparameters={self.hyperparameters})"


def _arguments(slots, row_slots, reduction, row, idle=None):
    """The argument names each function after ``coefficients`` takes: its forms, the first the
    one to write (one argument per slot), then the first release's (three slot values, three row
    values) where the rule has fewer slots."""
    def former(names, prefix):
        return tuple(names) if len(names) >= _FORMER_SLOTS else tuple(f"{prefix}{i}" for i in range(_FORMER_SLOTS))

    s, r = tuple(slots), tuple(row_slots)
    if reduction is not None:
        out = [[("p", "g", *s, "c")], [("sum_t0", "sum_t1", "c")], [("p", "d", "scale", "c")]]
        if len(s) < _FORMER_SLOTS:
            out[0].append(("p", "g", *former(s, "s"), "c"))
        return out
    update = [("p", "g", *s, *r, "c")]
    if len(s) < _FORMER_SLOTS and (not r or len(r) < _FORMER_SLOTS):
        update.append(("p", "g", *former(s, "s"), *(former(r, "r") if r else ()), "c"))
    if idle is not None:
        apply = [("p", *s, "t", "c", "tol", "zero")] + (
            [("p", *former(s, "s"), "t", "c", "tol", "zero")] if len(s) < _FORMER_SLOTS else [])
        return [update, [("t",)], [("t", "t_next", "rec")], apply] + (
            [[("c", "wd")]] if idle.is_identity is not None else [])
    if row is None:
        return [update]
    row_update = [(*r, "mean", "c")] + ([(*former(r, "r"), "mean", "c")] if len(r) < _FORMER_SLOTS else [])
    return [update, [("p", "g", "c")], row_update]


def _variants(name, variants, variant_for, functions):
    """``(variants, variant_for)`` checked: names that are identifiers, each fixing constants that
    one of the rule's ``functions`` reads as a global (else the variant would change nothing)."""
    if variants is None and variant_for is None:
        return None, None
    if not isinstance(variants, dict) or not variants or not callable(variant_for):
        raise errors.HyperparameterError(
            f"Rule {name!r}: variants is a non-empty dict {{name: {{CONSTANT: value}}}}, given with "
            f"variant_for(c) -> name or None; got variants={variants!r}, variant_for={variant_for!r}")
    read = set()
    for fn in functions:
        code = getattr(fn, "__code__", None)
        read |= set(code.co_names) if code is not None else set()
    out = {}
    for key, constants in variants.items():
        if not (isinstance(key, str) and key.isidentifier()) or not isinstance(constants, dict) or not constants:
            raise errors.HyperparameterError(
                f"Rule {name!r}: variant {key!r} must be named by an identifier and fix a dict of constants; "
                f"got {constants!r}")
        unread = [k for k in constants if k not in read]
        if unread:
            raise errors.HyperparameterError(
                f"Rule {name!r}: variant {key!r} fixes {unread}, which none of the rule's functions reads")
        out[key] = dict(constants)
    return out, variant_for


def _slot_names(rule_name, what, names, taken=()):
    """``names`` as a tuple of distinct non-empty strings, none in ``taken``."""
    names = tuple(names)
    if (len(set(names)) != len(names) or set(names) & set(taken)
            or not all(isinstance(s, str) and s for s in names)):
        also = ", none of them also in slots" if taken else ""
        raise errors.HyperparameterError(f"Rule {rule_name!r}: {what} must be distinct names{also}; got {names!r}")
    return names


def _hyperparameters(name, coefficients):
    params = list(inspect.signature(coefficients).parameters.values())
    if not params or params[0].name != "step" or params[0].default is not inspect.Parameter.empty:
        raise errors.HyperparameterError(
            f"Rule {name!r}: coefficients' first parameter is step (no default), then the "
            "hyperparameters with their defaults")
    hypers = {}
    for p in params[1:]:
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.default is inspect.Parameter.empty:
            raise errors.HyperparameterError(
                f"Rule {name!r}: coefficients' hyperparameter {p.name!r} needs a default value")
        if p.name in _RESERVED or p.name.startswith("_"):
            raise errors.HyperparameterError(
                f"Rule {name!r}: {p.name!r} is an argument of every optimizer; name the hyperparameter otherwise")
        hypers[p.name] = p.default
    if "learning_rate" not in hypers:
        raise errors.HyperparameterError(f"Rule {name!r}: coefficients must take learning_rate")
    return hypers


def _source(fn):
    """What the cache key covers of a rule's function: its code (two lambdas on one line
    differ there), its source, and the source of its module (helpers it calls)."""
    code = fn.__code__
    parts = [repr((code.co_code, code.co_consts, code.co_names, code.co_varnames))]
    for target in (fn, inspect.getmodule(fn)):
        try:
            parts.append(inspect.getsource(target))
        except (OSError, TypeError):
            pass
    return "\0".join(parts)


def _as_member(fn, module):
    """``fn`` as a function of ``module`` (the same code and globals): what a variant's constants
    are fixed in (:func:`sparseopt.kernels._compile.variant`), as in a built-in rule module's."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__module__ = module.__name__
    copy.__qualname__, copy.__doc__ = fn.__qualname__, fn.__doc__
    return copy


def _rule_module(rule):
    """The rule as the kernels see a rule module (:mod:`sparseopt.rules`)."""
    module = types.ModuleType(f"sparseopt_rule_{rule.name}", f"The rule {rule.name!r} (sparseopt.Rule).")
    module.SLOTS = rule.slots
    module.Coefficients = collections.namedtuple(f"{rule.name}_coefficients", rule.fields)
    module.coefficients = rule._coefficients
    if rule.reduction is None:
        module.update = rule._update
        functions = [rule._update]
        if rule.row is not None:  # the row-reduction kernels' stage (sparseopt.rules, "Row-wise rules")
            module.ROW_SLOTS = rule.row_slots
            module.row_term, module.row_update = rule.row
            functions += list(rule.row)
    else:  # the kernels' reduction stage (sparseopt.rules, "Reduction rules")
        module.REDUCTION = True
        module.reduce_terms, module.reduce_scale, module.reduce_apply = rule.reduction
        functions = list(rule.reduction)
    idle = rule.idle
    if idle is not None:  # exact mode's closed form (sparseopt.rules._idle)
        module.COLUMNS, module.IDLE_COLUMNS, module.IDLE_CONSTANT = idle.columns, idle.columns.count, idle.constant
        module.idle_table_init, module.idle_table_step, module.idle_apply = idle.table_init, idle.table_step, idle.apply
        functions += [idle.table_init, idle.table_step, idle.apply]
        if idle.is_identity is not None:
            module.idle_is_identity = idle.is_identity
    if rule.variants is not None:  # compile-time variants (sparseopt.kernels._compile.variant)
        module.VARIANTS, module.variant_for = rule.variants, rule.variant_for
        for key, value in vars(module).items():
            if isinstance(value, types.FunctionType) and key != "variant_for" and key != "coefficients":
                setattr(module, key, _as_member(value, module))
        functions.append(rule.variant_for)
    digest = hashlib.sha1("\0".join([_source(fn) for fn in functions] + [
        repr(rule.variants and sorted((k, sorted(v.items())) for k, v in rule.variants.items())),
        _source(rule._coefficients), repr(rule.slots), repr(rule.row_slots), repr(rule.fields),
        repr(idle and (tuple(idle.columns), idle.columns._fields, idle.constant))]).encode())
    module.__rule_key__ = f"{rule.name}_{digest.hexdigest()[:10]}"
    return module
