"""Test-only plugin (loaded with ``HARNESS_PLUGINS=failing_plugin``): techniques that fail on purpose, so the
study driver's failure classes can be checked with real trial processes.

- compression ``fault`` with ``mode``: ``ok`` (does nothing), ``raise`` (a plugin bug), ``oom``
  (``torch.OutOfMemoryError``), ``nan`` (the model's outputs become NaN), ``hang`` (sleeps forever),
  ``sigkill`` (the trial process kills itself with SIGKILL).
- compile ``needs-cuda``: declares ``Requirements(cuda=True)``; on a CPU machine it is infeasible and must
  never be launched (it would write ``launched-needs-cuda`` into the working directory if it were).
- compile ``shuns-fault``: runs eagerly but declares itself incompatible with compression ``fault``, so those
  combinations are ruled out before launch.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
from torch import nn

from harness import hookimpl
from harness.space import Categorical, Requirements, Technique

MODES = ("ok", "raise", "oom", "nan", "hang", "sigkill")


@hookimpl
def harness_declare_techniques():
    return [
        Technique(axis="compression", name="fault", space={"mode": Categorical(MODES, default="ok")},
                  description="test-only: fails in the chosen way"),
        Technique(axis="compile", name="needs-cuda", requires=Requirements(cuda=True),
                  description="test-only: needs CUDA, so infeasible on a CPU"),
        Technique(axis="compile", name="shuns-fault", incompatible={"compression:fault": "test-only rule"},
                  description="test-only: eager, but declared incompatible with compression fault"),
    ]


class _NaNOutputs(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) * float("nan")


@hookimpl
def harness_compress_before_training(model, spec):
    mode = spec.compression.params["mode"]
    if mode == "raise":
        raise RuntimeError("injected plugin bug")
    if mode == "oom":
        raise torch.OutOfMemoryError("injected: CUDA out of memory. Tried to allocate 80.00 GiB")
    if mode == "hang":
        time.sleep(3600)
    if mode == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "nan":
        return _NaNOutputs(model)
    return None


@hookimpl
def harness_compile_step(step, spec):
    if spec.compile.name == "needs-cuda":
        Path("launched-needs-cuda").write_text("this trial should never have been launched\n")
    return step
