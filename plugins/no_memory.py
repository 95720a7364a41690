"""Memory ``none``: train the model as it is, keeping every activation for the backward pass."""
from __future__ import annotations

from harness import hookimpl
from harness.space import Technique

TECHNIQUE = Technique(axis="memory", name="none", default=True,
                      description="no memory reduction: every activation is kept for the backward pass")


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]
