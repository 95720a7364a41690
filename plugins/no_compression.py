"""Compression ``none``: train and measure the workload's model as it is."""
from __future__ import annotations

from harness import hookimpl
from harness.space import Technique

TECHNIQUE = Technique(axis="compression", name="none", default=True, description="no compression")


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]
