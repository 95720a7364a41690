"""The conformance check of a plugin against the contract of :mod:`harness.hookspecs` (``check_plugin``), used by
plugin authors' tests and by ``harness plugins --check``."""
from __future__ import annotations

import inspect
import re
import types
from collections.abc import Mapping
from typing import Any

from harness.config import Setting
from harness.hookspecs import DECLARATION_HOOKS
from harness.space import AXES, Categorical, Float, Int, Requirements, Technique
from harness.workload import WorkloadInfo

#: kebab-case: lower-case words of letters and digits joined by single hyphens (``amp-bf16``, ``lion``).
NAME_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

#: the hook a technique of each axis needs, because the runner requires a result from it.
REQUIRED_HOOK = {"optimizer": "harness_build_optimizer", "precision": "harness_setup_precision",
                 "parallelism": "harness_build_engine"}


def check_plugin(plugin: Any, raises: bool = True) -> list[str]:
    """Check a plugin -- a module, a class (instantiated once, as the plugin manager does) or an instance with
    ``@harness.hookimpl`` functions or methods -- against the contract.

    Checks, each reported as one line naming the plugin:

    - every hook implementation through pluggy's own validation (arguments must be a subset of the hook
      spec's), unknown hook names (with a did-you-mean), and ``harness_*`` functions that lack the
      ``@hookimpl`` marker (pluggy would silently ignore them);
    - declarations the way the plugin manager checks them at load time, plus: names in kebab-case and unique
      within the plugin, parameter spaces of ``Float``/``Int``/``Categorical`` with valid ranges and defaults,
      sane :class:`Requirements`, ``incompatible`` entries as ``"axis:name"`` on another axis with a reason, workloads
      whose ``build`` accepts ``device``, ``seed`` and every declared parameter;
    - techniques on the optimizer, precision and parallelism axes implement the hook that builds them;
    - a technique hook (``harness.hookspecs.axis_of(hook)``) is implemented only by a plugin that declares a
      technique on that hook's axis: the harness calls it only on the plugin that declared the trial's
      technique, so any other implementation would never run;
    - no technique, workload or study-file section it declares is already declared by another installed
      plugin (a built-in or a third party's): installed together, the harness would disable one of the two.

    :param raises: raise ``AssertionError`` listing every problem (default), or only return them.
    :returns: the problems found (an empty list for a conforming plugin).
    """
    original = plugin
    if isinstance(plugin, type):
        name, plugin = plugin.__name__, plugin()
    else:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
    hooks = _hook_functions(plugin)
    marked = {attr for attr, func in hooks.items() if hasattr(func, "harness_impl")}
    problems = _hook_problems(hooks, name)
    declared, load_errors, problems_calling = _declarations(plugin)
    problems += problems_calling
    seen: set[Any] = set()
    for item, load_error in zip(declared, load_errors, strict=True):
        if isinstance(item, Technique):
            found = _technique_problems(item, marked, seen)
        elif isinstance(item, WorkloadInfo):
            found = _workload_problems(item, seen)
        else:
            found = []
        # the plugin manager's own verdict, unless the finer checks above already explain it
        problems += found or ([f"bad declaration: {load_error}"] if load_error else [])
    problems += _axis_problems(marked, {item.axis for item in declared if isinstance(item, Technique)})
    problems += _clash_problems(original, plugin, declared)
    problems = [f"{name}: {p}" for p in problems]
    if problems and raises:
        raise AssertionError(f"plugin {name} does not conform ({len(problems)} problem(s)):\n  "
                             + "\n  ".join(problems))
    return problems


def _hook_functions(plugin: Any) -> dict[str, Any]:
    """Every ``harness_*`` function or method of the plugin, marked or not."""
    return {attr: getattr(plugin, attr) for attr in dir(plugin)
            if attr.startswith("harness_") and inspect.isroutine(getattr(plugin, attr, None))}


def _hook_problems(hooks: Mapping[str, Any], name: str) -> list[str]:
    import pluggy

    from harness import hookspecs
    from harness.plugins import unknown_arguments, unknown_hooks

    problems = []
    for attr, func in sorted(hooks.items()):
        if not hasattr(func, "harness_impl"):
            problems.append(f"{attr} is not marked with @harness.hookimpl, so the harness never calls it")
            continue
        # One plugin manager per implementation, so every bad signature is reported, not only the first.
        pm = pluggy.PluginManager("harness")
        pm.add_hookspecs(hookspecs)
        single = types.SimpleNamespace(**{attr: func})
        try:
            pm.register(single, name=f"{name}.{attr}")
        except pluggy.PluginValidationError as exc:
            lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
            problems.append(f"hook signature error: {unknown_arguments(attr, func) or '; '.join(lines)}")
            continue
        problems += unknown_hooks(pm, single)
    return problems


def _is_same_plugin(loaded: Any, original: Any, instance: Any) -> bool:
    """Whether ``loaded`` (what the plugin manager registered) is the plugin being checked."""
    if loaded is original or loaded is instance:
        return True
    if isinstance(loaded, types.ModuleType):
        return isinstance(original, types.ModuleType) and loaded.__name__ == original.__name__
    return type(loaded) is (original if isinstance(original, type) else type(instance))


def _clash_problems(original: Any, instance: Any, declared: list[Any]) -> list[str]:
    """Names the plugin declares that another installed plugin (entry points, ``HARNESS_PLUGINS``) already
    declares: the plugin manager would disable one of the two."""
    import contextlib
    import io

    from harness.plugins import Registry

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # other plugins' load errors are not this check's
            registry = Registry()
    except Exception:  # noqa: BLE001 (an environment whose plugins cannot load has nothing to clash with)
        return []

    def owner(plugin_name: str, what: str) -> str | None:
        if not plugin_name or _is_same_plugin(registry.plugin(plugin_name), original, instance):
            return None
        rec = registry.records.get(plugin_name)
        dist = f" ({' '.join(filter(None, (rec.distribution, rec.version)))})" if rec and rec.distribution else ""
        return (f"{what} is already declared by the installed plugin {plugin_name!r}{dist}; installed together, "
                "the harness disables one of the two plugins: rename it")

    problems = []
    for item in declared:
        if isinstance(item, Technique):
            other = registry.techniques.get((item.axis, item.name))
            found = owner(other.plugin, f"technique {item.axis}:{item.name}: the name") if other else None
        elif isinstance(item, WorkloadInfo):
            info = registry.workloads.get(item.name)
            found = owner(info.plugin, f"workload {item.name!r}: the name") if info else None
        elif isinstance(item, Setting):
            setting = registry.settings.get(item.key)
            found = owner(setting.plugin, f"study-file section {item.key!r}") if setting else None
        else:
            found = None
        if found:
            problems.append(found)
    return problems


def _axis_problems(marked: set[str], axes: set[str]) -> list[str]:
    """Technique hooks implemented without a technique of their axis: dispatch by declaration never calls them."""
    from harness.hookspecs import axis_of

    problems = []
    for attr in sorted(marked):
        axis = axis_of(attr)
        if axis is not None and axis not in axes:
            problems.append(f"{attr} is a technique hook of the {axis} axis, but the plugin declares no {axis} "
                            "technique, so the harness never calls it")
    return problems


def _declarations(plugin: Any) -> tuple[list[Any], list[str], list[str]]:
    """Call the plugin's declaration hooks; return the declared items, the plugin manager's load-time verdict
    on each (an error message or ``""``) and problems calling the hooks themselves."""
    from harness.errors import PluginError
    from harness.plugins import check_declaration

    items: list[Any] = []
    verdicts: list[str] = []
    problems: list[str] = []
    for hookname in DECLARATION_HOOKS:
        func = getattr(plugin, hookname, None)
        if func is None or not hasattr(func, "harness_impl"):
            continue
        try:
            declared = func()
        except Exception as exc:  # a plugin's own declaration code failed: that is the finding
            problems.append(f"{hookname} raised {type(exc).__name__}: {exc}")
            continue
        if declared is None:
            continue
        if not isinstance(declared, (list, tuple)):
            problems.append(f"{hookname} must return a list, got {type(declared).__name__}")
            continue
        for item in declared:
            try:
                check_declaration("", hookname, item)
                verdicts.append("")
            except PluginError as exc:
                verdicts.append(str(exc))
            items.append(item)
    return items, verdicts, problems


def _param_problems(owner: str, space: Any, free_form: tuple[type, ...] = ()) -> list[str]:
    """Problems of a parameter space; ``free_form`` names extra parameter types allowed (workloads' Text)."""
    if not isinstance(space, Mapping):
        return [f"{owner}: the search space must be a mapping of parameter name -> Float/Int/Categorical"]
    problems = []
    for key, param in space.items():
        where = f"{owner}: parameter {key!r}"
        if not isinstance(key, str) or not key.isidentifier():
            problems.append(f"{where}: the name must be an identifier (it is a YAML key and a --set field)")
        elif key == "name":
            problems.append(f"{where}: 'name' is reserved (it selects the technique in trial and study files)")
        if isinstance(param, (Float, Int)):
            problems += _range_problems(where, param)
        elif isinstance(param, Categorical):
            if not isinstance(param.choices, tuple) or not param.choices:
                problems.append(f"{where}: choices must be a non-empty tuple, got {param.choices!r}")
            elif len(set(map(repr, param.choices))) != len(param.choices):
                problems.append(f"{where}: duplicate choices in {param.choices!r}")
            elif param.default is not None and param.default not in param.choices:
                problems.append(f"{where}: default {param.default!r} is not one of {param.choices!r}")
        elif not isinstance(param, free_form):
            allowed = ", ".join(["Float", "Int", "Categorical", *(t.__name__ for t in free_form)])
            problems.append(f"{where} must be one of {allowed}, got {type(param).__name__}")
    return problems


def _range_problems(where: str, param: Float | Int) -> list[str]:
    problems = []
    if param.low > param.high:
        problems.append(f"{where}: low {param.low!r} > high {param.high!r}")
    if param.log and param.low <= 0:
        problems.append(f"{where}: a log range needs low > 0 (got {param.low!r})")
    if isinstance(param, Int) and (not isinstance(param.step, int) or param.step < 1):
        problems.append(f"{where}: step must be a positive integer, got {param.step!r}")
    if param.default is not None:
        try:
            param.validate("default", param.default)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    return problems


def _tuple_of_str(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, str) and v for v in value)


def _requirement_problems(owner: str, req: Any) -> list[str]:
    if not isinstance(req, Requirements):
        return [f"{owner}: requires must be a harness.space.Requirements, got {type(req).__name__}"]
    problems = []
    if not isinstance(req.cuda, bool):
        problems.append(f"{owner}: requires.cuda must be True or False, got {req.cuda!r}")
    cc = req.min_compute_capability
    if cc is not None and not (isinstance(cc, tuple) and len(cc) == 2 and all(isinstance(v, int) for v in cc)):
        problems.append(f"{owner}: requires.min_compute_capability must be (major, minor) integers, got {cc!r}")
    if isinstance(req.min_devices, bool) or not isinstance(req.min_devices, int) or req.min_devices < 1:
        problems.append(f"{owner}: requires.min_devices must be an integer >= 1, got {req.min_devices!r}")
    elif req.max_devices is not None and (not isinstance(req.max_devices, int) or req.max_devices < req.min_devices):
        problems.append(f"{owner}: requires.max_devices {req.max_devices!r} is below min_devices {req.min_devices}")
    for name in ("packages", "workload_kinds"):
        value = getattr(req, name)
        if not _tuple_of_str(value):
            hint = " (a one-element tuple needs a trailing comma)" if isinstance(value, str) else ""
            problems.append(f"{owner}: requires.{name} must be a tuple of names, got {value!r}{hint}")
    return problems


def _technique_problems(tech: Technique, marked: set[str], seen: set[Any]) -> list[str]:
    owner = f"technique {tech.axis}:{tech.name}"
    problems = []
    if tech.axis not in AXES:
        problems.append(f"{owner}: unknown axis {tech.axis!r} (allowed: {', '.join(AXES)})")
    if not isinstance(tech.name, str) or not NAME_PATTERN.match(tech.name):
        problems.append(f"{owner}: the name must be kebab-case (lower-case letters, digits, single hyphens)")
    if (tech.axis, tech.name) in seen:
        problems.append(f"{owner}: declared twice")
    seen.add((tech.axis, tech.name))
    problems += _param_problems(owner, tech.space)
    problems += _requirement_problems(owner, tech.requires)
    problems += _incompatible_problems(owner, tech)
    required = REQUIRED_HOOK.get(tech.axis)
    if required and required not in marked:
        problems.append(f"{owner}: the plugin implements no {required}, so a trial selecting it would fail")
    return problems


def _incompatible_problems(owner: str, tech: Technique) -> list[str]:
    rules = tech.incompatible
    if not isinstance(rules, (tuple, Mapping)):
        return [f"{owner}: incompatible must be a tuple of 'axis:name' strings or a mapping 'axis:name' -> "
                f"reason, got {rules!r}"]
    problems = []
    for rule in rules:
        why = rules[rule] if isinstance(rules, Mapping) else tech.reason
        if not isinstance(why, str):
            problems.append(f"{owner}: the reason of incompatible entry {rule!r} must be a string, got {why!r}")
        elif not (why or tech.reason).strip():
            problems.append(f"{owner}: incompatible entry {rule!r} has no reason (users see it with the "
                            "infeasible verdict: give each entry its reason, or set reason)")
        axis, sep, other = str(rule).partition(":")
        if not sep or axis not in AXES or not other:
            problems.append(f"{owner}: incompatible entry {rule!r} is not 'axis:name' (axes: {', '.join(AXES)})")
        elif axis == tech.axis:
            problems.append(f"{owner}: incompatible entry {rule!r} names its own axis (one technique per axis is "
                            "chosen anyway)")
        elif not NAME_PATTERN.match(other):
            problems.append(f"{owner}: incompatible entry {rule!r} does not name a kebab-case technique")
    return problems


def _workload_problems(info: WorkloadInfo, seen: set[Any]) -> list[str]:
    from harness.workload import Text

    owner = f"workload {info.name!r}"
    problems = []
    if not isinstance(info.name, str) or not NAME_PATTERN.match(info.name):
        problems.append(f"{owner}: the name must be kebab-case (lower-case letters, digits, single hyphens)")
    if info.name in seen:
        problems.append(f"{owner}: declared twice")
    seen.add(info.name)
    problems += _param_problems(owner, info.params, (Text,))
    if getattr(info, "validate", None) is not None and not callable(info.validate):
        problems.append(f"{owner}: validate must be a callable taking the parameters, got {info.validate!r}")
    if not _tuple_of_str(info.kinds):
        problems.append(f"{owner}: kinds must be a tuple of names, got {info.kinds!r}")
    if not callable(info.build):
        return problems + [f"{owner}: build is not callable"]
    try:
        sig = inspect.signature(info.build)
    except (TypeError, ValueError):
        return problems
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return problems
    accepted = {k for k, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    missing = [k for k in ("device", "seed", *info.params) if k not in accepted]
    if missing:
        problems.append(f"{owner}: build{sig} does not accept {', '.join(map(repr, missing))} "
                        "(it is called as build(device=..., seed=..., **params))")
    return problems
