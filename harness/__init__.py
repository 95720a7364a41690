"""gpu-harness: find the fastest way to train a model on a GPU without losing accuracy.

The public surface: :func:`run_trial`, :class:`TrialSpec`, :data:`hookimpl` for plugin authors, and
:mod:`harness.testing` (a pytest plugin) for their tests.
"""
from typing import Any

from harness.plugins import hookimpl  # noqa: F401  (re-exported for plugin authors)

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import harness`` in a plugin module stays cheap and free of import cycles.
    if name == "run_trial":
        from harness.trial import run_trial

        return run_trial
    if name == "TrialSpec":
        from harness.config import TrialSpec

        return TrialSpec
    raise AttributeError(name)
