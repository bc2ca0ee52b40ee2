"""The package's layering, read from its sources (``ast``; the package is not imported).

* The module-level import graph of ``sparseopt`` has no cycle. An edge is an import
  statement outside any function or class: ``from sparseopt.a import b`` is an edge to
  ``sparseopt.a.b`` where that is a module, else to ``sparseopt.a`` (the parent packages a
  Python import also runs are not edges: ``sparseopt/__init__`` imports every room).
* Only ``sparseopt.backends`` asks which kind of array a variable is (and ``sparseopt.kernels``,
  which holds the kernels of each): no ``isinstance(x, np.ndarray)`` elsewhere but a short
  list of tests about something else, and no mention of CUDA arrays (``is_device_array``,
  ``__cuda_array_interface__``).
* ``sparseopt/backends/__init__.py``, the one place that picks a backend, imports no numba.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "sparseopt"

#: ``isinstance(..., np.ndarray)`` tests outside the backends that are about something else:
#: (module, enclosing function) -> what they ask.
ALLOWED_NDARRAY_TESTS = {
    ("sparseopt.optimizer", "_check_hyper"): "a hyperparameter given as a 0-d array",
    ("sparseopt.schedules", "_to_step"): "a schedule's step given as an array",
    ("sparseopt.saving", "_check_variables"): "a read-only NumPy target of load()",
}


def modules():
    """``{dotted name: path}`` of every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _module_level(tree):
    """The statements of a module outside any function or class (``if``/``try`` bodies included)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            todo.extend(getattr(node, field, []))


def _imported(node, name, is_package, known):
    """The package's modules an import statement of module ``name`` names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parent = name.split(".")[:len(name.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(parent + ([base] if base else []))
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in known:
            targets.append(sub)
        elif base in known:
            targets.append(base)
    return targets


def import_graph():
    """``{module: set of the package's modules it imports at module level}``."""
    known = modules()
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for node in _module_level(tree):
            edges.update(_imported(node, name, path.name == "__init__.py", known))
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph):
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state = {}  # module -> 1 on the current path, 2 done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_names_a_cycle():
    """The check below would see a cycle (its own test: a finder that never finds one passes it)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_the_imports_it_must_see():
    """The graph holds edges the sources certainly have (an empty graph has no cycle either)."""
    graph = import_graph()
    assert "sparseopt.backends" in graph["sparseopt.optimizer"]
    assert {"sparseopt.backends.cpu", "sparseopt.backends.cuda"} <= graph["sparseopt.backends"]
    assert "sparseopt._validation" in graph["sparseopt.backends.cuda"]
    assert "sparseopt.kernels.cpu" in graph["sparseopt.backends.cpu"]


def test_module_level_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def _ndarray_tests(tree):
    """``(enclosing function, line)`` of every ``isinstance(..., np.ndarray)`` (or a tuple
    holding ``np.ndarray``) in ``tree``."""
    found = []

    def is_ndarray(node):
        if isinstance(node, ast.Tuple):
            return any(is_ndarray(e) for e in node.elts)
        return isinstance(node, ast.Attribute) and node.attr == "ndarray"

    def walk(node, function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                walk(child, child.name)
                continue
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Name)
                    and child.func.id == "isinstance" and len(child.args) == 2 and is_ndarray(child.args[1])):
                found.append((function, child.lineno))
            walk(child, function)

    walk(tree, None)
    return found


def _outside_backends():
    for name, path in modules().items():
        if name.startswith(("sparseopt.backends", "sparseopt.kernels")):
            continue
        yield name, path


def test_only_the_backends_ask_which_array_a_variable_is():
    wrong = []
    for name, path in _outside_backends():
        for function, line in _ndarray_tests(ast.parse(path.read_text(), str(path))):
            if (name, function) not in ALLOWED_NDARRAY_TESTS:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} (in {function})")
    assert not wrong, ("isinstance(..., np.ndarray) outside sparseopt.backends (ask "
                       "sparseopt.backends.backend_for, or add a test about something else to "
                       "ALLOWED_NDARRAY_TESTS): " + ", ".join(wrong))


def test_the_allowed_ndarray_tests_exist():
    """Every allowed test is still there (a stale entry would allow a new one unseen)."""
    present = set()
    for name, path in _outside_backends():
        present.update((name, function) for function, _ in _ndarray_tests(ast.parse(path.read_text())))
    assert set(ALLOWED_NDARRAY_TESTS) <= present


def test_only_the_backends_mention_cuda_arrays():
    wrong = []
    for name, path in _outside_backends():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            named = (node.id if isinstance(node, ast.Name) else
                     node.attr if isinstance(node, ast.Attribute) else
                     node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None)
            if named in ("is_device_array", "__cuda_array_interface__", "__cuda_ndarray__"):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} ({named})")
    assert not wrong, "CUDA arrays recognised outside sparseopt.backends: " + ", ".join(wrong)


def test_the_backend_picker_imports_no_numba():
    path = PACKAGE / "backends" / "__init__.py"
    numba = []
    for node in _module_level(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            numba += [a.name for a in node.names if a.name.split(".")[0] == "numba"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "numba":
            numba.append(node.module)
    assert not numba, f"sparseopt/backends/__init__.py imports {numba} at module level"
