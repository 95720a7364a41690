"""Precision ``amp-bf16``: automatic mixed precision with bfloat16 (``torch.autocast``). Parameters and
optimizer state stay float32; matmuls and convolutions run in bfloat16. bfloat16 has float32's exponent
range, so no loss scaling is needed."""
from __future__ import annotations

import torch

from harness import hookimpl
from harness.space import Technique
from harness.step import Precision
from plugins._precision import autocast_to, set_tf32

TECHNIQUE = Technique(axis="precision", name="amp-bf16", description="autocast to bfloat16, float32 master weights")


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_setup_precision(device):
    set_tf32(device, True)
    return Precision(compute_dtype=torch.bfloat16, param_dtype=torch.bfloat16,
                     autocast=autocast_to(device, torch.bfloat16))
