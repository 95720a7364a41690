"""Parallelism ``single``: one process, one device."""
from __future__ import annotations

from harness import hookimpl
from harness.space import Requirements, Technique
from harness.step import Engine

TECHNIQUE = Technique(axis="parallelism", name="single", default=True, requires=Requirements(max_devices=1),
                      description="one process on one device")


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_build_engine(model, optimizer, precision):
    return Engine(model, optimizer, precision)
