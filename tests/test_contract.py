"""The plugin contract (harness/hookspecs.py) is complete, tested and documented, and its copies agree.

- every hook argument is annotated and has a ``:param:``; every hook says when it is called, on which plugins, and
  what it returns;
- the dispatch class of every hook (declaration, technique hook of an axis, trial hook, study hook) agrees with
  its docstring, its firstresult flag and the typed facade (harness/hooks.py);
- every hook is exercised by some test under tests/;
- docs/plugins.md's hook table lists exactly the hooks, with their arguments and who is called;
- docs/architecture.md quotes the lifecycle block of hookspecs' module docstring unchanged.
"""
from __future__ import annotations

import ast
import difflib
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from harness import hookspecs
from harness.hooks import Hooks
from harness.space import AXES

ROOT = Path(__file__).resolve().parents[1]
HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("harness_"))


def spec_of(name: str) -> Any:
    return getattr(hookspecs, name)


def kind_of(name: str) -> str:
    """``declaration``, ``study``, ``technique`` or ``trial``: which plugins the hook is called on."""
    if name in hookspecs.DECLARATION_HOOKS:
        return "declaration"
    if name in hookspecs.STUDY_HOOKS:
        return "study"
    return "technique" if hookspecs.axis_of(name) else "trial"


def who_is_called(name: str) -> str:
    """The words for the plugins a hook is called on: in its docstring and in docs/plugins.md's table."""
    return {
        "declaration": "once on every plugin",
        "study": "every plugin",
        "technique": f"the plugin of the trial's {hookspecs.axis_of(name)} technique",
        "trial": "the plugins taking part in the trial",
    }[kind_of(name)]


def is_firstresult(name: str) -> bool:
    return bool(spec_of(name).harness_spec.get("firstresult"))


def test_the_contract_has_hooks_of_every_kind():
    assert len(HOOKS) >= 20, HOOKS
    assert set(hookspecs.DECLARATION_HOOKS) <= set(HOOKS) and set(hookspecs.STUDY_HOOKS) <= set(HOOKS)
    axes = {hookspecs.axis_of(name) for name in HOOKS} - {None}
    assert axes == set(AXES), f"technique hooks exist for {sorted(axes)}, the axes are {list(AXES)}"
    assert {kind_of(name) for name in HOOKS} == {"declaration", "study", "technique", "trial"}


# ---------------------------------------------------------------------------------------------- docstrings
@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_argument_is_annotated_and_documented(name):
    signature = inspect.signature(spec_of(name))
    doc = inspect.getdoc(spec_of(name)) or ""
    args = list(signature.parameters)
    unannotated = [a for a, p in signature.parameters.items() if p.annotation is inspect.Parameter.empty]
    assert not unannotated, f"{name}: arguments without a type annotation: {unannotated}"
    assert signature.return_annotation is not inspect.Signature.empty, f"{name}: no return annotation"
    documented = re.findall(r"^:param (\w+):", doc, re.M)
    missing = [a for a in args if a not in documented]
    assert not missing, f"{name}: arguments without a ':param NAME:' line: {missing}"
    stray = [a for a in documented if a not in args]
    assert not stray, f"{name}: ':param:' lines for names that are not arguments: {stray}"
    repeated = sorted({a for a in documented if documented.count(a) > 1})
    assert not repeated, f"{name}: arguments documented twice: {repeated}"


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_says_when_it_is_called_and_what_it_returns(name):
    doc = " ".join((inspect.getdoc(spec_of(name)) or "").split())
    assert re.search(r"(^|\. )Called\b", doc), f"{name}: the docstring does not say when it is called ('Called ...')"
    assert ":returns:" in doc, f"{name}: the docstring has no ':returns:' line"
    called = re.search(r"Called\b[^.]*", doc)
    assert called and who_is_called(name) in called.group(0), (
        f"{name} is a {kind_of(name)} hook: its 'Called ...' sentence must say it is called on "
        f"'{who_is_called(name)}' (found: {called.group(0) if called else 'none'!r})")


@pytest.mark.parametrize("name", HOOKS)
def test_technique_hooks_and_only_they_are_firstresult(name):
    assert is_firstresult(name) == (kind_of(name) == "technique"), (
        f"{name}: a {kind_of(name)} hook must {'' if kind_of(name) == 'technique' else 'not '}be firstresult")


@pytest.mark.parametrize("name", [n for n in HOOKS if kind_of(n) != "declaration"])
def test_the_facade_calls_every_hook_with_its_arguments(name):
    """The core calls hooks only through ``Hooks``; each method takes the hook's arguments, in order."""
    method = getattr(Hooks, name.removeprefix("harness_"), None)
    assert method is not None, f"harness.hooks.Hooks has no method {name.removeprefix('harness_')!r} for {name}"
    facade = [p for p in inspect.signature(method).parameters if p != "self"]
    assert facade == list(inspect.signature(spec_of(name)).parameters), (
        f"Hooks.{method.__name__}{tuple(facade)} differs from {name}"
        f"{tuple(inspect.signature(spec_of(name)).parameters)}")


# ---------------------------------------------------------------------------------------------- tested
#: modules that name every hook to check the contract itself; they do not exercise any hook.
CONTRACT_TESTS = {"test_contract.py", "test_architecture.py"}
#: the methods of harness.testing.HookRecorder that ask about one hook.
RECORDER_QUERIES = {"calls_of", "plugins_called", "called"}


def importable_name(path: Path) -> str:
    """``tests/nvml_fake.py`` -> ``nvml_fake``; ``tests/plugin_dist/harness_hello/plugin.py`` ->
    ``harness_hello.plugin`` (up through the folders that are packages)."""
    parts = [path.stem]
    folder = path.parent
    while (folder / "__init__.py").exists():
        parts.insert(0, folder.name)
        folder = folder.parent
    return ".".join(parts)


def sources_of_tests() -> dict[Path, str]:
    """The test modules and conftests under tests/, and the plugin modules under tests/ or examples/ that one of
    them names by importable name (``nvml_fake``, ``two_moons``, ``harness_lion.plugin``): a test that loads a
    test plugin and asserts what it did exercises the plugin's hooks."""
    def python(folder: str) -> dict[Path, str]:
        return {p: p.read_text() for p in sorted((ROOT / folder).rglob("*.py"))
                if not {"build", "__pycache__"} & set(p.relative_to(ROOT).parts) and p.name not in CONTRACT_TESTS}

    tests = {p: s for p, s in python("tests").items() if p.name.startswith("test_") or p.name == "conftest.py"}
    helpers = {p: s for p, s in {**python("tests"), **python("examples")}.items()
               if p not in tests and p.name != "__init__.py" and not p.name.startswith("test_")}
    named = {p: s for p, s in helpers.items()
             if any(re.search(rf"\b{re.escape(importable_name(p))}\b", source) for source in tests.values())}
    return {**tests, **named}


def exercised_hooks(source: str) -> set[str]:
    """Hooks a test module exercises: implemented (``def harness_x`` in a test plugin, module or class), called
    through the facade (``hooks.x(...)`` / ``registry.hooks.x(...)``), asked about with the hook recorder
    (``recorder.calls_of("x")``, ``plugins_called``, ``called``; short or full name) or named as a string (a
    ``parametrize`` list)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in HOOKS:
            found.add(node.name)
        elif isinstance(node, ast.Constant) and node.value in HOOKS:
            found.add(node.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            receiver, method = node.func.value, node.func.attr
            if (isinstance(receiver, ast.Name) and receiver.id == "hooks") or (
                    isinstance(receiver, ast.Attribute) and receiver.attr == "hooks"):
                found.add(f"harness_{method}")
            elif method in RECORDER_QUERIES and node.args and isinstance(node.args[0], ast.Constant):
                found.add(f"harness_{str(node.args[0].value).removeprefix('harness_')}")
    return found & set(HOOKS)


def test_every_hook_is_exercised_by_a_test():
    """A static scan: for each hook, some test implements it in a test plugin, calls it through the facade, or
    names it (a hook recorder). Running every test to observe the calls would take the whole suite."""
    sources = sources_of_tests()
    assert any(p.name.startswith("test_") for p in sources), "found no test modules"
    exercised: set[str] = set()
    for source in sources.values():
        exercised |= exercised_hooks(source)
    untested = [name for name in HOOKS if name not in exercised]
    assert not untested, (
        "hooks no test exercises (implement them in a test plugin and assert their effect, call them through "
        "registry.hooks.<name>(...), or check them with the hook recorder): " + ", ".join(untested))


# ---------------------------------------------------------------------------------------------- docs/plugins.md
TABLE_ROW = re.compile(r"^\| `(harness_\w+)\(([^)]*)\)` \|([^|]*)\|([^|]*)\|([^|]*)\|([^|]*)\|\s*$", re.M)


def hook_table() -> dict[str, tuple[str, ...]]:
    text = (ROOT / "docs" / "plugins.md").read_text()
    rows = TABLE_ROW.findall(text)
    names = [row[0] for row in rows]
    assert len(names) == len(set(names)), f"docs/plugins.md: hooks listed twice in the hook table: {names}"
    return {row[0]: tuple(cell.strip() for cell in row[1:]) for row in rows}


def test_the_hook_table_lists_exactly_the_hooks():
    table = hook_table()
    missing, extra = sorted(set(HOOKS) - set(table)), sorted(set(table) - set(HOOKS))
    assert not missing, f"docs/plugins.md: hooks missing from the hook table: {missing}"
    assert not extra, f"docs/plugins.md: the hook table lists names that are not hooks: {extra}"


@pytest.mark.parametrize("name", HOOKS)
def test_the_hook_table_row_agrees_with_the_hookspec(name):
    """Columns: hook(arguments) | process | who is called | firstresult | return."""
    row = hook_table().get(name)
    if row is None:
        pytest.fail(f"docs/plugins.md: {name} is missing from the hook table")
    args, process, who, firstresult, returns = row
    expected_args = ", ".join(inspect.signature(spec_of(name)).parameters)
    assert args == expected_args, f"docs/plugins.md: {name}({args}) but the hookspec takes ({expected_args})"
    expected = who_is_called(name)
    if kind_of(name) == "technique":
        expected = f"technique hook, {hookspecs.axis_of(name)} axis: {expected}"
    elif kind_of(name) == "trial":
        expected = f"trial hook: {expected}"
    elif kind_of(name) == "study":
        expected = f"study hook: {expected}"
    else:
        expected = f"declaration: {expected}"
    assert who == expected, f"docs/plugins.md: {name}: 'who is called' should read {expected!r}, not {who!r}"
    assert firstresult == ("yes" if is_firstresult(name) else "no"), f"docs/plugins.md: {name}: firstresult"
    assert process and returns, f"docs/plugins.md: {name}: empty 'process' or 'return' cell"


# ---------------------------------------------------------------------------------------------- the lifecycle
def lifecycle_in_hookspecs() -> str:
    """The literal block (after the line ending in ``::``) of hookspecs' module docstring, dedented."""
    lines = (hookspecs.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.rstrip().endswith("::")), None)
    assert start is not None, "harness/hookspecs.py: the module docstring has no '::' lifecycle block"
    block = []
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith(" "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip("\n")


LIFECYCLE_MARK = "<!-- lifecycle: quoted from harness/hookspecs.py -->"


def lifecycle_in_architecture_doc() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    assert LIFECYCLE_MARK in text, f"docs/architecture.md: no {LIFECYCLE_MARK!r} before the lifecycle block"
    found = re.search(r"```\w*\n(.*?)```", text[text.index(LIFECYCLE_MARK):], re.S)
    assert found, "docs/architecture.md: no fenced block after the lifecycle mark"
    return found.group(1).strip("\n")


def test_the_architecture_doc_quotes_the_lifecycle_of_hookspecs():
    hookspec_block, doc_block = lifecycle_in_hookspecs(), lifecycle_in_architecture_doc()
    assert len(hookspec_block.splitlines()) > 10, "the lifecycle block of harness/hookspecs.py is (nearly) empty"
    assert doc_block == hookspec_block, (
        "docs/architecture.md's lifecycle block differs from harness/hookspecs.py's (copy it from the hookspecs):\n"
        + "\n".join(line for line in difflib.unified_diff(
            hookspec_block.splitlines(), doc_block.splitlines(), "harness/hookspecs.py", "docs/architecture.md",
            lineterm="")))


def test_the_lifecycle_names_every_hook_the_core_calls_in_a_trial_or_study():
    block = lifecycle_in_hookspecs()
    missing = [name for name in HOOKS if kind_of(name) != "declaration" and name not in block]
    assert not missing, f"harness/hookspecs.py: the lifecycle block does not mention {missing}"
