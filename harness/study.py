"""The Optuna study driver: ``harness study studies/X.yaml``.

A study file names a workload, the techniques to consider on each axis (with parameter ranges or fixed values),
the objectives, constraints, sampler, pruner and storage. The driver asks Optuna for one technique per axis per
trial, rejects infeasible combinations before launching anything, runs every other trial in its own process group
(:func:`harness.launch.launch`) and tells Optuna the outcome: objective values, or FAIL / PRUNED with a failure
class. The storage (SQLite by default, with heartbeats) lets a killed driver resume and several drivers share a
study. Every trial's :class:`TrialRecord` is kept in the Optuna trial's user attributes, so ``harness report``
needs nothing but the storage.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from harness.config import (
    DEFAULT_TECHNIQUES,
    Budget,
    Choice,
    TrialSpec,
    check_keys,
    load_yaml,
    parse_budget,
    parse_choice,
    parse_common,
)
from harness.errors import SpecError
from harness.measure import METRICS
from harness.space import AXES, Categorical, Environment, did_you_mean, infeasible_reason, param_from_yaml

STUDY_KEYS = ("name", "workload", "axes", "batch_size", "budget", "trial_timeout_s", "objectives", "constraints",
              "baseline", "sampler", "pruner", "n_trials", "timeout_s", "storage", "mlflow", "seed", "devices",
              "device", "screening", "output_dir", "heartbeat_s", "target_accuracy", "omitted_params")
SAMPLERS = ("auto", "tpe", "nsga2", "random", "grid")
PRUNERS = ("none", "median", "hyperband", "successive-halving")
DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}
DEFAULT_STORAGE = "sqlite:///harness.db"
#: the constraint value Optuna sees for an infeasible (never launched) trial; > 0 means violated.
INFEASIBLE_VIOLATION = 1.0


# ============================================================================================ configuration
@dataclass
class Objective:
    """One objective: the study-file name (``throughput``), the result key and Optuna's direction."""

    metric: str
    key: str
    direction: str


@dataclass
class Constraint:
    """``metric >= factor`` or ``metric <= factor`` (times the baseline trial's value when ``relative``)."""

    metric: str
    key: str
    op: str
    factor: float
    relative: bool
    text: str

    def bound(self, baseline_metrics: Mapping[str, Any] | None) -> float | None:
        if not self.relative:
            return self.factor
        if not baseline_metrics or self.key not in baseline_metrics:
            return None
        return self.factor * float(baseline_metrics[self.key])

    def violation(self, metrics: Mapping[str, Any], baseline_metrics: Mapping[str, Any] | None) -> float:
        """How far ``metrics`` is outside the constraint, relative to the bound (<= 0: satisfied)."""
        bound = self.bound(baseline_metrics)
        value = metrics.get(self.key)
        if bound is None or value is None or not math.isfinite(float(value)):
            return INFEASIBLE_VIOLATION
        scale = abs(bound) or 1.0
        diff = (bound - float(value)) if self.op == ">=" else (float(value) - bound)
        return diff / scale


@dataclass
class StudyConfig:
    """A validated study file. ``axes`` maps axis -> technique -> parameter -> ``("fixed", value)`` or
    ``("dist", optuna distribution)``; ``tracking`` is the file's ``mlflow`` mapping, read by tracking plugins."""

    name: str
    workload: str
    workload_space: dict[str, tuple] = field(default_factory=dict)
    axes: dict[str, dict[str, dict[str, tuple]]] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=lambda: [64])
    budget: Budget = field(default_factory=lambda: Budget(steps=200))
    trial_timeout_s: float = 600.0
    objectives: list[Objective] = field(default_factory=list)
    constraints: list[Constraint] = field(default_factory=list)
    baseline: dict[str, Any] | None = None
    sampler: str = "auto"
    sampler_options: dict[str, Any] = field(default_factory=dict)
    pruner: str = "none"
    pruner_options: dict[str, Any] = field(default_factory=dict)
    n_trials: int | None = None
    timeout_s: float | None = None
    storage: str = DEFAULT_STORAGE
    tracking: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    devices: int = 1
    device: str = "auto"
    screening: Budget | None = None
    screening_margin: float = 0.05
    output_dir: str = ""
    heartbeat_s: int = 10
    target_accuracy: float | None = None
    #: a technique parameter the file leaves out is ``search``-ed over its declared space, or kept at its
    #: ``default``.
    omitted_params: str = "search"
    path: str = ""

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def needs_baseline(self) -> bool:
        return self.baseline is not None or any(c.relative for c in self.constraints)

    @classmethod
    def from_yaml(cls, path: str | Path, registry) -> "StudyConfig":
        data = load_yaml(path)
        return cls.from_mapping(str(path), data, registry, default_name=Path(path).stem)

    @classmethod
    def from_mapping(cls, where: str, data: Any, registry, default_name: str = "study") -> "StudyConfig":
        if not isinstance(data, Mapping):
            raise SpecError(f"{where}: expected a mapping of study fields, got {type(data).__name__}")
        check_keys(where, data, STUDY_KEYS)
        cfg = cls(name=_string(f"{where}.name", data.get("name", default_name)), workload="digits", path=where)
        common = TrialSpec()
        parse_common(where, {k: data[k] for k in ("seed", "devices", "device", "budget") if k in data}, common)
        cfg.seed, cfg.devices, cfg.device = common.seed, common.devices, common.device
        cfg.budget = common.budget if "budget" in data else Budget(steps=200)
        _parse_workload(cfg, where, data.get("workload", "digits"), registry)
        cfg.omitted_params, _ = _parse_named(f"{where}.omitted_params", data.get("omitted_params", "search"),
                                             ("search", "default"))
        _parse_axes(cfg, where, data.get("axes"), registry)
        cfg.batch_sizes = _parse_batch_sizes(f"{where}.batch_size", data.get("batch_size", 64))
        cfg.trial_timeout_s = _positive(f"{where}.trial_timeout_s", data.get("trial_timeout_s", 600))
        cfg.objectives = _parse_objectives(f"{where}.objectives", data.get("objectives", ["throughput"]))
        cfg.constraints = _parse_constraints(f"{where}.constraints", data.get("constraints") or {})
        if "baseline" in data:
            if not isinstance(data["baseline"], Mapping):
                raise SpecError(f"{where}.baseline: expected a mapping of trial fields (workload, optimizer, ...)")
            cfg.baseline = dict(data["baseline"])
        cfg.sampler, cfg.sampler_options = _parse_named(f"{where}.sampler", data.get("sampler", "auto"), SAMPLERS)
        cfg.pruner, cfg.pruner_options = _parse_named(f"{where}.pruner", data.get("pruner", "none"), PRUNERS)
        if cfg.pruner != "none" and cfg.multi_objective:
            raise SpecError(f"{where}.pruner: {cfg.pruner!r} needs a single objective (Optuna's pruners cannot "
                            "prune multi-objective trials; use screening instead)")
        if "n_trials" in data:
            n = data["n_trials"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise SpecError(f"{where}.n_trials: expected a positive integer, got {n!r}")
            cfg.n_trials = n
        if "timeout_s" in data:
            cfg.timeout_s = _positive(f"{where}.timeout_s", data["timeout_s"])
        if cfg.n_trials is None and cfg.timeout_s is None:
            raise SpecError(f"{where}: give n_trials and/or timeout_s (when the study stops)")
        cfg.storage = _string(f"{where}.storage", data.get("storage", DEFAULT_STORAGE))
        if "mlflow" in data:
            if not isinstance(data["mlflow"], Mapping):
                raise SpecError(f"{where}.mlflow: expected a mapping (experiment, tracking_uri), "
                                f"got {data['mlflow']!r}")
            cfg.tracking = dict(data["mlflow"])
        if "screening" in data and data["screening"] is not None:
            _parse_screening(cfg, f"{where}.screening", data["screening"])
        cfg.output_dir = _string(f"{where}.output_dir", data.get("output_dir", f"harness-out/{cfg.name}"))
        hb = data.get("heartbeat_s", 10)
        if isinstance(hb, bool) or not isinstance(hb, int) or hb < 1:
            raise SpecError(f"{where}.heartbeat_s: expected a positive integer (seconds), got {hb!r}")
        cfg.heartbeat_s = hb
        if "target_accuracy" in data:
            t = data["target_accuracy"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
                raise SpecError(f"{where}.target_accuracy: expected a fraction in (0, 1], got {t!r}")
            cfg.target_accuracy = float(t)
        if cfg.sampler == "grid":
            grid_space(cfg)  # raises for ranges a grid cannot enumerate
        return cfg


def _string(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _positive(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SpecError(f"{where}: expected a positive number of seconds, got {value!r}")
    return float(value)


def _space_entry(where: str, base, value: Any = None, given: bool = False, omitted: str = "search") -> tuple:
    if given:
        return param_from_yaml(where, base, value)
    if omitted == "default" and base.default is not None:
        return "fixed", base.default
    if isinstance(base, Categorical):
        return ("fixed", base.choices[0]) if len(base.choices) == 1 else ("dist", base.distribution())
    if base.low == base.high:
        return "fixed", base.low
    return "dist", base.distribution()


def _parse_workload(cfg: StudyConfig, where: str, value: Any, registry) -> None:
    name, params = parse_choice(f"{where}.workload", value)
    info = registry.workload_info(f"{where}.workload", name)
    cfg.workload = name
    for key, v in params.items():
        if ":" in name:  # a bring-your-own builder declares no parameters: values pass through, fixed
            cfg.workload_space[key] = ("fixed", v)
            continue
        if key not in info.params:
            raise SpecError(f"{where}.workload: unknown parameter {key!r} of workload {name!r} "
                            f"(allowed: {', '.join(info.params) or 'none'}){did_you_mean(key, info.params)}")
        cfg.workload_space[key] = param_from_yaml(f"{where}.workload.{key}", info.params[key], v)
    if ":" not in name:  # the workload's own checks (a data directory that exists...) on the fixed values
        fixed = {k: v for k, (kind, v) in cfg.workload_space.items() if kind == "fixed"}
        registry.validate_workload(f"{where}.workload", name, fixed)


def _parse_axes(cfg: StudyConfig, where: str, data: Any, registry) -> None:
    where = f"{where}.axes"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a mapping of axis -> techniques (axes: {', '.join(AXES)})")
    check_keys(where, data, AXES)
    for axis in AXES:
        if axis not in data:  # an axis left out keeps its default technique with default parameters
            tech = registry.technique(f"{where}.{axis}", axis, DEFAULT_TECHNIQUES[axis])
            cfg.axes[axis] = {tech.name: {k: ("fixed", v) for k, v in tech.defaults().items()}}
            continue
        value, here = data[axis], f"{where}.{axis}"
        if isinstance(value, str):
            value = {value: None}
        elif isinstance(value, Sequence):
            names = {}
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    raise SpecError(f"{here}[{i}]: expected a technique name, got {item!r} (use a mapping "
                                    "technique -> parameters to set parameters)")
                names[item] = None
            value = names
        if not isinstance(value, Mapping):
            raise SpecError(f"{here}: expected a technique name, a list of names or a mapping technique -> "
                            f"parameters, got {value!r}")
        if not value:
            raise SpecError(f"{here}: an empty axis (give at least one technique; known: "
                            f"{', '.join(registry.names(axis))})")
        cfg.axes[axis] = {}
        for name, overrides in value.items():
            tech = registry.technique(here, axis, str(name))
            overrides = {} if overrides is None else overrides
            if not isinstance(overrides, Mapping):
                raise SpecError(f"{here}.{name}: expected a mapping parameter -> value/list/range, got {overrides!r}")
            for key in overrides:
                if key not in tech.space:
                    raise SpecError(f"{here}.{name}: unknown parameter {key!r} of {axis} technique {name!r} "
                                    f"(allowed: {', '.join(tech.space) or 'none'}){did_you_mean(key, tech.space)}")
            cfg.axes[axis][tech.name] = {
                key: _space_entry(f"{here}.{name}.{key}", base, overrides.get(key), key in overrides,
                                  cfg.omitted_params)
                for key, base in tech.space.items()}


def _parse_batch_sizes(where: str, value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise SpecError(f"{where}: an empty list of batch sizes")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SpecError(f"{where}: expected a positive integer or a list of them, got {v!r}")
    return list(dict.fromkeys(values))


def _metric(where: str, name: Any) -> tuple[str, str]:
    if name not in METRICS:
        raise SpecError(f"{where}: unknown metric {name!r} (known: {', '.join(METRICS)}){did_you_mean(name, METRICS)}")
    return name, METRICS[name][0]


def _parse_objectives(where: str, value: Any) -> list[Objective]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise SpecError(f"{where}: give at least one objective (known: {', '.join(METRICS)})")
    out: list[Objective] = []
    for i, item in enumerate(items):
        here = f"{where}[{i}]"
        if isinstance(item, str):
            metric, direction = item, None
        elif isinstance(item, Mapping) and len(item) == 1:
            (metric, direction), = item.items()
        else:
            raise SpecError(f"{here}: expected a metric name or {{metric: max|min}}, got {item!r}")
        metric, key = _metric(here, metric)
        if direction is None:
            direction = METRICS[metric][2]
        elif direction not in DIRECTIONS:
            raise SpecError(f"{here}.{metric}: direction {direction!r} is not allowed (allowed: max, min)")
        if any(o.metric == metric for o in out):
            raise SpecError(f"{here}: objective {metric!r} is given twice")
        out.append(Objective(metric, key, DIRECTIONS[direction]))
    return out


_CONSTRAINT = re.compile(r"^\s*(>=|<=)\s*(?:([-+0-9.eE]+)\s*(\*\s*baseline)?|(baseline))\s*$")


def _parse_constraints(where: str, value: Any) -> list[Constraint]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: expected a mapping metric -> \"<= number\" / \">= 0.98 * baseline\", got {value!r}")
    out = []
    for metric, text in value.items():
        metric, key = _metric(f"{where}", metric)
        m = _CONSTRAINT.match(str(text))
        factor = None
        if m:
            try:
                factor = 1.0 if m.group(4) else float(m.group(2))
            except ValueError:
                factor = None
        if not m or factor is None or not math.isfinite(factor):
            raise SpecError(f"{where}.{metric}: {text!r} is not a constraint (allowed: '>= NUMBER', '<= NUMBER', "
                            "'>= FACTOR * baseline', '<= FACTOR * baseline')")
        out.append(Constraint(metric, key, m.group(1), factor, bool(m.group(3) or m.group(4)), str(text).strip()))
    return out


def _parse_named(where: str, value: Any, allowed: Sequence[str]) -> tuple[str, dict]:
    options: dict[str, Any] = {}
    if isinstance(value, Mapping):
        options = {k: v for k, v in value.items() if k != "name"}
        value = value.get("name")
    if value not in allowed:
        raise SpecError(f"{where}: {value!r} is not allowed (allowed: {', '.join(allowed)})"
                        f"{did_you_mean(str(value), allowed)}")
    return value, options


def _parse_screening(cfg: StudyConfig, where: str, value: Any) -> None:
    if not cfg.multi_objective:
        raise SpecError(f"{where}: screening is for multi-objective studies (a single objective uses a pruner)")
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: expected a mapping like {{steps: 30}}, got {value!r}")
    value = dict(value)
    margin = value.pop("margin", 0.05)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise SpecError(f"{where}.margin: expected a fraction in [0, 1), got {margin!r}")
    base = {k: getattr(cfg.budget, k) for k in ("warmup_steps", "windows")}
    budget = parse_budget(where, {**base, **value})
    cfg.screening, cfg.screening_margin = budget, float(margin)


def grid_space(cfg: StudyConfig) -> dict[str, list]:
    """The grid sampler's search space: every searched name with its finite list of values."""
    space: dict[str, list] = {}

    def add(name: str, entry: tuple, where: str) -> None:
        kind, dist = entry
        if kind == "fixed":
            return
        choices = getattr(dist, "choices", None)
        if choices is None:
            if getattr(dist, "step", None) and not getattr(dist, "log", False) and isinstance(dist.low, int):
                choices = list(range(dist.low, dist.high + 1, dist.step))
            else:
                raise SpecError(f"{where}: the grid sampler needs a value or a list of values, not a range "
                               "(an omitted parameter is searched over its declared range)")
        space[name] = list(choices)

    for key, entry in cfg.workload_space.items():
        add(f"workload.{key}", entry, f"{cfg.path}.workload.{key}")
    for axis, techniques in cfg.axes.items():
        if len(techniques) > 1:
            space[axis] = list(techniques)
        for name, params in techniques.items():
            for key, entry in params.items():
                add(f"{axis}.{name}.{key}", entry, f"{cfg.path}.axes.{axis}.{name}.{key}")
    if len(cfg.batch_sizes) > 1:
        space["batch_size"] = list(cfg.batch_sizes)
    return space


# ============================================================================================ records
@dataclass
class TrialRecord:
    """A finished trial as the study sees it: kept in the Optuna trial's user attributes (``record``) so
    reports and observers (MLflow) need nothing else."""

    number: int
    state: str
    failure_class: str | None = None
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    values: list[float] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    spec_hash: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    #: > 0 when a constraint is violated (relative to its bound); None when not evaluated.
    constraint_violation: float | None = None
    #: the trial whose outcome was reused because it ran the same combination (-1: the baseline trial).
    duplicate_of: int | None = None

    @property
    def label(self) -> str:
        return " + ".join(str(self.params.get(a, "?")) for a in AXES)

    @property
    def feasible(self) -> bool:
        return self.state == "COMPLETE" and (self.constraint_violation is None or self.constraint_violation <= 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrialRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def constraints_from_attrs(trial) -> list[float]:
    """Optuna's ``constraints_func``: the violation stored on the trial (> 0 means infeasible)."""
    return [float(trial.user_attrs.get("constraint", 0.0))]


# ============================================================================================ storage
def open_storage(url: str, heartbeat_s: int = 10):
    """Open an Optuna RDB storage with heartbeats; a stale (killed) trial is failed and re-enqueued.

    Raises :class:`SpecError` when the URL is unusable, before anything is created."""
    import optuna

    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:" and not Path(path).resolve().parent.is_dir():
            raise SpecError(f"storage: {url!r}: directory {str(Path(path).parent)!r} does not exist")
    elif "://" not in url:
        raise SpecError(f"storage: {url!r} is not a database URL (e.g. sqlite:///harness.db, "
                        "postgresql://host/db, mysql://host/db)")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s + 1,
                heartbeat_stale_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=3))
    except Exception as exc:  # driver missing, host unreachable, bad credentials: all the user's to fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SpecError(f"storage: cannot open {url!r}: {type(exc).__name__}: {first[:200]}") from None


def _existing_directions(storage, name: str):
    import optuna

    for summary in optuna.study.get_all_study_summaries(storage, include_best_trial=False):
        if summary.study_name == name:
            return [d.name.lower() for d in summary.directions]
    return None


class _Heartbeat:
    """Records the running trial's heartbeat from a thread, so a driver killed mid-trial is noticed."""

    def __init__(self, storage, trial_id: int, interval_s: float):
        self.storage, self.trial_id, self.interval_s = storage, trial_id, interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a busy database skips one beat; the grace period covers it
                pass

    def __enter__(self):
        self.storage.record_heartbeat(self.trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


# ============================================================================================ driver
def _suggest(trial, name: str, dist):
    import optuna.distributions as d

    if isinstance(dist, d.CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    if isinstance(dist, d.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)


def _value(trial, name: str, entry: tuple):
    kind, value = entry
    return value if kind == "fixed" else _suggest(trial, name, value)


def _slot(t) -> str | None:
    """How a stored trial stands toward n_trials: "running", "waiting", "interrupted" (its process died before
    a record was written: it reruns and does not count) or "finished"; None for a surplus trial, which never
    ran and never counts."""
    from optuna.trial import TrialState

    if t.user_attrs.get("surplus"):
        return None
    if t.state == TrialState.RUNNING:
        return "running"
    if t.state == TrialState.WAITING:
        return "waiting"
    if t.state == TrialState.FAIL and "record" not in t.user_attrs:
        return "interrupted"
    return "finished"


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str], margin: float = 0.0) -> bool:
    """True when ``a`` is at least as good as ``b`` on every objective and better on one; with ``margin``,
    ``a`` must be better by that fraction where it is better and may be worse by at most it elsewhere."""
    better = False
    for x, y, direction in zip(a, b, directions):
        if direction == "minimize":
            x, y = -x, -y
        slack = abs(y) * margin
        if x < y - slack:
            return False
        if x > y + slack or (margin == 0 and x > y):
            better = True
    return better


class StudyDriver:
    """Runs a study: asks Optuna, checks feasibility, launches, tells; see the module docstring."""

    def __init__(self, config: StudyConfig, registry, console=None, n_trials: int | None = None,
                 timeout_s: float | None = None):
        from rich.console import Console

        self.config, self.registry = config, registry
        self.console = console or Console()
        self.n_trials = n_trials if n_trials is not None else config.n_trials
        self.timeout_s = timeout_s if timeout_s is not None else config.timeout_s
        self.output_dir = Path(config.output_dir)
        self.env = Environment.detect()
        self.baseline: TrialRecord | None = None
        self.study = None

    # ------------------------------------------------------------------------------------------ setup
    def open(self):
        """Open (or resume) the study in its storage; every check that can fail on user input runs first."""
        import optuna

        cfg = self.config
        storage = open_storage(cfg.storage, cfg.heartbeat_s)
        directions = [o.direction for o in cfg.objectives]
        existing = _existing_directions(storage, cfg.name)
        if existing is not None and existing != directions:
            raise SpecError(f"objectives: study {cfg.name!r} in {cfg.storage} was created with directions "
                            f"{existing}; this file asks for {directions} (use another name or storage)")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.study = optuna.create_study(storage=storage, study_name=cfg.name, load_if_exists=True,
                                             directions=directions, sampler=self._sampler(len(existing or []) > 0),
                                             pruner=self._pruner())
        attrs = {"objectives": [dataclasses.astuple(o) for o in cfg.objectives],
                 "constraints": {c.metric: c.text for c in cfg.constraints}, "workload": cfg.workload,
                 "study_file": cfg.path}
        for key, value in attrs.items():
            if self.study.user_attrs.get(key) != value:
                self.study.set_user_attr(key, value)
        return self.study

    def _sampler(self, resuming: bool):
        import optuna

        cfg = self.config
        name = cfg.sampler
        if name == "auto":
            name = "nsga2" if cfg.multi_objective else "tpe"
        # Each driver process samples its own random stream: two drivers sharing a storage (or a resumed one)
        # must not propose the same sequence. ``seed`` fixes the trials' training seed, not this stream.
        seed = (cfg.seed * 1_000_003 + os.getpid()) % 2**31
        kwargs = dict(cfg.sampler_options)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "tpe":
                    return optuna.samplers.TPESampler(seed=seed, constraints_func=constraints_from_attrs, **kwargs)
                if name == "nsga2":
                    return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints_from_attrs,
                                                         **kwargs)
                if name == "random":
                    return optuna.samplers.RandomSampler(seed=seed, **kwargs)
                return optuna.samplers.GridSampler(grid_space(cfg), seed=seed, **kwargs)
        except TypeError as exc:
            raise SpecError(f"{cfg.path}.sampler: bad option for {name!r}: {exc}") from None

    def _pruner(self):
        import optuna

        cfg = self.config
        kinds = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
                 "hyperband": optuna.pruners.HyperbandPruner,
                 "successive-halving": optuna.pruners.SuccessiveHalvingPruner}
        try:
            return kinds[cfg.pruner](**cfg.pruner_options)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{cfg.path}.pruner: bad option for {cfg.pruner!r}: {exc}") from None

    # ------------------------------------------------------------------------------------------ specs
    def suggest_spec(self, trial) -> TrialSpec:
        """Turn an Optuna trial into a TrialSpec: one technique per axis, then that technique's parameters."""
        cfg = self.config
        wparams = {k: _value(trial, f"workload.{k}", e) for k, e in cfg.workload_space.items()}
        spec = TrialSpec(workload=cfg.workload, batch_size=cfg.batch_sizes[0], budget=copy.deepcopy(cfg.budget),
                         seed=cfg.seed, devices=cfg.devices, device=cfg.device)
        spec.workload_params = self.registry.validate_workload("workload", cfg.workload, wparams)
        for axis in AXES:
            names = list(cfg.axes[axis])
            name = names[0] if len(names) == 1 else trial.suggest_categorical(axis, names)
            params = {k: _value(trial, f"{axis}.{name}.{k}", e) for k, e in cfg.axes[axis][name].items()}
            tech = self.registry.technique(axis, axis, name)
            setattr(spec, axis, Choice(name, tech.validate_params(f"{axis}.{name}", params)))
        if len(cfg.batch_sizes) > 1:
            spec.batch_size = trial.suggest_categorical("batch_size", cfg.batch_sizes)
        if cfg.target_accuracy is not None:
            spec.tags["target_accuracy"] = cfg.target_accuracy
        return spec

    def baseline_spec(self) -> TrialSpec:
        """fp32 / eager / single / none with the study's first optimizer (its fixed values, else defaults),
        or the study file's ``baseline:`` trial."""
        from harness.config import trial_from_mapping

        cfg = self.config
        if cfg.baseline is not None:
            data = {"workload": cfg.workload, "batch_size": cfg.batch_sizes[0], "seed": cfg.seed,
                    "devices": cfg.devices, "device": cfg.device, **cfg.baseline}
            spec = trial_from_mapping(f"{cfg.path}.baseline", data, self.registry)
            if "budget" not in cfg.baseline:
                spec.budget = copy.deepcopy(cfg.budget)
            if "workload" not in cfg.baseline:
                spec.workload_params = self._fixed_workload_params()
        else:
            opt_name, opt_space = next(iter(cfg.axes["optimizer"].items()))
            tech = self.registry.technique("optimizer", "optimizer", opt_name)
            fixed = {k: v for k, (kind, v) in opt_space.items() if kind == "fixed"}
            spec = TrialSpec(workload=cfg.workload, workload_params=self._fixed_workload_params(),
                             optimizer=Choice(opt_name, tech.validate_params("optimizer", fixed)),
                             batch_size=cfg.batch_sizes[0], budget=copy.deepcopy(cfg.budget), seed=cfg.seed,
                             devices=cfg.devices, device=cfg.device)
            for axis in ("precision", "compile", "parallelism", "compression"):
                tech = self.registry.technique(axis, axis, DEFAULT_TECHNIQUES[axis])
                setattr(spec, axis, Choice(tech.name, tech.defaults()))
        if cfg.target_accuracy is not None:
            spec.tags["target_accuracy"] = cfg.target_accuracy
        return spec

    def _fixed_workload_params(self) -> dict:
        cfg = self.config
        params = {k: (v if kind == "fixed" else None) for k, (kind, v) in cfg.workload_space.items()}
        return self.registry.validate_workload("workload", cfg.workload,
                                               {k: v for k, v in params.items() if v is not None})

    def infeasible(self, spec: TrialSpec) -> str | None:
        """Why ``spec`` cannot run here: declared requirements first, then every plugin's veto."""
        if spec.device == "cuda" and not self.env.cuda:
            return "device: 'cuda' requested but this machine has no CUDA GPU"
        kinds = self.registry.workload_kinds(spec.workload)
        reason = infeasible_reason(spec, self.registry.techniques, self.env, kinds)
        if reason:
            return reason
        for r in self.registry.hook.harness_check_combination(spec=spec, env=self.env, workload_kinds=kinds):
            if r:
                return r
        if spec.batch_size % spec.devices:
            return f"batch_size: {spec.batch_size} is not divisible by the {spec.devices} processes"
        return None

    # ------------------------------------------------------------------------------------------ the loop
    def counts(self) -> dict[str, int]:
        """Trials by outcome; ``finished`` counts toward n_trials (an interrupted trial does not: it reruns)."""
        from optuna.trial import TrialState

        out = dict(finished=0, running=0, waiting=0, complete=0, failed=0, pruned=0, infeasible=0, screened=0,
                   interrupted=0)
        for t in self.study.get_trials(deepcopy=False):
            slot = _slot(t)
            if slot is None:
                continue
            out[slot] += 1
            if slot != "finished":
                continue
            cls = t.user_attrs.get("failure_class")
            if t.state == TrialState.COMPLETE:
                out["complete"] += 1
            elif cls in ("infeasible", "screened"):
                out[cls] += 1
            elif t.state == TrialState.PRUNED:
                out["pruned"] += 1
            else:
                out["failed"] += 1
        return out

    def run(self) -> tuple[list[TrialRecord], list[TrialRecord]]:
        """Run trials until n_trials are finished in the storage (by any driver) or the timeout passes."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from harness import report

        if self.study is None:
            self.open()
        study, cfg, hook = self.study, self.config, self.registry.hook
        hook.harness_study_start(study=study, config=cfg)
        t0 = time.monotonic()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[status]}")]
        with Progress(*columns, console=self.console, transient=False) as progress:
            self.progress = progress
            self.task = progress.add_task(f"study {cfg.name}", total=self.n_trials, status="")
            self._update_progress("")
            if cfg.needs_baseline:
                self.baseline = self.ensure_baseline()
                if self.baseline is None:
                    return [], []
            while True:
                self._fail_stale()
                c = self.counts()
                if self.n_trials is not None and c["finished"] >= self.n_trials:
                    break
                if self.timeout_s is not None and time.monotonic() - t0 >= self.timeout_s:
                    break
                if self.n_trials is not None and c["finished"] + c["running"] >= self.n_trials and not c["waiting"]:
                    # the remaining trials run in other drivers; wait in case one of them dies
                    self._update_progress("waiting for other drivers' trials")
                    time.sleep(min(2.0, cfg.heartbeat_s))
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    trial = study.ask()
                if self._surplus(trial):
                    continue
                self.run_trial(trial)
            self._update_progress("done")
        records = report.records_from_study(study)
        pareto = report.pareto_front(records, cfg.objectives)
        report.print_table(self.console, study, records, pareto, baseline=self.baseline)
        written = report.write_outputs(study, records, pareto, cfg.objectives, self.output_dir,
                                       baseline=self.baseline)
        self.console.print(f"wrote {', '.join(p.name for p in written)} to {self.output_dir}")
        hook.harness_study_end(study=study, config=cfg, records=records, pareto=pareto,
                               output_dir=self.output_dir)
        return records, pareto

    def _surplus(self, trial) -> bool:
        """Whether n_trials were already claimed by lower-numbered trials when ``trial`` was asked: two drivers
        that read the counts at the same moment both ask, and the higher trial number gives way. A surplus
        trial is failed at once, marked so, and left out of the counts and the report."""
        from optuna.trial import TrialState

        if self.n_trials is None:
            return False
        ahead = sum(1 for t in self.study.get_trials(deepcopy=False)
                    if t.number < trial.number and _slot(t) in ("running", "finished"))
        if ahead < self.n_trials:
            return False
        trial.set_user_attr("surplus", True)
        self.study.tell(trial, state=TrialState.FAIL)
        return True

    def _fail_stale(self) -> None:
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(self.study)

    def _update_progress(self, current: str, refresh: bool = True) -> None:
        """Show the counts by outcome, the best trial so far and the current trial's line. The counts come
        from the storage (other drivers' trials included) and are re-read only when ``refresh``."""
        if refresh or not hasattr(self, "_summary"):
            c = self.counts()
            best = self._best_text()
            self._summary = (c["finished"], f"done {c['complete']}  failed {c['failed']}  infeasible "
                             f"{c['infeasible']}  pruned {c['pruned'] + c['screened']}  running {c['running']}"
                             + (f"  | best {best}" if best else ""))
        finished, summary = self._summary
        self.progress.update(self.task, completed=finished, status=summary + (f"\n  {current}" if current else ""))

    def _best_text(self) -> str:
        from harness import report

        records = [r for r in report.records_from_study(self.study) if r.feasible and r.values]
        if not records:
            return ""
        o = self.config.objectives[0]
        pick = max if o.direction == "maximize" else min
        best = pick(records, key=lambda r: r.values[0])
        return f"{o.metric} {report.fmt(o.key, best.values[0])} (#{best.number} {best.label})"

    # ------------------------------------------------------------------------------------------ one trial
    def ensure_baseline(self) -> TrialRecord | None:
        """Run the baseline trial once per study (kept in the study's user attributes across resumes)."""
        stored = self._claim_baseline()
        if stored:
            return TrialRecord.from_dict(stored)
        spec = self.baseline_spec()
        reason = self.infeasible(spec)
        t0 = time.monotonic()
        if reason:
            record = TrialRecord(-1, "FAIL", "infeasible", reason, spec_hash=spec.spec_hash(), spec=spec.to_dict(),
                                 params=spec.flat_params())
        else:
            self._update_progress(f"baseline: {spec.label()}")
            result = self._launch(spec, self.output_dir / "trials" / "baseline", None)
            record = TrialRecord(-1, "COMPLETE" if result.ok else "FAIL", None if result.ok else result.status,
                                 result.message, result.metrics, params=spec.flat_params(),
                                 spec_hash=spec.spec_hash(), spec=spec.to_dict(),
                                 duration_s=time.monotonic() - t0)
        if record.state != "COMPLETE":
            from rich.markup import escape

            self.console.print(f"[red]baseline trial failed ({record.failure_class}): {escape(record.message)}[/red]; "
                               "constraints relative to the baseline cannot be evaluated")
            return None
        record.values = self._values(record.metrics)
        self.study.set_user_attr("baseline", record.to_dict())
        self.console.print(f"baseline {spec.label()}: " + ", ".join(
            f"{c.metric} {c.op} {_fmt_bound(c, record.metrics)}" for c in self.config.constraints))
        return record

    def _claim_baseline(self) -> dict | None:
        """The stored baseline record, or None once this driver holds the claim to run it. Several drivers
        starting together: the last claim written wins and the others wait for its record (or for the claim to
        expire, when its driver died)."""
        me = f"{socket.gethostname()}:{os.getpid()}"
        while True:
            attrs = self._study_attrs()
            if attrs.get("baseline"):
                return attrs["baseline"]
            claim = attrs.get("baseline_claim") or {}
            alive = time.time() - claim.get("time", 0) < self.config.trial_timeout_s + 60
            host, _, pid = str(claim.get("driver", "")).rpartition(":")
            if alive and host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                alive = False  # its driver on this machine is gone (killed during the baseline)
            if claim.get("driver") not in (None, me) and alive:
                self._update_progress(f"waiting for the baseline trial run by {claim['driver']}")
                time.sleep(2.0)
                continue
            if claim.get("driver") == me:
                return None
            self.study.set_user_attr("baseline_claim", {"driver": me, "time": time.time()})
            time.sleep(0.5)  # let a simultaneous claim land; whichever was written last wins

    def _study_attrs(self) -> dict:
        return self.study.user_attrs  # read from the storage each time: other drivers' writes included

    def _values(self, metrics: Mapping[str, Any]) -> list[float] | None:
        values = []
        for o in self.config.objectives:
            v = metrics.get(o.key)
            if v is None or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                return None
            values.append(float(v))
        return values

    def _violation(self, metrics: Mapping[str, Any]) -> float:
        base = self.baseline.metrics if self.baseline else None
        return max([c.violation(metrics, base) for c in self.config.constraints], default=0.0)

    def _launch(self, spec: TrialSpec, workdir: Path, trial):
        from harness.launch import LaunchOptions, launch

        objective = self.config.objectives[0]
        prunable = trial is not None and self.config.pruner != "none"

        def on_event(event: dict):
            kind = event.get("event")
            if kind in ("progress", "window") and event.get("total_steps"):
                self._update_progress(f"#{getattr(trial, 'number', 'baseline')} {spec.label()}: step "
                                      f"{event['step']}/{event['total_steps']}", refresh=False)
            if not prunable or kind not in ("window", "eval"):
                return None
            value = (event.get("metrics") or {}).get(objective.key)
            if value is None or not math.isfinite(float(value)):
                return None
            with warnings.catch_warnings():  # the final evaluation may repeat the last intermediate step
                warnings.simplefilter("ignore")
                trial.report(float(value), int(event["step"]))
            return bool(trial.should_prune())

        try:
            return launch(spec, workdir, LaunchOptions(timeout_s=self.config.trial_timeout_s), on_event=on_event)
        except KeyboardInterrupt:
            # The trial runs in a session of its own, so Ctrl-C never reached it: end it here. The Optuna trial
            # stays RUNNING without heartbeats; the next driver fails it as stale and runs it again.
            _kill_children()
            raise
        except Exception as exc:  # the launcher itself failed (a missing tool, a full disk): this trial crashed
            from harness.trial import TrialResult

            return TrialResult("crashed", {}, f"could not launch the trial: {type(exc).__name__}: {exc}",
                               spec=spec.to_dict())

    def _previous(self, trial, spec_hash: str) -> TrialRecord | None:
        """The outcome of this combination if it already ran in the study; waits while an earlier trial of
        another driver is running it (so no combination is launched twice)."""
        from optuna.trial import TrialState

        if self.baseline is not None and self.baseline.spec_hash == spec_hash:
            return self.baseline
        while True:
            running = False
            for t in self.study.get_trials(deepcopy=False):
                if t.number == trial.number or t.user_attrs.get("spec_hash") != spec_hash:
                    continue
                if t.state.is_finished() and "record" in t.user_attrs:
                    return TrialRecord.from_dict(t.user_attrs["record"])
                if t.state == TrialState.RUNNING and t.number < trial.number:
                    running = True
            if not running:
                return None
            self._update_progress(f"#{trial.number}: waiting for the same combination running elsewhere")
            time.sleep(1.0)
            self._fail_stale()

    def run_trial(self, trial) -> TrialRecord:
        """Run one asked trial to its end and tell Optuna; never raises for a failing trial."""
        from optuna.trial import TrialState

        t0 = time.monotonic()
        study, cfg = self.study, self.config
        spec = self.suggest_spec(trial)
        spec_hash = spec.spec_hash()
        trial.set_user_attr("spec_hash", spec_hash)
        trial.set_user_attr("label", spec.label())
        trial.set_user_attr("driver", f"{socket.gethostname()}:{os.getpid()}")
        record = TrialRecord(trial.number, "FAIL", params=spec.flat_params(), spec_hash=spec_hash,
                             spec=spec.to_dict())
        with _Heartbeat(study._storage, trial._trial_id, cfg.heartbeat_s):
            reason = self.infeasible(spec)
            previous = None if reason else self._previous(trial, spec_hash)
            if reason:
                record.state, record.failure_class, record.message = "PRUNED", "infeasible", reason
                record.constraint_violation = INFEASIBLE_VIOLATION
            elif previous is not None:
                record.state, record.failure_class = previous.state, previous.failure_class
                record.metrics, record.values = dict(previous.metrics), previous.values
                record.constraint_violation = previous.constraint_violation
                record.duplicate_of = previous.number
                record.message = f"same combination as trial #{previous.number}: reused its outcome" + (
                    f" ({previous.message})" if previous.message else "")
            else:
                self.registry.hook.harness_trial_launch(spec=spec, trial_number=trial.number, study=study)
                record.spec = spec.to_dict()
                trial.set_user_attr("launched", True)
                self._run_launched(trial, spec, record)
        record.duration_s = time.monotonic() - t0
        trial.set_user_attr("failure_class", record.failure_class)
        trial.set_user_attr("failure_message", record.message[:2000])
        trial.set_user_attr("constraint", record.constraint_violation or 0.0)
        trial.set_user_attr("record", record.to_dict())
        state = {"COMPLETE": TrialState.COMPLETE, "PRUNED": TrialState.PRUNED}.get(record.state, TrialState.FAIL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                study.tell(trial, record.values if state == TrialState.COMPLETE else None, state=state)
            except RuntimeError as exc:  # the grid sampler calls study.stop() when the grid is done
                if "stop" not in str(exc):
                    raise
        self.registry.hook.harness_trial_finished(spec=spec, record=record, study=study)
        self._log(record)
        self._update_progress("")
        return record

    def _run_launched(self, trial, spec: TrialSpec, record: TrialRecord) -> None:
        cfg = self.config
        workdir = self.output_dir / "trials" / f"{trial.number:04d}"
        self._update_progress(f"#{trial.number} {spec.label()}")
        if cfg.screening is not None:
            short = copy.deepcopy(spec)
            short.budget = copy.deepcopy(cfg.screening)
            result = self._launch(short, workdir / "screen", None)
            if not result.ok:
                self._fill_failure(record, result)
                record.message = f"screening: {record.message}"
                return
            screen = [float(result.metrics.get("throughput_samples_per_s", 0.0)),
                      float(result.metrics.get("peak_memory_bytes", 0.0))]
            trial.set_user_attr("screen", screen)
            rival = self._dominating_screen(trial.number, screen)
            if rival is not None:
                number, (thr, mem) = rival
                record.state, record.failure_class, record.metrics = "PRUNED", "screened", dict(result.metrics)
                record.message = (f"dominated at screening by trial #{number} ({thr:,.0f} vs {screen[0]:,.0f} "
                                  f"samples/s, {mem / 2**20:,.0f} vs {screen[1] / 2**20:,.0f} MiB)")
                return
        result = self._launch(spec, workdir, trial)
        if not result.ok:
            self._fill_failure(record, result)
            return
        record.metrics = dict(result.metrics)
        record.metrics.update({f"condition.{k}": v for k, v in result.conditions.items()})
        record.values = self._values(result.metrics)
        if record.values is None:
            missing = [o.key for o in cfg.objectives if not isinstance(result.metrics.get(o.key), (int, float))]
            record.state, record.failure_class = "FAIL", "missing-metric"
            record.message = f"objective metric(s) not measured or not finite: {', '.join(missing) or '?'}"
            return
        record.state = "COMPLETE"
        record.constraint_violation = self._violation(result.metrics)

    def _fill_failure(self, record: TrialRecord, result) -> None:
        record.metrics = dict(result.metrics)
        record.failure_class, record.message = result.status, result.message
        if result.status == "pruned":
            record.state = "PRUNED"
        elif result.status == "infeasible":
            record.state, record.constraint_violation = "PRUNED", INFEASIBLE_VIOLATION
        else:
            record.state = "FAIL"

    def _dominating_screen(self, number: int, screen: list[float]):
        """An earlier stage-1 result that beats ``screen`` on (throughput up, memory down) by the margin."""
        for t in self.study.get_trials(deepcopy=False):
            other = t.user_attrs.get("screen")
            if t.number == number or not other:
                continue
            if dominates(other, screen, ("maximize", "minimize"), self.config.screening_margin):
                return t.number, other
        return None

    def _log(self, record: TrialRecord) -> None:
        from harness import report

        color = {"COMPLETE": "green", "PRUNED": "yellow"}.get(record.state, "red")
        if record.state == "COMPLETE":
            what = "  ".join(f"{o.metric} {report.fmt(o.key, v)}" for o, v in zip(self.config.objectives,
                                                                                   record.values or []))
            if record.constraint_violation and record.constraint_violation > 0:
                what += "  (violates the constraints)"
        else:
            what = f"{record.failure_class}: {record.message[:160]}"
        from rich.markup import escape

        self.progress.console.print(f"[{color}]#{record.number:<3} {record.state:<8}[/{color}] "
                                    f"{escape(record.label)}  {escape(what)}  ({record.duration_s:.1f} s)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_children() -> None:
    """SIGKILL the trial processes this driver started (its descendants)."""
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except Exception:  # psutil missing: nothing more can be done here
        return
    for child in children:
        try:
            child.kill()
        except Exception:
            pass


def _fmt_bound(c: Constraint, baseline_metrics) -> str:
    from harness import report

    bound = c.bound(baseline_metrics)
    return report.fmt(c.key, bound) if bound is not None else "?"


# ============================================================================================ CLI
def cmd_study(args, registry) -> int:
    """``harness study FILE``: validate everything (file, plugins, storage), then run the study."""
    from rich.console import Console

    config = StudyConfig.from_yaml(args.file, registry)
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough for the Pareto table
        console = Console(width=160)
    if args.storage:
        config.storage = args.storage
    if args.output_dir:
        config.output_dir = args.output_dir
    if args.n_trials is not None and args.n_trials < 1:
        raise SpecError(f"--n-trials: expected a positive integer, got {args.n_trials}")
    if args.timeout is not None and args.timeout <= 0:
        raise SpecError(f"--timeout: expected seconds > 0, got {args.timeout}")
    driver = StudyDriver(config, registry, console, n_trials=args.n_trials, timeout_s=args.timeout)
    driver.open()
    records, _ = driver.run()
    if config.needs_baseline and driver.baseline is None:
        return 1
    return 0


def cmd_report(args, registry) -> int:
    """``harness report STUDY``: re-print the Pareto table of a study from its storage."""
    import optuna
    from rich.console import Console

    from harness import report

    if args.storage.startswith("sqlite:///") and not Path(args.storage[len("sqlite:///"):]).is_file():
        raise SpecError(f"--storage: {args.storage!r}: no such database file")
    storage = open_storage(args.storage)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]
    if args.study not in names:
        raise SpecError(f"study: no study {args.study!r} in {args.storage} (studies: {', '.join(names) or 'none'})"
                        f"{did_you_mean(args.study, names)}")
    study = optuna.load_study(study_name=args.study, storage=storage)
    objectives = [Objective(*o) for o in study.user_attrs.get("objectives", [])] or [
        Objective("throughput", METRICS["throughput"][0], "maximize")]
    records = report.records_from_study(study)
    pareto = report.pareto_front(records, objectives)
    baseline = study.user_attrs.get("baseline")
    baseline = TrialRecord.from_dict(baseline) if baseline else None
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    report.print_table(console, study, records, pareto, baseline=baseline, objectives=objectives)
    if args.output_dir:
        written = report.write_outputs(study, records, pareto, objectives, Path(args.output_dir), baseline=baseline)
        console.print(f"wrote {', '.join(p.name for p in written)} to {args.output_dir}")
    return 0


def add_cli(sub) -> None:
    """Add ``harness study`` and ``harness report`` to the CLI (called by :mod:`harness.cli`)."""
    p = sub.add_parser("study", help="search technique combinations (an Optuna study) from a study file")
    p.add_argument("file", help="study YAML file (studies/quickstart.yaml)")
    p.add_argument("--n-trials", type=int, help="override n_trials")
    p.add_argument("--timeout", type=float, help="override timeout_s (seconds before no new trial starts)")
    p.add_argument("--storage", help=f"override the Optuna storage URL (default {DEFAULT_STORAGE})")
    p.add_argument("--output-dir", help="override output_dir (plots, trials.csv, pareto.json)")
    p.set_defaults(handler=cmd_study)
    r = sub.add_parser("report", help="re-print the Pareto table of a study from its storage")
    r.add_argument("study", help="study name")
    r.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default {DEFAULT_STORAGE})")
    r.add_argument("--output-dir", help="also (re)write trials.csv, pareto.json and the plots here")
    r.set_defaults(handler=cmd_report)
