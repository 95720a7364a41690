"""The model's repeated blocks, shared by the plugins that work block by block (not a plugin itself): FSDP shards
each block as one unit, ZeRO-3 gathers each block's parameters at once, ``torch-compile`` with ``scope: blocks``
compiles each block and activation checkpointing recomputes them.

The contract for workload authors: **repeated blocks are the children of an ``nn.ModuleList``** (the transformer
layers of ``plugins/gpt.py``). A ``ModuleList`` nested inside a block is part of that block, not a second level of
blocks. A model without a ``ModuleList`` has no repeated blocks; each plugin says what it does then.

A plugin that changes what a block computes does it in place by giving the block a subclass of its class with
another ``forward`` (:func:`subclass_with_forward`, as FSDP2 does): the module stays the same object with the same
parameter names and hooks, and a deep copy of the model (quantisation copies the trained model) runs its own
parameters, which a ``forward`` stored on the instance, bound to the original, would not.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of every outermost ``nn.ModuleList`` in ``model``, in module order."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()  # ids of the modules that belong to a block found already
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList):
            continue
        for block in module:
            blocks.append(block)
            inside.update(id(m) for m in block.modules())
    return blocks


def subclass_with_forward(cls: type[nn.Module], prefix: str, forward: Callable[..., Any],
                          copies_as_base: bool = False) -> type[nn.Module]:
    """The class ``<prefix><cls name>``, a subclass of ``cls`` whose ``forward(self, *args, **kwargs)`` is ``forward``.

    Assign it to ``block.__class__``. Make it once per ``cls`` (cache it): blocks sharing one class share one
    ``forward``, so ``torch.compile`` compiles it once for all of them. With ``copies_as_base`` a deep copy (or a
    pickle) of a block is an instance of ``cls`` itself, as torch's ``module.compile()`` leaves copies uncompiled.
    """
    namespace: dict[str, Any] = {"forward": forward, "__module__": cls.__module__}
    if copies_as_base:
        def __reduce_ex__(self, protocol):  # noqa: N807 (the copy and pickle protocol's name)
            rebuild, args, *rest = super(subclass, self).__reduce_ex__(protocol)
            return (rebuild, (cls, *args[1:]), *rest)

        namespace["__reduce_ex__"] = __reduce_ex__
    subclass = type(f"{prefix}{cls.__name__}", (cls,), namespace)
    return subclass
