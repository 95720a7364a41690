"""Shared pieces of the optimizer plugins (not a plugin itself): the common search space, the choice of
torch's ``foreach`` / ``fused`` implementations (and a feasibility verdict where torch lacks one), and the
warm-up + cosine learning-rate schedule."""
from __future__ import annotations

import inspect
import math

import torch

from harness.space import Categorical, Float

IMPLEMENTATIONS = ("default", "foreach", "fused")

#: the moment-decay and epsilon parameters of the Adam family (adam, adamw)
ADAM_MOMENTS = {
    "beta1": Float(0.5, 0.999, default=0.9, help="first-moment decay"),
    "beta2": Float(0.9, 0.9999, default=0.999, help="second-moment decay"),
    "eps": Float(1e-10, 1e-6, default=1e-8, log=True, help="numerical-stability term"),
}


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


def implementation_kwargs(params: dict) -> dict:
    """torch's keyword for the chosen implementation (``default`` lets torch pick)."""
    impl = params.get("implementation", "default")
    if impl == "fused":
        return {"fused": True}
    if impl == "foreach":
        return {"foreach": True}
    return {}


def trial_device_type(spec, env) -> str:
    """The device type a trial will run on, as the feasibility check sees it."""
    return "cuda" if spec.device in ("cuda", "auto") and env.cuda else "cpu"


def implementation_unavailable(optimizer_cls, spec, env) -> str | None:
    """Why ``spec``'s implementation of ``optimizer_cls`` (the trial's optimizer) cannot run here, or None.

    torch has fused kernels only for some optimizers (not RMSprop) and some device types; a trial asking for
    one that does not exist is infeasible (declared before launch) rather than a crash inside torch.
    """
    if spec.optimizer.params.get("implementation") != "fused":
        return None
    name = spec.optimizer.name
    if "fused" not in inspect.signature(optimizer_cls).parameters:
        return (f"optimizer {name!r}: implementation 'fused' does not exist for torch.optim."
                f"{optimizer_cls.__name__} (torch {torch.__version__}; use 'foreach' or 'default')")
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    device_type = trial_device_type(spec, env)
    if device_type not in _get_fused_kernels_supported_devices():
        return f"optimizer {name!r}: implementation 'fused' has no kernel for device type {device_type!r}"
    return None


def cosine_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warm-up from 1/warmup to 1 over
    ``warmup_steps``, then half a cosine down to 0 at ``total_steps`` (constant 1 when the total is unknown)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not total_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(optimizer, total_steps: int, warmup_fraction: float):
    warmup = max(1, int(total_steps * warmup_fraction)) if total_steps else 1
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_factor(step, total_steps, warmup))


def build_schedule(optimizer, spec, total_steps: int):
    """The trial's learning-rate schedule: None for ``constant``, warm-up then cosine decay for ``cosine``."""
    if spec.optimizer.params.get("schedule", "constant") != "cosine":
        return None
    return cosine_schedule(optimizer, total_steps, spec.optimizer.params.get("warmup_fraction", 0.05))
