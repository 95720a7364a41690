"""The typed facade through which the core calls every hook (tox 4's ``Plugin`` idea), by keyword.

``pm.hook`` appears nowhere else in the core, and plugins never receive the plugin manager. The facade also does
the dispatch by declaration described in :mod:`harness.hookspecs`: a technique hook reaches only the plugin that
declared the trial's technique on the hook's axis, a trial hook only the plugins taking part in the trial.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from harness import hookspecs
from harness.space import AXES

if TYPE_CHECKING:
    import optuna
    import torch

    from harness.config import TrialSpec
    from harness.outcomes import TrialRecord
    from harness.space import Environment
    from harness.step import DistInfo, Engine, Precision, TrainStep
    from harness.studyfile import StudyConfig
    from harness.trial import Trial, TrialResult
    from harness.workload import Workload


class Hooks:
    """Calls hooks on the right plugins. ``owners`` maps ``(axis, technique)`` and ``("workload", name)`` to the
    registered plugin name that declared it; ``observers`` are the plugins that declare neither."""

    def __init__(self, pm: pluggy.PluginManager, owners: Mapping[tuple[str, str], str],
                 observers: Iterable[str]) -> None:
        self._pm = pm
        self._owners = owners
        self._observers = frozenset(observers)
        self._cache: dict[tuple[str, frozenset[str]], Any] = {}

    # ------------------------------------------------------------------------------------------ dispatch
    def _caller(self, hook: str, keep: Iterable[str]) -> Any:
        """The hook caller restricted to the plugins named in ``keep`` (cached: window hooks run often)."""
        keep = frozenset(keep)
        key = (hook, keep)
        caller = self._cache.get(key)
        if caller is None:
            remove = [plugin for name, plugin in self._pm.list_name_plugin() if name not in keep]
            caller = self._pm.subset_hook_caller(hook, remove_plugins=remove)
            self._cache[key] = caller
        return caller

    def _owner(self, axis: str, spec: TrialSpec) -> list[str]:
        owner = self._owners.get((axis, getattr(spec, axis).name))
        return [owner] if owner else []

    def participants(self, spec: TrialSpec) -> frozenset[str]:
        """The plugins taking part in a trial: owners of its techniques and workload, and the observers."""
        names = set(self._observers)
        for axis in AXES:
            names.update(self._owner(axis, spec))
        owner = self._owners.get(("workload", spec.workload))
        if owner:
            names.add(owner)
        return frozenset(names)

    def _technique(self, hook: str, spec: TrialSpec, **kwargs: Any) -> Any:
        axis = hookspecs.axis_of(hook)
        assert axis is not None, hook
        return self._caller(hook, self._owner(axis, spec))(spec=spec, **kwargs)

    def _trial(self, hook: str, who: TrialSpec, /, **kwargs: Any) -> list[Any]:
        return list(self._caller(hook, self.participants(who))(**kwargs))

    def _all(self, hook: str, **kwargs: Any) -> list[Any]:
        return list(getattr(self._pm.hook, hook)(**kwargs))

    @staticmethod
    def _merged(results: Iterable[Mapping[str, Any] | None]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        # pluggy returns results last-registered first; merge in registration order so later plugins win
        for extra in reversed(list(results)):
            out.update(extra or {})
        return out

    # ------------------------------------------------------------------------------------------ feasibility
    def check_combination(self, spec: TrialSpec, env: Environment, workload_kinds: tuple[str, ...]) -> str | None:
        """The first reason a plugin taking part gives against ``spec``, or None."""
        reasons = self._trial("harness_check_combination", spec, spec=spec, env=env, workload_kinds=workload_kinds)
        return next((r for r in reasons if r), None)

    # ------------------------------------------------------------------------------------------ building
    # A technique hook's result is typed by its hookspec; pluggy's caller returns Any, so each method names it.
    def compress_before_training(self, model: torch.nn.Module, workload: Workload, spec: TrialSpec,
                                 device: torch.device) -> torch.nn.Module | None:
        compressed: torch.nn.Module | None = self._technique(
            "harness_compress_before_training", spec, model=model, workload=workload, device=device)
        return compressed

    def reduce_memory(self, model: torch.nn.Module, workload: Workload, spec: TrialSpec,
                      device: torch.device) -> torch.nn.Module | None:
        reduced: torch.nn.Module | None = self._technique("harness_reduce_memory", spec, model=model,
                                                          workload=workload, device=device)
        return reduced

    def setup_precision(self, model: torch.nn.Module, spec: TrialSpec, device: torch.device) -> Precision | None:
        precision: Precision | None = self._technique("harness_setup_precision", spec, model=model, device=device)
        return precision

    def build_optimizer(self, params: list[torch.nn.Parameter], spec: TrialSpec,
                        device: torch.device) -> torch.optim.Optimizer | None:
        optimizer: torch.optim.Optimizer | None = self._technique(
            "harness_build_optimizer", spec, params=params, device=device)
        return optimizer

    def build_engine(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                     spec: TrialSpec, device: torch.device, dist: DistInfo) -> Engine | None:
        engine: Engine | None = self._technique("harness_build_engine", spec, model=model, optimizer=optimizer,
                                                precision=precision, device=device, dist=dist)
        return engine

    def build_lr_scheduler(self, optimizer: torch.optim.Optimizer, spec: TrialSpec,
                           total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = self._technique(
            "harness_build_lr_scheduler", spec, optimizer=optimizer, total_steps=total_steps)
        return scheduler

    def build_loss(self, model: torch.nn.Module, workload: Workload, spec: TrialSpec,
                   device: torch.device) -> hookspecs.LossFn | None:
        loss: hookspecs.LossFn | None = self._technique("harness_build_loss", spec, model=model, workload=workload,
                                                        device=device)
        return loss

    def build_data_transform(self, workload: Workload, spec: TrialSpec,
                             device: torch.device) -> hookspecs.DataTransform | None:
        transform: hookspecs.DataTransform | None = self._technique("harness_build_data_transform", spec,
                                                                    workload=workload, device=device)
        return transform

    def compile_step(self, step: TrainStep, spec: TrialSpec, device: torch.device) -> Callable[..., Any] | None:
        compiled: Callable[..., Any] | None = self._technique("harness_compile_step", spec, step=step, device=device)
        return compiled

    def compress_after_training(self, model: torch.nn.Module, trainer: Trial, workload: Workload, spec: TrialSpec,
                                device: torch.device) -> torch.nn.Module | None:
        compressed: torch.nn.Module | None = self._technique(
            "harness_compress_after_training", spec, model=model, trainer=trainer, workload=workload, device=device)
        return compressed

    # ------------------------------------------------------------------------------------------ measuring
    def measure_model(self, model: torch.nn.Module, workload: Workload, spec: TrialSpec,
                      device: torch.device) -> dict[str, Any]:
        return self._merged(self._trial("harness_measure_model", spec, model=model, workload=workload, spec=spec,
                                        device=device))

    def measure_window(self, trial: Trial, step: int, phase: str) -> dict[str, Any]:
        return self._merged(self._trial("harness_measure_window", trial.spec, trial=trial, step=step, phase=phase))

    def measure_trial(self, trial: Trial, status: str) -> dict[str, Any]:
        return self._merged(self._trial("harness_measure_trial", trial.spec, trial=trial, status=status))

    # ------------------------------------------------------------------------------------------ trial observers
    def trial_start(self, trial: Trial) -> None:
        self._trial("harness_trial_start", trial.spec, trial=trial)

    def trial_window(self, trial: Trial, step: int, metrics: Mapping[str, Any]) -> None:
        self._trial("harness_trial_window", trial.spec, trial=trial, step=step, metrics=metrics)

    def trial_evaluated(self, trial: Trial, step: int, metrics: Mapping[str, Any]) -> None:
        self._trial("harness_trial_evaluated", trial.spec, trial=trial, step=step, metrics=metrics)

    def trial_end(self, trial: Trial, result: TrialResult) -> None:
        self._trial("harness_trial_end", trial.spec, trial=trial, result=result)

    # ------------------------------------------------------------------------------------------ study driver
    def study_start(self, study: optuna.Study, config: StudyConfig) -> None:
        self._all("harness_study_start", study=study, config=config)

    def trial_launch(self, spec: TrialSpec, trial_number: int, study: optuna.Study) -> dict[str, Any]:
        """The tags the plugins taking part return, merged (the caller adds them to ``spec.tags``)."""
        return self._merged(self._trial("harness_trial_launch", spec, spec=spec, trial_number=trial_number,
                                        study=study))

    def trial_finished(self, spec: TrialSpec, record: TrialRecord, study: optuna.Study) -> None:
        self._trial("harness_trial_finished", spec, spec=spec, record=record, study=study)

    def study_end(self, study: optuna.Study, config: StudyConfig, records: list[TrialRecord],
                  pareto: list[TrialRecord], output_dir: Path) -> None:
        self._all("harness_study_end", study=study, config=config, records=records, pareto=pareto,
                  output_dir=output_dir)

    def study_interrupted(self, study: optuna.Study, config: StudyConfig) -> None:
        self._all("harness_study_interrupted", study=study, config=config)
