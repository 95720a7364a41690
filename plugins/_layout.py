"""Memory-format helpers shared by the compile-axis plugins (not a plugin itself): channels-last (NHWC)
lets cuDNN use tensor-core convolution kernels without transposes."""
from __future__ import annotations

import torch
from torch import nn


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert the model's 4-D parameters and buffers to channels-last, in place (others are unchanged)."""
    return model.to(memory_format=torch.channels_last)


def channels_last_input(inputs: torch.Tensor) -> torch.Tensor:
    """Image batches (N, C, H, W) to channels-last; other inputs pass through."""
    return inputs.contiguous(memory_format=torch.channels_last) if inputs.dim() == 4 else inputs


def apply_channels_last(step) -> None:
    """Make a :class:`harness.step.TrainStep` run channels-last: the model, and the inputs of every batch."""
    to_channels_last(step.engine.module)
    previous = step.input_transform
    step.input_transform = channels_last_input if previous is None else (
        lambda x: channels_last_input(previous(x)))
