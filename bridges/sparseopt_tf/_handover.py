"""Every hand-over between TensorFlow variables and the arrays the kernels update.

The problem: the Numba kernels update arrays in place, and a sparse step must cost
O(touched rows). Copying a table out of a ``tf.Variable`` and assigning it back
would cost O(table) per step, so the kernels must write into the variable's own
buffer. Three facts of TensorFlow's resource variables (verified in
``tests/tf/test_handover.py``) make that possible and safe:

1. ``ReadVariableOp`` on a CPU variable returns a tensor that *aliases* the
   variable's buffer, unless the variable is in *copy-on-read* mode (any sparse op,
   such as ``ResourceGather`` or ``ResourceScatterUpdate``, switches a variable to
   that mode; reads then copy the whole buffer).
2. Every TensorFlow write is copy-on-write: before writing in place it checks that
   the variable is the buffer's only owner and otherwise copies the buffer first, so
   a tensor read earlier (a *snapshot*) never changes.
3. ``tf.numpy_function`` hands CPU tensors to Python as NumPy arrays that alias
   their buffers, and ``np.from_dlpack`` does the same for eager tensors.

The hand-over of one variable (and of each of its slots) is therefore:

* **claim**: ``ResourceScatterUpdate`` with no rows. Like every TensorFlow sparse
  write it first makes the variable the sole owner of its buffer (copying the
  buffer only if a snapshot still aliases it; TensorFlow's own writes pay exactly
  this), then switches on copy-on-read mode. It writes no element;
* ``DisableCopyOnRead``, so that the next read aliases the now exclusive buffer;
* ``ReadVariableOp``: the live buffer, shared only by the variable and this tensor;
* the kernels write through a NumPy view of that tensor; no snapshot can see it,
  because step 1 left none;
* in a graph, a second ``DisableCopyOnRead`` under a control dependency on the
  kernels' ``numpy_function``: a resource op that automatic control dependencies
  treat as a write, so every later read or write of the variable in the function
  waits for the kernels, and the claim waits for every earlier read and write.

In a graph the claims also wait for every gradient tensor: a forward pass that read
the variable (Keras 3's ``Embedding`` gathers from a ``ReadVariableOp``) keeps that
read alive until the backward pass has used it, and a claim made before would find
the buffer shared and copy the whole table.

Eagerly the same ops run one after the other and the kernels are called directly.
:func:`run_step` hands over a step's variables; exact mode's catch-ups and flushes
(:mod:`sparseopt_tf._exact`) use the same hand-over, :func:`run_on_host`.
No step of this allocates or touches the whole table; the claim copies it only when
the user holds a snapshot, as TensorFlow itself would. Views are made afresh each
step and dropped at its end, so a view never outlives the buffer it points to (no
stale alias after TensorFlow replaces a variable's buffer, e.g. on ``assign``).

Devices: the kernels are CPU kernels. A variable on another device is refused with
a clear error (the CUDA kernels of the core are the future path). XLA cannot
compile ``numpy_function``: a step traced for XLA (``jit_compile=True``) raises
:class:`XlaNotSupportedError` naming the fix.
"""

import threading

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util

from sparseopt import errors
from sparseopt.kernels import lowp

#: The variable dtypes the kernels update: 16-bit ones with float32 math and rounding
#: (:mod:`sparseopt.kernels.lowp`).
DTYPES = (tf.float32, tf.float64, tf.bfloat16, tf.float16)


class XlaNotSupportedError(errors.SparseoptError, ValueError):
    """The step is being compiled by XLA, which cannot run the Numba kernels."""


class DeviceNotSupportedError(errors.SparseoptError, ValueError):
    """A variable on a device whose memory the CPU kernels cannot address."""


class NotAVariableError(errors.SparseoptError, TypeError, NotImplementedError):
    """A tensor (or anything else) given where a variable belongs: only variables can be
    updated. (A ``NotImplementedError`` too, as ``tf_keras``' optimizers raise one.)"""


class StrategyNotSupportedError(errors.SparseoptError, ValueError):
    """A ``tf.distribute`` strategy under which the kernels cannot run (parameter servers)."""


def check_variables(optimizer_name, variables):
    """Raise :class:`NotAVariableError` unless every entry of ``variables`` is a variable
    (a ``tf.Variable``, a distributed one, or a Keras 3 variable); before anything is written."""
    for i, v in enumerate(variables):
        if _is_keras_variable(v) or isinstance(v, tf.Variable) or hasattr(v, "_distributed_container"):
            continue
        what = getattr(v, "name", None) if isinstance(v, tf.Tensor) and not tf.executing_eagerly() else None
        raise NotAVariableError(
            f"{optimizer_name}: entry {i} of the variables is not a variable but a {type(v).__name__}"
            + (f" ({what!r})" if what else "")
            + "; an optimizer updates variables in place. Pass the tf.Variable "
            "(or Keras variable) itself, not a tensor read from it.")


def check_strategy(optimizer_name):
    """Raise :class:`StrategyNotSupportedError` under a ``ParameterServerStrategy``.

    The kernels run in a ``tf.numpy_function``, whose Python callback exists only in the
    process that traced it (the coordinator), while a parameter-server strategy places
    the variables, and so the update ops, on the parameter servers' processes.
    """
    if not tf.distribute.has_strategy():
        return
    strategy = tf.distribute.get_strategy()
    if isinstance(strategy, _PARAMETER_SERVER_STRATEGIES):
        raise StrategyNotSupportedError(
            f"{optimizer_name}: {type(strategy).__name__} is not supported: the variables live "
            "on the parameter servers, which cannot run sparseopt's kernels (a "
            "tf.numpy_function runs only in the process that traced it). Use "
            "MirroredStrategy or MultiWorkerMirroredStrategy (each worker keeps every table "
            "and updates it in place), or no strategy.")


_PARAMETER_SERVER_STRATEGIES = (tf.distribute.experimental.ParameterServerStrategy,
                                tf.compat.v1.distribute.experimental.ParameterServerStrategy)


class Ref:
    """A variable as the hand-over sees it: handle, dtype, shape, name, device.

    Accepts a ``tf.Variable`` (also a per-device component of a distributed one, or a
    distributed one inside ``strategy.extended.update``) or a Keras 3 variable.
    """

    __slots__ = ("handle", "dtype", "shape", "name", "device")

    def __init__(self, variable):
        variable = getattr(variable, "value", variable) if _is_keras_variable(variable) else variable
        self.handle = variable.handle
        self.dtype = tf.as_dtype(variable.dtype)
        self.shape = tf.TensorShape(variable.shape)
        self.name = getattr(variable, "name", "variable")
        self.device = self.handle.device or ""


def _is_keras_variable(v):
    try:
        import keras
    except ImportError:  # pragma: no cover
        return False
    return isinstance(v, keras.Variable)


def check_traceable(optimizer_name):
    """Raise :class:`XlaNotSupportedError` when the current graph is compiled by XLA."""
    if tf.executing_eagerly():
        return
    graph = tf.compat.v1.get_default_graph()
    in_xla = control_flow_util.GraphOrParentsInXlaContext(graph)
    g = graph
    while not in_xla and g is not None:
        in_xla = bool(getattr(g, "_xla_compile", False) or getattr(g, "_jit_compile", False))
        g = getattr(g, "outer_graph", None)
    if in_xla:
        raise XlaNotSupportedError(
            f"{optimizer_name}: sparseopt_tf runs Numba kernels through tf.numpy_function, which "
            "XLA cannot compile. Compile the model with jit_compile=False "
            "(model.compile(..., jit_compile=False)) or call the step from a tf.function "
            "without jit_compile=True.")


def _check_device(ref, optimizer_name):
    device = ref.device.upper()
    if device and "CPU" not in device:
        raise DeviceNotSupportedError(
            f"{optimizer_name}: {ref.name!r} lives on {ref.device}; sparseopt_tf's kernels update "
            "CPU variables in place. Place the embedding tables and the optimizer's variables on "
            "the CPU (with tf.device('/CPU:0')).")
    if ref.dtype not in DTYPES:
        raise errors.DtypeMismatchError(
            f"{optimizer_name}: {ref.name!r} has dtype {ref.dtype.name}; sparseopt_tf updates "
            "float32, float64, bfloat16 and float16 variables")


def _claim(ref):
    """The claim ops (see the module docstring); returns a tensor aliasing the exclusive buffer.

    The three ops are chained by explicit control dependencies: a ``tf.function`` would
    order them by its automatic control dependencies, but a TF1 graph
    (``tf.compat.v1.Session``, ``get_updates``) has none, and there a read that ran
    before the claim would alias a buffer that another tensor still shares.
    """
    if ref.shape.rank == 0:
        # A scatter needs a row axis; a scalar is claimed by assigning it a fresh copy.
        fresh = tf.raw_ops.DeepCopy(x=tf.raw_ops.ReadVariableOp(resource=ref.handle, dtype=ref.dtype))
        claim = tf.raw_ops.AssignVariableOp(resource=ref.handle, value=fresh)
    else:
        claim = tf.raw_ops.ResourceScatterUpdate(
            resource=ref.handle, indices=tf.zeros([0], tf.int32),
            updates=tf.zeros([0] + ref.shape.as_list()[1:], ref.dtype))
    with tf.control_dependencies([claim]):
        exclusive = tf.raw_ops.DisableCopyOnRead(resource=ref.handle)
    with tf.control_dependencies([exclusive]):
        return tf.raw_ops.ReadVariableOp(resource=ref.handle, dtype=ref.dtype)


class _Buffer:
    """Exposes a writable ``__array_interface__`` over memory kept alive by ``owner``."""

    __slots__ = ("__array_interface__", "owner")

    def __init__(self, interface, owner):
        self.__array_interface__ = interface
        self.owner = owner


def writable_view(array, owner=None):
    """A writable NumPy view of ``array``'s memory (which this step owns exclusively)."""
    if array.flags.writeable:
        return array
    interface = dict(array.__array_interface__)
    interface["data"] = (interface["data"][0], False)
    # (the interface of a bfloat16 array says only "2-byte void": view it as the dtype again)
    return np.asarray(_Buffer(interface, (array, owner))).view(array.dtype)


def eager_view(tensor):
    """A writable NumPy view aliasing an eager CPU tensor's buffer (no copy)."""
    return writable_view(eager_array(tensor), tensor)


def eager_array(tensor):
    """A NumPy array aliasing an eager CPU tensor's buffer (no copy; maybe read-only).

    DLPack has no bfloat16 for NumPy: a bfloat16 tensor goes through its ``uint16``
    bitcast (an alias of the same buffer, as ``tf.numpy_function``'s bfloat16 arrays
    are) and is viewed as ``ml_dtypes.bfloat16``."""
    if tensor.dtype == tf.bfloat16:
        return np.from_dlpack(tf.bitcast(tensor, tf.uint16)).view(lowp.BFLOAT16)
    return np.from_dlpack(tensor)


def constrain_rows(ref, indices, fn):
    """Replace the rows ``indices`` of a variable by ``fn(rows)``, in O(rows).

    A constraint of a sparsely updated variable (``tf.Variable.constraint``) runs on the
    touched rows only. ``ResourceGather`` and ``ResourceScatterUpdate`` switch the variable
    to copy-on-read mode (copying the buffer only if a snapshot aliases it, as any
    TensorFlow write would); ``DisableCopyOnRead`` then switches it back, so that later
    reads still alias the buffer. In a graph, every op here is a resource op of the
    variable and runs after the kernels' own ``DisableCopyOnRead``.
    """
    rows, _ = tf.unique(indices)
    current = tf.raw_ops.ResourceGather(resource=ref.handle, indices=rows, dtype=ref.dtype)
    new = tf.cast(tf.convert_to_tensor(fn(current)), ref.dtype)
    write = tf.raw_ops.ResourceScatterUpdate(resource=ref.handle, indices=rows, updates=new)
    with tf.control_dependencies([write]):
        return tf.raw_ops.DisableCopyOnRead(resource=ref.handle)


#: Counts of hand-overs by kind, for tests and diagnostics.
stats = {"eager": 0, "graph": 0}
_stats_lock = threading.Lock()


def run_step(host_step, jobs, refs_per_job, grads, scalars, optimizer_name):
    """Run one optimizer step on TensorFlow variables, in place.

    Args:
        host_step: a :class:`sparseopt_tf._host.HostStep`.
        jobs: the :class:`sparseopt_tf._host.Job` of each pair.
        refs_per_job: per job, the :class:`Ref` of the variable then of its slots.
        grads: per job, a dense ``tf.Tensor`` or a ``tf.IndexedSlices``.
        scalars: a float64 tensor ``[step, weight_decay * lr, *hyperparameters]``.
        optimizer_name: for error messages.

    Returns:
        ``None`` eagerly; in a graph, an op that completes after the update.
    """
    inputs = [tf.cast(scalars, tf.float64)]
    ready = []       # every tensor of the gradients, dense_shape included (see run_on_host)
    for job, refs, g in zip(jobs, refs_per_job, grads):
        if job.sparse:
            job_grads = [tf.convert_to_tensor(g.values), tf.convert_to_tensor(g.indices)]
            if g.dense_shape is not None:
                ready.append(tf.convert_to_tensor(g.dense_shape))
        else:
            job_grads = [tf.convert_to_tensor(g)]
        ready += job_grads
        inputs += list(refs) + job_grads

    def body(arrays):
        return host_step(jobs, arrays[0], arrays[1:])

    return run_on_host(body, inputs, optimizer_name, "step", ready=ready)


def run_on_host(body, inputs, optimizer_name, what, ready=()):
    """Run ``body(arrays)`` on the host, with the variables of ``inputs`` handed over.

    Args:
        body: called with one NumPy array per input: a writable view of the buffer of
            each :class:`Ref` (claimed, see the module docstring), the values of each
            tensor. It must validate everything before its first write.
        inputs: :class:`Ref` and ``tf.Tensor`` objects, in the order ``body`` takes them.
        optimizer_name: for error messages.
        what: names the ``numpy_function`` op (``{optimizer_name}_sparseopt_{what}``).
        ready: tensors the claims wait for in a graph. A step passes every tensor of its
            gradients: a forward pass's read of a variable (Keras 3's ``Embedding`` gathers
            from a ``ReadVariableOp``) aliases its buffer until the backward pass has
            consumed it (the gather's gradient takes its shape), and a claim made while it
            is alive would copy the whole table, as any TensorFlow write would. Once every
            gradient tensor exists those reads are done, and the claim is free.

    Returns:
        ``None`` eagerly (``body`` has run); in a graph, an op that completes after it.
    """
    check_traceable(optimizer_name)
    check_strategy(optimizer_name)
    for x in inputs:
        if isinstance(x, Ref):
            _check_device(x, optimizer_name)

    if tf.executing_eagerly():
        arrays = []
        keep = []
        for x in inputs:
            t = _claim(x) if isinstance(x, Ref) else x
            keep.append(t)
            arrays.append(eager_view(t) if isinstance(x, Ref) else eager_array(t))
        with _stats_lock:
            stats["eager"] += 1
        body(arrays)
        del arrays, keep
        return None

    refs = [x for x in inputs if isinstance(x, Ref)]
    # A 0-d tensor reaches numpy_function as a copy, never as a view of its buffer: a
    # scalar variable travels as a (1,)-shaped reshape, which aliases the buffer, and
    # the body gets a 0-d view of that.
    scalar = [isinstance(x, Ref) and x.shape.rank == 0 for x in inputs]
    with tf.control_dependencies(list(ready)):
        tensors = [_claim(x) if isinstance(x, Ref) else x for x in inputs]
    tensors = [tf.reshape(t, [1]) if s else t for t, s in zip(tensors, scalar)]

    def graph_body(*arrays):
        with _stats_lock:
            stats["graph"] += 1
        body([writable_view(a).reshape(()) if s else writable_view(a)
              for a, s in zip(arrays, scalar)])
        return np.int32(0)

    token = tf.numpy_function(graph_body, tensors, Tout=tf.int32, stateful=True,
                              name=f"{optimizer_name}_sparseopt_{what}")
    token.set_shape([])
    with tf.control_dependencies([token]):
        done = [tf.raw_ops.DisableCopyOnRead(resource=ref.handle) for ref in refs]
    return tf.group(done)
