"""The plugin manager: loads built-in and third-party plugins from the ``harness.plugins`` entry points.

Built-ins are registered exactly like anyone else's plugin. A plugin is disabled by its entry-point name
(``--disable NAME`` / ``HARNESS_DISABLE_PLUGINS=a,b``); extra plugin modules can be named in
``HARNESS_PLUGINS=pkg.mod,other.mod`` (the way ``pytest -p`` works), which also reaches trial processes.
A plugin that fails to import, declares nonsense or breaks a hook signature is reported in one line by name
and left out; the others keep working.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import pluggy

from harness import hookspecs
from harness.config import Setting
from harness.errors import PluginError, SpecError, shown
from harness.hooks import Hooks
from harness.measure import CORE_METRICS, Metric
from harness.space import AXES, Categorical, Float, Int, Technique, did_you_mean
from harness.workload import WorkloadInfo

ENTRY_POINT_GROUP = "harness.plugins"
hookimpl = pluggy.HookimplMarker("harness")


@dataclass
class PluginRecord:
    """What ``harness plugins`` shows about one plugin."""

    name: str
    module: str
    distribution: str = ""
    version: str = ""
    techniques: list[Technique] = field(default_factory=list)
    workloads: list[WorkloadInfo] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    error: str = ""


def _env_list(name: str) -> list[str]:
    return [p.strip() for p in os.environ.get(name, "").split(",") if p.strip()]


class Registry:
    """The loaded plugins: their declarations (techniques, workloads, metrics, study-file settings) and the
    typed hook facade (``registry.hooks``) through which the core calls them."""

    def __init__(self, disable: Iterable[str] = (), extra: Iterable[Any] = (), entry_points: bool = True):
        self.pm = pluggy.PluginManager("harness")
        self.pm.add_hookspecs(hookspecs)
        self.disabled = set(disable) | set(_env_list("HARNESS_DISABLE_PLUGINS"))
        self.records: dict[str, PluginRecord] = {}
        self.techniques: dict[tuple[str, str], Technique] = {}
        self.workloads: dict[str, WorkloadInfo] = {}
        self.metrics: dict[str, Metric] = {m.name: m for m in CORE_METRICS}
        self.settings: dict[str, Setting] = {}
        self._entry_points: dict[str, Any] = {}
        if entry_points:
            for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                self._entry_points.setdefault(ep.name, ep)
                if ep.name in self.disabled:
                    continue
                dist = getattr(ep, "dist", None)
                rec = PluginRecord(ep.name, ep.value, dist.name if dist else "", dist.version if dist else "")
                try:
                    plugin = _instantiate(ep.load())
                except Exception as exc:  # any import-time failure of a third party's code
                    self._fail(rec, f"failed to import {ep.value}: {type(exc).__name__}: {exc}")
                    continue
                self._register(plugin, ep.name, rec)
        for i, item in enumerate(list(_env_list("HARNESS_PLUGINS")) + list(extra)):
            if isinstance(item, str):
                rec = PluginRecord(item, item, "HARNESS_PLUGINS")
                if item in self.disabled:
                    continue
                try:
                    plugin = _instantiate(importlib.import_module(item))
                except Exception as exc:
                    self._fail(rec, f"failed to import {item}: {type(exc).__name__}: {exc}")
                    continue
                self._register(plugin, item, rec)
            else:
                plugin = _instantiate(item)
                name = getattr(item, "__name__", None) or f"{type(item).__name__}-{i}"
                self._register(plugin, name, PluginRecord(name, name))
        self._collect()
        self.pm.check_pending()
        if entry_points:
            self._check_essential()
        owners: dict[tuple[str, str], str] = {k: t.plugin for k, t in self.techniques.items()}
        owners.update({("workload", k): w.plugin for k, w in self.workloads.items()})
        declaring = set(owners.values())
        observers = [name for name, _ in self.pm.list_name_plugin() if name not in declaring]
        #: the typed facade: the only way the core calls hooks.
        self.hooks = Hooks(self.pm, owners, observers)

    # ------------------------------------------------------------------------------------------ loading
    def _fail(self, rec: PluginRecord, message: str) -> None:
        rec.error = message
        self.records[rec.name] = rec
        print(f"harness: plugin {rec.name!r} disabled: {message}", file=sys.stderr)

    def _register(self, plugin: Any, name: str, rec: PluginRecord) -> None:
        if self.pm.has_plugin(name):
            first = self.records[name].module if name in self.records else name
            self._fail(PluginRecord(f"{name} ({rec.module})", rec.module, rec.distribution, rec.version),
                       f"plugin name {name!r} is already registered by {first} (plugin names must be unique)")
            return
        if self.pm.is_registered(plugin):
            self._fail(rec, f"{rec.module} is already registered as plugin {self.pm.get_name(plugin)!r}")
            return
        try:
            self.pm.register(plugin, name=name)
            unknown = unknown_hooks(self.pm, plugin)
            if unknown:
                raise PluginError(unknown[0])
        except (pluggy.PluginValidationError, PluginError) as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(rec, f"hook signature error: {signature_problem(plugin, exc)}")
            return
        rec.hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])
        self.records[name] = rec

    def _collect(self) -> None:
        for name, plugin in list(self.pm.list_name_plugin()):
            rec = self.records[name]
            try:
                found = {hook: [check_declaration(name, hook, item) for item in _declared(self.pm, plugin, hook)]
                         for hook in _DECLARATIONS}
                self._add(rec, found)
            except PluginError as exc:
                self.pm.unregister(plugin)
                self._forget(name)
                self._fail(rec, f"bad declaration: {exc}" if not str(exc).startswith("declares") else str(exc))

    def _add(self, rec: PluginRecord, found: dict[str, list[Any]]) -> None:
        """Add one plugin's declarations; a name another plugin already declared is an error."""
        for tech in found["harness_declare_techniques"]:
            other = self.techniques.get((tech.axis, tech.name))
            if other is not None:
                raise PluginError(f"declares {tech.axis} technique {tech.name!r}, already declared by plugin "
                                  f"{other.plugin!r}")
            if tech.default:
                current = self.default_technique(tech.axis, required=False)
                if current is not None:
                    raise PluginError(f"declares {tech.name!r} the default {tech.axis} technique, but plugin "
                                      f"{current.plugin!r} already declares {current.name!r} the default")
            self.techniques[(tech.axis, tech.name)] = tech
            rec.techniques.append(tech)
        for info in found["harness_declare_workloads"]:
            if info.name in self.workloads:
                raise PluginError(f"declares workload {info.name!r}, already declared by plugin "
                                  f"{self.workloads[info.name].plugin!r}")
            if info.default and any(w.default for w in self.workloads.values()):
                raise PluginError(f"declares workload {info.name!r} the default, but another plugin already does")
            self.workloads[info.name] = info
            rec.workloads.append(info)
        for metric in found["harness_declare_metrics"]:
            other_m = self.metrics.get(metric.name)
            if other_m is not None and (other_m.key, other_m.unit, other_m.direction) != (
                    metric.key, metric.unit, metric.direction):
                raise PluginError(f"declares metric {metric.name!r} differently from "
                                  f"{'the core' if not other_m.plugin else 'plugin ' + repr(other_m.plugin)}")
            self.metrics.setdefault(metric.name, metric)
            rec.metrics.append(metric)
        for setting in found["harness_declare_study_settings"]:
            if setting.key in self.settings:
                raise PluginError(f"declares study-file section {setting.key!r}, already declared by plugin "
                                  f"{self.settings[setting.key].plugin!r}")
            self.settings[setting.key] = setting

    def _forget(self, plugin_name: str) -> None:
        tables: tuple[dict[Any, Any], ...] = (self.techniques, self.workloads, self.metrics, self.settings)
        for table in tables:
            for key in [k for k, v in table.items() if v.plugin == plugin_name]:
                del table[key]
        rec = self.records.get(plugin_name)
        if rec is not None:
            rec.techniques, rec.workloads = [], []

    def _check_essential(self) -> None:
        """Every axis (and the workloads) must keep its default: a disabled plugin that provides one is an error."""
        missing = [axis for axis in AXES if self.default_technique(axis, required=False) is None]
        if not any(w.default for w in self.workloads.values()):
            missing.append("workload")
        if not missing:
            return
        for name in sorted(self.disabled & set(self._entry_points)):
            try:
                module = _instantiate(self._entry_points[name].load())
            except Exception:  # cannot be imported: it cannot be what provides the default either
                continue
            for tech in [*_plain_declared(module, "harness_declare_techniques"),
                         *_plain_declared(module, "harness_declare_workloads")]:
                axis = getattr(tech, "axis", "workload")
                if getattr(tech, "default", False) and axis in missing:
                    raise SpecError(f"--disable: plugin {name!r} is essential: it provides the default {axis} "
                                    f"{tech.name!r} (plugins that declare a default cannot be disabled)")

    # ------------------------------------------------------------------------------------------ queries
    def plugin(self, name: str) -> Any:
        """The registered plugin object (module or instance) named ``name``, or None."""
        return self.pm.get_plugin(name)

    def names(self, axis: str) -> list[str]:
        return sorted(name for (a, name) in self.techniques if a == axis)

    @overload
    def default_technique(self, axis: str) -> Technique: ...

    @overload
    def default_technique(self, axis: str, required: Literal[True]) -> Technique: ...

    @overload
    def default_technique(self, axis: str, required: bool) -> Technique | None: ...

    def default_technique(self, axis: str, required: bool = True) -> Technique | None:
        """The technique declared ``default=True`` on ``axis`` (SpecError when none is and ``required``)."""
        for (a, _), tech in self.techniques.items():
            if a == axis and tech.default:
                return tech
        if required:
            raise SpecError(f"{axis}: no loaded plugin declares a default {axis} technique "
                            f"(known: {', '.join(self.names(axis)) or 'none'}); name one{self._broken_hint()}")
        return None

    def default_workload(self) -> str:
        """The name of the workload declared ``default=True``."""
        for info in self.workloads.values():
            if info.default:
                return info.name
        raise SpecError(f"workload: no loaded plugin declares a default workload (known: "
                        f"{', '.join(sorted(self.workloads)) or 'none'}); name one{self._broken_hint()}")

    def technique(self, where: str, axis: str, name: str) -> Technique:
        tech = self.techniques.get((axis, name))
        if tech is None:
            known = self.names(axis)
            raise SpecError(f"{where}: unknown technique {shown(name)} (known: {', '.join(known) or 'none'})"
                            f"{did_you_mean(name, known)}{self._broken_hint()}")
        return tech

    def metric(self, where: str, name: Any) -> Metric:
        """The metric a study file names, or SpecError listing the known ones."""
        metric = self.metrics.get(name) if isinstance(name, str) else None
        if metric is None:
            raise SpecError(f"{where}: unknown metric {shown(name)} (known: {', '.join(self.metrics)})"
                            f"{did_you_mean(str(name), self.metrics)}")
        return metric

    def _broken_hint(self) -> str:
        """Names the plugins that failed to load: the unknown name may be one of theirs."""
        broken = [f"plugin {r.name!r} failed to load ({r.error})" for r in self.records.values() if r.error]
        return f"; {'; '.join(broken)}" if broken else ""

    def workload_info(self, where: str, name: str) -> WorkloadInfo:
        if ":" in name:
            return _import_workload(where, name)
        info = self.workloads.get(name)
        if info is None:
            known = sorted(self.workloads)
            raise SpecError(f"{where}: unknown workload {shown(name)} (known: {', '.join(known)}, or module:function)"
                            f"{did_you_mean(name, known)}{self._broken_hint()}")
        return info

    def validate_workload(self, where: str, name: str, params: Mapping[str, Any]) -> dict[str, Any]:
        info = self.workload_info(where, name)
        if ":" in name:
            return dict(params)  # a bring-your-own builder takes its parameters as keyword arguments
        out = {k: p.default for k, p in info.params.items() if p.default is not None}
        for key, value in params.items():
            if key not in info.params:
                raise SpecError(f"{where}: unknown parameter {key!r} of workload {name!r} "
                                f"(allowed: {', '.join(info.params) or 'none'}){did_you_mean(key, info.params)}")
            out[key] = info.params[key].validate(f"{where}.{key}", value)
        if info.validate is not None:
            info.validate(out)
        return out

    def build_workload(self, spec: Any, device: Any) -> Any:
        """Build ``spec``'s workload with its declared builder (dispatch by declaration, no hook)."""
        info = self.workload_info("workload", spec.workload)
        return info.build(device=device, seed=spec.seed, **spec.workload_params)

    def workload_kinds(self, name: str) -> tuple[str, ...]:
        try:
            return self.workload_info("workload", name).kinds
        except SpecError:
            return ()

    def workload_params(self, name: str) -> Mapping[str, Any]:
        """The parameter declarations of workload ``name`` (none for a bring-your-own builder)."""
        try:
            return {} if ":" in name else self.workload_info("workload", name).params
        except SpecError:
            return {}


def hook_names() -> list[str]:
    """Every hook name of the contract (:mod:`harness.hookspecs`)."""
    return [n for n in dir(hookspecs) if n.startswith("harness_")]


def unknown_hooks(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """One message per hook implementation of a registered ``plugin`` that matches no hook spec (a typo)."""
    return [f"implements unknown hook {c.name!r}{did_you_mean(c.name, hook_names())}"
            for c in pm.get_hookcallers(plugin) or [] if c.spec is None]


def hook_arguments(func: Callable[..., Any]) -> list[str]:
    """The arguments pluggy passes to a hook function: its named parameters without a default (``self`` of a
    bound method excluded)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty]


def unknown_arguments(hookname: str, func: Callable[..., Any]) -> str | None:
    """``harness_x(a, b): unknown argument 'b' (allowed: a, c)`` when ``func`` takes arguments the hook
    ``hookname`` does not pass, else None."""
    spec = getattr(hookspecs, hookname, None)
    if spec is None:
        return None
    allowed = list(inspect.signature(spec).parameters)
    taken = hook_arguments(func)
    unknown = [a for a in taken if a not in allowed]
    if not unknown:
        return None
    words = ", ".join(repr(a) for a in unknown)
    hint = did_you_mean(unknown[0], allowed) if len(unknown) == 1 else ""
    return (f"{hookname}({', '.join(taken)}): unknown argument{'s' if len(unknown) > 1 else ''} {words} "
            f"(allowed: {', '.join(allowed) or 'none'}){hint}")


def signature_problem(plugin: Any, exc: Exception) -> str:
    """One line for a hook implementation pluggy refused: the unknown arguments with the allowed ones, or
    pluggy's own message (which spans lines) on one line."""
    found = [problem for attr in sorted(dir(plugin)) if attr.startswith("harness_")
             and hasattr(getattr(plugin, attr, None), "harness_impl")
             for problem in [unknown_arguments(attr, getattr(plugin, attr))] if problem]
    if found:
        return "; ".join(found)
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


#: where a bring-your-own ``module:function`` workload is looked for, in the words of an import error.
WORKLOAD_PATH_HELP = ("the harness looks in the current directory, the study or trial file's directory and "
                      "PYTHONPATH")


def _import_workload(where: str, target: str) -> WorkloadInfo:
    """Resolve a bring-your-own ``module:function`` workload; the function takes (device, seed, **params).

    An import that fails is one line saying which module is missing and how to make it importable."""
    module_name, _, func_name = target.partition(":")
    if not module_name or not func_name:
        raise SpecError(f"{where}: workload {shown(target)} is not 'module:function' (e.g. my_model:build)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            file = module_name.replace(".", "/") + ".py"
            raise SpecError(f"{where}: cannot import module {module_name!r} of workload {target!r}: no {file} on "
                            f"the Python path ({WORKLOAD_PATH_HELP}); run from the directory that holds {file}, "
                            "put the study file next to it, or add its directory to PYTHONPATH") from None
        raise SpecError(f"{where}: module {module_name!r} of workload {target!r} imports {exc.name!r}, which is "
                        f"not installed ({type(exc).__name__}: {exc}); pip install it") from None
    except Exception as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        at = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise SpecError(f"{where}: importing module {module_name!r} of workload {target!r} failed{at}: "
                        f"{type(exc).__name__}: {first}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        known = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")
                       and v.__module__ == module.__name__)
        raise SpecError(f"{where}: module {module_name!r} ({getattr(module, '__file__', '?')}) has no function "
                        f"{func_name!r} (its functions: {', '.join(known) or 'none'}){did_you_mean(func_name, known)}")
    return WorkloadInfo(name=target, build=func, kinds=tuple(getattr(func, "kinds", ())), plugin=module_name)


def workload_search_path(*dirs: str | os.PathLike[str]) -> Callable[[], None]:
    """Make ``dirs`` (the current directory, a study or trial file's directory) importable, in that order, for
    ``module:function`` workloads: first on ``sys.path`` here, and on ``PYTHONPATH`` for the trial processes
    this process starts (``python -m harness.worker`` puts its current directory, the same one, first too).
    Returns the function that undoes it."""
    added = [d for d in dict.fromkeys(os.path.abspath(d) for d in dirs) if os.path.isdir(d)]
    inserted = [d for d in added if d not in sys.path]
    saved_env = os.environ.get("PYTHONPATH")
    sys.path[:0] = inserted
    if added:
        os.environ["PYTHONPATH"] = os.pathsep.join([*added, *([saved_env] if saved_env else [])])

    def undo() -> None:
        for d in inserted:
            if d in sys.path:
                sys.path.remove(d)
        if saved_env is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved_env

    return undo


def _instantiate(obj: Any) -> Any:
    """A plugin named by a class is instantiated once per registry, so its state lives on the instance."""
    return obj() if isinstance(obj, type) else obj


def _declared(pm: pluggy.PluginManager, plugin: Any, hook: str) -> list[Any]:
    """What ``plugin``'s implementation of the declaration ``hook`` returns (an empty list without one)."""
    impls = [i for caller in pm.get_hookcallers(plugin) or [] if caller.name == hook
             for i in caller.get_hookimpls() if i.plugin is plugin]
    if not impls:
        return []
    try:
        declared = impls[0].function() or []
    except Exception as exc:  # a third party's declaration code failed: report it like a bad declaration
        raise PluginError(f"{hook} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(declared, (list, tuple)):
        raise PluginError(f"{hook} returned {type(declared).__name__}, not a list")
    return list(declared)


def _plain_declared(module: Any, hook: str) -> list[Any]:
    """A declaration of a plugin that is not registered (to explain why it cannot be disabled)."""
    func = getattr(module, hook, None)
    try:
        return list(func() or []) if callable(func) else []
    except Exception:  # its declarations are broken: it provides no default
        return []


def _technique_problem(tech: Technique) -> str | None:
    if tech.axis not in AXES:
        return f"technique {tech.name!r}: unknown axis {tech.axis!r} (allowed: {', '.join(AXES)})"
    if not tech.name or not isinstance(tech.name, str) or tech.name != tech.name.strip():
        return f"technique on axis {tech.axis!r} has an invalid name {tech.name!r}"
    for key, param in tech.space.items():
        if not isinstance(param, (Float, Int, Categorical)):
            return f"technique {tech.name!r}: parameter {key!r} must be Float, Int or Categorical"
        if not isinstance(param, Categorical) and param.low > param.high:
            return f"technique {tech.name!r}: parameter {key!r} has low > high"
    if isinstance(tech.incompatible, Mapping) and not all(isinstance(v, str) for v in tech.incompatible.values()):
        return f"technique {tech.name!r}: the reasons in incompatible must be strings"
    for rule in tech.incompatible:
        axis, sep, other = str(rule).partition(":")
        if not sep or axis not in AXES or not other:
            return f"technique {tech.name!r}: incompatible entry {rule!r} is not 'axis:name'"
    return None


#: per declaration hook: the type each declared item must have, and what else is wrong with it (or None).
_DECLARATIONS: dict[str, tuple[type, Callable[[Any], str | None]]] = {
    "harness_declare_techniques": (Technique, _technique_problem),
    "harness_declare_workloads": (WorkloadInfo, lambda w: None if callable(w.build) else
                                  f"workload {w.name!r}: build is not callable"),
    "harness_declare_metrics": (Metric, lambda m: None if m.direction in ("maximize", "minimize") else
                                f"metric {m.name!r}: direction {m.direction!r} (allowed: maximize, minimize)"),
    "harness_declare_study_settings": (Setting, lambda s: None if callable(s.validate) else
                                       f"study-file section {s.key!r}: validate is not callable"),
}


def check_declaration(plugin: str, hook: str, item: Any) -> Any:
    """``item``, declared by ``plugin`` through the declaration ``hook``, stamped with the plugin's name; a
    :class:`PluginError` naming what is wrong otherwise (the loader disables such a plugin)."""
    cls, problem = _DECLARATIONS[hook]
    if not isinstance(item, cls):
        raise PluginError(f"{hook} returned {item!r}, not a {cls.__module__}.{cls.__name__}")
    reason = problem(item)
    if reason:
        raise PluginError(reason)
    return dataclasses.replace(item, plugin=plugin)  # type: ignore[type-var]  # every cls is a dataclass


def get_registry(disable: Iterable[str] = (), extra: Iterable[Any] = ()) -> Registry:
    """Load every plugin (entry points, ``HARNESS_PLUGINS``, ``extra``) except the disabled ones."""
    return Registry(disable=disable, extra=extra)
