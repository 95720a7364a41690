"""Study files (``studies/X.yaml``): the validated :class:`StudyConfig` and its parsers.

A study file names a workload, the techniques to consider on each axis (with parameter ranges or fixed values),
the objectives, constraints, sampler, pruner and storage. Every mistake is one :class:`SpecError` line naming
the field, raised before any storage is opened. Top-level sections other than the core keys belong to plugins
that declare them (``harness_declare_study_settings``); their validated values land in
:attr:`StudyConfig.settings`. The section of a plugin disabled by name is accepted and left unread.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import (
    TRIAL_KEYS,
    Budget,
    TrialSpec,
    check_keys,
    checked_name,
    integer,
    load_yaml,
    parse_budget,
    parse_choice,
    parse_common,
    positive,
)
from harness.errors import SpecError, shown
from harness.outcomes import Constraint, Objective
from harness.redact import mask_credentials
from harness.slots import parse_gpus
from harness.space import AXES, Categorical, Param, did_you_mean, param_from_yaml

if TYPE_CHECKING:
    from harness.plugins import Registry

STUDY_KEYS = ("name", "workload", "axes", "batch_size", "budget", "trial_timeout_s", "objectives", "constraints",
              "baseline", "sampler", "pruner", "n_trials", "timeout_s", "storage", "seed", "devices", "device",
              "screening", "output_dir", "heartbeat_s", "target_accuracy", "omitted_params",
              "remeasure_baseline_every", "gpus", "cpu_slots")
SAMPLERS = ("auto", "tpe", "nsga2", "random", "grid")
PRUNERS = ("none", "median", "hyperband", "successive-halving")
DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}
DEFAULT_STORAGE = "sqlite:///harness.db"
#: what a study name may hold: it names the Optuna study, the MLflow experiment and the output directory.
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
STUDY_NAME_TEXT = "a letter or digit, then up to 99 of letters, digits, '.', '_', '-'; no '..'"
SQLITE_HEADER = b"SQLite format 3\x00"

#: a searched value: ``("fixed", value)`` or ``("dist", optuna distribution)``.
SpaceEntry = tuple[str, Any]


@dataclass
class StudyConfig:
    """A validated study file. ``axes`` maps axis -> technique -> parameter -> :data:`SpaceEntry`;
    ``settings`` maps each plugin-declared section the file has (``mlflow``) to its validated value."""

    name: str
    workload: str
    workload_space: dict[str, SpaceEntry] = field(default_factory=dict)
    axes: dict[str, dict[str, dict[str, SpaceEntry]]] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=lambda: [64])
    budget: Budget = field(default_factory=lambda: Budget(steps=200))
    #: seconds before a trial is killed; None (``auto``): derived from the baseline trial's wall time.
    trial_timeout_s: float | None = None
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
    settings: dict[str, Any] = field(default_factory=dict)
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
    #: the baseline runs again after every this many launched trials (0: never), so drift shows.
    remeasure_baseline_every: int = 10
    #: the GPUs whose slots run trials at once (None: every visible GPU); see :mod:`harness.slots`.
    gpus: list[int] | None = None
    #: trials at once in a CPU study (1: parallel CPU trials would distort each other's throughput).
    cpu_slots: int = 1
    path: str = ""

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def needs_baseline(self) -> bool:
        return self.baseline is not None or any(c.relative for c in self.constraints)

    @classmethod
    def from_yaml(cls, path: str | Path, registry: Registry) -> StudyConfig:
        return cls.from_mapping(str(path), load_yaml(path), registry, default_name=Path(path).stem)

    @classmethod
    def from_mapping(cls, where: str, data: Any, registry: Registry, default_name: str = "study") -> StudyConfig:
        if not isinstance(data, Mapping):
            raise SpecError(f"{where}: expected a mapping of study fields, got {type(data).__name__}")
        # a section named after a plugin disabled by name (``--disable mlflow``) is left unread, not an error
        given = {k: v for k, v in data.items() if k in STUDY_KEYS or k not in registry.disabled}
        trial_keys = [k for k in data if k in TRIAL_KEYS and k not in STUDY_KEYS]
        if trial_keys and not any(k in data for k in ("axes", "n_trials", "timeout_s", "objectives")):
            raise SpecError(f"{where}: this looks like a trial file (top-level {', '.join(map(str, trial_keys))}; "
                            "a study file has axes and n_trials): run it with `harness run FILE`")
        check_keys(where, given, [*STUDY_KEYS, *(k for k in registry.settings if k not in STUDY_KEYS)])
        cfg = cls(name=_study_name(f"{where}.name", data.get("name", default_name)), workload="", path=where)
        common = TrialSpec()
        parse_common(where, {k: data[k] for k in ("seed", "devices", "device", "budget") if k in data}, common)
        cfg.seed, cfg.devices, cfg.device = common.seed, common.devices, common.device
        cfg.budget = common.budget if "budget" in data else Budget(steps=200)
        workload = data.get("workload", registry.default_workload())
        # a ``module:function`` workload is code: it is imported only once every other field has passed
        deferred = ":" in parse_choice(f"{where}.workload", workload)[0]
        if not deferred:
            _parse_workload(cfg, where, workload, registry)
        cfg.omitted_params, _ = _parse_named(f"{where}.omitted_params", data.get("omitted_params", "search"),
                                             ("search", "default"))
        _parse_axes(cfg, where, data.get("axes"), registry)
        cfg.batch_sizes = _parse_batch_sizes(f"{where}.batch_size", data.get("batch_size", 64))
        timeout = data.get("trial_timeout_s", "auto")
        cfg.trial_timeout_s = None if timeout == "auto" else positive(
            f"{where}.trial_timeout_s", timeout, " of seconds or 'auto' (derived from the baseline's wall time)")
        cfg.remeasure_baseline_every = integer(f"{where}.remeasure_baseline_every",
                                               data.get("remeasure_baseline_every", 10), 0, " of launched trials")
        cfg.gpus = parse_gpus(f"{where}.gpus", data.get("gpus", "all"))
        cfg.cpu_slots = integer(f"{where}.cpu_slots", data.get("cpu_slots", 1), 1, " (trials at once on a CPU)")
        cfg.objectives = _parse_objectives(f"{where}.objectives", data.get("objectives", ["throughput"]), registry)
        cfg.constraints = _parse_constraints(f"{where}.constraints", data.get("constraints") or {}, registry)
        if "baseline" in data:
            if not isinstance(data["baseline"], Mapping):
                raise SpecError(f"{where}.baseline: expected a mapping of trial fields (workload, optimizer, ...)")
            cfg.baseline = dict(data["baseline"])
        cfg.sampler, cfg.sampler_options = _parse_named(f"{where}.sampler", data.get("sampler", "auto"), SAMPLERS)
        cfg.pruner, cfg.pruner_options = _parse_named(f"{where}.pruner", data.get("pruner", "none"), PRUNERS)
        if cfg.pruner != "none" and cfg.multi_objective:
            raise SpecError(f"{where}.pruner: {shown(cfg.pruner)} needs a single objective (Optuna's pruners cannot "
                            "prune multi-objective trials; use screening instead)")
        if "n_trials" in data:
            cfg.n_trials = integer(f"{where}.n_trials", data["n_trials"])
        if "timeout_s" in data:
            cfg.timeout_s = positive(f"{where}.timeout_s", data["timeout_s"], " of seconds")
        if cfg.n_trials is None and cfg.timeout_s is None:
            raise SpecError(f"{where}: give n_trials and/or timeout_s (when the study stops)")
        cfg.storage = _string(f"{where}.storage", data.get("storage", DEFAULT_STORAGE))
        if data.get("screening") is not None:
            _parse_screening(cfg, f"{where}.screening", data["screening"])
        cfg.output_dir = _string(f"{where}.output_dir", data.get("output_dir", f"harness-out/{cfg.name}"))
        cfg.heartbeat_s = integer(f"{where}.heartbeat_s", data.get("heartbeat_s", 10), what=" (seconds)")
        if "target_accuracy" in data:
            t = data["target_accuracy"]
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
                raise SpecError(f"{where}.target_accuracy: expected a fraction in (0, 1], got {shown(t)}")
            cfg.target_accuracy = float(t)
        if cfg.sampler == "grid":
            grid_space(cfg)  # raises for ranges a grid cannot enumerate
        for key, setting in registry.settings.items():  # plugins' sections, checked by their declared validate
            if key in data and key not in STUDY_KEYS:
                cfg.settings[key] = setting.validate(f"{where}.{key}", data[key])
        if deferred:
            _parse_workload(cfg, where, workload, registry)
        return cfg


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(path: Path) -> bool:
    """Whether this process may create entries in directory ``path`` (permissions and a read-only mount)."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def check_destinations(cfg: StudyConfig, where: str = "") -> None:
    """Check, without creating anything, that the study can write where it will: ``output_dir`` is (or can be
    made) a writable directory, and a ``sqlite:///`` storage is an SQLite database or can be created. The CLI
    calls it after its flags override the file, before any storage is opened."""
    prefix = f"{where}." if where else ""
    out = Path(cfg.output_dir)
    here = f"{prefix}output_dir: {shown(cfg.output_dir)}"
    if out.exists() and not out.is_dir():
        raise SpecError(f"{here} exists and is not a directory (give a directory for plots, trials.csv, pareto.json)")
    base = _nearest_existing(out)
    if not base.is_dir():
        raise SpecError(f"{here}: {shown(str(base))} is not a directory")
    if not _writable(base):
        raise SpecError(f"{here}: the directory {shown(str(base))} is not writable")
    check_sqlite_file(f"{prefix}storage", cfg.storage)


def check_sqlite_file(where: str, url: str, must_exist: bool = False) -> None:
    """For a ``sqlite:///PATH`` URL: PATH is an SQLite database file (or, unless ``must_exist``, can be created).
    Other URLs are left to the database to judge."""
    if not url.startswith("sqlite:///"):
        return
    name = url[len("sqlite:///"):].split("?", 1)[0]
    if not name or name == ":memory:":
        return
    path = Path(name)
    here = f"{where}: {shown(mask_credentials(url))}"
    if not path.exists():
        if must_exist:
            raise SpecError(f"{here}: no such database file")
        parent = _nearest_existing(path.parent)
        if parent != path.parent.absolute():
            raise SpecError(f"{here}: the directory {shown(str(path.parent))} does not exist")
        if not _writable(parent):
            raise SpecError(f"{here}: the directory {shown(str(parent))} is not writable")
        return
    if not path.is_file():
        raise SpecError(f"{here}: not a database file (it is a directory or a special file)")
    try:
        with path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise SpecError(f"{here}: cannot read the database file: {exc.strerror or exc}") from None
    if header and header != SQLITE_HEADER:  # SQLite takes an empty file as an empty database
        raise SpecError(f"{here}: the file is not an SQLite database (give a new path or an Optuna database)")


def _study_name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not STUDY_NAME.fullmatch(value) or ".." in value:
        raise SpecError(f"{where}: {shown(value)} is not a study name (allowed: {STUDY_NAME_TEXT})")
    return value


def _string(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where}: expected a non-empty string, got {shown(value)}")
    return value


def _param(where: str, base: Any, value: Any) -> SpaceEntry:
    """:func:`param_from_yaml`, after refusing a range whose keys are not all strings (which it would sort)."""
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise SpecError(f"{where}: unknown key {shown(key)} in range (allowed: low, high, log)")
    return param_from_yaml(where, base, value)


def _space_entry(where: str, base: Param, value: Any = None, given: bool = False,
                 omitted: str = "search") -> SpaceEntry:
    if given:
        return _param(where, base, value)
    if omitted == "default" and base.default is not None:
        return "fixed", base.default
    if isinstance(base, Categorical):
        return ("fixed", base.choices[0]) if len(base.choices) == 1 else ("dist", base.distribution())
    if base.low == base.high:
        return "fixed", base.low
    return "dist", base.distribution()


def _parse_workload(cfg: StudyConfig, where: str, value: Any, registry: Registry) -> None:
    name, params = parse_choice(f"{where}.workload", value)
    info = registry.workload_info(f"{where}.workload", name)
    cfg.workload = name
    for key, v in params.items():
        if ":" in name:  # a bring-your-own builder declares no parameters: values pass through, fixed
            cfg.workload_space[key] = ("fixed", v)
            continue
        if key not in info.params:
            raise SpecError(f"{where}.workload: unknown parameter {shown(key)} of workload {shown(name)} "
                            f"(allowed: {', '.join(info.params) or 'none'}){did_you_mean(key, info.params)}")
        cfg.workload_space[key] = _param(f"{where}.workload.{key}", info.params[key], v)
    if ":" not in name:  # the workload's own checks (a data directory that exists...) on the fixed values
        fixed = {k: v for k, (kind, v) in cfg.workload_space.items() if kind == "fixed"}
        registry.validate_workload(f"{where}.workload", name, fixed)


def _axis_names(here: str, value: Any) -> Mapping[Any, Any]:
    """An axis is a technique name, a list of names or a mapping technique -> parameters."""
    if isinstance(value, str):
        return {value: None}
    if isinstance(value, Sequence):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise SpecError(f"{here}[{i}]: expected a technique name, got {shown(item)} (use a mapping "
                                "technique -> parameters to set parameters)")
        return dict.fromkeys(value)
    if not isinstance(value, Mapping):
        raise SpecError(f"{here}: expected a technique name, a list of names or a mapping technique -> "
                        f"parameters, got {shown(value)}")
    return value


def _parse_axes(cfg: StudyConfig, where: str, data: Any, registry: Registry) -> None:
    where = f"{where}.axes"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a mapping of axis -> techniques (axes: {', '.join(AXES)})")
    check_keys(where, data, AXES)
    for axis in AXES:
        if axis not in data:  # an axis left out keeps its declared default technique with default parameters
            tech = registry.default_technique(axis)
            cfg.axes[axis] = {tech.name: {k: ("fixed", v) for k, v in tech.defaults().items()}}
            continue
        here = f"{where}.{axis}"
        value = _axis_names(here, data[axis])
        if not value:
            raise SpecError(f"{here}: an empty axis (give at least one technique; known: "
                            f"{', '.join(registry.names(axis))})")
        cfg.axes[axis] = {}
        for name, overrides in value.items():
            tech = registry.technique(here, axis, checked_name(here, name))
            overrides = {} if overrides is None else overrides
            if not isinstance(overrides, Mapping):
                raise SpecError(f"{here}.{name}: expected a mapping parameter -> value/list/range, "
                                f"got {shown(overrides)}")
            for key in overrides:
                if key not in tech.space:
                    raise SpecError(f"{here}.{name}: unknown parameter {shown(key)} of {axis} technique {shown(name)} "
                                    f"(allowed: {', '.join(tech.space) or 'none'}){did_you_mean(key, tech.space)}")
            cfg.axes[axis][tech.name] = {
                key: _space_entry(f"{here}.{name}.{key}", base, overrides.get(key), key in overrides,
                                  cfg.omitted_params)
                for key, base in tech.space.items()}


def _parse_batch_sizes(where: str, value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise SpecError(f"{where}: an empty list of batch sizes")
    return list(dict.fromkeys(integer(where, v, what=" or a list of them") for v in values))


def _parse_objectives(where: str, value: Any, registry: Registry) -> list[Objective]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise SpecError(f"{where}: give at least one objective (known: {', '.join(registry.metrics)})")
    out: list[Objective] = []
    for i, item in enumerate(items):
        here = f"{where}[{i}]"
        if isinstance(item, str):
            name, direction = item, None
        elif isinstance(item, Mapping) and len(item) == 1:
            (name, direction), = item.items()
        else:
            raise SpecError(f"{here}: expected a metric name or {{metric: max|min}}, got {shown(item)}")
        metric = registry.metric(here, checked_name(here, name))
        if direction is not None and (not isinstance(direction, str) or direction not in DIRECTIONS):
            raise SpecError(f"{here}.{name}: direction {shown(direction)} is not allowed (allowed: max, min)")
        if any(o.metric == metric.name for o in out):
            raise SpecError(f"{here}: objective {shown(name)} is given twice")
        out.append(Objective.of(metric, DIRECTIONS[direction] if direction is not None else None))
    return out


_CONSTRAINT = re.compile(r"^\s*(>=|<=)\s*(?:([-+0-9.eE]+)\s*(\*\s*baseline)?|(baseline))\s*$")


def _parse_constraints(where: str, value: Any, registry: Registry) -> list[Constraint]:
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: expected a mapping metric -> \"<= number\" / \">= 0.98 * baseline\", "
                        f"got {shown(value)}")
    out = []
    for name, text in value.items():
        metric = registry.metric(where, checked_name(where, name))
        m = _CONSTRAINT.match(str(text))
        factor = None
        if m:
            try:
                factor = 1.0 if m.group(4) else float(m.group(2))
            except ValueError:
                factor = None
        if not m or factor is None or not math.isfinite(factor):
            raise SpecError(f"{where}.{name}: {shown(text)} is not a constraint (allowed: '>= NUMBER', '<= NUMBER', "
                            "'>= FACTOR * baseline', '<= FACTOR * baseline')")
        out.append(Constraint(metric.name, metric.key, m.group(1), factor, bool(m.group(3) or m.group(4)),
                              str(text).strip()))
    return out


def _parse_named(where: str, value: Any, allowed: Sequence[str]) -> tuple[str, dict[str, Any]]:
    options: dict[str, Any] = {}
    if isinstance(value, Mapping):
        options = {k: v for k, v in value.items() if k != "name"}
        value = value.get("name")
    if value not in allowed:
        raise SpecError(f"{where}: {shown(value)} is not allowed (allowed: {', '.join(allowed)})"
                        f"{did_you_mean(str(value), allowed)}")
    return value, options


def _parse_screening(cfg: StudyConfig, where: str, value: Any) -> None:
    if not cfg.multi_objective:
        raise SpecError(f"{where}: screening is for multi-objective studies (a single objective uses a pruner)")
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: expected a mapping like {{steps: 30}}, got {shown(value)}")
    value = dict(value)
    margin = value.pop("margin", 0.05)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise SpecError(f"{where}.margin: expected a fraction in [0, 1), got {shown(margin)}")
    base = {k: getattr(cfg.budget, k) for k in ("warmup_steps", "windows")}
    cfg.screening, cfg.screening_margin = parse_budget(where, {**base, **value}), float(margin)


def grid_space(cfg: StudyConfig) -> dict[str, list[Any]]:
    """The grid sampler's search space: every searched name with its finite list of values."""
    space: dict[str, list[Any]] = {}

    def add(name: str, entry: SpaceEntry, where: str) -> None:
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
