"""Data ``none``: train on the workload's batches as they are (class-index targets, untouched inputs)."""
from __future__ import annotations

from harness import hookimpl
from harness.space import Technique

TECHNIQUE = Technique(axis="data", name="none", default=True, description="training batches as they are")


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]
