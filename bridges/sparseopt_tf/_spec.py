"""What the bridge learns from the core: one ``OptimizerSpec`` per core optimizer.

The bridge holds no per-optimizer code. For every class listed in
``sparseopt.optimizers.__all__`` it reads the constructor's signature (arguments and
defaults) and the float hyperparameters (``_hyper_names``); a configured core instance
(:meth:`OptimizerSpec.make_core`) then answers the per-configuration questions through
its public ``step_config()`` (:class:`sparseopt.engine.StepConfig`: the rule, which
slots, their initial values and dtypes, the per-step ``Coefficients``). A new core
optimizer therefore appears in ``sparseopt_tf`` and ``sparseopt_tf.legacy`` without any
change here.
"""

import inspect
from dataclasses import dataclass

import sparseopt.optimizers as core_optimizers
from sparseopt.optimizer import Optimizer as CoreOptimizer

# Arguments of the core base class that the Keras classes own under their own names.
_BASE_ARGS = ("self", "learning_rate", "name", "kwargs", "weight_decay", "clipnorm",
              "clipvalue", "global_clipnorm", "gradient_aggregator",
              "gradient_transformers", "sparse_mode")


@dataclass(frozen=True)
class OptimizerSpec:
    """A core optimizer class, as the bridge sees it.

    Attributes:
        name: the class name (``"Adam"``).
        core_class: the core class (``sparseopt.Adam``).
        default_name: the default ``name`` argument (``"adam"``).
        default_learning_rate: the default learning rate.
        args: ``(argument, default)`` of the optimizer's own arguments, in order
            (``beta_1``, ``amsgrad``, ...), hyperparameters and structural ones alike.
        hyper_names: those of ``args`` that are float hyperparameters (they may be
            tensors, callables or schedules in the bridge).
    """

    name: str
    core_class: type
    default_name: str
    default_learning_rate: float
    args: tuple
    hyper_names: tuple
    default_weight_decay: object = None
    explicit_weight_decay: bool = False

    def unsupported(self):
        """Why the bridge cannot run this optimizer (None when it can: every core
        optimizer today; host state such as Nadam's ``u_product`` lives in TensorFlow
        variables of the optimizer, and row-wise rules run the row-reduction kernels)."""
        return None

    def make_core(self, learning_rate, name, values, weight_decay=None, legacy=False,
                  sparse_mode="lazy", exact_history=None, rounding=None):
        """A configured core instance; non-float hyperparameters get their defaults.

        The instance is never stepped: it validates the configuration (``sparse_mode``,
        ``exact_history`` and the 16-bit ``rounding`` arguments, :data:`ROUNDING_ARGS`,
        included), and its ``step_config()`` (:class:`sparseopt.engine.StepConfig`) answers
        the rest: the rule, the kept slots and their initial values, the coefficients of a
        step, the host state, the checks, and the step itself.
        """
        kwargs = {}
        for arg, default in self.args:
            value = values.get(arg, default)
            if arg in self.hyper_names and not _is_plain_number(value):
                value = default
            kwargs[arg] = value
        if not _is_plain_number(learning_rate):
            learning_rate = self.default_learning_rate
        if self.explicit_weight_decay:
            kwargs["weight_decay"] = weight_decay if _is_plain_number(weight_decay) else self.default_weight_decay
        elif legacy and weight_decay is not None:
            # OptimizerV2 has no weight decay: the legacy classes keep a given one in the
            # core (which checks it), decoupled and fused into the kernels as in Keras 3.
            kwargs["weight_decay"] = weight_decay
        if legacy and getattr(self.core_class, "_has_legacy_math", False):
            kwargs["_legacy"] = True     # the rule's tf_keras variant (coefficients(..., legacy=True))
        return self.core_class(learning_rate=learning_rate, name=name, sparse_mode=sparse_mode,
                               exact_history=exact_history, **(rounding or {}), **kwargs)


def signed_init(init, spec):
    """``init`` (a bridge base class's ``__init__``) with the signature of ``spec``'s class:
    ``learning_rate``, then the core optimizer's own arguments with their defaults, then
    ``**kwargs`` (what ``inspect.signature`` and Keras' ``get_config`` checks show)."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
              inspect.Parameter("learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                default=spec.default_learning_rate)]
    params += [inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for a, d in spec.args]
    params += [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
    __init__.__signature__ = inspect.Signature(params)
    __init__.__qualname__ = f"{spec.name}.__init__"
    return __init__


#: The core's arguments for 16-bit variables (bfloat16, float16), which both bridges take
#: as keyword arguments: ``stochastic_rounding`` (default True), ``slot_dtype`` (None:
#: float32 slots; ``"bfloat16"``) and ``seed`` (of the rounding's random bits, default 0).
ROUNDING_ARGS = ("stochastic_rounding", "slot_dtype", "seed")


def pop_rounding(kwargs):
    """The :data:`ROUNDING_ARGS` given in ``kwargs``, taken out of it."""
    return {k: kwargs.pop(k) for k in ROUNDING_ARGS if k in kwargs}


def rounding_config(core):
    """The core's config entries of :data:`ROUNDING_ARGS` (only those not at their defaults,
    so that a float32 user's config keeps Keras' keys)."""
    config = core.get_config()
    return {k: config[k] for k in ROUNDING_ARGS if k in config}


def _is_plain_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checked_core_class(core_class, who):
    """``core_class`` if it is a core optimizer class with a rule (what ``keras_optimizer``
    and ``legacy.keras_optimizer`` take), else a TypeError naming ``who``."""
    if not (isinstance(core_class, type) and issubclass(core_class, CoreOptimizer)
            and core_class._rule is not None):
        raise TypeError(f"{who}: expected a subclass of sparseopt.Optimizer with a rule; got {core_class!r}")
    return core_class


def spec_of(core_class):
    """The ``OptimizerSpec`` of a core optimizer class (built-in or a user's)."""
    params = inspect.signature(core_class.__init__).parameters
    args = tuple((p.name, p.default) for p in params.values()
                 if p.name not in _BASE_ARGS and p.kind is not inspect.Parameter.VAR_KEYWORD)
    hyper_names = tuple(h for h in core_class._hyper_names if h != "learning_rate")
    missing = [h for h in hyper_names if h not in dict(args)]
    if missing:
        raise TypeError(f"sparseopt_tf: {core_class.__name__}'s hyperparameters {missing} "
                        "are not constructor arguments")
    wd = params.get("weight_decay")
    return OptimizerSpec(
        default_weight_decay=None if wd is None else wd.default,
        explicit_weight_decay=wd is not None,
        name=core_class.__name__,
        core_class=core_class,
        default_name=params["name"].default,
        default_learning_rate=params["learning_rate"].default,
        args=args,
        hyper_names=hyper_names,
    )


def optimizer_specs():
    """``{class name: OptimizerSpec}`` for every optimizer the core exports."""
    return {name: spec_of(getattr(core_optimizers, name)) for name in core_optimizers.__all__}


def bind_arguments(class_name, spec, args, kwargs):
    """``{name: value}`` of the positional ``args`` and of the keyword arguments named in
    ``spec`` (``learning_rate`` first, then the core optimizer's own), taken out of ``kwargs``."""
    names = ["learning_rate"] + [a for a, _ in spec.args]
    if len(args) > len(names):
        raise TypeError(f"{class_name} takes at most {len(names)} positional "
                        f"arguments ({', '.join(names)}); got {len(args)}")
    values = dict(zip(names, args))
    for key in names:
        if key in kwargs:
            if key in values:
                raise TypeError(f"{class_name}: got two values for {key!r}")
            values[key] = kwargs.pop(key)
    return values
