"""Workload ``two-moons``: two interleaving half circles with noise, classified by a small MLP.

A single-file workload plugin: load it with ``HARNESS_PLUGINS=two_moons`` (with this folder on ``PYTHONPATH``),
or register it through a ``harness.plugins`` entry point in a package of your own.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from harness import hookimpl
from harness.space import Float, Int
from harness.workload import TensorSource, Workload, WorkloadInfo


def make_moons(samples: int, noise: float, generator: torch.Generator):
    """``samples`` points on two half circles (label 0 and 1), with Gaussian noise of std ``noise``."""
    labels = torch.randint(0, 2, (samples,), generator=generator)
    angle = torch.rand(samples, generator=generator) * math.pi
    x = torch.where(labels == 0, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(labels == 0, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x, y], dim=1) + noise * torch.randn(samples, 2, generator=generator)
    return points, labels


def build(device, seed, samples=2000, noise=0.1, hidden=64):  # noqa: ARG001 (device: the data stays on the CPU)
    """Called in the trial's process as ``build(device=..., seed=..., **params)``; data may stay on the CPU."""
    generator = torch.Generator().manual_seed(0)  # the same data set in every trial; ``seed`` seeds the model
    points, labels = make_moons(samples, noise, generator)
    split = samples * 4 // 5
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    return Workload(name="two-moons", model=model, kinds=("mlp",), input_shape=(2,),
                    train=TensorSource(points[:split], labels[:split]),
                    test=TensorSource(points[split:], labels[split:]),
                    flops_per_sample=6.0 * sum(p.numel() for p in model.parameters() if p.dim() > 1))


@hookimpl
def harness_declare_workloads():
    return [WorkloadInfo(
        name="two-moons", build=build, kinds=("mlp",),
        params={"samples": Int(100, 1_000_000, default=2000, help="points in the data set (4/5 train)"),
                "noise": Float(0.0, 1.0, default=0.1, help="standard deviation of the noise"),
                "hidden": Int(2, 4096, default=64, help="hidden width of the MLP")},
        description="two interleaving half circles, 2-layer MLP (a single-file workload plugin example)",
    )]
