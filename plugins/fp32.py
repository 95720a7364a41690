"""Precision ``fp32``: full float32 with TF32 tensor-core math switched off (the reference precision)."""
from __future__ import annotations

import torch

from harness import hookimpl
from harness.space import Technique
from harness.step import Precision
from plugins._precision import set_tf32

NAME = "fp32"
TECHNIQUE = Technique(axis="precision", name=NAME, description="float32 everywhere, TF32 off")


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_setup_precision(model, spec, device):
    if spec.precision.name != NAME:
        return None
    set_tf32(device, False)
    return Precision(compute_dtype=torch.float32, param_dtype=torch.float32)
