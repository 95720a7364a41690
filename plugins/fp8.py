"""Precision ``fp8``: float8 training of the linear layers with torchao (``convert_to_float8_training``):
matmuls in float8 with dynamic scaling, everything else under bfloat16 autocast. Needs an H100-class GPU
(compute capability >= 8.9) and the ``torchao`` package, so it is declared infeasible elsewhere. float8
matmuls only pay off when the model is also compiled (``torch-compile``), which fuses the casts."""
from __future__ import annotations

import torch
from torch import nn

from harness import hookimpl
from harness.space import Categorical, Requirements, Technique
from harness.step import Precision
from plugins._precision import autocast_to, set_tf32

TECHNIQUE = Technique(
    axis="precision", name="fp8",
    space={"recipe": Categorical(("tensorwise", "rowwise"), default="tensorwise",
                                 help="torchao float8 scaling recipe")},
    requires=Requirements(cuda=True, min_compute_capability=(8, 9), packages=("torchao",)),
    description="torchao float8 linear layers + bfloat16 autocast",
)


def float8_eligible(module: nn.Module, _fqn: str) -> bool:
    """float8 GEMMs need both dimensions divisible by 16; smaller or odd layers (a classifier head) stay."""
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_setup_precision(model, spec, device):
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    set_tf32(device, True)
    config = Float8LinearConfig.from_recipe_name(spec.precision.params["recipe"])
    converted = convert_to_float8_training(model, config=config, module_filter_fn=float8_eligible)
    layers = sum(1 for m in converted.modules() if type(m).__name__ == "Float8Linear")
    return Precision(compute_dtype="fp8", param_dtype=torch.bfloat16, model=converted,
                     autocast=autocast_to(device, torch.bfloat16),
                     info={"fp8_linear_layers": layers})
