"""Saving and resuming: an optimizer's configuration and state (and its variables) in one file.

:func:`save` writes, to one ``.npz`` file (a zip of ``.npy`` arrays, readable with
``numpy.load``; no pickle):

* a JSON header: the optimizer's class name, its :meth:`~sparseopt.Optimizer.get_config`
  (schedules serialized by their ``get_config``), and the name, shape and dtype of
  every array below;
* the optimizer's state, :meth:`~sparseopt.Optimizer.get_weights`: ``iterations``,
  the host state some optimizers keep (Nadam's ``u_product``), then every slot in
  creation order;
* optionally the variables themselves (a list or a dict of arrays). A bfloat16 array
  (``ml_dtypes.bfloat16``, which ``.npy`` files cannot name) is stored as its ``uint16``
  bits and comes back as bfloat16: the header keeps its dtype.

The file is replaced atomically: it is written to a temporary file in the same
directory, flushed to disk (``fsync``), then renamed over the old one, so a crash
or an error mid-write leaves the previous file intact (and, after an error, no
temporary file behind). A process killed mid-write cannot remove its temporary file
(``.<name>.sparseopt-<pid>-<random>.tmp``): the next save to the same file removes
those whose process is gone. A path that is a symbolic link is written through: the
link's target is replaced (in the target's directory), the link stays.

:func:`load` reads it back: it checks everything (the file's integrity, the optimizer
class, the number, shapes and dtypes of the slots and variables) before it writes
anything, raises :class:`~sparseopt.errors.ConfigError` or
:class:`~sparseopt.errors.WeightsMismatchError` naming the problem, and on success the
optimizer continues exactly (bit for bit) where the saved one stopped.

Example:
    >>> import numpy as np, os, tempfile, sparseopt as so
    >>> table = np.zeros((1000, 4), np.float32)
    >>> opt = so.Adam(0.01)
    >>> _ = opt.apply_gradients([(so.IndexedSlices(np.ones((2, 4), np.float32), [3, 7]), table)])
    >>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
    >>> so.save(path, opt, variables={"table": table})
    >>> opt2, variables = so.load(path)          # a new optimizer and new arrays
    >>> opt2.iterations, type(opt2).__name__, round(float(variables["table"][3, 0]), 4)
    (1, 'Adam', -0.01)
"""

import copy
import json
import os
import tempfile
import zipfile

import numpy as np

from sparseopt import backends, errors
from sparseopt.kernels import lowp
from sparseopt.optimizer import Optimizer

FORMAT = "sparseopt.save"
VERSION = 1
_HEADER = "header"


# ------------------------------------------------------------------------- save


def save(path, optimizer, variables=None):
    """Save ``optimizer`` (class, config, state) and optionally ``variables`` to one file.

    Args:
        path: the file to write (any name; ``.npz`` is customary). An existing file
            is replaced atomically; a symbolic link is written through to its target.
        optimizer: a :class:`sparseopt.Optimizer`.
        variables: optional arrays to save with it: a list, or a dict from names to
            arrays (NumPy or CUDA arrays; CUDA arrays are copied to the host). Saving
            the variables the optimizer updates lets :func:`load` rebuild both.

    Hyperparameters that are no-argument callables are saved as their current value
    (as ``get_config`` does); schedules are saved by their ``get_config``. Settings
    outside the config (``exclude_from_weight_decay``, ``gradient_aggregator``,
    ``gradient_transformers``) are not saved: set them again after loading.

    Raises:
        TypeError: ``optimizer`` is not a sparseopt optimizer, or ``variables`` is
            neither a list nor a dict.
        OSError: the file could not be written (the old file, if any, is intact).
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"sparseopt.save: expected a sparseopt.Optimizer; got {type(optimizer).__name__} "
                        "(Keras optimizers of sparseopt_tf save with tf.train.Checkpoint or model.save)")
    kind, names, var_arrays = _flatten(variables, "sparseopt.save")
    config = optimizer.get_config()
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise errors.ConfigError(f"sparseopt.save: {optimizer.name}: the config is not JSON-serializable "
                                 f"({exc}); a custom schedule's get_config must return plain values") from None
    weights = optimizer.get_weights()
    labels = _weight_labels(optimizer)
    host_vars = [backends.host_array(v) for v in var_arrays]
    by_id = {id(v): i for i, v in enumerate(var_arrays)}
    states = list(optimizer._states.values())
    header = {
        "format": FORMAT, "version": VERSION,
        "class_name": type(optimizer).__name__, "module": type(optimizer).__module__,
        "config": config,
        "weights": [_describe(label, w) for label, w in zip(labels, weights)],
        "variables": None if kind is None else {
            "kind": kind, "names": names, "arrays": [_describe(n, v) for n, v in zip(names, host_vars)]},
        # For each variable the optimizer keeps state for (in build order): its name,
        # and its position among the saved variables (None when it was not saved).
        "states": [{"name": s.name, "shape": list(s.var.shape), "dtype": str(s.storage.dtype),
                    "variable": by_id.get(id(s.var))} for s in states],
    }
    arrays = {_HEADER: np.frombuffer(json.dumps(header).encode("utf-8"), np.uint8)}
    arrays.update({f"weight_{i}": _storable(w) for i, w in enumerate(weights)})
    arrays.update({f"variable_{i}": _storable(v) for i, v in enumerate(host_vars)})
    _atomic_write(os.fspath(path), arrays)


def _write_npz(file, arrays):
    """Write ``arrays`` to the open binary ``file`` (the one writer :func:`save` uses)."""
    np.savez(file, **arrays)


_TMP_TAG = ".sparseopt-"


def _atomic_write(path, arrays):
    path = os.path.realpath(path)  # a symbolic link: replace its target, keep the link
    directory = os.path.dirname(path)
    base = os.path.basename(path)
    _remove_stale_temporaries(directory, base)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}{_TMP_TAG}{os.getpid()}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _write_npz(f, arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


def _remove_stale_temporaries(directory, base):
    """Remove the temporary files of earlier saves to ``base`` whose process is gone
    (killed mid-write). POSIX only: elsewhere a process cannot be probed safely."""
    if os.name != "posix":
        return
    prefix = f".{base}{_TMP_TAG}"
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_exists(int(pid)):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or an unexpected answer: keep its file
        return True
    return True


def _file_mode(path):
    """The old file's permissions, or those a new file gets (mkstemp's are 0600)."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_directory(directory):
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------- load


def load(path, optimizer=None, variables=None, custom_objects=None):
    """Load what :func:`save` wrote; returns ``(optimizer, variables)``.

    Args:
        path: the file.
        optimizer: the optimizer to load the state into, or None to create one from
            the saved class and config. A given optimizer must be of the saved class;
            it keeps its own hyperparameters (build it from the same config to continue
            the saved run exactly). If it is not built yet, it is built with the
            variables, in the saved order.
        variables: the arrays to load the saved variables into, in place (a list or a
            dict like the one saved), or None to get new NumPy arrays (when variables
            were saved).
        custom_objects: ``{name: class}`` for classes outside sparseopt: a custom
            optimizer class or learning rate schedule.

    Returns:
        ``(optimizer, variables)``: the optimizer with the saved state, and the
        variables (the given ones, or new arrays; None when none were saved or given).

    Raises:
        ConfigError: the file is not a readable sparseopt save (corrupted, truncated,
            another format or version, a header edited into another structure), names another optimizer class than the given
            one, or its config cannot be loaded; or the optimizer cannot be built
            because a variable it kept state for was not saved.
        WeightsMismatchError: the number, shapes or dtypes of the saved slots or
            variables differ from the optimizer's or the given variables'.

    On any error nothing is written: the optimizer and the variables are as they were.
    """
    header, weights, saved_vars = _read(os.fspath(path))
    source = os.fspath(path)
    if optimizer is None:
        optimizer = _from_config(header, custom_objects, source)
    elif not isinstance(optimizer, Optimizer):
        raise TypeError(f"sparseopt.load: expected a sparseopt.Optimizer; got {type(optimizer).__name__}")
    elif type(optimizer).__name__ != header["class_name"]:
        raise errors.ConfigError(
            f"{source}: holds the state of a {header['class_name']} optimizer; got a "
            f"{type(optimizer).__name__} ({optimizer.name!r})")

    saved_info = header["variables"]
    if variables is not None:
        if saved_info is None:
            raise errors.ConfigError(f"{source}: no variables were saved; load it with variables=None")
        kind, names, targets = _flatten(variables, "sparseopt.load")
        _check_variables(source, saved_info, kind, names, targets)
    else:
        targets = None
        # The file's arrays become the variables (and the optimizer is built with them).
        saved_vars = [v if v.flags.writeable and v.flags.c_contiguous else np.array(v) for v in saved_vars]

    built = bool(optimizer._states)
    if built and targets is None and saved_info is not None:
        # A built optimizer's own variables take the saved values; any other saved
        # variable comes back as a new array.
        states = list(optimizer._states.values())
        targets = list(saved_vars)
        for saved_state, state in zip(header["states"], states):
            if saved_state["variable"] is not None:
                targets[saved_state["variable"]] = state.var
        _check_variables(source, saved_info, saved_info["kind"], list(saved_info["names"]), targets)
    if built:
        _check_weights(source, header, weights, optimizer.variables(), _weight_labels(optimizer))
        if targets is not None:
            _check_built_with(source, header, optimizer, targets)
    else:
        # Build it with the variables, in the saved order, and compare; undo the build
        # if anything differs (building reads no variable, it only allocates slots).
        build_vars = _build_list(source, header, targets if targets is not None else saved_vars)
        before = {k: (copy.copy(v) if isinstance(v, (dict, list, set)) else v)
                  for k, v in vars(optimizer).items()}
        try:
            optimizer.build(build_vars, names=[s["name"] for s in header["states"]])
            _check_weights(source, header, weights, optimizer.variables(), _weight_labels(optimizer))
        except BaseException:
            vars(optimizer).clear()
            vars(optimizer).update(before)
            raise

    # Every check has passed: from here on nothing can fail.
    if targets is None:
        result_arrays = saved_vars if saved_info is not None else None
    else:
        for target, value in zip(targets, saved_vars):
            backends.backend_for(target).copy_from_host(target, value)
        result_arrays = targets
    optimizer.set_weights(weights)
    if variables is not None or result_arrays is None:
        return optimizer, variables
    if saved_info["kind"] == "dict":
        return optimizer, dict(zip(saved_info["names"], result_arrays))
    return optimizer, result_arrays


def _read(path):
    """The header, the weights and the variables of a save, fully read and checked for integrity."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if _HEADER not in data.files:
                raise errors.ConfigError(f"{path}: not a sparseopt save (no header; it holds {data.files[:5]})")
            header = json.loads(data[_HEADER].tobytes().decode("utf-8"))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                found = header.get("format") if isinstance(header, dict) else type(header).__name__
                raise errors.ConfigError(f"{path}: not a sparseopt save (format {found!r})")
            if header.get("version") != VERSION:
                raise errors.ConfigError(f"{path}: saved in format version {header.get('version')}; "
                                         f"this sparseopt reads version {VERSION}")
            _check_header(path, header)
            weights = [_restored(d, data[f"weight_{i}"]) for i, d in enumerate(header["weights"])]
            info = header["variables"]
            saved_vars = [_restored(d, data[f"variable_{i}"]) for i, d in enumerate(info["arrays"])] if info else []
    except errors.ConfigError:
        raise
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile,
            UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise errors.ConfigError(f"{path}: not a readable sparseopt save (corrupted or truncated?): "
                                 f"{type(exc).__name__}: {exc}") from None
    if weights[0].shape != () or weights[0].dtype.kind not in "iu" or int(weights[0]) < 0:
        raise errors.ConfigError(f"{path}: corrupted: iterations is {weights[0]!r}; "
                                 "expected an integer >= 0")
    for label, described, array in (
            [("weight", d, w) for d, w in zip(header["weights"], weights)]
            + [("variable", d, v) for d, v in zip((info or {}).get("arrays", []), saved_vars)]):
        if list(array.shape) != described["shape"] or str(array.dtype) != described["dtype"]:
            raise errors.ConfigError(f"{path}: corrupted: {label} {described['name']!r} is {array.dtype} "
                                     f"{array.shape}; the header says {described['dtype']} {described['shape']}")
    return header, weights, saved_vars


def _check_header(path, header):
    """Every field :func:`load` reads, of the type it expects (a hand-edited header with a
    valid checksum gets a ``ConfigError``, never an AttributeError or KeyError)."""
    def bad(what):
        raise errors.ConfigError(f"{path}: corrupted header: {what}")

    def described(d, label):
        if not (isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("dtype"), str)
                and isinstance(d.get("shape"), list)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in d["shape"])):
            bad(f"{label} must be {{'name': str, 'shape': [int >= 0, ...], 'dtype': str}}; got {d!r:.200}")

    if not isinstance(header.get("class_name"), str):
        bad(f"class_name must be a string; got {header.get('class_name')!r:.100}")
    if not isinstance(header.get("config"), dict):
        bad(f"config must be a dict; got {type(header.get('config')).__name__}")
    weights = header.get("weights")
    if not isinstance(weights, list) or not weights:
        bad("weights must be a non-empty list (iterations first)")
    for i, d in enumerate(weights):
        described(d, f"weights[{i}]")
    info = header.get("variables")
    count = 0
    if info is not None:
        if not isinstance(info, dict) or info.get("kind") not in ("list", "dict"):
            bad("variables must be None or {'kind': 'list' or 'dict', 'names': [...], 'arrays': [...]}")
        names, arrays = info.get("names"), info.get("arrays")
        if not (isinstance(names, list) and isinstance(arrays, list) and len(names) == len(arrays)
                and all(isinstance(n, str) for n in names)):
            bad("variables' names and arrays must be lists of the same length (names: strings)")
        if info["kind"] == "dict" and len(set(names)) != len(names):
            bad("variables' names repeat")
        for i, d in enumerate(arrays):
            described(d, f"variables' arrays[{i}]")
        count = len(arrays)
    states = header.get("states")
    if not isinstance(states, list):
        bad("states must be a list")
    seen = set()
    for i, st in enumerate(states):
        if not (isinstance(st, dict) and isinstance(st.get("name"), str)):
            bad(f"states[{i}] must be a dict with a string name; got {st!r:.200}")
        v = st.get("variable")
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < count
                              or v in seen):
            bad(f"states[{i}]['variable'] must be None or the index of a saved variable "
                f"(0 to {count - 1}, each once); got {v!r:.100}")
        seen.add(v)


def _from_config(header, custom_objects, source):
    import sparseopt
    name = header["class_name"]
    cls = (custom_objects or {}).get(name) or getattr(sparseopt, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise errors.ConfigError(f"{source}: unknown optimizer class {name!r} (module {header.get('module')}); "
                                 f"pass it with custom_objects={{{name!r}: cls}}")
    try:
        return cls.from_config(header["config"], custom_objects=custom_objects)
    except errors.ConfigError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise errors.ConfigError(f"{source}: cannot rebuild the {name} optimizer from its saved config: "
                                 f"{exc}") from exc


def _check_variables(source, saved, kind, names, targets):
    if kind != saved["kind"]:
        raise errors.WeightsMismatchError(
            f"{source}: the variables were saved as a {saved['kind']}; got a {kind}")
    if kind == "dict" and sorted(names) != sorted(saved["names"]):
        raise errors.WeightsMismatchError(
            f"{source}: saved variables {sorted(saved['names'])}; got {sorted(names)}")
    if len(targets) != len(saved["arrays"]):
        raise errors.WeightsMismatchError(
            f"{source}: {len(saved['arrays'])} variables were saved; got {len(targets)}")
    if kind == "dict":  # match by name, in the saved order
        by_name = dict(zip(names, targets))
        targets[:] = [by_name[n] for n in saved["names"]]
    for described, target in zip(saved["arrays"], targets):
        shape, dtype = list(getattr(target, "shape", ())), _dtype_of(target)
        if shape != described["shape"] or dtype != described["dtype"]:
            raise errors.WeightsMismatchError(
                f"{source}: variable {described['name']!r} was saved as {described['dtype']} "
                f"{tuple(described['shape'])}; got {dtype} {tuple(shape)}")
        if isinstance(target, np.ndarray) and not target.flags.writeable:
            raise errors.ArrayLayoutError(f"{source}: variable {described['name']!r} is read-only")


def _check_built_with(source, header, optimizer, targets):
    """A built optimizer given with variables must keep its state for those same arrays."""
    states = list(optimizer._states.values())
    for saved_state, state in zip(header["states"], states):
        i = saved_state["variable"]
        if i is not None and targets[i] is not state.var:
            raise errors.ConfigError(
                f"{source}: the optimizer's state for {state.name!r} belongs to another array than the "
                f"variable {header['variables']['names'][i]!r} given to load")


def _build_list(source, header, arrays):
    out = []
    for s in header["states"]:
        if s["variable"] is None:
            raise errors.ConfigError(
                f"{source}: the optimizer kept state for {s['name']!r}, which was not saved; "
                "build the optimizer with its variables (optimizer.build) before loading")
        out.append(arrays[s["variable"]])
    return out


def _check_weights(source, header, weights, current, labels):
    if len(weights) != len(current):
        saved = [w["name"] for w in header["weights"]]
        raise errors.WeightsMismatchError(
            f"{source}: {len(weights)} optimizer arrays were saved ({_short(saved)}); this "
            f"{header['class_name']} has {len(current)} ({_short(labels)})")
    for described, label, cur, new in zip(header["weights"], labels, current, weights):
        if tuple(new.shape) != tuple(cur.shape) or np.dtype(new.dtype) != np.dtype(_dtype_of(cur)):
            raise errors.WeightsMismatchError(
                f"{source}: {label} must be {_dtype_of(cur)} {tuple(cur.shape)}; the file holds "
                f"{described['name']} as {new.dtype} {tuple(new.shape)}")


# ---------------------------------------------------------------------- helpers


def _flatten(variables, who):
    if variables is None:
        return None, [], []
    if isinstance(variables, dict):
        names = [str(k) for k in variables]
        return "dict", names, list(variables.values())
    if isinstance(variables, (list, tuple)):
        return "list", [f"variable {i}" for i in range(len(variables))], list(variables)
    raise TypeError(f"{who}: variables must be a list or a dict of arrays; got {type(variables).__name__}")


def _weight_labels(optimizer):
    return (["iterations"] + list(optimizer._scalar_state)
            + [f"{state.name!r} slot {name!r}" for state, name in optimizer._weights])


def _describe(name, array):
    return {"name": name, "shape": list(array.shape), "dtype": str(array.dtype)}


def _dtype_of(array):
    backend = backends.backend_for(array)  # (torch's and CuPy's dtypes are not NumPy's)
    return str(np.dtype(array.dtype) if backend is None else backend.dtype_of(array))


def _storable(array):
    """``array`` as ``.npy`` can hold it: a bfloat16 array as its ``uint16`` bits."""
    return array.view(np.uint16) if lowp.kind(array.dtype) == "bfloat16" else array


def _restored(described, array):
    """A saved array with the dtype the header describes (bfloat16 from its bits)."""
    if described["dtype"] == "bfloat16" and array.dtype == np.uint16 and lowp.BFLOAT16 is not None:
        return array.view(lowp.BFLOAT16)
    return array


def _short(names, n=4):
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")
