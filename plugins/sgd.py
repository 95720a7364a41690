"""Optimizer ``sgd``: stochastic gradient descent with momentum, optional Nesterov, weight decay."""
from __future__ import annotations

import torch

from harness import hookimpl
from harness.space import Categorical, Float, Technique
from plugins._optim import build_schedule, common_space, implementation_kwargs, implementation_unavailable

TECHNIQUE = Technique(
    axis="optimizer", name="sgd",
    space={**common_space(lr=0.05, lr_low=1e-4, lr_high=1.0),
           "momentum": Float(0.0, 0.99, default=0.9, help="momentum"),
           "nesterov": Categorical((False, True), default=False, help="Nesterov momentum (needs momentum > 0)")},
    description="SGD with momentum (torch.optim.SGD)",
)


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_check_combination(spec, env):
    return implementation_unavailable(torch.optim.SGD, spec, env)


@hookimpl
def harness_build_optimizer(params, spec):
    p = spec.optimizer.params
    momentum = p["momentum"]
    return torch.optim.SGD(params, lr=p["lr"], momentum=momentum, weight_decay=p["weight_decay"],
                           nesterov=bool(p["nesterov"] and momentum > 0), **implementation_kwargs(p))


@hookimpl
def harness_build_lr_scheduler(optimizer, spec, total_steps):
    return build_schedule(optimizer, spec, total_steps)
