"""Memory ``activation-checkpointing``: keep fewer activations for the backward pass and recompute the rest there,
block by block, so that larger batches and models fit (at the cost of recomputation).

The blocks are the model's repeated blocks (:mod:`plugins._blocks`: the children of an ``nn.ModuleList``); a model
without any is infeasible here. Every ``every``-th block (the first, then every n-th after it) is wrapped in place
with ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: the block gets a subclass whose ``forward`` runs
the original one under the checkpoint, so parameter names, module identity and hooks stay (FSDP, DeepSpeed ZeRO-3,
state dicts and optimizer rebuilds rely on them) and the wrapper sits *inside* whatever a parallelism engine or
``torch-compile`` (any scope, eager too) adds around the block later, as torchtitan orders them.

- ``mode: block``: the block keeps only its input; its whole forward runs again in the backward pass.
- ``mode: selective``: torchtitan's selective op checkpointing: a ``create_selective_checkpoint_contexts`` policy
  saves the outputs of matrix multiplications and attention (the expensive ops) and recomputes the rest
  (normalisations, activations, residual adds: cheap, and most of the bytes).

Recomputation replays the random-number state of the forward (dropout draws the same mask), which is why CUDA
graph capture is ruled out: torch before 2.11 cannot capture it (pytorch#162504); 2.11 captured it on an H200
(2026-11-30; ``tests/test_gpu_sharded.py`` now also compares the gradients), and the combination stays ruled out
until a whole-step parity trial shows the captured step trains like the uncaptured one. The memory saved shows in
the trial's ``peak_memory_bytes``.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from harness import hookimpl
from harness.errors import TrialFailed
from harness.space import Categorical, Int, Technique
from plugins._blocks import repeated_blocks, subclass_with_forward

NAME = "activation-checkpointing"
TECHNIQUE = Technique(
    axis="memory", name=NAME,
    space={"mode": Categorical(("block", "selective"), default="block",
                               help="block: recompute each checkpointed block's whole forward; selective: save "
                                    "matmul and attention outputs, recompute the rest"),
           "every": Int(1, 4, default=1, help="checkpoint every n-th repeated block (1: all of them)")},
    incompatible={"compile:cuda-graph": "activation checkpointing reads and restores the CUDA random-number state "
                                        "to recompute a block, which CUDA graph capture forbade before torch 2.11 "
                                        "(pytorch#162504); not yet verified with the whole-step graph"},
    description="activation checkpointing of the repeated blocks: whole blocks or selected ops recomputed",
)

#: the ops whose outputs selective checkpointing keeps: matrix multiplications and every attention kernel.
SAVED_OPS = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_attention_math")


@functools.cache
def saved_ops() -> frozenset:
    """The default overloads of :data:`SAVED_OPS` that this torch has."""
    ops = (getattr(torch.ops.aten, name, None) for name in SAVED_OPS)
    return frozenset(op.default for op in ops if op is not None and hasattr(op, "default"))


def save_matmuls_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:  # noqa: ARG001 (policy signature)
    return CheckpointPolicy.MUST_SAVE if op in saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts():
    return create_selective_checkpoint_contexts(save_matmuls_and_attention)


@functools.cache
def checkpointed_class(cls: type[nn.Module], mode: str) -> type[nn.Module]:
    """``cls`` whose ``forward`` runs under ``checkpoint`` (one class per block class and mode)."""
    extra = {"context_fn": selective_contexts} if mode == "selective" else {}

    def forward(self, *args, **kwargs):
        def block_forward(*a, **k):  # a closure, not ``cls.forward.__get__(self)``: torch 2.11's Dynamo cannot
            return cls.forward(self, *a, **k)  # trace a bound ``__get__`` (a warning and a graph break per block)

        return checkpoint(block_forward, *args, use_reentrant=False, **extra, **kwargs)

    return subclass_with_forward(cls, "Checkpointed", forward)


def checkpoint_blocks(model: nn.Module, mode: str, every: int) -> list[nn.Module]:
    """Checkpoint every ``every``-th repeated block of ``model`` in place; returns the blocks checkpointed."""
    blocks = repeated_blocks(model)
    if not blocks:
        raise TrialFailed("infeasible", f"memory {NAME!r}: the model has no repeated blocks to checkpoint "
                                        "(children of an nn.ModuleList)")
    chosen = blocks[::every]
    for block in chosen:
        block.__class__ = checkpointed_class(type(block), mode)
    return chosen


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_reduce_memory(model, spec):
    checkpoint_blocks(model, spec.memory.params["mode"], spec.memory.params["every"])
    return model
