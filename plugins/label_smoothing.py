"""Data ``label-smoothing`` (Szegedy et al. 2016): train against ``(1 - smoothing) * onehot(y) + smoothing /
classes`` instead of the one-hot target, which keeps the logits from growing without bound.

The inputs are untouched; the targets become ``SoftTargets(y, smoothing=...)``, whose cross-entropy is
torch's ``label_smoothing`` (no ``tokens x vocabulary`` matrix for a language model). Any workload whose loss
takes soft targets: ``classification`` or ``lm``.
"""
from __future__ import annotations

import torch

from harness import hookimpl
from harness.space import Float, Requirements, Technique
from harness.workload import SoftTargets

TECHNIQUE = Technique(
    axis="data", name="label-smoothing",
    space={"smoothing": Float(0.0, 0.3, default=0.1, help="probability mass spread evenly over the classes")},
    requires=Requirements(workload_kinds=("classification", "lm")),
    description="label smoothing: targets mixed with the uniform distribution",
)


class LabelSmoothing:
    """``transform(inputs, targets) -> (inputs, SoftTargets(targets, smoothing))``."""

    def __init__(self, smoothing: float) -> None:
        self.smoothing = smoothing

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, SoftTargets]:
        return inputs, SoftTargets(targets, smoothing=self.smoothing)


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_build_data_transform(spec):
    return LabelSmoothing(spec.data.params["smoothing"])
