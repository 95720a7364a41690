"""Axes, technique declarations, parameter spaces and compatibility.

A technique is declared as plain data (:class:`Technique`): its axis, name, search space, requirements and
incompatibilities. The harness turns those declarations into Optuna suggestions and into an ``infeasible``
verdict *before* anything is launched; no rule about a technique lives in the core's code.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from harness.errors import SpecError, shown

AXES = ("optimizer", "precision", "compile", "parallelism", "compression", "data", "memory")
#: axes added after studies were first stored: a trial record or spec written before one existed ran nothing on
#: it, which reads as the technique ``none`` (the declared default of each of these axes).
LATER_AXES = ("data", "memory")
NO_TECHNIQUE = "none"
#: how a combination reads in tables, progress lines and run names (see :func:`techniques_label`).
LABEL_CAPTION = " + ".join(a for a in AXES if a not in LATER_AXES) + " (+ " + ", ".join(LATER_AXES) + " when used)"


def techniques_label(names: Mapping[str, Any]) -> str:
    """A combination as ``adamw + fp32 + eager + single + none``: one technique name per axis in axis order, the
    later axes' only when they hold a technique (``+ mixup``), so that three ``none`` in a row never need decoding."""
    return " + ".join(str(names.get(a, "?")) for a in AXES
                      if a not in LATER_AXES or names.get(a, NO_TECHNIQUE) != NO_TECHNIQUE)


# --------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Float:
    """A real-valued parameter in ``[low, high]`` (log-uniform when ``log``)."""

    low: float
    high: float
    default: float | None = None
    log: bool = False
    help: str = ""

    def validate(self, where: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: expected a number in [{self.low}, {self.high}], got {shown(value)}")
        if not (self.low <= value <= self.high) or math.isnan(value):
            raise SpecError(f"{where}: {shown(value)} is out of range (allowed: {self.low} .. {self.high})")
        return float(value)

    def distribution(self, low=None, high=None):
        import optuna

        return optuna.distributions.FloatDistribution(
            self.low if low is None else low, self.high if high is None else high, log=self.log)

    def describe(self) -> str:
        return f"float {self.low}..{self.high}" + (" log" if self.log else "")


@dataclass(frozen=True)
class Int:
    """An integer parameter in ``[low, high]``."""

    low: int
    high: int
    default: int | None = None
    log: bool = False
    step: int = 1
    help: str = ""

    def validate(self, where: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise SpecError(f"{where}: expected an integer in [{self.low}, {self.high}], got {shown(value)}")
        if not (self.low <= value <= self.high):
            raise SpecError(f"{where}: {shown(value)} is out of range (allowed: {self.low} .. {self.high})")
        return value

    def distribution(self, low=None, high=None):
        import optuna

        return optuna.distributions.IntDistribution(
            self.low if low is None else low, self.high if high is None else high, log=self.log, step=self.step)

    def describe(self) -> str:
        return f"int {self.low}..{self.high}"


@dataclass(frozen=True)
class Categorical:
    """A parameter taking one of ``choices`` (strings, numbers, booleans or None).

    ``requires`` says what a choice needs from the machine (CUDA, compute capability, packages), for choices that
    need more than the rest: a study drops the choices this machine can never run from its search space when it
    starts (one line each), and a trial that fixes one is ruled out before launch.
    """

    choices: tuple
    default: Any = None
    help: str = ""
    requires: Mapping[Any, Requirements] = field(default_factory=dict, compare=False)

    def validate(self, where: str, value: Any) -> Any:
        for choice in self.choices:
            if value == choice and type(value) is type(choice) or (
                    isinstance(choice, float) and isinstance(value, int) and not isinstance(value, bool)
                    and value == choice):
                return choice
        allowed = ", ".join(repr(c) for c in self.choices)
        raise SpecError(f"{where}: {shown(value)} is not allowed (allowed: {allowed})")

    def distribution(self, choices=None):
        import optuna

        return optuna.distributions.CategoricalDistribution(tuple(self.choices if choices is None else choices))

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)


Param = Float | Int | Categorical


# --------------------------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Requirements:
    """What a technique needs from the machine and the trial; checked before launch."""

    cuda: bool = False
    #: minimal CUDA compute capability, e.g. ``(8, 9)`` for fp8.
    min_compute_capability: tuple[int, int] | None = None
    min_devices: int = 1
    max_devices: int | None = None
    #: importable module names, e.g. ``("deepspeed",)``.
    packages: tuple[str, ...] = ()
    #: workload kinds the technique applies to, any of them (e.g. ``("classification", "lm")``); a ``+`` joins
    #: kinds needed together (``("image+classification",)``); empty means any.
    workload_kinds: tuple[str, ...] = ()


@dataclass(frozen=True)
class Technique:
    """One technique on one axis: the unit Optuna chooses between.

    ``incompatible`` names techniques on other axes, as ``"axis:name"``, that this one cannot be combined
    with, and says why in the user's words (shown with the infeasible verdict): either a tuple of names that
    share the one ``reason``, or a mapping ``{"axis:name": "why", ...}`` giving each its own reason (an
    empty one falls back to ``reason``).
    """

    axis: str
    name: str
    space: Mapping[str, Param] = field(default_factory=dict)
    requires: Requirements = Requirements()
    incompatible: tuple[str, ...] | Mapping[str, str] = ()
    reason: str = ""
    description: str = ""
    #: the axis's default technique: what a trial or study that leaves the axis out runs. Exactly one technique
    #: per axis is the default; the plugin declaring it is essential (cannot be disabled).
    default: bool = False
    #: filled in by the plugin manager: the plugin that declared it.
    plugin: str = ""

    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.space.items() if p.default is not None}

    def incompatibilities(self) -> dict[str, str]:
        """Each incompatible ``"axis:name"`` -> the reason shown with it (its own, else the shared ``reason``)."""
        if isinstance(self.incompatible, Mapping):
            return {rule: why or self.reason for rule, why in self.incompatible.items()}
        return {rule: self.reason for rule in self.incompatible}

    def validate_params(self, where: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """Return ``params`` completed with defaults, raising :class:`SpecError` for unknown or bad values."""
        out = self.defaults()
        for key, value in params.items():
            if key not in self.space:
                allowed = ", ".join(self.space) or "none"
                raise SpecError(f"{where}: unknown parameter {shown(key)} of {self.axis} technique {self.name!r} "
                                f"(allowed: {allowed}){did_you_mean(key, self.space)}")
            out[key] = self.space[key].validate(f"{where}.{key}", value)
        return out


@dataclass(frozen=True)
class Environment:
    """What the machine offers, as the feasibility check sees it."""

    cuda: bool
    device_count: int
    compute_capability: tuple[int, int] | None
    device_name: str

    @classmethod
    def detect(cls) -> Environment:
        import torch

        if torch.cuda.is_available():
            return cls(True, torch.cuda.device_count(), torch.cuda.get_device_capability(0),
                       torch.cuda.get_device_name(0))
        return cls(False, 0, None, "cpu")


def package_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def unavailable_reason(tech: Technique, env: Environment, device: str = "auto",
                       where: str = "this trial") -> str | None:
    """Why the machine ``env`` can never run ``tech`` on ``device`` (``auto``, ``cuda`` or ``cpu``), from its
    declared CUDA, compute-capability and package requirements (one sentence), or None when it can.

    It says nothing of a trial's other choices (process count, workload, other techniques): that is
    :func:`infeasible_reason`. ``where`` names what lacks CUDA (``this trial``, ``this machine``).
    """
    return unmet_requirements(tech.requires, f"{tech.axis} technique {tech.name!r}", env, device, where)


def unavailable_choice(param: Any, label: str, value: Any, env: Environment, device: str = "auto",
                       where: str = "this trial") -> str | None:
    """Why ``env`` can never run ``value`` of a :class:`Categorical` parameter (its ``requires``), or None;
    ``label`` names the parameter (``workload.kernels``)."""
    req = param.requires.get(value) if isinstance(param, Categorical) else None
    return unmet_requirements(req, f"{label} {value!r}", env, device, where) if req else None


def unavailable_values(values: Mapping[str, Any], declared: Mapping[str, Any], prefix: str, env: Environment,
                       device: str = "auto", where: str = "this trial") -> str | None:
    """The first of ``values`` (parameter -> value) that ``env`` can never run by its declaration in ``declared``
    (:func:`unavailable_choice`; labelled ``<prefix>.<parameter>``), or None."""
    return next(filter(None, (unavailable_choice(declared.get(k), f"{prefix}.{k}", v, env, device, where)
                              for k, v in values.items())), None)


def unmet_requirements(req: Requirements, label: str, env: Environment, device: str, where: str) -> str | None:
    """The first of ``req``'s CUDA, compute-capability and package requirements ``env`` does not meet, said of
    ``label`` (one sentence), or None."""
    if req.cuda and not (device in ("cuda", "auto") and env.cuda):
        return f"{label} requires CUDA, which {where} does not have"
    if req.min_compute_capability and (
            not env.cuda or (env.compute_capability or (0, 0)) < tuple(req.min_compute_capability)):
        cc = env.compute_capability or (0, 0)
        have = "no GPU" if not env.cuda else f"{env.device_name} (compute capability {cc[0]}.{cc[1]})"
        need = ".".join(map(str, req.min_compute_capability))
        return f"{label} requires compute capability >= {need}; this machine has {have}"
    for pkg in req.packages:
        if not package_available(pkg):
            return f"{label} requires the package {pkg!r}, which is not installed"
    return None


def infeasible_reason(spec, techniques: Mapping[tuple[str, str], Technique], env: Environment,
                      workload_kinds: Iterable[str] = (), workload_params: Mapping[str, Any] | None = None
                      ) -> str | None:
    """Return why ``spec`` cannot run here (one sentence), or None when every declaration is satisfied;
    ``workload_params`` are the workload's parameter declarations (their choices' requirements)."""
    reason = unavailable_values(getattr(spec, "workload_params", {}), workload_params or {}, "workload", env,
                                spec.device)
    if reason:
        return reason
    kinds = set(workload_kinds)
    chosen = {axis: getattr(spec, axis).name for axis in AXES}
    for axis in AXES:
        tech = techniques.get((axis, chosen[axis]))
        if tech is None:
            return f"{axis}: unknown technique {shown(chosen[axis])}"
        req, label = tech.requires, f"{axis} technique {tech.name!r}"
        machine = (unavailable_reason(tech, env, spec.device)
                   or unavailable_values(getattr(spec, axis).params, tech.space, axis, env, spec.device))
        if machine:
            return machine
        if spec.devices < req.min_devices:
            return f"{label} requires at least {req.min_devices} processes (devices: {spec.devices})"
        if req.max_devices is not None and spec.devices > req.max_devices:
            return f"{label} runs on at most {req.max_devices} process(es) (devices: {spec.devices})"
        if req.workload_kinds and not any(set(group.split("+")) <= kinds for group in req.workload_kinds):
            return (f"{label} applies to {'/'.join(req.workload_kinds)} workloads; "
                    f"workload {spec.workload!r} is {'/'.join(sorted(kinds)) or 'of no declared kind'}")
        for rule, why in tech.incompatibilities().items():
            other_axis, _, other_name = rule.partition(":")
            if other_axis in chosen and other_name == chosen[other_axis]:
                return f"{label} cannot be combined with {other_axis} {chosen[other_axis]!r}" + (
                    f": {why}" if why else "")
    if spec.devices > 1 and not env.cuda and spec.device == "cuda":
        return f"devices: {spec.devices} CUDA processes requested but no GPU is present"
    if spec.devices > 1 and env.cuda and spec.device != "cpu" and spec.devices > env.device_count:
        return f"devices: {spec.devices} requested but this machine has {env.device_count} GPU(s)"
    return None


# --------------------------------------------------------------------------------------------- helpers
def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(str(word), list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class Validates(Protocol):
    """Any parameter declaration: a technique's ``Param`` or a workload's free-form ``Text``."""

    def validate(self, where: str, value: Any) -> Any: ...


def param_from_yaml(where: str, base: Param | Validates, value: Any) -> tuple[str, Any]:
    """Interpret a study file's value for a parameter: a fixed value, a list of choices or a ``{low, high}`` range.

    Returns ``("fixed", value)`` or ``("dist", optuna distribution)``.
    """
    if isinstance(value, Mapping):
        if isinstance(base, Categorical):
            raise SpecError(f"{where}: a range is not allowed for a categorical parameter "
                            f"(give one value or a list from: {', '.join(map(repr, base.choices))})")
        if not isinstance(base, (Float, Int)):
            raise SpecError(f"{where}: a range is allowed only for a numeric parameter (give one value or a list)")
        unknown = set(value) - {"low", "high", "log"}
        if unknown:
            first = sorted(map(str, unknown))[0]
            raise SpecError(f"{where}: unknown key {shown(first)} in range (allowed: low, high, log)")
        low = base.validate(f"{where}.low", value.get("low", base.low))
        high = base.validate(f"{where}.high", value.get("high", base.high))
        if low > high:
            raise SpecError(f"{where}: inverted range: low {shown(low)} > high {shown(high)}")
        if low == high:
            return "fixed", low
        log = bool(value.get("log", base.log))
        if log and low <= 0:
            raise SpecError(f"{where}: a log range needs low > 0 (got {shown(low)})")
        dist = dataclasses.replace(base, log=log).distribution(low, high)
        return "dist", dist
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise SpecError(f"{where}: an empty list of values (give at least one)")
        checked = [base.validate(f"{where}[{i}]", v) for i, v in enumerate(value)]
        if len(checked) == 1:
            return "fixed", checked[0]
        import optuna

        return "dist", optuna.distributions.CategoricalDistribution(tuple(checked))
    return "fixed", base.validate(where, value)
