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

from harness.errors import SpecError, one_line, shown
from harness.space import AXES, LATER_AXES, NO_TECHNIQUE, did_you_mean, techniques_label

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
    #: a trial whose throughput's 95 % interval is wider than this (relative half-width) is timed again once with
    #: as many windows, then marked ``throughput_noisy`` if it still is (0: never).
    noise_threshold: float = 0.1


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
    data: Choice = field(default_factory=Choice)
    memory: Choice = field(default_factory=Choice)
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
        """A short hash of what determines the trial's outcome (tags excluded). An axis added later
        (:data:`~harness.space.LATER_AXES`) that runs no technique is left out, so a spec hashes as it did before
        the axis existed and a resumed older study still recognises the combinations it ran."""
        d = self.to_dict()
        d.pop("tags", None)
        for axis in LATER_AXES:
            if d[axis] == {"name": NO_TECHNIQUE, "params": {}}:
                del d[axis]
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
        return techniques_label({a: getattr(self, a).name for a in AXES})


# --------------------------------------------------------------------------------------------- loading
TRIAL_KEYS = ("workload", *AXES, "batch_size", "budget", "seed", "devices", "device")
BUDGET_KEYS = tuple(f.name for f in dataclasses.fields(Budget))
DEVICES = ("auto", "cuda", "cpu")


#: limits on what a study or trial file may be: its size in bytes, its YAML aliases (``*name``), the nodes its
#: aliases would expand to and how deeply it nests. A real file is a few KB with no alias; the limits stop a
#: "billion laughs" file before anything is expanded or echoed.
MAX_FILE_BYTES = 1 << 20
MAX_ALIASES = 100
MAX_EXPANDED_NODES = 100_000
MAX_DEPTH = 40


class _Refused(Exception):
    """A file the loader will not build (duplicate key, too many aliases...); load_yaml adds the file name."""


def _loader(text: str) -> Any:
    """A PyYAML safe loader that rejects duplicate keys, too many aliases, too large an expansion and too deep
    a nesting while composing, i.e. before any value is built."""
    import yaml
    from yaml.composer import Composer
    from yaml.events import AliasEvent
    from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

    class Loader(yaml.SafeLoader):
        aliases = 0
        depth = 0

        def compose_node(self, parent: Node | None, index: Any) -> Node:
            if self.check_event(AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_ALIASES:
                    line = self.peek_event().start_mark.line + 1
                    raise _Refused(f"more than {MAX_ALIASES} YAML aliases (line {line}); a study or trial file "
                                   "needs none")
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    raise _Refused(f"nested more than {MAX_DEPTH} levels deep "
                                   f"(line {self.peek_event().start_mark.line + 1})")
                return Composer.compose_node(self, parent, index)
            finally:
                self.depth -= 1

        def compose_document(self) -> Node:
            node = Composer.compose_document(self)
            _check_expansion(node)
            return node

        def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                try:
                    key = self.construct_object(key_node, deep=True)
                    hash(key)
                except (TypeError, yaml.YAMLError):
                    continue  # the base constructor reports an unhashable key
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _Refused(f"duplicate key {shown(key)} at lines {seen[key]} and {line} (a key may appear "
                                   "once in a mapping)")
                seen[key] = line
            return super().construct_mapping(node, deep=deep)

    def _check_expansion(root: Node) -> None:
        # nodes reached through aliases are shared: count each path's expansion once per node (memoised), and
        # refuse a cycle (an alias inside its own anchor) rather than follow it
        size: dict[int, int] = {}
        active: set[int] = set()

        def count(node: Node) -> int:
            key = id(node)
            if key in size:
                return size[key]
            if key in active:
                raise _Refused(f"a recursive YAML alias (line {node.start_mark.line + 1})")
            active.add(key)
            total = 1
            if isinstance(node, SequenceNode):
                total += sum(count(child) for child in node.value)
            elif isinstance(node, MappingNode):
                total += sum(count(k) + count(v) for k, v in node.value)
            elif not isinstance(node, ScalarNode):
                raise _Refused(f"an unexpected YAML node (line {node.start_mark.line + 1})")
            active.discard(key)
            if total > MAX_EXPANDED_NODES:
                raise _Refused(f"its aliases expand to more than {MAX_EXPANDED_NODES} values "
                               f"(line {node.start_mark.line + 1}); a study or trial file is a few hundred")
            size[key] = total
            return total

        if root is not None:
            count(root)

    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)


def load_yaml(path: str | Path) -> Any:
    """Safe-load a YAML study or trial file. Everything wrong with it (missing, not a regular file, unreadable,
    too large, not UTF-8, malformed YAML, a duplicate key, an alias bomb) becomes one :class:`SpecError` line."""
    import yaml

    p = Path(path)
    name = str(path) if len(str(path)) <= 200 else shown(str(path))
    try:
        if not p.exists():
            raise SpecError(f"{name}: no such file")
        if p.is_dir():
            raise SpecError(f"{name}: is a directory, not a study or trial file")
        if not p.is_file():
            raise SpecError(f"{name}: not a regular file")
        with p.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"{name}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError(f"{name}: larger than {MAX_FILE_BYTES // 1024} KiB; a study or trial file is a few KB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{name}: not a UTF-8 text file (byte {exc.start}: {shown(raw[exc.start:exc.start + 4])})"
                        ) from None
    if "\x00" in text:
        raise SpecError(f"{name}: not a text file (it holds a NUL byte)")
    try:
        return _loader(text)
    except _Refused as exc:
        raise SpecError(f"{name}: {exc}") from None
    except RecursionError:
        raise SpecError(f"{name}: nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{name}: malformed YAML{where}: {one_line(problem, 200)}") from None


def check_keys(where: str, data: Mapping[str, Any], allowed: Collection[str]) -> None:
    for key in data:
        if key not in allowed:
            raise SpecError(f"{where}: unknown key {shown(key)} (allowed: {', '.join(allowed)})"
                            f"{did_you_mean(key, allowed)}")


def integer(where: str, value: Any, minimum: int | None = 1, what: str = "") -> int:
    """``value`` when it is an integer >= ``minimum`` (any integer when None), else a SpecError naming ``where``.
    The trial and study parsers check every count (batch size, processes, steps, trials) through here."""
    kind = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}")
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise SpecError(f"{where}: expected {kind}{what}, got {shown(value)}")
    return value


def positive(where: str, value: Any, what: str = "") -> float:
    """``value`` as a float when it is a number > 0, else a SpecError naming ``where`` (``what``: the unit)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SpecError(f"{where}: expected a positive number{what}, got {shown(value)}")
    return float(value)


#: the longest technique, workload or metric name a file may give (``module:function`` workloads included).
MAX_NAME_CHARS = 200


def checked_name(where: str, value: Any) -> str:
    """``value`` when it can be a technique, workload or metric name (a string of at most
    :data:`MAX_NAME_CHARS`), checked before it is looked up or echoed whole."""
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        raise SpecError(f"{where}: expected a name of 1 to {MAX_NAME_CHARS} characters, got {shown(value)}")
    return value


def parse_choice(where: str, value: Any) -> tuple[str, dict[str, Any]]:
    """A technique (or workload) is written as ``name`` or ``{name: ..., <param>: value, ...}``."""
    if isinstance(value, str):
        return checked_name(where, value), {}
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        params = {k: v for k, v in value.items() if k != "name"}
        if isinstance(params.get("params"), Mapping) and len(params) == 1:
            params = dict(params["params"])
        return checked_name(f"{where}.name", value["name"]), params
    raise SpecError(f"{where}: expected a technique name or a mapping with 'name', got {shown(value)}")


def parse_budget(where: str, data: Any) -> Budget:
    if data is None:
        return Budget(steps=200)
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a mapping with one of steps, epochs, seconds; got {shown(data)}")
    check_keys(where, data, BUDGET_KEYS)
    budget = Budget(**dict(data))
    if budget.steps is not None:
        integer(f"{where}.steps", budget.steps, minimum=0)
    for key in ("warmup_steps", "windows", "eval_every_steps", "eval_samples"):  # these have no "not given"
        integer(f"{where}.{key}", getattr(budget, key), minimum=0)
    for key in ("epochs", "seconds"):
        if getattr(budget, key) is not None:
            positive(f"{where}.{key}", getattr(budget, key))
    if isinstance(budget.noise_threshold, bool) or not isinstance(budget.noise_threshold, (int, float)) \
            or not 0 <= budget.noise_threshold < 1:
        raise SpecError(f"{where}.noise_threshold: expected a fraction from 0 (off) to below 1, got "
                        f"{shown(budget.noise_threshold)}")
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
            raise SpecError(f"{where}.device: {shown(data['device'])} is not allowed (allowed: {', '.join(DEVICES)})")
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
    for axis in AXES:
        if axis in data:
            tname, params = parse_choice(f"{where}.{axis}", data[axis])
            tech = registry.technique(f"{where}.{axis}", axis, tname)
            setattr(spec, axis, Choice(tname, tech.validate_params(f"{where}.{axis}", params)))
    if "workload" in data:  # last: a ``module:function`` workload is code, imported once the rest has passed
        name, wparams = parse_choice(f"{where}.workload", data["workload"])
        spec.workload = name
        spec.workload_params = registry.validate_workload(f"{where}.workload", name, wparams)
        declared = registry.workload_params(name)
        if any(v in getattr(declared.get(k), "requires", {}) for k, v in spec.workload_params.items()):
            # a value this machine can never run (its declared requirements): one line now, not a trial; the
            # machine is only looked at (CUDA initialised) when a value has requirements
            from harness.space import Environment, unavailable_values

            why = unavailable_values(spec.workload_params, declared, f"{where}.workload", Environment.detect(),
                                     spec.device, "this machine")
            if why:
                raise SpecError(why)
    return fill_defaults(spec, registry)
