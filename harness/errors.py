"""Errors the harness raises on purpose, and the failure classes a trial can end in."""
from __future__ import annotations

#: How a trial can end other than ``ok`` (docs/architecture.md); recorded on the Optuna trial and the MLflow run.
#: The worker reports the first eight; the study driver adds ``screened`` (dominated at screening) and
#: ``missing-metric`` (an objective was not measured).
FAILURE_CLASSES = ("infeasible", "oom", "diverged", "timeout", "crashed", "plugin-error", "compile-error", "pruned",
                   "screened", "missing-metric")


class SpecError(ValueError):
    """Bad user input (a study or trial file, a CLI argument, a plugin declaration).

    The message is one line naming the field, the value and what is allowed; the CLI prints it and exits 2.
    """


class PluginError(RuntimeError):
    """A plugin failed to load or broke its contract; the message names the plugin."""


class TrialFailed(RuntimeError):
    """A trial ended in one of :data:`FAILURE_CLASSES`; raised inside the worker, reported to the driver."""

    def __init__(self, failure_class: str, message: str):
        assert failure_class in FAILURE_CLASSES, failure_class
        super().__init__(message)
        self.failure_class = failure_class
        self.message = message
