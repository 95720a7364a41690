"""Workload ``seed-cnn``: the two-convolution CNN of the seed example on CIFAR-10 (python-batch files in
``data_dir``) or, without a data directory, on a synthetic CIFAR-shaped source for throughput-only runs."""
from __future__ import annotations

import torch
from torch import nn

from harness import hookimpl
from harness.space import Int
from harness.workload import Workload
from plugins._cifar import INPUT_SHAPE, KINDS, cifar_workload, data_sources

NAME = "seed-cnn"


def seed_cnn(width: int = 32, hidden: int = 128, classes: int = 10) -> nn.Sequential:
    """Conv(3->w)-ReLU-MaxPool-Conv(w->2w)-ReLU-MaxPool-Flatten-Linear(2w*8*8 -> hidden)-ReLU-Linear(hidden -> 10);
    ``width=32, hidden=128`` is the seed example's network."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 8 * 8, hidden), nn.ReLU(), nn.Linear(hidden, classes),
    )


def training_flops_per_sample(width: int = 32, hidden: int = 128, classes: int = 10) -> float:
    """Forward + backward FLOPs of one 32x32 image: 3 x (2 x multiply-accumulates) of the convs and linears."""
    macs = 32 * 32 * width * 3 * 9 + 16 * 16 * 2 * width * width * 9 + 2 * width * 64 * hidden + hidden * classes
    return 6.0 * macs


def build(device, seed, data_dir=None, synthetic_samples=8192, synthetic_test_samples=1024, width=32,  # noqa: ARG001 (device: the builder protocol's; the trial moves the data)
          hidden=128, student_width=None, student_hidden=None):
    train, test, source = data_sources(seed, data_dir, synthetic_samples, synthetic_test_samples)
    torch.manual_seed(seed)
    return Workload(name=NAME, model=seed_cnn(width, hidden), train=train, test=test, kinds=KINDS,
                    flops_per_sample=training_flops_per_sample(width, hidden), input_shape=INPUT_SHAPE,
                    make_student=lambda: seed_cnn(student_width or max(2, width // 2),
                                                   student_hidden or max(4, hidden // 2)),
                    info={"data": source})


@hookimpl
def harness_declare_workloads():
    return [cifar_workload(
        NAME, build,
        {"width": Int(4, 1024, default=32, help="channels of the first conv (the second has twice)"),
         "hidden": Int(8, 8192, default=128, help="width of the hidden linear layer"),
         "student_width": Int(2, 1024, help="first-conv channels of the student (default: width / 2)"),
         "student_hidden": Int(4, 8192, help="hidden width of the student (default: hidden / 2)")},
        description="two-conv CNN of the seed example; CIFAR-10 (data_dir) or synthetic CIFAR-shaped data",
    )]
