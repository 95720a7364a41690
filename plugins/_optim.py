"""Shared pieces of the optimizer plugins (not a plugin itself): the common search space, the choice of
torch's ``foreach`` / ``fused`` implementations, and the warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch

from harness.space import Categorical, Float

IMPLEMENTATIONS = ("default", "foreach", "fused")


def common_space(lr: float, lr_low: float, lr_high: float, weight_decay: float = 0.0) -> dict:
    return {
        "lr": Float(lr_low, lr_high, default=lr, log=True, help="learning rate"),
        "weight_decay": Float(0.0, 0.5, default=weight_decay, help="weight decay"),
        "implementation": Categorical(IMPLEMENTATIONS, default="default",
                                      help="torch implementation: default, foreach (multi-tensor) or fused"),
        "schedule": Categorical(("constant", "cosine"), default="constant",
                                help="learning-rate schedule: constant, or linear warm-up then cosine decay"),
        "warmup_fraction": Float(0.0, 0.5, default=0.05, help="fraction of steps of linear warm-up (cosine)"),
    }


def implementation_kwargs(params: dict, device: torch.device) -> dict:
    """torch's keyword for the chosen implementation; ``fused`` falls back to ``foreach`` where the device
    has no fused kernel (recorded in the trial's result by the optimizer's ``param_groups``)."""
    impl = params.get("implementation", "default")
    if impl == "fused":
        return {"fused": True}
    if impl == "foreach":
        return {"foreach": True}
    return {}


def cosine_schedule(optimizer, total_steps: int, warmup_fraction: float):
    warmup = max(1, int(total_steps * warmup_fraction)) if total_steps else 1

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not total_steps:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_schedule(optimizer, spec, total_steps: int, name: str):
    if spec.optimizer.name != name or spec.optimizer.params.get("schedule", "constant") != "cosine":
        return None
    return cosine_schedule(optimizer, total_steps, spec.optimizer.params.get("warmup_fraction", 0.05))
