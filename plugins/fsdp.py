"""Parallelism ``fsdp``: PyTorch's fully sharded data parallel, FSDP2 (``torch.distributed.fsdp.fully_shard``).

Parameters, gradients and optimizer state are sharded across the ranks (as DTensors); each repeated block
(:mod:`plugins._blocks`: the children of an ``nn.ModuleList``, e.g. the transformer layers) and then the whole
model become FSDP units whose parameters are all-gathered just before use and freed after. ``batch_size`` is the
*global* batch: each of N ranks takes ``batch_size / N`` samples per step, so trials compare at any N.

Set up the torchtitan way, and why each default is fast:

- the root unit (embeddings, tied output layer, final norm) and the last block keep their parameters after
  forward whatever ``reshard_after_forward`` says: backward needs them first, so freeing them would only
  all-gather them again at once (``reshard_after_forward`` applies to the other blocks: True frees memory like
  ZeRO-3, False keeps it like ZeRO-2 for one all-gather per block and step less);
- ``prefetch`` blocks ahead are all-gathered explicitly in forward and backward
  (``set_modules_to_forward_prefetch`` / ``set_modules_to_backward_prefetch``), so an all-gather is in flight
  while the block before it computes even when the host does not run ahead of the device;
- per-block compilation is the compile axis's ``torch-compile`` with ``scope: blocks``: it compiles each block
  in place after sharding (FSDP's hooks stay outside the compiled graphs; one graph serves every block);
- the optimizer axis's optimizer is rebuilt over the DTensor parameters with its own settings: torch's fused
  AdamW runs fused on them (DTensor dispatches ``_fused_adamw_`` to each rank's local shard; no fallback).

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
from harness.space import Categorical, Int, Requirements, Technique
from harness.step import Engine
from plugins._blocks import repeated_blocks

TECHNIQUE = Technique(
    axis="parallelism", name="fsdp",
    space={"reshard_after_forward": Categorical((True, False), default=True,
                                                help="free each block's gathered parameters after forward "
                                                     "(ZeRO-3 like) or keep them until backward (ZeRO-2 like, "
                                                     "more memory, one all-gather per block less)"),
           "prefetch": Int(0, 2, default=1, help="blocks all-gathered ahead in forward and backward "
                                                 "(0: FSDP's implicit backward prefetch only)"),
           "mixed_precision": Categorical(("policy", "autocast"), default="policy",
                                          help="half precision through FSDP's MixedPrecisionPolicy, or autocast"),
           "reduce_dtype": Categorical(("float32", "compute"), default="float32",
                                       help="dtype of the gradient reduce-scatter under the policy")},
    requires=Requirements(min_devices=2),
    incompatible=("compile:cuda-graph",),
    reason="FSDP's all-gathers and frees are driven from the host between kernels",
    description="FSDP2 fully_shard per block: sharded parameters, gradients and optimizer state, prefetching",
)

HALF = (torch.bfloat16, torch.float16)


def shard(model: nn.Module, reshard_after_forward: bool, prefetch: int, mp_policy) -> list[nn.Module]:
    """Make every repeated block, then the root, an FSDP unit; returns the blocks (in execution order)."""
    from torch.distributed.fsdp import fully_shard

    blocks = repeated_blocks(model)
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, mp_policy=mp_policy)
    fully_shard(model, reshard_after_forward=False, mp_policy=mp_policy)
    if prefetch:
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1:i + 1 + prefetch])
            block.set_modules_to_backward_prefetch(blocks[max(0, i - prefetch):i][::-1])
    return blocks


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
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy_dtype = precision.compute_dtype if params["mixed_precision"] == "policy" and \
            precision.compute_dtype in HALF else None
        mp = MixedPrecisionPolicy()
        if policy_dtype is not None:
            reduce = torch.float32 if params["reduce_dtype"] == "float32" else policy_dtype
            mp = MixedPrecisionPolicy(param_dtype=policy_dtype, reduce_dtype=reduce)
            precision = dataclasses.replace(precision, autocast=contextlib.nullcontext, model=None)
        old = dict(model.named_parameters())
        shard(model, params["reshard_after_forward"], params["prefetch"], mp)
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
