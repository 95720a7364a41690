"""Compile ``torch-compile``: ``torch.compile`` (TorchDynamo + Inductor), whose backward is compiled with the forward
by AOTAutograd. Compilation happens lazily on the first call, i.e. inside the runner's first step, so its cost
lands in ``compile_s`` and not in the timed throughput.

``scope`` says what is compiled:

- ``forward-loss``: the train step's forward pass and loss as one function (fuses e.g. a vocabulary-sized
  cross-entropy with the output layer; DDP's graphs are split at its gradient buckets by Dynamo itself);
- ``model``: the engine's model only (a wrapper such as DDP included);
- ``blocks``: the ``forward`` of each repeated block (:mod:`plugins._blocks`; of the whole model when it has
  none) compiled in place, plus the loss function. Module identity, parameter names and the hooks of sharding
  engines stay, outside the compiled graphs, and one graph serves every block of the same class and shape. This is
  the torchtitan recipe for FSDP and the way to compile under DeepSpeed (each block's backward is its own graph,
  so gradients are reduced block by block while the backward goes on). ``module.compile()`` is not used: it
  compiles the module's hooks too, and ZeRO-3's hooks then break the graphs and recompile per block.
- ``engine``: the parallelism engine compiles with its own compiler (``Engine.compile``): DeepSpeed's
  ``engine.compile()`` (its DeepCompile passes when ``deepspeed`` sets ``deepcompile: True``: ZeRO's gathers,
  releases and reductions become operations inside the compiled graph instead of module hooks); for the other
  engines the same as ``model``.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from harness import hookimpl
from harness.space import Categorical, Technique
from plugins._blocks import repeated_blocks, subclass_with_forward
from plugins._layout import apply_channels_last

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TECHNIQUE = Technique(
    axis="compile", name="torch-compile",
    space={"mode": Categorical(MODES, default="default", help="torch.compile mode"),
           "fullgraph": Categorical((False, True), default=False,
                                    help="fail instead of falling back to eager at graph breaks"),
           "dynamic": Categorical((False, True), default=False,
                                  help="compile for dynamic shapes (batches here have static shapes)"),
           "scope": Categorical(("forward-loss", "model", "blocks", "engine"), default="forward-loss",
                                help="what is compiled: forward pass + loss (fuses e.g. a vocabulary-sized "
                                     "cross-entropy), only the model (for wrapped parallel models), each "
                                     "repeated block in place plus the loss (for sharded models: fsdp, deepspeed), "
                                     "or the model by the engine's own compiler (deepspeed: engine.compile(), "
                                     "DeepCompile)"),
           "channels_last": Categorical((False, True), default=False,
                                        help="also run the model and image inputs channels-last")},
    description="torch.compile of forward + loss, the model, each repeated block or the engine's own way "
                "(backward via AOTAutograd)",
)


@functools.cache
def compiled_class(cls: type[nn.Module], mode: str | None, fullgraph: bool, dynamic: bool) -> type[nn.Module]:
    """``cls`` with its ``forward`` compiled (one class, hence one compilation, per block class and options); a deep
    copy of a compiled block (quantisation copies the trained model) is not compiled, as with ``module.compile()``."""
    forward = torch.compile(cls.forward, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    return subclass_with_forward(cls, "Compiled", forward, copies_as_base=True)


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_compile_step(step, spec):
    p = spec.compile.params
    if p["channels_last"]:
        apply_channels_last(step)
    options = {"mode": None if p["mode"] == "default" else p["mode"], "fullgraph": p["fullgraph"],
               "dynamic": p["dynamic"]}
    if p["scope"] == "engine":
        step.engine.compile(options)
    elif p["scope"] == "model":
        step.engine.model = torch.compile(step.engine.model, **options)
    elif p["scope"] == "blocks":
        for block in repeated_blocks(step.engine.module) or [step.engine.module]:
            block.__class__ = compiled_class(type(block), **options)
        step.loss = torch.compile(step.loss, **options)
    else:
        # An instance attribute shadows TrainStep.forward_loss; TrainStep.__call__ then runs the compiled one.
        step.forward_loss = torch.compile(step.forward_loss, **options)
    return step
