"""Helpers for testing the harness and third-party plugins with real components (pytest fixtures live in
``tests/conftest.py``; plugin authors import these functions directly in their own test suites).

- :func:`make_spec`: a small, fast TrialSpec on the ``digits`` workload, with any field overridden.
- :func:`run_one_trial`: run a spec in this process (``isolated=False``) or in its own worker process.
- :func:`tiny_workload`: random Gaussian blobs and a small MLP, built in well under a second; use it as
  ``workload="harness.testing:tiny_workload"`` (the bring-your-own ``module:function`` path) so a plugin's
  tests need no data set.
- :func:`run_small_study`: run a study file or mapping through the real study driver, in a temporary
  directory with its own SQLite storage.
- :func:`check_plugin`: the conformance check of a plugin's declarations and hook implementations.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re
import tempfile
import types
from pathlib import Path
from typing import Any, Mapping

from harness.config import Budget, Choice, TrialSpec
from harness.space import AXES, Categorical, Float, Int, Requirements, Technique


def make_spec(**fields: Any) -> TrialSpec:
    """A TrialSpec for a quick CPU trial (digits, 60 steps, batch 64); ``optimizer="sgd"`` or
    ``optimizer={"name": "sgd", "lr": 0.1}`` select techniques; defaults of their parameters are filled in."""
    from harness.plugins import get_registry

    registry = fields.pop("registry", None) or get_registry()
    budget = fields.pop("budget", None)
    spec = TrialSpec(budget=Budget(steps=60, warmup_steps=3, windows=3), device="cpu")
    if isinstance(budget, dict):
        budget = Budget(**{**Budget(warmup_steps=3, windows=3).__dict__, **budget})
    if budget is not None:
        spec.budget = budget
    for axis in AXES:
        value = fields.pop(axis, getattr(spec, axis).name)
        name, params = (value, {}) if isinstance(value, str) else (value["name"], {
            k: v for k, v in value.items() if k != "name"})
        tech = registry.technique(axis, axis, name)
        setattr(spec, axis, Choice(name, tech.validate_params(axis, params)))
    workload_params = fields.pop("workload_params", {})
    for key, value in fields.items():
        setattr(spec, key, value)
    spec.workload_params = registry.validate_workload("workload", spec.workload, workload_params)
    return spec


def run_one_trial(spec: TrialSpec | None = None, isolated: bool = False, timeout_s: float = 0, **fields: Any):
    """Run one trial and return its :class:`harness.trial.TrialResult`.

    ``isolated=True`` runs it the way studies do, in its own process (``harness.launch``).
    """
    spec = spec or make_spec(**fields)
    if not isolated:
        from harness.trial import run_trial

        return run_trial(spec)
    from harness.launch import LaunchOptions, launch

    with tempfile.TemporaryDirectory(prefix="harness-test-") as tmp:
        return launch(spec, Path(tmp), LaunchOptions(timeout_s=timeout_s))


# ============================================================================================ tiny workload
TINY_WORKLOAD = "harness.testing:tiny_workload"


def tiny_workload(device=None, seed: int = 0, samples: int = 768, features: int = 16, classes: int = 4,
                  hidden: int = 32):
    """A workload for plugin tests: ``classes`` Gaussian blobs in ``features`` dimensions (3/4 train, 1/4
    held out) and a two-layer MLP. The blobs are well separated, so any working optimizer reaches > 90 %
    held-out accuracy in about a hundred steps; a broken technique does not.

    Select it with ``workload="harness.testing:tiny_workload"`` (keyword parameters go in ``workload_params``).
    """
    import torch
    from torch import nn

    from harness.workload import TensorSource, Workload

    gen = torch.Generator().manual_seed(1234)  # the data set is fixed; ``seed`` only seeds the model
    centers = torch.randn(classes, features, generator=gen) * 2.5
    targets = torch.randint(0, classes, (samples,), generator=gen)
    inputs = centers[targets] + torch.randn(samples, features, generator=gen)
    split = samples * 3 // 4
    torch.manual_seed(seed)

    def mlp(width: int) -> nn.Module:
        return nn.Sequential(nn.Linear(features, width), nn.ReLU(), nn.Linear(width, classes))

    model = mlp(hidden)
    flops = 6.0 * sum(p.numel() for p in model.parameters() if p.dim() > 1)
    return Workload(name="tiny", model=model, train=TensorSource(inputs[:split], targets[:split]),
                    test=TensorSource(inputs[split:], targets[split:]), kinds=("mlp",), flops_per_sample=flops,
                    input_shape=(features,), make_student=lambda: mlp(max(2, hidden // 4)))


tiny_workload.kinds = ("mlp",)


# ============================================================================================ small study
def run_small_study(study: str | Path | Mapping[str, Any], tmp_path: str | Path, n_trials: int | None = None,
                    registry=None):
    """Run a study through the real driver (:class:`harness.study.StudyDriver`) and return its
    ``(records, pareto)``: every :class:`harness.study.TrialRecord`, and the non-dominated ones.

    ``study`` is a study YAML file or the same content as a mapping. The study runs with ``tmp_path`` as
    working directory, so its SQLite storage, MLflow files and report land there; fields left out get small
    defaults (``n_trials: 2``, the tiny workload on the CPU, 40 steps, throughput objective).
    """
    from rich.console import Console

    from harness.config import load_yaml
    from harness.plugins import get_registry
    from harness.study import StudyConfig, StudyDriver

    registry = registry or get_registry()
    where = str(study) if isinstance(study, (str, Path)) else "study"
    data = dict(load_yaml(study) if isinstance(study, (str, Path)) else study)
    data.setdefault("workload", TINY_WORKLOAD)
    data.setdefault("device", "cpu")
    data.setdefault("budget", {"steps": 40, "warmup_steps": 3, "windows": 3})
    data.setdefault("trial_timeout_s", 120)
    if "n_trials" not in data and "timeout_s" not in data:
        data["n_trials"] = 2
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    with _working_directory(tmp_path):
        config = StudyConfig.from_mapping(where, data, registry, default_name="small-study")
        driver = StudyDriver(config, registry, Console(width=160, quiet=True), n_trials=n_trials)
        driver.open()
        return driver.run()


@contextlib.contextmanager
def _working_directory(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# ============================================================================================ conformance
#: kebab-case: lower-case words of letters and digits joined by single hyphens (``amp-bf16``, ``lion``).
NAME_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

#: the hook a technique of each axis needs, because the runner requires a result from it.
REQUIRED_HOOK = {"optimizer": "harness_build_optimizer", "precision": "harness_setup_precision",
                 "parallelism": "harness_build_engine"}

#: firstresult hooks whose implementations must return None when another technique of their axis is selected.
SELECTED_ONLY_HOOKS = ("harness_compress_before_training", "harness_setup_precision", "harness_build_optimizer",
                       "harness_build_lr_scheduler", "harness_build_engine", "harness_build_loss",
                       "harness_compile_step", "harness_compress_after_training")

_OTHER = "conformance-other-technique"


def check_plugin(plugin: Any, raises: bool = True) -> list[str]:
    """Check a plugin (a module, class or object with ``@harness.hookimpl`` functions) against the contract.

    Checks, each reported as one line naming the plugin:

    - every hook implementation through pluggy's own validation (arguments must be a subset of the hook
      spec's), unknown hook names (with a did-you-mean), and ``harness_*`` functions that lack the
      ``@hookimpl`` marker (pluggy would silently ignore them);
    - declarations the way the plugin manager checks them at load time, plus: names in kebab-case and unique
      within the plugin, parameter spaces of ``Float``/``Int``/``Categorical`` with valid ranges and defaults,
      sane :class:`Requirements`, ``incompatible`` entries as ``"axis:name"`` on another axis, workloads
      whose ``build`` accepts ``device``, ``seed`` and every declared parameter;
    - techniques on the optimizer, precision and parallelism axes implement the hook that builds them;
    - firstresult building hooks return None when the trial selected another technique (instead of taking
      over every trial).

    :param raises: raise ``AssertionError`` listing every problem (default), or only return them.
    :returns: the problems found (an empty list for a conforming plugin).
    """
    from harness.space import Technique
    from harness.workload import WorkloadInfo

    name = getattr(plugin, "__name__", None) or type(plugin).__name__
    problems = _hook_problems(plugin, name)
    declared, load_errors, problems_calling = _declarations(plugin)
    problems += problems_calling
    seen: set = set()
    for item, load_error in zip(declared, load_errors):
        if isinstance(item, Technique):
            found = _technique_problems(item, plugin, seen)
        elif isinstance(item, WorkloadInfo):
            found = _workload_problems(item, seen)
        else:
            found = []
        # the plugin manager's own verdict, unless the finer checks above already explain it
        problems += found or ([f"bad declaration: {load_error}"] if load_error else [])
    problems += _selected_only_problems(plugin)
    problems = [f"{name}: {p}" for p in problems]
    if problems and raises:
        raise AssertionError(f"plugin {name} does not conform ({len(problems)} problem(s)):\n  "
                             + "\n  ".join(problems))
    return problems


def _hook_functions(plugin: Any) -> dict[str, Any]:
    """Every ``harness_*`` attribute of the plugin, marked or not."""
    return {attr: getattr(plugin, attr) for attr in dir(plugin)
            if attr.startswith("harness_") and inspect.isroutine(getattr(plugin, attr, None))}


def _hook_problems(plugin: Any, name: str) -> list[str]:
    import pluggy

    from harness import hookspecs
    from harness.plugins import unknown_hooks

    problems = []
    for attr, func in sorted(_hook_functions(plugin).items()):
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
            problems.append(f"hook signature error: {'; '.join(lines)}")
            continue
        problems += unknown_hooks(pm, single)
    return problems


def _declarations(plugin: Any) -> tuple[list, list[str], list[str]]:
    """Call the plugin's declaration hooks; return the declared items, the plugin manager's load-time verdict
    on each (an error message or ``""``) and problems calling the hooks themselves."""
    from harness.errors import PluginError
    from harness.plugins import Registry

    items, verdicts, problems = [], [], []
    checks = {"harness_declare_techniques": Registry._check_technique,
              "harness_declare_workloads": Registry._check_workload}
    for hookname, check in checks.items():
        func = getattr(plugin, hookname, None)
        if func is None or not hasattr(func, "harness_impl"):
            continue
        try:
            declared = func()
        except Exception as exc:
            problems.append(f"{hookname} raised {type(exc).__name__}: {exc}")
            continue
        if declared is None:
            continue
        if not isinstance(declared, (list, tuple)):
            problems.append(f"{hookname} must return a list, got {type(declared).__name__}")
            continue
        for item in declared:
            try:
                check("", item)
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
    for field in ("packages", "workload_kinds"):
        value = getattr(req, field)
        if not _tuple_of_str(value):
            hint = " (a one-element tuple needs a trailing comma)" if isinstance(value, str) else ""
            problems.append(f"{owner}: requires.{field} must be a tuple of names, got {value!r}{hint}")
    return problems


def _technique_problems(tech: Technique, plugin: Any, seen: set) -> list[str]:
    from harness.space import AXES

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
    if not isinstance(tech.incompatible, tuple):
        problems.append(f"{owner}: incompatible must be a tuple of 'axis:name' strings, got {tech.incompatible!r}")
    else:
        for rule in tech.incompatible:
            axis, sep, other = str(rule).partition(":")
            if not sep or axis not in AXES or not other:
                problems.append(f"{owner}: incompatible entry {rule!r} is not 'axis:name' "
                                f"(axes: {', '.join(AXES)})")
            elif axis == tech.axis:
                problems.append(f"{owner}: incompatible entry {rule!r} names its own axis (one technique per "
                                "axis is chosen anyway)")
            elif not NAME_PATTERN.match(other):
                problems.append(f"{owner}: incompatible entry {rule!r} does not name a kebab-case technique")
    hooks = {attr for attr, func in _hook_functions(plugin).items() if hasattr(func, "harness_impl")}
    required = REQUIRED_HOOK.get(tech.axis)
    if required and required not in hooks:
        problems.append(f"{owner}: the plugin implements no {required}, so a trial selecting it would fail")
    return problems


def _workload_problems(info: Any, seen: set) -> list[str]:
    owner = f"workload {info.name!r}"
    problems = []
    if not isinstance(info.name, str) or not NAME_PATTERN.match(info.name):
        problems.append(f"{owner}: the name must be kebab-case (lower-case letters, digits, single hyphens)")
    if info.name in seen:
        problems.append(f"{owner}: declared twice")
    seen.add(info.name)
    from harness import workload

    text = getattr(workload, "Text", None)
    problems += _param_problems(owner, info.params, (text,) if text else ())
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


def _selected_only_problems(plugin: Any) -> list[str]:
    """Call each firstresult building hook with a trial that selected another technique on every axis: a
    conforming implementation returns None (by checking ``spec.<axis>.name``) before touching its arguments."""
    import torch
    from torch import nn

    from harness.step import DistInfo, Engine, Precision, TrainStep

    spec = TrialSpec(workload=TINY_WORKLOAD, device="cpu", budget=Budget(steps=10),
                     **{axis: Choice(_OTHER) for axis in AXES})
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    precision = Precision()
    engine = Engine(model, optimizer, precision)
    args = {"model": model, "params": list(model.parameters()), "optimizer": optimizer, "precision": precision,
            "spec": spec, "device": torch.device("cpu"), "dist": DistInfo(), "total_steps": 10,
            "workload": tiny_workload(), "trainer": None,
            "step": TrainStep(engine, lambda out, tgt, inp: nn.functional.cross_entropy(out, tgt), precision)}
    problems = []
    for hookname in SELECTED_ONLY_HOOKS:
        func = getattr(plugin, hookname, None)
        if func is None or not hasattr(func, "harness_impl"):
            continue
        wanted = list(inspect.signature(func).parameters)
        if any(p not in args for p in wanted):
            continue  # a signature error, reported by the hook check
        try:
            result = func(**{p: args[p] for p in wanted})
        except Exception as exc:
            problems.append(f"{hookname} raised {type(exc).__name__}: {exc} when the trial selected another "
                            "technique (check spec.<axis>.name first and return None)")
            continue
        if result is not None:
            problems.append(f"{hookname} returned {type(result).__name__} when the trial selected another "
                            "technique; it must return None unless spec.<axis>.name is its own")
    return problems
