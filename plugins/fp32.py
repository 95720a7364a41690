"""Precision ``fp32``: full float32 with TF32 tensor-core math switched off (the reference precision)."""
from __future__ import annotations

import torch

from harness import hookimpl
from harness.space import Technique
from harness.step import Precision
from plugins._precision import set_tf32

TECHNIQUE = Technique(axis="precision", name="fp32", default=True, description="float32 everywhere, TF32 off")


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_setup_precision(device):
    set_tf32(device, False)
    return Precision(compute_dtype=torch.float32, param_dtype=torch.float32)
