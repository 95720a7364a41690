"""Workload ``digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes), a
fixed stratified 80/20 train/test split, and an MLP classifier. The CPU quickstart's default."""
from __future__ import annotations

import torch
from torch import nn

from harness import hookimpl
from harness.space import Int
from harness.workload import TensorSource, Workload, WorkloadInfo

#: 8x8 grey images (N, 1, 8, 8) classified into 10 digits by an MLP.
KINDS = ("mlp", "image", "classification")


def mlp(hidden: int, depth: int) -> nn.Module:
    layers, width = [nn.Flatten()], 64
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def load_split(seed: int = 0):
    """The digits as float tensors in [0, 1], split 80/20 with a fixed stratification seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=data.target)
    return TensorSource(x[tr], y[tr]), TensorSource(x[te], y[te])


def build(device, seed, hidden=256, depth=2, student_hidden=32):  # noqa: ARG001 (device: the builder protocol's; the trial moves the data)
    train, test = load_split()
    torch.manual_seed(seed)
    model = mlp(hidden, depth)
    flops = 6.0 * sum(p.numel() for p in model.parameters() if p.dim() > 1)
    return Workload(name="digits", model=model, train=train, test=test, kinds=KINDS,
                    flops_per_sample=flops, input_shape=(1, 8, 8),
                    make_student=lambda: mlp(student_hidden, 1))


@hookimpl
def harness_declare_workloads():
    return [WorkloadInfo(
        name="digits", build=build, default=True, kinds=KINDS,
        params={"hidden": Int(8, 4096, default=256, help="hidden width"),
                "depth": Int(1, 8, default=2, help="hidden layers"),
                "student_hidden": Int(4, 4096, default=32, help="hidden width of the distillation student")},
        description="scikit-learn digits (8x8, 10 classes), MLP; CPU quickstart",
    )]
