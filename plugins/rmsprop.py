"""Optimizer ``rmsprop``: RMSprop with optional momentum and centring (torch.optim.RMSprop).

torch has no fused RMSprop kernel, so ``implementation: fused`` is declared infeasible before launch.
"""
from __future__ import annotations

import torch

from harness import hookimpl
from harness.space import Categorical, Float, Technique
from plugins._optim import build_schedule, common_space, implementation_kwargs, implementation_unavailable

TECHNIQUE = Technique(
    axis="optimizer", name="rmsprop",
    space={**common_space(lr=1e-3, lr_low=1e-5, lr_high=1e-1),
           "alpha": Float(0.8, 0.999, default=0.99, help="smoothing constant of the squared-gradient average"),
           "eps": Float(1e-10, 1e-6, default=1e-8, log=True, help="numerical-stability term"),
           "momentum": Float(0.0, 0.99, default=0.0, help="momentum"),
           "centered": Categorical((False, True), default=False, help="normalise by the gradient's variance")},
    description="RMSprop (torch.optim.RMSprop)",
)


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_check_combination(spec, env):
    return implementation_unavailable(torch.optim.RMSprop, spec, env)


@hookimpl
def harness_build_optimizer(params, spec):
    p = spec.optimizer.params
    return torch.optim.RMSprop(params, lr=p["lr"], alpha=p["alpha"], eps=p["eps"], weight_decay=p["weight_decay"],
                               momentum=p["momentum"], centered=bool(p["centered"]), **implementation_kwargs(p))


@hookimpl
def harness_build_lr_scheduler(optimizer, spec, total_steps):
    return build_schedule(optimizer, spec, total_steps)
