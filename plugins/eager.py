"""Compile ``eager``: run the train step as written (the reference for every compile technique)."""
from __future__ import annotations

from harness import hookimpl
from harness.space import Technique

TECHNIQUE = Technique(axis="compile", name="eager", default=True, description="plain eager PyTorch")


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]
