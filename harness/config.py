"""Trial specs: plain, JSON-able data that fully describes one trial, and loading them from YAML with validation.

A :class:`TrialSpec` is what travels from the study driver to a worker process, is hashed to recognise a
combination already run, is stored on the Optuna trial and logged to MLflow, unchanged.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from harness.errors import SpecError
from harness.space import AXES, did_you_mean

DEFAULT_TECHNIQUES = {"optimizer": "adamw", "precision": "fp32", "compile": "eager", "parallelism": "single",
                      "compression": "none"}


@dataclass
class Choice:
    """The technique picked on one axis and its parameter values (defaults filled in)."""

    name: str
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
    ``batch_size / N`` per step, so trials compare at equal global batch whatever their process count."""

    workload: str = "digits"
    workload_params: dict[str, Any] = field(default_factory=dict)
    optimizer: Choice = field(default_factory=lambda: Choice("adamw"))
    precision: Choice = field(default_factory=lambda: Choice("fp32"))
    compile: Choice = field(default_factory=lambda: Choice("eager"))
    parallelism: Choice = field(default_factory=lambda: Choice("single"))
    compression: Choice = field(default_factory=lambda: Choice("none"))
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
    def from_dict(cls, data: Mapping[str, Any]) -> "TrialSpec":
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


def check_keys(where: str, data: Mapping, allowed) -> None:
    for key in data:
        if key not in allowed:
            raise SpecError(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)}){did_you_mean(key, allowed)}")


def parse_choice(where: str, value: Any) -> tuple[str, dict]:
    """A technique is written as ``name`` or ``{name: ..., <param>: value, ...}``."""
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
    budget = Budget(**{k: v for k, v in data.items()})
    for key in ("steps", "warmup_steps", "windows", "eval_every_steps", "eval_samples"):
        value = getattr(budget, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise SpecError(f"{where}.{key}: expected a non-negative integer, got {value!r}")
    for key in ("epochs", "seconds"):
        value = getattr(budget, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise SpecError(f"{where}.{key}: expected a positive number, got {value!r}")
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


def parse_common(where: str, data: Mapping, spec: TrialSpec) -> None:
    """Fill the non-technique fields of ``spec`` from a trial or study mapping."""
    if "batch_size" in data:
        bs = data["batch_size"]
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise SpecError(f"{where}.batch_size: expected a positive integer, got {bs!r}")
        spec.batch_size = bs
    if "seed" in data:
        if isinstance(data["seed"], bool) or not isinstance(data["seed"], int):
            raise SpecError(f"{where}.seed: expected an integer, got {data['seed']!r}")
        spec.seed = data["seed"]
    if "devices" in data:
        n = data["devices"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SpecError(f"{where}.devices: expected a positive integer, got {n!r}")
        spec.devices = n
    if "device" in data:
        if data["device"] not in ("auto", "cuda", "cpu"):
            raise SpecError(f"{where}.device: {data['device']!r} is not allowed (allowed: auto, cuda, cpu)")
        spec.device = data["device"]
    if "budget" in data:
        spec.budget = parse_budget(f"{where}.budget", data["budget"])


def parse_workload(where: str, value: Any) -> tuple[str, dict]:
    """A workload is ``name``, ``module:function`` or ``{name: ..., <param>: value}``."""
    return parse_choice(where, value)


def trial_from_mapping(where: str, data: Any, registry) -> TrialSpec:
    """Build and validate a TrialSpec from a trial file's mapping against the registered plugins."""
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a mapping of trial fields, got {type(data).__name__}")
    check_keys(where, data, TRIAL_KEYS)
    spec = TrialSpec(budget=Budget(steps=200))
    parse_common(where, data, spec)
    name, wparams = parse_workload(f"{where}.workload", data.get("workload", "digits"))
    spec.workload = name
    spec.workload_params = registry.validate_workload(f"{where}.workload", name, wparams)
    for axis in AXES:
        tname, params = parse_choice(f"{where}.{axis}", data.get(axis, DEFAULT_TECHNIQUES[axis]))
        tech = registry.technique(f"{where}.{axis}", axis, tname)
        setattr(spec, axis, Choice(tname, tech.validate_params(f"{where}.{axis}", params)))
    return spec
