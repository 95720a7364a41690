"""Parallelism ``fsdp``: PyTorch's fully sharded data parallel, FSDP2 (``torch.distributed.fsdp.fully_shard``).

Parameters, gradients and optimizer state are sharded across the ranks (as DTensors); each repeated block
(every child of an ``nn.ModuleList``, e.g. the transformer layers) and then the whole model become FSDP units
whose parameters are all-gathered just before use and freed after. ``batch_size`` is the *global* batch: each of
N ranks takes ``batch_size / N`` samples per step, so trials compare at any N.

Precision: with ``mixed_precision: policy`` (default) a half-precision trial (bfloat16/float16 compute dtype)
becomes FSDP's ``MixedPrecisionPolicy`` (parameters all-gathered and computed in that dtype, gradients reduced in
``reduce_dtype``, float32 sharded master weights) and the step runs without autocast, so nothing is cast twice;
a float16 trial keeps its gradient scaler. ``mixed_precision: autocast`` keeps the precision axis's autocast
and float32 communication instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch
from torch import nn

from harness import hookimpl
from harness.space import Categorical, Requirements, Technique
from harness.step import Engine

TECHNIQUE = Technique(
    axis="parallelism", name="fsdp",
    space={"reshard_after_forward": Categorical((True, False), default=True,
                                                help="free gathered parameters after forward (ZeRO-3 like) or "
                                                     "keep them until backward (ZeRO-2 like, more memory)"),
           "mixed_precision": Categorical(("policy", "autocast"), default="policy",
                                          help="half precision through FSDP's MixedPrecisionPolicy, or autocast"),
           "reduce_dtype": Categorical(("float32", "compute"), default="float32",
                                       help="dtype of the gradient reduce-scatter under the policy")},
    requires=Requirements(min_devices=2),
    incompatible=("compile:cuda-graph",),
    reason="FSDP's all-gathers and frees are driven from the host between kernels",
    description="FSDP2 fully_shard: sharded parameters, gradients and optimizer state",
)

HALF = (torch.bfloat16, torch.float16)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules made FSDP units before the root: every child of every ``nn.ModuleList`` (repeated blocks)."""
    return [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]


def rebuild_optimizer(optimizer: torch.optim.Optimizer, old: dict[str, nn.Parameter],
                      new: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    """The same optimizer (class, hyper-parameters, groups) over the sharded parameters that replaced ``old``.

    ``fully_shard`` swaps every parameter for a DTensor one, so the optimizer the optimizer axis built must be
    rebuilt over them; it has taken no step yet, so no state is lost.
    """
    name_of = {id(p): n for n, p in old.items()}
    groups = []
    for group in optimizer.param_groups:
        params = [new[name_of[id(p)]] for p in group["params"] if id(p) in name_of]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    accepted = inspect.signature(type(optimizer)).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(groups, **defaults)


class FSDPEngine(Engine):
    """Plain backward and step on the sharded model; FSDP2 reduce-scatters gradients in its backward hooks."""

    def __init__(self, model, optimizer, precision, params: dict):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy_dtype = precision.compute_dtype if params["mixed_precision"] == "policy" and \
            precision.compute_dtype in HALF else None
        mp = MixedPrecisionPolicy()
        if policy_dtype is not None:
            reduce = torch.float32 if params["reduce_dtype"] == "float32" else policy_dtype
            mp = MixedPrecisionPolicy(param_dtype=policy_dtype, reduce_dtype=reduce)
            precision = dataclasses.replace(precision, autocast=contextlib.nullcontext, model=None)
        old = dict(model.named_parameters())
        for unit in shard_units(model):
            fully_shard(unit, reshard_after_forward=params["reshard_after_forward"], mp_policy=mp)
        fully_shard(model, reshard_after_forward=params["reshard_after_forward"], mp_policy=mp)
        super().__init__(model, rebuild_optimizer(optimizer, old, dict(model.named_parameters())), precision)

    def no_sync(self):
        @contextlib.contextmanager
        def skip_reduction():
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        return skip_reduction()


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_build_engine(model, optimizer, precision, spec):
    return FSDPEngine(model, optimizer, precision, spec.parallelism.params)
