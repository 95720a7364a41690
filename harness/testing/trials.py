"""Trials, studies and the CLI for tests, with real components: specs built from the plugins' declarations, a
tiny workload that trains in a second, one trial in this process or in a worker, a study through the real
driver, the ``harness`` command in-process, and assertions that say why a trial failed."""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.config import Budget, Choice, TrialSpec, fill_defaults
from harness.space import AXES

if TYPE_CHECKING:
    from harness.outcomes import TrialRecord
    from harness.plugins import Registry
    from harness.trial import TrialResult
    from harness.workload import Workload

#: the tiny workload as a trial or study names it (the bring-your-own ``module:function`` path).
TINY_WORKLOAD = "harness.testing:tiny_workload"


# ============================================================================================ specs
def make_spec(*, registry: Registry | None = None, **fields: Any) -> TrialSpec:
    """A TrialSpec for a quick CPU trial (60 steps, batch 64, no re-timing of noisy windows:
    ``budget.noise_threshold`` 0) with any field overridden; the workload and the techniques left out are the
    declared defaults (``digits``, ``adamw``, ``fp32``...).

    ``optimizer="sgd"`` or ``optimizer={"name": "sgd", "lr": 0.1}`` select techniques (the defaults of their
    parameters are filled in); ``budget={"steps": 80}`` overrides budget fields; ``workload_params`` are
    validated against the workload's declaration. ``registry`` defaults to every installed plugin.
    """
    from harness.plugins import get_registry

    registry = registry or get_registry()
    budget = fields.pop("budget", None)
    # a quick trial's windows are too short to time reliably: it is not timed again when they disagree
    spec = TrialSpec(budget=Budget(steps=60, warmup_steps=3, windows=3, noise_threshold=0), device="cpu")
    if isinstance(budget, dict):
        budget = Budget(**{**Budget(warmup_steps=3, windows=3, noise_threshold=0).__dict__, **budget})
    if budget is not None:
        spec.budget = budget
    for axis in AXES:
        value = fields.pop(axis, None)
        if value is None:
            continue
        name, params = (value, {}) if isinstance(value, str) else (value["name"], {
            k: v for k, v in value.items() if k != "name"})
        tech = registry.technique(axis, axis, name)
        setattr(spec, axis, Choice(name, tech.validate_params(axis, params)))
    workload_params = fields.pop("workload_params", {})
    for key, value in fields.items():
        setattr(spec, key, value)
    fill_defaults(spec, registry)  # the declared defaults where the workload or an axis is left out
    spec.workload_params = registry.validate_workload("workload", spec.workload, workload_params)
    return spec


# ============================================================================================ trials
def run_one_trial(spec: TrialSpec | None = None, isolated: bool = False, timeout_s: float = 0,
                  registry: Registry | None = None, **fields: Any) -> TrialResult:
    """Run one trial and return its :class:`harness.trial.TrialResult`; ``fields`` go to :func:`make_spec`.

    In this process by default, with ``registry`` (default: every installed plugin); ``isolated=True`` runs it
    the way studies do, in its own worker process, which loads the installed plugins (and ``HARNESS_PLUGINS``)
    itself.
    """
    if spec is None:
        spec = make_spec(registry=registry, **fields)
    elif fields:
        raise TypeError(f"run_one_trial: give a spec or spec fields, not both (got {', '.join(fields)})")
    if not isolated:
        from harness.trial import run_trial

        return run_trial(spec, registry)
    from harness.launch import LaunchOptions, launch

    with tempfile.TemporaryDirectory(prefix="harness-test-") as tmp:
        return launch(spec, Path(tmp), LaunchOptions(timeout_s=timeout_s))


def assert_trial_ok(result: TrialResult) -> TrialResult:
    """Fail, with the trial's status and message, unless it finished ``ok``; returns ``result``."""
    __tracebackhide__ = True
    if result.status != "ok":
        raise AssertionError(f"the trial ended {result.status!r}, not 'ok': {result.message or '(no message)'}")
    return result


def assert_trial_status(result: TrialResult, status: str, message: str = "") -> TrialResult:
    """Fail unless the trial ended with ``status`` (``infeasible``, ``oom``...) and its message contains
    ``message``; returns ``result``."""
    __tracebackhide__ = True
    if result.status != status:
        raise AssertionError(f"the trial ended {result.status!r}, not {status!r}: "
                             f"{result.message or '(no message)'}")
    if message not in result.message:
        raise AssertionError(f"the trial's message does not contain {message!r}: {result.message!r}")
    return result


# ============================================================================================ tiny workload
def tiny_workload(device: Any = None, seed: int = 0, samples: int = 768, features: int = 16,  # noqa: ARG001
                  classes: int = 4, hidden: int = 32) -> Workload:
    """A workload for plugin tests: ``classes`` Gaussian blobs in ``features`` dimensions (3/4 train, 1/4
    held out) and a two-layer MLP. The blobs are well separated, so any working optimizer reaches > 90 %
    held-out accuracy in about a hundred steps; a broken technique does not.

    Select it with ``workload=TINY_WORKLOAD`` (keyword parameters go in ``workload_params``). The data stay on
    the CPU (``device`` is part of the builder protocol); the trial moves them.
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
                    test=TensorSource(inputs[split:], targets[split:]), kinds=("mlp", "classification"),
                    flops_per_sample=flops, input_shape=(features,), make_student=lambda: mlp(max(2, hidden // 4)))


# what requirements on workload kinds see
tiny_workload.kinds = ("mlp", "classification")  # type: ignore[attr-defined]


# ============================================================================================ studies
def run_small_study(study: str | Path | Mapping[str, Any], tmp_path: str | Path, n_trials: int | None = None,
                    registry: Registry | None = None) -> tuple[list[TrialRecord], list[TrialRecord]]:
    """Run a study through the real driver (:class:`harness.driver.StudyDriver`) and return its
    ``(records, pareto)``: every :class:`harness.outcomes.TrialRecord`, and the non-dominated ones.

    ``study`` is a study YAML file or the same content as a mapping. The study runs with ``tmp_path`` as
    working directory, so its SQLite storage, MLflow files and report land there; fields left out get small
    defaults (``n_trials: 2``, the tiny workload on the CPU, 40 steps, throughput objective).
    """
    from rich.console import Console

    from harness.config import load_yaml
    from harness.driver import StudyDriver
    from harness.plugins import get_registry
    from harness.studyfile import StudyConfig

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
    with working_directory(tmp_path):
        config = StudyConfig.from_mapping(where, data, registry, default_name="small-study")
        driver = StudyDriver(config, registry, Console(width=160, quiet=True), n_trials=n_trials)
        driver.open()
        return driver.run()


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[Path]:
    """Run the block with ``path`` as the working directory (restored after)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


# ============================================================================================ the CLI
def run_cli(*argv: Any) -> tuple[int, str, str]:
    """Run the ``harness`` command in this process: ``(exit code, stdout, stderr)``."""
    from harness.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()
