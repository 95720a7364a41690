"""Workload ``resnet18``: ResNet-18 with the CIFAR stem (3x3 convolution, stride 1, no max-pool), written out
here because torchvision is not a dependency; CIFAR-10 from ``data_dir`` or synthetic CIFAR-shaped data."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from harness import hookimpl
from harness.space import Int
from harness.workload import Workload
from plugins._cifar import INPUT_SHAPE, KINDS, cifar_workload, data_sources

NAME = "resnet18"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, four stages of ``blocks[i]`` basic blocks at widths w, 2w, 4w, 8w (strides
    1, 2, 2, 2), global average pooling, a linear classifier. ``blocks=(2, 2, 2, 2), width=64`` is ResNet-18."""

    def __init__(self, blocks=(2, 2, 2, 2), width: int = 64, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        layers, in_channels = [], width
        for stage, n in enumerate(blocks):
            channels = width * 2 ** stage
            for i in range(n):
                layers.append(BasicBlock(in_channels, channels, stride=2 if stage > 0 and i == 0 else 1))
                in_channels = channels
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnet18(width: int = 64) -> ResNet:
    return ResNet((2, 2, 2, 2), width)


def resnet10(width: int = 32) -> ResNet:
    """The distillation student: one block per stage (ResNet-10) at half the width."""
    return ResNet((1, 1, 1, 1), width)


def build(device, seed, data_dir=None, synthetic_samples=8192, synthetic_test_samples=1024, width=64,  # noqa: ARG001 (device: the builder protocol's; the trial moves the data)
          student_width=None):
    train, test, source = data_sources(seed, data_dir, synthetic_samples, synthetic_test_samples)
    torch.manual_seed(seed)
    # FLOPs are left to the runner's counter (torch.utils.flop_counter): BN and shortcuts make a formula fragile.
    return Workload(name=NAME, model=resnet18(width), train=train, test=test, kinds=KINDS, input_shape=INPUT_SHAPE,
                    make_student=lambda: resnet10(student_width or max(2, width // 2)),
                    info={"data": source})


@hookimpl
def harness_declare_workloads():
    return [cifar_workload(
        NAME, build,
        {"width": Int(4, 512, default=64, help="channels of the first stage (doubling per stage)"),
         "student_width": Int(2, 512, help="first-stage channels of the ResNet-10 student (default: width / 2)")},
        description="ResNet-18, CIFAR stem; CIFAR-10 (data_dir) or synthetic CIFAR-shaped data",
    )]
