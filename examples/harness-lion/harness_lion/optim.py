"""The Lion optimizer written by hand as a ``torch.optim.Optimizer`` (no dependency beyond torch).

Lion keeps one momentum buffer per parameter (half of Adam's state) and steps by the *sign* of an interpolation
between the momentum and the gradient, so every coordinate moves by exactly ``lr``::

    update = sign(beta1 * m + (1 - beta1) * g)
    p      = p * (1 - lr * weight_decay) - lr * update
    m      = beta2 * m + (1 - beta2) * g
"""
from __future__ import annotations

import torch


class Lion(torch.optim.Optimizer):
    """Lion: sign of an interpolated momentum, decoupled weight decay, one state tensor per parameter.

    Its useful learning rates are 3-10x smaller than AdamW's, and its weight decay 3-10x larger, because the
    sign makes every update's magnitude ``lr`` regardless of the gradient's scale.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Lion: lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas must be in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), weight_decay = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg = state["exp_avg"]
                if weight_decay:
                    p.mul_(1.0 - lr * weight_decay)
                update = exp_avg.mul(beta1).add_(grad, alpha=1.0 - beta1).sign_()
                p.add_(update, alpha=-lr)
                exp_avg.mul_(beta2).add_(grad, alpha=1.0 - beta2)
        return loss
