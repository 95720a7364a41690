"""Shared pieces of the precision plugins (not a plugin itself): the TF32 switch and the autocast factory."""
from __future__ import annotations

import functools

import torch


def set_tf32(device: torch.device, enabled: bool) -> None:
    """Allow or forbid TF32 tensor-core math for float32 matmuls and convolutions (CUDA only; a CPU has none).

    Mixed-precision techniques enable it too: the ops autocast leaves in float32 may then use TF32.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def autocast_to(device: torch.device, dtype: torch.dtype):
    """The ``Precision.autocast`` factory: ``torch.autocast`` on the trial's device type to ``dtype``."""
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)
