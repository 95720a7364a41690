"""Compile ``channels-last``: run a convolutional model and its inputs in channels-last (NHWC) memory format,
which lets cuDNN pick tensor-core kernels without layout transposes. Eager otherwise."""
from __future__ import annotations

from harness import hookimpl
from harness.space import Requirements, Technique
from plugins._layout import apply_channels_last

TECHNIQUE = Technique(axis="compile", name="channels-last", requires=Requirements(workload_kinds=("conv",)),
                      description="eager, model and inputs in channels-last memory format")


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_compile_step(step):
    apply_channels_last(step)
    return step
