"""Any number of slots: the kernels' slot arguments as tuples, and the code that takes them apart.

A kernel takes a rule's slots as one tuple ``S`` of arrays, in the rule's ``SLOTS`` order (a
slot the configuration does not keep is a placeholder array, never touched; a rule without
slots gets one placeholder, so that no kernel takes an empty tuple), and its row slots
(:mod:`sparseopt.rules.rowwise_adagrad`) as a tuple ``R`` likewise. An element's slot values
travel through the kernels as one tuple ``v`` (row values: ``rv``). A function that returns
slot values with other values returns one flat tuple, the slot values last (``(x, *v)``),
and the caller slices it (``o[1:]``): Numba's parallel-loop analysis fails on a tuple
unpacked into a value and a nested tuple (``x, v = ...``, numba 0.68).

Numba compiles a tuple's items as separate values, so a tuple costs nothing over separate
arguments, but it cannot loop over the positions of two tuples together (``S[k][at] = v[k]``
for each ``k``). The few functions that do are generated here, as Python source, for one
count and one choice of kept slots: *templates* in the sense of
:mod:`sparseopt.kernels._specialize` (their other names are globals that the caller binds per
specialization, as for the hand-written templates), which the CPU and CUDA kernels compile
for their target. The rule's own functions take the slots as separate arguments, exactly as
many as the rule has (``update(p, g, m, v, c)``); the adapters below call them from the
tuples (:func:`rule_call`). A rule written for the former fixed three slots
(``update(p, g, s0, s1, s2, c)`` with fewer than three ``SLOTS``) is still called so: the
adapter passes the parameter's value in the extra places and drops what they return.
"""

import functools
import inspect
import linecache

#: bfloat16 slots rounded from the element's own 64 random bits (:func:`store_rounded`).
FIRST_HASH_SLOTS = 3


def count(names):
    """How many slot arrays a kernel takes for a rule with slots ``names``: one at least."""
    return max(1, len(names))


def rule_slot_count(rule, name, fixed, slots, former=3):
    """How many slot arguments the rule's function ``name`` takes (``fixed``: its other
    arguments): ``len(slots)``, or ``former`` for a rule with fewer slots written for the
    former fixed three (``update(p, g, s0, s1, s2, c)``). Raises ``TypeError`` otherwise."""
    fn = vars(rule)[name]
    fn = getattr(fn, "py_func", fn)
    code = getattr(fn, "__code__", None)
    taken = (code.co_argcount if code is not None else len(inspect.signature(fn).parameters)) - fixed
    if taken == len(slots) or (taken == former and len(slots) < former):
        return taken
    raise TypeError(f"rule {rule.__name__!r}: {name} takes {taken} slot arguments; its slots are {slots}")


def template(name, params, lines, namespace):
    """A function ``name(params)`` with the body ``lines``, whose globals are a copy of
    ``namespace`` (the module it serves: its helpers, and the names bound per specialization).
    Its source is registered with :mod:`linecache`, so tracebacks and Numba's errors show it."""
    source = f"def {name}({', '.join(params)}):\n" + "".join(f"    {line}\n" for line in lines)
    filename = f"<sparseopt.kernels._slots {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    glb = dict(namespace)
    exec(compile(source, filename, "exec"), glb)  # noqa: S102 - source generated above
    fn = glb[name]
    fn.__module__ = namespace.get("__name__", __name__)
    return fn


def _tuple(items):
    """Source of a tuple of the source expressions ``items`` (a 1-tuple keeps its comma)."""
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _flags(used):
    return "".join("1" if u else "0" for u in used)


@functools.lru_cache(maxsize=None)
def load(used, namespace_key, widen=False):
    """``LOAD(p, S, at) -> (x, *v)``: element ``at`` of ``p`` and of the kept slots (``x``, the
    parameter's value, in the others). ``widen``: a 16-bit variable's (``WIDEN(p[at])``,
    ``WIDEN_SLOT(S[k][at])``)."""
    x = "WIDEN(p[at])" if widen else "p[at]"
    item = "WIDEN_SLOT(S[{k}][at])" if widen else "S[{k}][at]"
    values = [item.format(k=k) if u else "x" for k, u in enumerate(used)]
    return template(f"_load_{_flags(used)}{'_w' if widen else ''}", ("p", "S", "at"),
                    [f"x = {x}", f"return {_tuple(['x'] + values)}"], _NAMESPACES[namespace_key])


@functools.lru_cache(maxsize=None)
def store(used, namespace_key):
    """``STORE(p, S, at, x, v)``: write element ``at`` of ``p`` and of the kept slots."""
    lines = ["p[at] = x"] + [f"S[{k}][at] = v[{k}]" for k, u in enumerate(used) if u]
    return template(f"_store_{_flags(used)}", ("p", "S", "at", "x", "v"), lines, _NAMESPACES[namespace_key])


@functools.lru_cache(maxsize=None)
def store_slots(used, namespace_key):
    """``STORE_SLOTS(S, at, v)``: write element ``at`` of the kept slots only."""
    lines = [f"S[{k}][at] = v[{k}]" for k, u in enumerate(used) if u] or ["pass"]
    return template(f"_store_slots_{_flags(used)}", ("S", "at", "v"), lines, _NAMESPACES[namespace_key])


@functools.lru_cache(maxsize=None)
def store_rounded(used, namespace_key):
    """``STORE_ROUNDED(p, S, at, x, v, c)`` of a 16-bit variable (:mod:`sparseopt.kernels.lowp`):
    ``x`` rounded to ``p``'s 16 bits with the element's random bits of the step
    (``c.rounding_key``), the kept slots as they are or, for bfloat16 slots (``SLOT16``),
    rounded with more bits of the same hash: slot ``k`` < 3 with bits ``16 (k + 1)`` and up
    of its 64, slots 3 and up with 16 bits each of ``mix(r + g * GOLDEN)``, ``g = 1, 2, ...``
    (four slots per further hash)."""
    lines = ["if STOCHASTIC:",
             "    r = element_bits(c.rounding_key, flat_index(p, at))",
             "else:",
             "    r = _0",
             "p[at] = NARROW(x, r, STOCHASTIC)"]
    kept = [k for k, u in enumerate(used) if u]
    if kept:
        lines.append("if SLOT16:")
        groups = sorted({(k - FIRST_HASH_SLOTS) // 4 + 1 for k in kept if k >= FIRST_HASH_SLOTS})
        lines += [f"    r{g} = mix(r + _U({g}) * _GOLDEN)" for g in groups]
        for k in kept:
            if k < FIRST_HASH_SLOTS:
                bits = f"r >> _U({16 * (k + 1)})"
            else:
                g, lane = divmod(k - FIRST_HASH_SLOTS, 4)
                bits = f"r{g + 1} >> _U({16 * lane})"
            lines.append(f"    S[{k}][at] = f32_to_bf16(v[{k}], {bits}, STOCHASTIC)")
        lines.append("else:")
        lines += [f"    S[{k}][at] = v[{k}]" for k in kept]
    return template(f"_store_rounded_{_flags(used)}", ("p", "S", "at", "x", "v", "c"), lines,
                    _NAMESPACES[namespace_key])


@functools.lru_cache(maxsize=None)
def prefetch(used, row_used, namespace_key):
    """``PREFETCH(p, S, R, row)``: prefetch row ``row`` of ``p``, of the kept slots and of the
    kept row slots (``prefetch``: the namespace's cache hint)."""
    lines = ["prefetch(p, row)"] + [f"prefetch(S[{k}], row)" for k, u in enumerate(used) if u] + [
        f"prefetch(R[{k}], row)" for k, u in enumerate(row_used) if u]
    return template(f"_prefetch_{_flags(used)}_r{_flags(row_used)}", ("p", "S", "R", "row"), lines,
                    _NAMESPACES[namespace_key])


@functools.lru_cache(maxsize=None)
def row_slots(row_used, namespace_key):
    """``ROW_SLOTS(R, row, mean, c) -> rv``: the row stage (``ROW_RULE``, an adapter of
    :func:`row_rule_call`) on row ``row`` of the kept row slots (``mean``: the row's mean
    ``ROW_TERM``); writes the kept ones and returns the new row values."""
    values = [f"R[{k}][row]" if u else "mean" for k, u in enumerate(row_used)]
    lines = [f"rv = ROW_RULE({_tuple(values)}, mean, c)"] + [
        f"R[{k}][row] = rv[{k}]" for k, u in enumerate(row_used) if u] + ["return rv"]
    return template(f"_row_slots_{_flags(row_used)}", ("R", "row", "mean", "c"), lines, _NAMESPACES[namespace_key])


def _call(fn_name, before, n_rule, n_kernel, after, returns_before, returns_after):
    """Lines calling ``fn_name(*before, v[0], ..., *after)`` with ``n_rule`` slot arguments
    (the ones past ``n_kernel``: ``before[0]``, the padding of a rule written for three) and
    returning the flat ``(*returned before, *returned after, *v')`` with ``n_kernel`` slot values."""
    args = [f"v[{k}]" if k < n_kernel else before[0] for k in range(n_rule)]
    lines = [f"o = {fn_name}({', '.join(list(before) + args + list(after))})"]
    first = len(returns_before)
    new = [f"o[{first + k}]" if k < n_rule else f"v[{k}]" for k in range(n_kernel)]
    out = [f"o[{i}]" for i in range(first)] + [f"o[{first + n_rule + i}]" for i in range(len(returns_after))]
    return lines + [f"return {_tuple(out + new)}"]


@functools.lru_cache(maxsize=None)
def rule_call(n_rule, n_kernel, n_rule_rows=None, n_kernel_rows=None):
    """``RULE(x, g, v, c) -> (x, *v)``: the rule's element ``UPDATE(x, g, *slots, c)`` on the
    slot values' tuple; for a row-wise rule (``n_rule_rows``: its row-slot arguments)
    ``RULE(x, g, v, rv, c)``, which also passes the row values."""
    if n_rule_rows is None:
        lines = _call("UPDATE", ("x", "g"), n_rule, n_kernel, ("c",), ("x",), ())
        return template(f"_rule_{n_rule}_{n_kernel}", ("x", "g", "v", "c"), lines, _NAMESPACES["rules"])
    rows = [f"rv[{k}]" if k < n_kernel_rows else "x" for k in range(n_rule_rows)]
    lines = _call("UPDATE", ("x", "g"), n_rule, n_kernel, tuple(rows) + ("c",), ("x",), ())
    return template(f"_row_rule_{n_rule}_{n_kernel}_{n_rule_rows}_{n_kernel_rows}", ("x", "g", "v", "rv", "c"),
                    lines, _NAMESPACES["rules"])


@functools.lru_cache(maxsize=None)
def row_rule_call(n_rule, n_kernel):
    """``ROW_RULE(rv, mean, c) -> rv``: the rule's ``ROW_UPDATE(*row_slots, mean, c)``, which
    returns the new row values as a tuple."""
    args = [f"rv[{k}]" if k < n_kernel else "mean" for k in range(n_rule)]
    new = [f"o[{k}]" if k < n_rule else f"rv[{k}]" for k in range(n_kernel)]
    lines = [f"o = ROW_UPDATE({', '.join(args + ['mean', 'c'])})", f"return {_tuple(new)}"]
    return template(f"_row_update_{n_rule}_{n_kernel}", ("rv", "mean", "c"), lines, _NAMESPACES["rules"])


@functools.lru_cache(maxsize=None)
def reduce_terms_call(n_rule, n_kernel):
    """``TERMS_RULE(x, g, v, c) -> (d, t0, t1, *v)``: the rule's ``REDUCE_TERMS(x, g, *slots,
    c) -> (d, *slots, t0, t1)`` (:mod:`sparseopt.rules.lamb`)."""
    lines = _call("REDUCE_TERMS", ("x", "g"), n_rule, n_kernel, ("c",), ("d",), ("t0", "t1"))
    return template(f"_reduce_terms_{n_rule}_{n_kernel}", ("x", "g", "v", "c"), lines, _NAMESPACES["rules"])


@functools.lru_cache(maxsize=None)
def idle_call(fn_name, n_rule, n_kernel):
    """``IDLE(x, v, t, c, tol, zero) -> (x, ok, *v)``: the rule's exact-mode closed form
    ``fn_name(x, *slots, t, c, tol, zero) -> (x, *slots, ok)`` (:mod:`sparseopt.rules._idle`)."""
    lines = _call(fn_name, ("x",), n_rule, n_kernel, ("t", "c", "tol", "zero"), ("x",), ("ok",))
    return template(f"_idle_{fn_name}_{n_rule}_{n_kernel}", ("x", "v", "t", "c", "tol", "zero"), lines,
                    _NAMESPACES["rules"])


@functools.lru_cache(maxsize=None)
def no_idle(n_kernel):
    """``IDLE(x, v, t, c, tol, zero) -> (x, False, *v)``: a rule without a closed form for its
    idle steps (exact mode replays them)."""
    out = _tuple(["x", "False"] + [f"v[{k}]" for k in range(n_kernel)])
    return template(f"_no_idle_{n_kernel}", ("x", "v", "t", "c", "tol", "zero"), [f"return {out}"],
                    _NAMESPACES["rules"])


@functools.lru_cache(maxsize=None)
def cast(n, namespace_key):
    """``CAST(v) -> v``: each of ``n`` values through ``TO`` (exact mode's float32 before a
    16-bit variable's rounding)."""
    return template(f"_cast_{n}", ("v",), [f"return {_tuple([f'TO(v[{k}])' for k in range(n)])}"],
                    _NAMESPACES[namespace_key])


@functools.lru_cache(maxsize=None)
def select(n, namespace_key):
    """``SELECT(ok, a, b) -> a if ok else b``, item by item, for tuples of ``n`` values."""
    return template(f"_select_{n}", ("ok", "a", "b"),
                    [f"return {_tuple([f'a[{k}] if ok else b[{k}]' for k in range(n)])}"],
                    _NAMESPACES[namespace_key])


@functools.lru_cache(maxsize=None)
def views(n, namespace_key):
    """``VIEWS(meta, t, first, like, shape) -> tuple``: ``n`` arrays of ``shape`` whose addresses
    are ``meta[t, first:first + n]`` (the table-batched kernels; ``VIEW(address, like, shape)``:
    the namespace's view of an address as an array of ``like``'s dtype)."""
    items = [f"VIEW(meta[t, first + {k}], like, shape)" for k in range(n)]
    return template(f"_views_{n}", ("meta", "t", "first", "like", "shape"), [f"return {_tuple(items)}"],
                    _NAMESPACES[namespace_key])


@functools.lru_cache(maxsize=None)
def share(n, namespace_key):
    """``SHARE(buf, y, rv)``: ``n`` row values to row ``y`` of a 2-D (shared-memory) array."""
    return template(f"_share_{n}", ("buf", "y", "rv"), [f"buf[y, {k}] = rv[{k}]" for k in range(n)],
                    _NAMESPACES[namespace_key])


@functools.lru_cache(maxsize=None)
def shared(n, namespace_key):
    """``SHARED(buf, y) -> rv``: the ``n`` row values :func:`share` put in row ``y``."""
    return template(f"_shared_{n}", ("buf", "y"), [f"return {_tuple([f'buf[y, {k}]' for k in range(n)])}"],
                    _NAMESPACES[namespace_key])


#: The globals of the generated templates, by the module they serve (``register``).
_NAMESPACES = {"rules": {"__name__": __name__}}


def register(key, namespace):
    """Make ``namespace`` (a module's globals) the globals of the templates generated for ``key``."""
    _NAMESPACES[key] = namespace
