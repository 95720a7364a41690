"""Data ``cutmix`` (Yun et al. 2019): paste a box cut from another sample of the batch into each image, and mix
the targets by the area pasted.

For each training batch, ``lam ~ Beta(alpha, alpha)``, a random partner for every sample, and one box of area
about ``(1 - lam)`` of the image, centred uniformly and clipped at the borders, over the last two (spatial)
dimensions, whatever the memory format. ``lam`` is then corrected to the area actually kept, so the soft
targets ``SoftTargets(y, y[perm], lam)`` match the pixels. The box is a mask computed on the device (no host
round trip, fixed shapes). It needs image inputs of a ``classification`` workload.
"""
from __future__ import annotations

import torch

from harness import hookimpl
from harness.space import Float, Requirements, Technique
from harness.workload import SoftTargets
from plugins._mixing import BatchMixer

TECHNIQUE = Technique(
    axis="data", name="cutmix",
    space={"alpha": Float(0.1, 2.0, default=1.0, log=True,
                          help="Beta(alpha, alpha) of the area kept from each image")},
    requires=Requirements(workload_kinds=("image+classification",)),
    description="CutMix: a box pasted from another image, targets mixed by its area",
)


def box_mask(height: int, width: int, lam: torch.Tensor, centre_y: torch.Tensor, centre_x: torch.Tensor
             ) -> torch.Tensor:
    """A boolean ``(height, width)`` mask of the box of sides ``sqrt(1 - lam)`` times the image's, centred at
    the fractions ``centre_y``, ``centre_x`` of the image and clipped to it."""
    side = (1.0 - lam).clamp(0.0, 1.0).sqrt()

    def span(size: int, centre: torch.Tensor) -> torch.Tensor:
        middle, half = centre * size, side * size / 2
        low, high = (middle - half).round().clamp(0, size), (middle + half).round().clamp(0, size)
        index = torch.arange(size, device=lam.device)
        return (index >= low) & (index < high)

    return span(height, centre_y)[:, None] & span(width, centre_x)[None, :]


class CutMix:
    """``transform(inputs, targets) -> (images with a pasted box, SoftTargets)`` for each training batch."""

    def __init__(self, alpha: float, seed: int, device: torch.device) -> None:
        self.mixer = BatchMixer(alpha, seed, device)

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, SoftTargets]:
        mixer = self.mixer
        lam, perm = mixer.lam(), mixer.permutation(len(inputs))
        height, width = inputs.shape[-2:]
        mask = box_mask(height, width, lam, mixer.uniform(), mixer.uniform())
        mixed = torch.where(mask, inputs[perm], inputs)
        kept = 1.0 - mask.float().mean()  # the area left of each image: the weight of its own target
        return mixed, SoftTargets(targets, targets[perm], kept)


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_build_data_transform(spec, device):
    return CutMix(spec.data.params["alpha"], spec.seed, device)
