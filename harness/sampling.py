"""From a study file to Optuna and back: the sampler and pruner it names, the TrialSpec of an asked trial (one
technique per axis, then that technique's parameters) and the baseline trial's spec."""
from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from harness.config import Choice, TrialSpec, trial_from_mapping
from harness.errors import SpecError
from harness.outcomes import INFEASIBLE_VIOLATION, constraints_from_attrs
from harness.space import AXES
from harness.studyfile import SpaceEntry, StudyConfig, grid_space

if TYPE_CHECKING:
    import optuna

    from harness.plugins import Registry


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    """The study file's sampler (``auto``: NSGA-II for several objectives, else TPE) with its options."""
    import optuna

    name = cfg.sampler
    if name == "auto":
        name = "nsga2" if cfg.multi_objective else "tpe"
    # Each driver process samples its own random stream: two drivers sharing a storage (or a resumed one)
    # must not propose the same sequence. ``seed`` fixes the trials' training seed, not this stream.
    seed = (cfg.seed * 1_000_003 + os.getpid()) % 2**31
    kwargs: dict[str, Any] = dict(cfg.sampler_options)
    constrained = dict(kwargs)
    if not _trial_constraints():  # Optuna 5 reads the trial's own constraints and deprecates constraints_func
        constrained["constraints_func"] = constraints_from_attrs
    try:
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **constrained)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, **constrained)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed, **kwargs)
        return optuna.samplers.GridSampler(grid_space(cfg), seed=seed, **kwargs)
    except TypeError as exc:
        raise SpecError(f"{cfg.path}.sampler: bad option for {name!r}: {exc}") from None


def _trial_constraints() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def record_constraint(trial: optuna.Trial, violation: float) -> None:
    """Store the trial's constraint violation (> 0: infeasible) where the constrained samplers read it: the
    ``constraint`` user attribute (:func:`~harness.outcomes.constraints_from_attrs`), and with Optuna 5 the
    trial's own constraint. Call it before telling Optuna the outcome."""
    violation = violation if math.isfinite(violation) else INFEASIBLE_VIOLATION
    trial.set_user_attr("constraint", violation)
    if _trial_constraints():
        trial.set_constraint("violation", violation)


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    import optuna

    kinds: dict[str, type[optuna.pruners.BasePruner]] = {
        "none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner, "successive-halving": optuna.pruners.SuccessiveHalvingPruner}
    try:
        return kinds[cfg.pruner](**cfg.pruner_options)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{cfg.path}.pruner: bad option for {cfg.pruner!r}: {exc}") from None


def pruning_reporter(trial: optuna.Trial, key: str) -> Callable[[Mapping[str, Any]], bool | None]:
    """A trial process's event handler that reports the objective ``key`` of its timing windows and
    evaluations to Optuna and answers whether the pruner stops the trial."""
    reported: set[int] = set()  # a final evaluation may repeat the last intermediate step: report it once

    def on_event(event: Mapping[str, Any]) -> bool | None:
        value = (event.get("metrics") or {}).get(key)
        if event.get("event") not in ("window", "eval") or value is None or not math.isfinite(float(value)):
            return None
        step = int(event["step"])
        if step not in reported:
            reported.add(step)
            trial.report(float(value), step)
        return bool(trial.should_prune())

    return on_event


def _value(trial: optuna.Trial, name: str, entry: SpaceEntry) -> Any:
    import optuna.distributions as d

    kind, dist = entry
    if kind == "fixed":
        return dist
    if isinstance(dist, d.CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    if isinstance(dist, d.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)


def _common(cfg: StudyConfig) -> TrialSpec:
    """A spec with the study's fields that no sampler chooses (techniques still unchosen)."""
    spec = TrialSpec(workload=cfg.workload, batch_size=cfg.batch_sizes[0], budget=copy.deepcopy(cfg.budget),
                     seed=cfg.seed, devices=cfg.devices, device=cfg.device)
    _study_tags(cfg, spec)
    return spec


def _study_tags(cfg: StudyConfig, spec: TrialSpec) -> None:
    """Tags every trial of the study carries: its target accuracy, and the result keys its objectives and
    constraints read (``wanted_metrics``: a plugin may skip measuring what nobody asked for)."""
    if cfg.target_accuracy is not None:
        spec.tags["target_accuracy"] = cfg.target_accuracy
    spec.tags["wanted_metrics"] = sorted({o.key for o in cfg.objectives} | {c.key for c in cfg.constraints})


def suggest_spec(trial: optuna.Trial, cfg: StudyConfig, registry: Registry) -> TrialSpec:
    """Turn an Optuna trial into a TrialSpec: one technique per axis, then that technique's parameters."""
    spec = _common(cfg)
    wparams = {k: _value(trial, f"workload.{k}", e) for k, e in cfg.workload_space.items()}
    spec.workload_params = registry.validate_workload("workload", cfg.workload, wparams)
    for axis in AXES:
        names = list(cfg.axes[axis])
        name = names[0] if len(names) == 1 else trial.suggest_categorical(axis, names)
        params = {k: _value(trial, f"{axis}.{name}.{k}", e) for k, e in cfg.axes[axis][name].items()}
        tech = registry.technique(axis, axis, name)
        setattr(spec, axis, Choice(name, tech.validate_params(f"{axis}.{name}", params)))
    if len(cfg.batch_sizes) > 1:
        spec.batch_size = trial.suggest_categorical("batch_size", cfg.batch_sizes)
    return spec


def baseline_spec(cfg: StudyConfig, registry: Registry) -> TrialSpec:
    """The study file's ``baseline:`` trial; without one, the study's first optimizer (its fixed values, else
    its defaults) with the declared default technique on every other axis."""
    if cfg.baseline is not None:
        data = {"workload": cfg.workload, "batch_size": cfg.batch_sizes[0], "seed": cfg.seed,
                "devices": cfg.devices, "device": cfg.device, **cfg.baseline}
        spec = trial_from_mapping(f"{cfg.path}.baseline", data, registry)
        if "budget" not in cfg.baseline:
            spec.budget = copy.deepcopy(cfg.budget)
        if "workload" not in cfg.baseline:
            spec.workload_params = _fixed_workload_params(cfg, registry)
        _study_tags(cfg, spec)
        return spec
    spec = _common(cfg)
    spec.workload_params = _fixed_workload_params(cfg, registry)
    opt_name, opt_space = next(iter(cfg.axes["optimizer"].items()))
    fixed = {k: v for k, (kind, v) in opt_space.items() if kind == "fixed"}
    spec.optimizer = Choice(opt_name, registry.technique("optimizer", "optimizer", opt_name)
                            .validate_params("optimizer", fixed))
    for axis in AXES:
        if axis != "optimizer":
            tech = registry.default_technique(axis)
            setattr(spec, axis, Choice(tech.name, tech.defaults()))
    return spec


def _fixed_workload_params(cfg: StudyConfig, registry: Registry) -> dict[str, Any]:
    fixed = {k: v for k, (kind, v) in cfg.workload_space.items() if kind == "fixed" and v is not None}
    return registry.validate_workload("workload", cfg.workload, fixed)
