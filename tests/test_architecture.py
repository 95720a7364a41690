"""The architecture's rules, held by static checks of the source (docs/architecture.md explains each).

- the core (``harness/``) never imports the built-in plugins (``plugins/``);
- no import cycle among the core's modules;
- no Python module over 500 lines;
- hooks are called only through the typed facade (``harness/hooks.py``);
- plugins carry no ``spec.<axis>.name != ...`` guard: dispatch by declaration calls a technique hook only on the
  plugin that declared the trial's technique;
- the core names no technique, workload or plugin;
- no file refers to a design document outside the repository.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from harness.space import AXES

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "harness"
MAX_LINES = 500
#: folders never scanned: build outputs, caches, installed copies.
SKIP_DIRS = {"__pycache__", "build", "dist", ".tox", ".venv", ".git"}


def python_files(*folders: str) -> list[Path]:
    """The Python files under ``folders`` (relative to the repository), build outputs and caches excluded."""
    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).parts
            if not SKIP_DIRS.intersection(parts) and not any(p.endswith(".egg-info") for p in parts):
                found.append(path)
    return found


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=rel(path))


# ---------------------------------------------------------------------------------------------- imports
def module_name(path: Path) -> str:
    """``harness/testing/fixtures.py`` -> ``harness.testing.fixtures``; a package's ``__init__`` -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement with where it runs: ``module`` (at import time: the module body, class bodies,
    module-level ``if``/``try``/``with`` blocks), ``function`` (inside a function, run when it is called) or
    ``typing`` (under ``if TYPE_CHECKING:``, never run)."""

    def walk(node: ast.AST, where: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, where
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, "function" if where == "module" else where)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), "typing")
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), where)
            else:
                yield from walk(child, where)

    yield from walk(tree, "module")


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """The absolute names a statement imports: ``import a.b`` -> a.b; ``from a import b`` -> a.b and a (which of
    the two is a module is for the caller to decide); relative imports resolved against ``importer``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def core_import_graph() -> dict[str, dict[str, dict[str, list[str]]]]:
    """``graph[where][importer][imported] = ["harness/x.py:12", ...]`` for imports among the core's modules.

    What is counted: an import of a core module (``import harness.x``, ``from harness.x import y``, ``from harness
    import x`` where ``x`` is a module, relative imports). ``from harness import name`` where ``name`` is not a
    module counts as an import of the package ``harness`` (its ``__init__``). The implicit import of parent
    packages (importing ``harness.x`` runs ``harness/__init__.py`` first) is not counted: every module would
    otherwise be in a cycle with the package that contains it.
    """
    files = {module_name(p): p for p in python_files("harness")}
    graph: dict[str, dict[str, dict[str, list[str]]]] = {"module": {}, "function": {}, "typing": {}}
    for importer, path in files.items():
        for node, where in imports(parse(path)):
            names = imported_modules(node, importer, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):
                base, members = names[0], names[1:]
                targets = [m for m in members if m in files]
                if len(targets) < len(members) and base in files:
                    targets.append(base)
            else:
                targets = [n for n in names if n in files]
            for target in targets:
                if target != importer:
                    graph[where].setdefault(importer, {}).setdefault(target, []).append(f"{rel(path)}:{node.lineno}")
    return graph


def cycles(edges: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges.get(node, {}):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def describe_cycle(component: list[str], edges: dict[str, dict[str, list[str]]]) -> str:
    inside = [f"{a} -> {b} ({', '.join(where)})" for a in component for b, where in sorted(edges.get(a, {}).items())
              if b in component]
    return "import cycle among " + ", ".join(component) + ":\n    " + "\n    ".join(inside)


def merged(*graphs: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    for graph in graphs:
        for a, targets in graph.items():
            for b, where in targets.items():
                out.setdefault(a, {}).setdefault(b, []).extend(where)
    return out


def test_the_core_never_imports_plugins():
    found = []
    for path in python_files("harness"):
        tree = parse(path)
        for node, _ in imports(tree):
            names = imported_modules(node, module_name(path), path.name == "__init__.py")
            for name in names[:1] if isinstance(node, ast.ImportFrom) else names:
                if name == "plugins" or name.startswith("plugins."):
                    found.append(f"{rel(path)}:{node.lineno}: imports {name}")
        for call in ast.walk(tree):  # importlib.import_module("plugins.x") is an import too
            if isinstance(call, ast.Call) and call.args and isinstance(call.args[0], ast.Constant) and \
                    isinstance(call.args[0].value, str) and call.args[0].value.split(".")[0] == "plugins" and \
                    getattr(call.func, "attr", getattr(call.func, "id", "")) == "import_module":
                found.append(f"{rel(path)}:{call.lineno}: imports {call.args[0].value}")
    assert not found, "the core must not import plugins/ (built-ins load through entry points like anyone's):\n" \
        + "\n".join(found)


def test_no_import_cycle_among_core_modules_at_import_time():
    graph = core_import_graph()["module"]
    assert graph, "found no imports among harness modules: the scan is broken"
    found = cycles(graph)
    assert not found, "\n".join(describe_cycle(c, graph) for c in found)


def test_no_import_cycle_among_core_modules_through_deferred_imports():
    """An import inside a function defers a cycle to run time instead of removing it: count those too (imports
    under ``if TYPE_CHECKING:`` never run and are not counted)."""
    graph = core_import_graph()
    both = merged(graph["module"], graph["function"])
    found = cycles(both)
    assert not found, "\n".join(describe_cycle(c, both) for c in found)


# ---------------------------------------------------------------------------------------------- size
@pytest.mark.parametrize("folder", ["harness", "plugins", "tests", "benchmarks", "examples"])
def test_no_module_over_500_lines(folder):
    long = [f"{rel(p)}: {n} lines" for p in python_files(folder)
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split them by concern):\n" + "\n".join(long)


# ---------------------------------------------------------------------------------------------- hook calls
#: where the plugin manager's hook relay may be used: the facade, and the test kit's hook recorder.
FACADE = ("harness/hooks.py", "harness/testing/")


def hook_relay_uses(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """``x.hook`` (pluggy's hook relay: ``pm.hook``, ``registry.hook``, ``self._pm.hook``) and
    ``hook.harness_*`` (a relay held in a local variable)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "hook":
            yield node.lineno, f"{ast.unparse(node)}"
        elif isinstance(node, ast.Attribute) and node.attr.startswith("harness_") and \
                isinstance(node.value, ast.Name) and node.value.id == "hook":
            yield node.lineno, f"{ast.unparse(node)}"


def test_hooks_are_called_only_through_the_facade():
    found = []
    for path in python_files("harness", "plugins", "tests", "benchmarks", "examples"):
        if rel(path).startswith(FACADE):
            continue
        found += [f"{rel(path)}:{line}: {text}" for line, text in hook_relay_uses(parse(path))]
    assert not found, "call hooks through the typed facade (registry.hooks.<name>(...)), not the plugin " \
        "manager's relay:\n" + "\n".join(sorted(set(found)))


# ---------------------------------------------------------------------------------------------- plugins
def axis_name_guards(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Comparisons ``<x>.<axis>.name != ...`` (either side): the "return None unless it is mine" guard."""
    def is_axis_name(expr: ast.expr) -> bool:
        return isinstance(expr, ast.Attribute) and expr.attr == "name" and \
            isinstance(expr.value, ast.Attribute) and expr.value.attr in AXES

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            for op, (a, b) in zip(node.ops, pairwise(sides), strict=True):
                if isinstance(op, ast.NotEq) and (is_axis_name(a) or is_axis_name(b)):
                    yield node.lineno, ast.unparse(node)


def test_plugins_do_not_guard_on_the_selected_technique():
    found = []
    for path in python_files("plugins", "examples"):
        found += [f"{rel(path)}:{line}: {text}" for line, text in axis_name_guards(parse(path))]
    assert not found, "technique hooks are called only on the plugin that declared the trial's technique " \
        "(dispatch by declaration); remove these guards:\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------- core
def builtin_names() -> dict[str, str]:
    """Every name the built-in plugins declare (techniques, workloads, study-file sections) and their entry-point
    names, mapped to what declares it: the names the core must not know."""
    from harness.plugins import get_registry

    registry = get_registry()
    builtin = {name for name, record in registry.records.items() if record.module.startswith("plugins.")}
    names = {}
    for (axis, name), tech in registry.techniques.items():
        if tech.plugin in builtin:
            names[name] = f"{axis} technique of plugin {tech.plugin!r}"
    for name, info in registry.workloads.items():
        if info.plugin in builtin:
            names[name] = f"workload of plugin {info.plugin!r}"
    for key, setting in registry.settings.items():
        if setting.plugin in builtin:
            names[key] = f"study-file section of plugin {setting.plugin!r}"
    for name in builtin:
        names.setdefault(name, "a built-in plugin")
    return names


def code_strings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """String constants that the code acts on: not docstrings, not the text of f-strings (messages)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            skip.add(id(body[0].value))
        if isinstance(node, ast.JoinedStr):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


#: names that also have a meaning of their own in the core, where that meaning (not the plugin) is meant. A
#: comparison of a trial's technique with any literal is caught by the next test, whatever the name.
OTHER_MEANINGS = {
    # the word: Optuna's pruner "none", matplotlib's facecolors="none", "(known: none)" in messages
    "none": ("harness/",),
    # numeric formats: the peak FLOP/s table is indexed by a Precision's compute_dtype ("tf32", "fp8", torch dtypes)
    "fp32": ("harness/measure.py",), "tf32": ("harness/measure.py",), "fp8": ("harness/measure.py",),
}


def core_files() -> list[Path]:
    """The core: ``harness/`` without the plugin authors' test kit (which may pick built-ins for its examples)."""
    return [p for p in python_files("harness") if not rel(p).startswith("harness/testing")]


def test_the_core_names_no_technique_workload_or_plugin():
    """A string constant of the core equal to a name a built-in plugin declares means the core special-cases
    it: a hook or a declaration is missing. Compared whole, so prose that contains the word does not count."""
    names = builtin_names()
    assert {"fp32", "eager", "adamw", "digits", "mlflow"} <= set(names), "the built-in plugins did not load"
    found = []
    for path in core_files():
        found += [f"{rel(path)}:{line}: {value!r} ({names[value]})" for line, value in code_strings(parse(path))
                  if value in names and not rel(path).startswith(OTHER_MEANINGS.get(value, ()))]
    assert not found, "the core names plugins' techniques, workloads or sections; declare the behaviour " \
        "instead:\n" + "\n".join(found)


def selection_tests(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Comparisons of a trial's technique (``<x>.<axis>.name``) or workload (``<x>.workload``) with literals."""
    def selects(expr: ast.expr) -> bool:
        return isinstance(expr, ast.Attribute) and (expr.attr == "workload" or (
            expr.attr == "name" and isinstance(expr.value, ast.Attribute) and expr.value.attr in AXES))

    def literal(expr: ast.expr) -> bool:
        if isinstance(expr, (ast.Tuple, ast.List, ast.Set)):
            return bool(expr.elts) and all(literal(e) for e in expr.elts)
        return isinstance(expr, ast.Constant) and isinstance(expr.value, str)

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any((selects(a) and literal(b)) or (literal(a) and selects(b)) for a, b in pairwise(sides)):
                yield node.lineno, ast.unparse(node)


def test_the_core_never_tests_which_technique_or_workload_a_trial_selected():
    found = []
    for path in core_files():
        found += [f"{rel(path)}:{line}: {text}" for line, text in selection_tests(parse(path))]
    assert not found, "the core branches on a technique or workload by name; add a hook or a declaration:\n" \
        + "\n".join(found)


# ---------------------------------------------------------------------------------------------- docs
def test_the_repository_refers_to_no_document_outside_it():
    """The project's own docs carry the architecture (docs/architecture.md): no file points to a design document
    that is not in the repository."""
    outside = ("DESIGN.md", "../shared")
    texts = [*python_files("harness", "plugins", "tests", "benchmarks", "examples"),
             *sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
    found = [f"{rel(p)}:{n}: {line.strip()}" for p in texts if p.name != "test_architecture.py"
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if any(ref in line and not (ROOT / ref).exists() for ref in outside)]
    assert not found, "references to documents outside the repository (point to docs/architecture.md):\n" \
        + "\n".join(found)
