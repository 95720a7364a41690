"""The plugin manager: loads built-in and third-party plugins from the ``harness.plugins`` entry points.

Built-ins are registered exactly like anyone else's plugin. A plugin is disabled by its entry-point name
(``--disable NAME`` / ``HARNESS_DISABLE_PLUGINS=a,b``); extra plugin modules can be named in
``HARNESS_PLUGINS=pkg.mod,other.mod`` (the way ``pytest -p`` works), which also reaches trial processes.
A plugin that fails to import, declares nonsense or breaks a hook signature is reported in one line by name
and left out; the others keep working.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import pluggy

from harness import hookspecs
from harness.errors import PluginError, SpecError
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
    hooks: list[str] = field(default_factory=list)
    error: str = ""


def _env_list(name: str) -> list[str]:
    return [p.strip() for p in os.environ.get(name, "").split(",") if p.strip()]


class Registry:
    """The loaded plugins, their hooks (``registry.hook``), techniques and workloads."""

    def __init__(self, disable: Iterable[str] = (), extra: Iterable[Any] = (), entry_points: bool = True):
        self.pm = pluggy.PluginManager("harness")
        self.pm.add_hookspecs(hookspecs)
        self.disabled = set(disable) | set(_env_list("HARNESS_DISABLE_PLUGINS"))
        self.records: dict[str, PluginRecord] = {}
        self.techniques: dict[tuple[str, str], Technique] = {}
        self.workloads: dict[str, WorkloadInfo] = {}
        self._register(_CoreHooks(self), "harness-core", "harness.plugins")
        if entry_points:
            for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                if ep.name in self.disabled:
                    continue
                dist = getattr(ep, "dist", None)
                rec = PluginRecord(ep.name, ep.value, dist.name if dist else "", dist.version if dist else "")
                try:
                    plugin = ep.load()
                except Exception as exc:  # any import-time failure of a third party's code
                    self._fail(rec, f"failed to import {ep.value}: {type(exc).__name__}: {exc}")
                    continue
                self._register(plugin, ep.name, ep.value, rec)
        for i, item in enumerate(list(_env_list("HARNESS_PLUGINS")) + list(extra)):
            if isinstance(item, str):
                rec = PluginRecord(item, item, "HARNESS_PLUGINS")
                if item in self.disabled:
                    continue
                try:
                    plugin = importlib.import_module(item)
                except Exception as exc:
                    self._fail(rec, f"failed to import {item}: {type(exc).__name__}: {exc}")
                    continue
                self._register(plugin, item, item, rec)
            else:
                name = getattr(item, "__name__", None) or f"{type(item).__name__}-{i}"
                self._register(item, name, name)
        self._collect()

    # ------------------------------------------------------------------------------------------ loading
    def _fail(self, rec: PluginRecord, message: str) -> None:
        rec.error = message
        self.records[rec.name] = rec
        print(f"harness: plugin {rec.name!r} disabled: {message}", file=sys.stderr)

    def _register(self, plugin, name: str, module: str, rec: PluginRecord | None = None) -> None:
        rec = rec or PluginRecord(name, module)
        if self.pm.has_plugin(name) or self.pm.is_registered(plugin):
            return
        try:
            self.pm.register(plugin, name=name)
            unknown = unknown_hooks(self.pm, plugin)
            if unknown:
                raise PluginError(unknown[0])
        except (pluggy.PluginValidationError, PluginError) as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            # pluggy's message spans lines (plugin, hook, definition, reason): keep them all, on one line
            msg = "; ".join(line.strip() for line in str(exc).splitlines()) or type(exc).__name__
            self._fail(rec, f"hook signature error: {msg}")
            return
        rec.hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])
        self.records[name] = rec

    def _collect(self) -> None:
        for name, plugin in list(self.pm.list_name_plugin()):
            rec = self.records.get(name)
            for hookname, target, check in (("harness_declare_techniques", self.techniques, self._check_technique),
                                            ("harness_declare_workloads", self.workloads, self._check_workload)):
                caller = getattr(self.pm.hook, hookname)
                impls = [i for i in caller.get_hookimpls() if i.plugin is plugin]
                if not impls:
                    continue
                try:
                    declared = impls[0].function() or []
                    items = [check(name, item) for item in declared]
                except Exception as exc:
                    self.pm.unregister(plugin)
                    self._fail(rec or PluginRecord(name, name), f"bad declaration: {exc}")
                    self._forget(name)
                    break
                for item in items:
                    key = (item.axis, item.name) if isinstance(item, Technique) else item.name
                    if key in target:
                        self.pm.unregister(plugin)
                        self._fail(rec or PluginRecord(name, name),
                                   f"declares {key!r}, already declared by plugin {target[key].plugin!r}")
                        self._forget(name)
                        break
                    target[key] = item
                    if rec is not None:
                        (rec.techniques if isinstance(item, Technique) else rec.workloads).append(item)
                else:
                    continue
                break

    def _forget(self, plugin_name: str) -> None:
        for key in [k for k, t in self.techniques.items() if t.plugin == plugin_name]:
            del self.techniques[key]
        for key in [k for k, w in self.workloads.items() if w.plugin == plugin_name]:
            del self.workloads[key]

    @staticmethod
    def _check_technique(plugin: str, tech: Any) -> Technique:
        if not isinstance(tech, Technique):
            raise PluginError(f"harness_declare_techniques returned {tech!r}, not a harness.space.Technique")
        if tech.axis not in AXES:
            raise PluginError(f"technique {tech.name!r}: unknown axis {tech.axis!r} (allowed: {', '.join(AXES)})")
        if not tech.name or not isinstance(tech.name, str) or tech.name != tech.name.strip():
            raise PluginError(f"technique on axis {tech.axis!r} has an invalid name {tech.name!r}")
        for key, param in tech.space.items():
            if not isinstance(param, (Float, Int, Categorical)):
                raise PluginError(f"technique {tech.name!r}: parameter {key!r} must be Float, Int or Categorical")
            if not isinstance(param, Categorical) and param.low > param.high:
                raise PluginError(f"technique {tech.name!r}: parameter {key!r} has low > high")
        for rule in tech.incompatible:
            axis, sep, other = rule.partition(":")
            if not sep or axis not in AXES or not other:
                raise PluginError(f"technique {tech.name!r}: incompatible entry {rule!r} is not 'axis:name'")
        return Technique(**{**tech.__dict__, "plugin": plugin})

    @staticmethod
    def _check_workload(plugin: str, info: Any) -> WorkloadInfo:
        if not isinstance(info, WorkloadInfo):
            raise PluginError(f"harness_declare_workloads returned {info!r}, not a harness.workload.WorkloadInfo")
        if not callable(info.build):
            raise PluginError(f"workload {info.name!r}: build is not callable")
        return WorkloadInfo(**{**info.__dict__, "plugin": plugin})

    # ------------------------------------------------------------------------------------------ queries
    @property
    def hook(self):
        return self.pm.hook

    def names(self, axis: str) -> list[str]:
        return sorted(name for (a, name) in self.techniques if a == axis)

    def technique(self, where: str, axis: str, name: str) -> Technique:
        tech = self.techniques.get((axis, name))
        if tech is None:
            known = self.names(axis)
            raise SpecError(f"{where}: unknown technique {name!r} (known: {', '.join(known) or 'none'})"
                            f"{did_you_mean(name, known)}{self._broken_hint()}")
        return tech

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
            raise SpecError(f"{where}: unknown workload {name!r} (known: {', '.join(known)}, or module:function)"
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

    def workload_kinds(self, name: str) -> tuple[str, ...]:
        try:
            return self.workload_info("workload", name).kinds
        except SpecError:
            return ()


def hook_names() -> list[str]:
    """Every hook name of the contract (:mod:`harness.hookspecs`)."""
    return [n for n in dir(hookspecs) if n.startswith("harness_")]


def unknown_hooks(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """One message per hook implementation of a registered ``plugin`` that matches no hook spec (a typo)."""
    return [f"implements unknown hook {c.name!r}{did_you_mean(c.name, hook_names())}"
            for c in pm.get_hookcallers(plugin) or [] if c.spec is None]


def _import_workload(where: str, target: str) -> WorkloadInfo:
    """Resolve a bring-your-own ``module:function`` workload; the function takes (device, seed, **params)."""
    module_name, _, func_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise SpecError(f"{where}: cannot import module {module_name!r} of workload {target!r} "
                        f"({type(exc).__name__}: {exc})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise SpecError(f"{where}: module {module_name!r} has no function {func_name!r}")
    return WorkloadInfo(name=target, build=func, kinds=tuple(getattr(func, "kinds", ())), plugin=module_name)


class _CoreHooks:
    """The core's own hook implementations: resolving a workload name to its declared builder."""

    def __init__(self, registry: Registry):
        self.registry = registry

    @hookimpl(trylast=True)
    def harness_build_workload(self, spec, device, params):
        info = self.registry.workload_info("workload", spec.workload)
        return info.build(device=device, seed=spec.seed, **params)


def get_registry(disable: Iterable[str] = (), extra: Iterable[Any] = ()) -> Registry:
    """Load every plugin (entry points, ``HARNESS_PLUGINS``, ``extra``) except the disabled ones."""
    return Registry(disable=disable, extra=extra)
