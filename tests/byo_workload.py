"""Bring-your-own workloads for the tests: named in a trial as ``workload: byo_workload:two_moons`` (with
``tests/`` on ``PYTHONPATH``), built by calling ``two_moons(device=..., seed=..., **params)``; and
``byo_workload:refuses_to_evaluate``, whose model raises when evaluated (failure messages)."""
from __future__ import annotations

import math

import torch
from torch import nn

from harness.workload import TensorSource, Workload


def two_moons(device=None, seed: int = 0, samples: int = 512, hidden: int = 32, noise: float = 0.1):
    """Two interleaved half-circles (a classic non-linear toy problem), 3/4 train, 1/4 held out, and an MLP, built
    on ``device`` (the harness passes the trial's device; None: the CPU)."""
    gen = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 2, (samples,), generator=gen)
    angle = torch.rand(samples, generator=gen) * math.pi
    x = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    x = torch.where(labels[:, None] == 1, torch.stack([1 - x[:, 0], 0.5 - x[:, 1]], 1), x)
    x = x + noise * torch.randn(samples, 2, generator=gen)
    split = samples * 3 // 4
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2))
    x, labels, model = x.to(device), labels.to(device), model.to(device)
    return Workload(name="two-moons", model=model, train=TensorSource(x[:split], labels[:split]),
                    test=TensorSource(x[split:], labels[split:]), kinds=("mlp",), input_shape=(2,),
                    info={"built_by": __name__})


two_moons.kinds = ("mlp",)


class _RefusesToEvaluate(nn.Module):
    """Trains like an MLP; its forward raises in evaluation mode, from a nested call spread over several lines
    (the shape of traceback that once turned into a garbled failure message)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, x):
        if not self.training:
            _refuse(
                "evaluation",
                x.shape,
            )
        return self.net(x)


def _refuse(what, shape):
    raise RuntimeError(f"this model refuses {what} of a {tuple(shape)} batch\nsecond line of the message")


def refuses_to_evaluate(device=None, seed: int = 0, samples: int = 256, hidden: int = 8):
    """Two moons with a model that trains but raises when evaluated."""
    workload = two_moons(device=device, seed=seed, samples=samples, hidden=hidden)
    workload.model = _RefusesToEvaluate(hidden).to(device)
    return workload
