"""Data ``mixup`` (Zhang et al. 2018): train on convex combinations of pairs of samples and of their targets.

For each training batch, ``lam ~ Beta(alpha, alpha)`` and a random partner for every sample (a permutation of
the batch); the inputs become ``lam * x + (1 - lam) * x[perm]`` and the targets the soft targets
``SoftTargets(y, y[perm], lam)``. ``lam`` stays a device tensor, drawn from a generator seeded by the trial's
seed, so nothing waits for the device and trials are reproducible. It needs float inputs and class-index
targets with a loss that takes soft targets: ``classification`` workloads.
"""
from __future__ import annotations

import torch

from harness import hookimpl
from harness.space import Float, Requirements, Technique
from harness.workload import SoftTargets
from plugins._mixing import BatchMixer

TECHNIQUE = Technique(
    axis="data", name="mixup",
    space={"alpha": Float(0.05, 1.0, default=0.2, log=True,
                          help="Beta(alpha, alpha) of the mixing weight (small: mostly one sample)")},
    requires=Requirements(workload_kinds=("classification",)),
    description="Mixup: convex combinations of sample pairs and their targets",
)


class Mixup:
    """``transform(inputs, targets) -> (mixed inputs, SoftTargets)`` for each training batch."""

    def __init__(self, alpha: float, seed: int, device: torch.device) -> None:
        self.mixer = BatchMixer(alpha, seed, device)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, SoftTargets]:
        lam, perm = self.mixer.lam(), self.mixer.permutation(len(inputs))
        weight = lam.to(inputs.dtype)
        mixed = weight * inputs + (1 - weight) * inputs[perm]
        return mixed, SoftTargets(targets, targets[perm], lam)


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_build_data_transform(spec, device):
    return Mixup(spec.data.params["alpha"], spec.seed, device)
