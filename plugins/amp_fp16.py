"""Precision ``amp-fp16``: automatic mixed precision with float16 (``torch.autocast``) and dynamic loss
scaling (``torch.amp.GradScaler``). Steps whose gradients overflow are skipped by the scaler; they are
counted on the device (no host sync per step) and reported as ``amp_skipped_steps``."""
from __future__ import annotations

import torch

from harness import hookimpl
from harness.space import Float, Int, Technique
from harness.step import Precision
from plugins._precision import autocast_to, set_tf32

TECHNIQUE = Technique(
    axis="precision", name="amp-fp16",
    space={"init_scale": Float(1.0, 2.0 ** 24, default=2.0 ** 16, log=True, help="initial loss scale"),
           "growth_interval": Int(10, 10000, default=2000, log=True,
                                  help="steps without overflow before the scale doubles")},
    description="autocast to float16 with a dynamic GradScaler",
)


class CountingGradScaler(torch.amp.GradScaler):
    """A GradScaler that also counts the optimizer steps it skipped because of inf/NaN gradients.

    The count lives in a device tensor updated with the same found-inf flags ``update()`` consumes, so
    counting adds no host synchronisation to the train step.
    """

    def __init__(self, device: str, **kwargs):
        super().__init__(device, **kwargs)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, new_scale=None) -> None:
        if self.is_enabled() and new_scale is None and self._per_optimizer_states:
            flags = [found.to(self.skipped_steps.device, non_blocking=True)
                     for state in self._per_optimizer_states.values()
                     for found in state["found_inf_per_device"].values()]
            if flags:
                self.skipped_steps += (torch.stack(flags).sum() > 0).to(torch.int64)
        super().update(new_scale)


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_setup_precision(spec, device):
    p = spec.precision.params
    set_tf32(device, True)
    scaler = CountingGradScaler(device.type, init_scale=p["init_scale"], growth_interval=p["growth_interval"])
    return Precision(compute_dtype=torch.float16, param_dtype=torch.float16, scaler=scaler,
                     autocast=autocast_to(device, torch.float16),
                     info={"amp_skipped_steps": lambda: int(scaler.skipped_steps.item()),
                           "amp_final_loss_scale": lambda: float(scaler.get_scale())})
