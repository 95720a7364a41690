"""Compile ``torch-compile``: ``torch.compile`` (TorchDynamo + Inductor) of the forward pass and loss, whose
backward is compiled with it by AOTAutograd. Compilation happens lazily on the first call, i.e. inside the
runner's first step, so its cost lands in ``compile_s`` and not in the timed throughput."""
from __future__ import annotations

import torch

from harness import hookimpl
from harness.space import Categorical, Technique
from plugins._layout import apply_channels_last

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TECHNIQUE = Technique(
    axis="compile", name="torch-compile",
    space={"mode": Categorical(MODES, default="default", help="torch.compile mode"),
           "fullgraph": Categorical((False, True), default=False,
                                    help="fail instead of falling back to eager at graph breaks"),
           "dynamic": Categorical((False, True), default=False,
                                  help="compile for dynamic shapes (batches here have static shapes)"),
           "scope": Categorical(("forward-loss", "model"), default="forward-loss",
                                help="what is compiled: forward pass + loss (fuses e.g. a vocabulary-sized "
                                     "cross-entropy), or only the model (for wrapped parallel models)"),
           "channels_last": Categorical((False, True), default=False,
                                        help="also run the model and image inputs channels-last")},
    description="torch.compile of forward + loss (backward via AOTAutograd)",
)


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
    if p["scope"] == "model":
        step.engine.model = torch.compile(step.engine.model, **options)
    else:
        # An instance attribute shadows TrainStep.forward_loss; TrainStep.__call__ then runs the compiled one.
        step.forward_loss = torch.compile(step.forward_loss, **options)
    return step
