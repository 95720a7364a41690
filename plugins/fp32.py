"""Precision ``fp32``: full float32 with TF32 tensor-core math switched off (the reference precision)."""
from __future__ import annotations

import torch

from harness import hookimpl
from harness.space import Technique
from harness.step import Precision

NAME = "fp32"
TECHNIQUE = Technique(axis="precision", name=NAME, description="float32 everywhere, TF32 off")


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_setup_precision(model, spec, device):
    if spec.precision.name != NAME:
        return None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return Precision(compute_dtype=torch.float32, param_dtype=torch.float32)
