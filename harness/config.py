"""Trial specs: plain, JSON-able data that fully describes one trial, and loading them from YAML with validation.

A :class:`TrialSpec` is what travels from the study driver to a worker process, is hashed to recognise a
combination already run, is stored on the Optuna trial and logged to MLflow, unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import SpecError
from harness.space import AXES, did_you_mean

if TYPE_CHECKING:
    from harness.plugins import Registry


@dataclass(frozen=True)
class Setting:
    """A top-level study-file section that a plugin reads (``mlflow:``), declared with
    ``harness_declare_study_settings``. ``validate(where, value)`` returns the value to keep or raises
    :class:`harness.errors.SpecError` naming the field; it runs before any storage is opened."""

    key: str
    validate: Callable[[str, Any], Any]
    help: str = ""
    #: filled in by the plugin manager: the plugin that declared it.
    plugin: str = ""


@dataclass
class Choice:
    """The technique picked on one axis and its parameter values (defaults filled in). An empty ``name`` means
    "not chosen yet": :func:`fill_defaults` puts the axis's declared default technique there."""

    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Budget:
    """How long a trial trains: a number of ``steps``, of ``epochs`` over the training set, or ``seconds``.

    ``warmup_steps`` run first and are excluded from throughput (compilation happens in the first of them);
    the timed steps are split into ``windows`` timing windows for the median and spread.
    """

    steps: int | None = None
    epochs: float | None = None
    seconds: float | None = None
    warmup_steps: int = 5
    windows: int = 5
    #: evaluate on held-out data every this many steps (0: only at the end); feeds intermediate values.
    eval_every_steps: int = 0
    #: at most this many held-out samples are evaluated (0: all).
    eval_samples: int = 0


@dataclass
class TrialSpec:
    """Everything that defines one trial. ``batch_size`` is the *global* batch: with N processes each takes
    ``batch_size / N`` per step, so trials compare at equal global batch whatever their process count.

    The core names no technique or workload, so ``TrialSpec()`` leaves the workload (``""``) and every axis
    (``Choice("")``) unchosen; :func:`fill_defaults` (which :func:`trial_from_mapping` and the study-file parser
    use) fills them with the defaults the loaded plugins declare."""

    workload: str = ""
    workload_params: dict[str, Any] = field(default_factory=dict)
    optimizer: Choice = field(default_factory=Choice)
    precision: Choice = field(default_factory=Choice)
    compile: Choice = field(default_factory=Choice)
    parallelism: Choice = field(default_factory=Choice)
    compression: Choice = field(default_factory=Choice)
    batch_size: int = 64
    budget: Budget = field(default_factory=Budget)
    seed: int = 0
    #: number of processes (one per GPU on CUDA).
    devices: int = 1
    #: "auto" (CUDA when present), "cuda" or "cpu".
    device: str = "auto"
    #: free-form annotations that plugins read and write (e.g. the MLflow run id); not part of the hash.
    tags: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialSpec:
        data = dict(data)
        for axis in AXES:
            if axis in data and isinstance(data[axis], Mapping):
                data[axis] = Choice(**data[axis])
        if isinstance(data.get("budget"), Mapping):
            data["budget"] = Budget(**data["budget"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def spec_hash(self) -> str:
        """A short hash of what determines the trial's outcome (tags excluded)."""
        d = self.to_dict()
        d.pop("tags", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def flat_params(self) -> dict[str, Any]:
        """``{"optimizer": "adamw", "optimizer.lr": 1e-3, ...}``: the shape MLflow params and tables use."""
        out: dict[str, Any] = {"workload": self.workload}
        out.update({f"workload.{k}": v for k, v in self.workload_params.items()})
        for axis in AXES:
            choice = getattr(self, axis)
            out[axis] = choice.name
            out.update({f"{axis}.{k}": v for k, v in sorted(choice.params.items())})
        out.update(batch_size=self.batch_size, seed=self.seed, devices=self.devices)
        return out

    def label(self) -> str:
        return " + ".join(getattr(self, a).name for a in AXES)


# --------------------------------------------------------------------------------------------- loading
TRIAL_KEYS = ("workload", "optimizer", "precision", "compile", "parallelism", "compression", "batch_size",
              "budget", "seed", "devices", "device")
BUDGET_KEYS = tuple(f.name for f in dataclasses.fields(Budget))
DEVICES = ("auto", "cuda", "cpu")


def load_yaml(path: str | Path) -> Any:
    """Safe-load a YAML file; a missing file or a syntax error becomes one :class:`SpecError` line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{path}: no such file")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}: malformed YAML{where}: {problem}") from None


def check_keys(where: str, data: Mapping[str, Any], allowed: Collection[str]) -> None:
    for key in data:
        if key not in allowed:
            raise SpecError(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)}){did_you_mean(key, allowed)}")


def integer(where: str, value: Any, minimum: int | None = 1, what: str = "") -> int:
    """``value`` when it is an integer >= ``minimum`` (any integer when None), else a SpecError naming ``where``.
    The trial and study parsers check every count (batch size, processes, steps, trials) through here."""
    kind = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}")
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise SpecError(f"{where}: expected {kind}{what}, got {value!r}")
    return value


def positive(where: str, value: Any, what: str = "") -> float:
    """``value`` as a float when it is a number > 0, else a SpecError naming ``where`` (``what``: the unit)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SpecError(f"{where}: expected a positive number{what}, got {value!r}")
    return float(value)


def parse_choice(where: str, value: Any) -> tuple[str, dict[str, Any]]:
    """A technique (or workload) is written as ``name`` or ``{name: ..., <param>: value, ...}``."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        params = {k: v for k, v in value.items() if k != "name"}
        if isinstance(params.get("params"), Mapping) and len(params) == 1:
            params = dict(params["params"])
        return value["name"], params
    raise SpecError(f"{where}: expected a technique name or a mapping with 'name', got {value!r}")


def parse_budget(where: str, data: Any) -> Budget:
    if data is None:
        return Budget(steps=200)
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a mapping with one of steps, epochs, seconds; got {data!r}")
    check_keys(where, data, BUDGET_KEYS)
    budget = Budget(**dict(data))
    for key in ("steps", "warmup_steps", "windows", "eval_every_steps", "eval_samples"):
        if getattr(budget, key) is not None:
            integer(f"{where}.{key}", getattr(budget, key), minimum=0)
    for key in ("epochs", "seconds"):
        if getattr(budget, key) is not None:
            positive(f"{where}.{key}", getattr(budget, key))
    given = [k for k in ("steps", "epochs", "seconds") if getattr(budget, k) is not None]
    if not given:
        raise SpecError(f"{where}: give one of steps, epochs, seconds")
    if len(given) > 1:
        raise SpecError(f"{where}: give only one of steps, epochs, seconds (got {', '.join(given)})")
    if budget.windows < 1:
        raise SpecError(f"{where}.windows: expected at least 1, got {budget.windows}")
    if budget.steps is not None and budget.steps <= budget.warmup_steps:
        raise SpecError(f"{where}.steps: {budget.steps} must exceed warmup_steps ({budget.warmup_steps})")
    return budget


def parse_common(where: str, data: Mapping[str, Any], spec: TrialSpec) -> None:
    """Fill the non-technique fields of ``spec`` from a trial or study mapping."""
    if "batch_size" in data:
        spec.batch_size = integer(f"{where}.batch_size", data["batch_size"])
    if "seed" in data:
        spec.seed = integer(f"{where}.seed", data["seed"], minimum=None)
    if "devices" in data:
        spec.devices = integer(f"{where}.devices", data["devices"])
    if "device" in data:
        if data["device"] not in DEVICES:
            raise SpecError(f"{where}.device: {data['device']!r} is not allowed (allowed: {', '.join(DEVICES)})")
        spec.device = data["device"]
    if "budget" in data:
        spec.budget = parse_budget(f"{where}.budget", data["budget"])


def fill_defaults(spec: TrialSpec, registry: Registry) -> TrialSpec:
    """Put the loaded plugins' declared defaults where ``spec`` leaves the workload or an axis unchosen
    (``""``), with the defaults of their parameters; returns ``spec``."""
    if not spec.workload:
        spec.workload = registry.default_workload()
        spec.workload_params = registry.validate_workload("workload", spec.workload, spec.workload_params)
    for axis in AXES:
        if not getattr(spec, axis).name:
            tech = registry.default_technique(axis)
            setattr(spec, axis, Choice(tech.name, tech.validate_params(axis, getattr(spec, axis).params)))
    return spec


def trial_from_mapping(where: str, data: Any, registry: Registry) -> TrialSpec:
    """Build and validate a TrialSpec from a trial file's mapping against the registered plugins; a workload or
    axis the mapping leaves out gets the declared default."""
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a mapping of trial fields, got {type(data).__name__}")
    check_keys(where, data, TRIAL_KEYS)
    spec = TrialSpec(budget=Budget(steps=200))
    parse_common(where, data, spec)
    if "workload" in data:
        name, wparams = parse_choice(f"{where}.workload", data["workload"])
        spec.workload = name
        spec.workload_params = registry.validate_workload(f"{where}.workload", name, wparams)
    for axis in AXES:
        if axis in data:
            tname, params = parse_choice(f"{where}.{axis}", data[axis])
            tech = registry.technique(f"{where}.{axis}", axis, tname)
            setattr(spec, axis, Choice(tname, tech.validate_params(f"{where}.{axis}", params)))
    return fill_defaults(spec, registry)
