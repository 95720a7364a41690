"""Parallelism ``single``: one process, one device."""
from __future__ import annotations

from harness import hookimpl
from harness.space import Requirements, Technique
from harness.step import Engine

NAME = "single"
TECHNIQUE = Technique(axis="parallelism", name=NAME, requires=Requirements(max_devices=1),
                      description="one process on one device")


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_build_engine(model, optimizer, precision, spec, device, dist):
    if spec.parallelism.name != NAME:
        return None
    return Engine(model, optimizer, precision)
