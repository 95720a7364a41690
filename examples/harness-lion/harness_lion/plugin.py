"""Optimizer ``lion``: the harness plugin. Declaration at the top, hook implementations below.

Registered in setup.cfg as ``lion = harness_lion.plugin`` in the ``harness.plugins`` entry-point group. The
harness calls ``harness_build_optimizer`` only in trials whose optimizer is ``lion``, the technique this plugin
declares on the optimizer axis.
"""
from __future__ import annotations

from harness import hookimpl
from harness.space import Float, Technique

from harness_lion.optim import Lion

TECHNIQUE = Technique(
    axis="optimizer", name="lion",
    space={
        "lr": Float(1e-5, 1e-2, default=3e-4, log=True, help="learning rate (3-10x smaller than AdamW's)"),
        "beta1": Float(0.5, 0.99, default=0.9, help="interpolation factor of the update direction"),
        "beta2": Float(0.9, 0.9999, default=0.99, help="momentum decay"),
        "weight_decay": Float(0.0, 2.0, default=0.0, help="decoupled weight decay (3-10x larger than AdamW's)"),
    },
    description="Lion: sign of interpolated momentum (Chen et al. 2023); half of Adam's optimizer state",
)


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_build_optimizer(params, spec):
    p = spec.optimizer.params
    return Lion(params, lr=p["lr"], betas=(p["beta1"], p["beta2"]), weight_decay=p["weight_decay"])
