"""Parallelism ``fsdp``: PyTorch's fully sharded data parallel, FSDP2 (``torch.distributed.fsdp.fully_shard``).

Parameters, gradients and optimizer state are sharded across the ranks (as DTensors); the whole model, or
(``units: block``) each repeated block (:mod:`plugins._blocks`: the children of an ``nn.ModuleList``, e.g. the
transformer layers) and then the rest of the model, become FSDP units whose parameters are all-gathered just before
use and freed after. ``batch_size`` is the
*global* batch: each of N ranks takes ``batch_size / N`` samples per step, so trials compare at any N.

Set up the torchtitan way, and why each default is fast:

- ``units: model`` (default) makes the whole model one unit: one all-gather before forward and one
  reduce-scatter after backward, no hooks between the blocks, so the least host work per step. Parameters are
  whole during the step; between steps parameters, gradients and optimizer state are sharded. Measured on
  2 x H200: 1.04x DDP's throughput (gpt-124M) and 1.06x (gpt-1B), where ``units: block`` ran at 0.51x on gpt-124M:
  its per-block hooks and copies kept the GPU idle 76 of every 109 ms (the host could not keep up with blocks that
  small). ``units: block`` makes each repeated block a unit (the torchtitan recipe) and is what lets a model larger
  than one GPU train: only one or two blocks' parameters are whole at a time;
- with ``units: block``, the root unit (embeddings, tied output layer, final norm) and the last block keep their
  parameters after forward whatever ``reshard_after_forward`` says: backward needs them first, so freeing them
  would only all-gather them again at once (``reshard_after_forward`` applies to the other blocks: True frees
  memory like ZeRO-3, False keeps it like ZeRO-2 for one all-gather per block and step less);
- ``prefetch`` blocks ahead are all-gathered explicitly in forward and backward
  (``set_modules_to_forward_prefetch`` / ``set_modules_to_backward_prefetch``), so an all-gather is in flight
  while the block before it computes even when the host does not run ahead of the device;
- per-block compilation is the compile axis's ``torch-compile`` with ``scope: blocks``: it compiles each block
  in place after sharding (FSDP's hooks stay outside the compiled graphs; one graph serves every block);
- the optimizer axis's optimizer is rebuilt, with its own settings, over each rank's *local shards* of the
  parameters (the tensors inside the DTensor parameters, updated in place), and each step hands it the local
  shards of the reduce-scattered gradients: torch's fused AdamW then runs as one kernel launch per group, without
  DTensor's dispatch on the host (which took ~5 ms per step for gpt-124M's 148 parameters on an H200).

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
           "units": Categorical(("model", "block"), default="model",
                                help="FSDP units: each repeated block, or the whole model as one unit (least "
                                     "host work; parameters whole during the step)"),
           "prefetch": Int(0, 2, default=1, help="blocks all-gathered ahead in forward and backward "
                                                 "(0: FSDP's implicit backward prefetch only)"),
           "mixed_precision": Categorical(("policy", "autocast"), default="policy",
                                          help="half precision through FSDP's MixedPrecisionPolicy, or autocast"),
           "reduce_dtype": Categorical(("float32", "compute"), default="float32",
                                       help="dtype of the gradient reduce-scatter under the policy")},
    requires=Requirements(min_devices=2),
    incompatible=("compile:cuda-graph",),
    reason="FSDP's all-gathers and frees are driven from the host between kernels",
    description="FSDP2 fully_shard per block or of the whole model: sharded parameters, gradients and "
                "optimizer state, prefetching",
)

HALF = (torch.bfloat16, torch.float16)


def shard(model: nn.Module, units: str, reshard_after_forward: bool, prefetch: int, mp_policy) -> list[nn.Module]:
    """Make every repeated block (``units: block``), then the root, an FSDP unit; returns the block units."""
    from torch.distributed.fsdp import fully_shard

    blocks = repeated_blocks(model) if units == "block" else []
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, mp_policy=mp_policy)
    fully_shard(model, reshard_after_forward=False, mp_policy=mp_policy)
    if prefetch:
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1:i + 1 + prefetch])
            block.set_modules_to_backward_prefetch(blocks[max(0, i - prefetch):i][::-1])
    return blocks


Shards = list[tuple[nn.Parameter, torch.Tensor]]  # (sharded DTensor parameter, this rank's local shard of it)


def local_optimizer(optimizer: torch.optim.Optimizer, old: dict[str, nn.Parameter],
                    new: dict[str, nn.Parameter]) -> tuple[torch.optim.Optimizer, Shards]:
    """The same optimizer (class, hyper-parameters, groups) over the local shards of the sharded parameters that
    replaced ``old``, and the (sharded parameter, local shard) pairs.

    ``fully_shard`` swaps every parameter for a DTensor one whose local tensor is this rank's shard; updating that
    tensor in place updates the parameter FSDP all-gathers. The optimizer has taken no step yet, so no state is lost.
    """
    name_of = {id(p): n for n, p in old.items()}
    groups, pairs = [], []
    for group in optimizer.param_groups:
        sharded = [new[name_of[id(p)]] for p in group["params"] if id(p) in name_of]
        local = [p.to_local().detach() for p in sharded]
        pairs += zip(sharded, local, strict=True)
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": local})
    accepted = inspect.signature(type(optimizer)).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(groups, **defaults), pairs


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
        shard(model, params["units"], params["reshard_after_forward"], params["prefetch"], mp)
        optimizer, self.shards = local_optimizer(optimizer, old, dict(model.named_parameters()))
        super().__init__(model, optimizer, precision)

    def step(self) -> None:
        with torch.no_grad():
            for i, (sharded, local) in enumerate(self.shards):
                current = sharded.to_local()
                if current.data_ptr() != local.data_ptr() or current.shape != local.shape:
                    local = self._follow(i, current.detach())
                # this rank's part of the reduce-scattered gradient, for the optimizer
                local.grad = None if sharded.grad is None else sharded.grad.to_local()
        super().step()
        for sharded, _ in self.shards:  # FSDP accumulates into a gradient left in place
            sharded.grad = None

    def _follow(self, i: int, new: torch.Tensor) -> torch.Tensor:
        """FSDP gave parameter ``i`` a new local tensor (it re-pads uneven shards when it first runs): step that one,
        with the state kept so far."""
        sharded, old = self.shards[i]
        for group in self.optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        if old in self.optimizer.state:
            self.optimizer.state[new] = self.optimizer.state.pop(old)
        self.shards[i] = (sharded, new)
        return new

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
