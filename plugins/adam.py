"""Optimizer ``adam``: Adam with L2 (coupled) weight decay (torch.optim.Adam)."""
from __future__ import annotations

import torch

from harness import hookimpl
from harness.space import Technique
from plugins._optim import ADAM_MOMENTS, build_schedule, common_space, implementation_kwargs, implementation_unavailable

TECHNIQUE = Technique(
    axis="optimizer", name="adam",
    space={**common_space(lr=1e-3, lr_low=1e-5, lr_high=1e-1),
           **ADAM_MOMENTS},
    description="Adam (torch.optim.Adam), weight decay added to the gradient",
)


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_check_combination(spec, env):
    return implementation_unavailable(torch.optim.Adam, spec, env)


@hookimpl
def harness_build_optimizer(params, spec):
    p = spec.optimizer.params
    return torch.optim.Adam(params, lr=p["lr"], betas=(p["beta1"], p["beta2"]), eps=p["eps"],
                            weight_decay=p["weight_decay"], **implementation_kwargs(p))


@hookimpl
def harness_build_lr_scheduler(optimizer, spec, total_steps):
    return build_schedule(optimizer, spec, total_steps)
