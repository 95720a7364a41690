"""Optimizer ``adamw``: Adam with decoupled weight decay (torch.optim.AdamW); the optimizer axis's default."""
from __future__ import annotations

import torch

from harness import hookimpl
from harness.space import Technique
from plugins._optim import ADAM_MOMENTS, build_schedule, common_space, implementation_kwargs, implementation_unavailable

TECHNIQUE = Technique(
    axis="optimizer", name="adamw", default=True,
    space={**common_space(lr=1e-3, lr_low=1e-5, lr_high=1e-1, weight_decay=0.01),
           **ADAM_MOMENTS},
    description="AdamW (torch.optim.AdamW)",
)


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_check_combination(spec, env):
    return implementation_unavailable(torch.optim.AdamW, spec, env)


@hookimpl
def harness_build_optimizer(params, spec):
    p = spec.optimizer.params
    return torch.optim.AdamW(params, lr=p["lr"], betas=(p["beta1"], p["beta2"]), eps=p["eps"],
                             weight_decay=p["weight_decay"], **implementation_kwargs(p))


@hookimpl
def harness_build_lr_scheduler(optimizer, spec, total_steps):
    return build_schedule(optimizer, spec, total_steps)
