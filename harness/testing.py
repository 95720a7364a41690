"""Helpers for testing the harness and third-party plugins with real components (pytest fixtures live in
``tests/conftest.py``; plugin authors import these functions directly).

- :func:`make_spec`: a small, fast TrialSpec on the ``digits`` workload, with any field overridden.
- :func:`run_one_trial`: run a spec in this process (``isolated=False``) or in its own worker process.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from harness.config import Budget, Choice, TrialSpec
from harness.space import AXES


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
