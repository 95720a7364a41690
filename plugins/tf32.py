"""Precision ``tf32``: float32 storage, TensorFloat-32 tensor-core math for matmuls and convolutions
(Ampere and later; a 10-bit mantissa in the multiply, float32 accumulation)."""
from __future__ import annotations

import torch

from harness import hookimpl
from harness.space import Technique
from harness.step import Precision
from plugins._precision import set_tf32

TECHNIQUE = Technique(axis="precision", name="tf32", description="float32 storage, TF32 matmul/conv math")


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_setup_precision(device):
    set_tf32(device, True)
    # On a CPU there is no TF32: the math stays float32, and MFU is not computed for CPUs anyway.
    return Precision(compute_dtype="tf32" if device.type == "cuda" else torch.float32, param_dtype=torch.float32)
