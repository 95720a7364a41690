"""Errors the harness raises on purpose, and the failure classes a trial can end in."""
from __future__ import annotations

#: How a trial can end other than ``ok`` (docs/architecture.md); recorded on the Optuna trial and the MLflow run.
#: The worker reports the first eight; the study driver adds ``screened`` (dominated at screening),
#: ``missing-metric`` (an objective was not measured) and ``interrupted`` (Ctrl-C on the driver: re-run on resume).
FAILURE_CLASSES = ("infeasible", "oom", "diverged", "timeout", "crashed", "plugin-error", "compile-error", "pruned",
                   "screened", "missing-metric", "interrupted")


class SpecError(ValueError):
    """Bad user input (a study or trial file, a CLI argument, a plugin declaration).

    The message is one line naming the field, the value and what is allowed; the CLI prints it and exits 2.
    """


#: how many characters of a user's value a message echoes (:func:`shown`).
SHOWN_CHARS = 80


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters with an ellipsis and the full length,
    so a 1 MB value in a file gives a short line: ``'xxxx...' (1000002 chars)``."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"


def one_line(message: str, limit: int = 1000) -> str:
    """``message`` on one line (newlines escaped) and at most ``limit`` characters: the CLI's last guard on
    what a :class:`SpecError` prints, whoever raised it."""
    text = message.replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


class PluginError(RuntimeError):
    """A plugin failed to load or broke its contract; the message names the plugin."""


class TrialFailed(RuntimeError):
    """A trial ended in one of :data:`FAILURE_CLASSES`; raised inside the worker, reported to the driver."""

    def __init__(self, failure_class: str, message: str):
        assert failure_class in FAILURE_CLASSES, failure_class
        super().__init__(message)
        self.failure_class = failure_class
        self.message = message
