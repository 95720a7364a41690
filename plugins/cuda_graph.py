"""Compile ``cuda-graph``: capture the WHOLE train step -- forward, backward and optimizer step -- in one CUDA
graph and replay it for every batch, which removes the per-kernel launch cost of the host (what limits small
models such as seed-cnn at small batches).

How (PyTorch's whole-network capture recipe): on the first call, a few warm-up iterations run on a side
stream (cuDNN autotuning, lazy optimizer state), then one step is captured into static input/target buffers
with the optimizer switched to ``capturable`` (its step counters live on the device; a learning-rate schedule
writes into a device tensor after each replay). The warm-up must not change the training run, so the model's
parameters and buffers are restored afterwards and the optimizer state is zeroed again (torch's optimizers
start from zero state). Each later call copies the batch into the static buffers and replays the graph. The
runner times that first call as ``compile_s``. Targets may be class indices or soft targets
(:class:`harness.workload.SoftTargets`, a pytree): every tensor in them gets its static buffer.
"""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from harness import hookimpl
from harness.errors import TrialFailed
from harness.space import Categorical, Int, Requirements, Technique
from harness.workload import Targets
from plugins._layout import apply_channels_last

NAME = "cuda-graph"
TECHNIQUE = Technique(
    axis="compile", name=NAME,
    space={"warmup_iters": Int(1, 20, default=3, help="eager iterations on a side stream before capture"),
           "channels_last": Categorical((False, True), default=False,
                                        help="also run the model and image inputs channels-last")},
    requires=Requirements(cuda=True, max_devices=1),
    incompatible={
        "parallelism:ddp": "a captured CUDA graph replays one single-process step; DDP's gradient all-reduce "
                           "runs from the host between kernels",
        "parallelism:deepspeed": "a captured CUDA graph replays one single-process step; DeepSpeed's engine "
                                 "communicates and synchronises with the host inside its step",
        "parallelism:fsdp": "a captured CUDA graph replays one single-process step; FSDP's all-gathers and frees "
                            "are driven from the host between kernels",
        "precision:amp-fp16": "a captured CUDA graph cannot contain GradScaler's host-side overflow checks",
        "compression:prune": "a captured CUDA graph replays a fixed model; pruning changes its weights' masks "
                             "during training",
        "compression:quantize": "a captured CUDA graph replays a fixed model; quantisation-aware training "
                                "changes its observers during training",
    },
    description="whole train step (forward, backward, optimizer) captured in one CUDA graph",
)


class CapturedTrainStep:
    """``(inputs, targets) -> loss`` that replays a CUDA graph of the whole train step.

    Every batch must have the shape of the first one (the static buffers'); the returned loss is a copy.
    """

    def __init__(self, step, device: torch.device, warmup_iters: int):
        self.step, self.device, self.warmup_iters = step, device, warmup_iters
        self.engine = step.engine
        self.graph: torch.cuda.CUDAGraph | None = None

    # Mirrors TrainStep.__call__ minus zero_grad and the scheduler: inside the graph, backward *writes* the
    # gradients (they were None at capture), and the schedule is applied outside it.
    def _body(self, inputs: torch.Tensor, targets: Targets) -> torch.Tensor:
        n, engine = self.step.accumulation_steps, self.engine
        if n == 1:
            loss = self.step.forward_loss(inputs, targets)
            engine.backward(loss)
        else:
            loss = 0.0
            for x, y in zip(inputs.chunk(n), targets.chunk(n), strict=True):
                part = self.step.forward_loss(x, y) / n
                engine.backward(part)
                loss = loss + part.detach()
        engine.optimizer.step()
        return loss.detach()

    def _make_capturable(self) -> None:
        optimizer = self.engine.optimizer
        for group in optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
            if self.engine.scheduler is None:
                continue
            if "capturable" not in group and not group.get("fused"):
                raise TrialFailed("infeasible", f"compile {NAME!r}: a learning-rate schedule needs an optimizer "
                                                f"with a device-side learning rate (capturable or fused); "
                                                f"{type(optimizer).__name__} has neither: use a constant schedule")
            if not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.device)

    def _capture(self, inputs: torch.Tensor, targets: Targets) -> None:
        model, optimizer = self.engine.module, self.engine.optimizer
        self._make_capturable()
        self.static_inputs = inputs.clone()
        # None leaves (SoftTargets without a second label) stay None; tensors get static copies
        self.static_targets = pytree.tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, targets)
        self.static_target_leaves, self.static_target_spec = pytree.tree_flatten(self.static_targets)
        initial = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if torch.is_tensor(v)}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):
                optimizer.zero_grad(set_to_none=True)
                self._body(self.static_inputs, self.static_targets)
        torch.cuda.current_stream(self.device).wait_stream(side)
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self._body(self.static_inputs, self.static_targets)
        # Undo the warm-up in place (the graph holds these very tensors' addresses).
        with torch.no_grad():
            for key, value in model.state_dict(keep_vars=True).items():
                if key in initial:
                    value.detach().copy_(initial[key])
            for state in optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        value.zero_()

    def __call__(self, inputs: torch.Tensor, targets: Targets) -> torch.Tensor:
        if self.step.input_transform is not None:
            inputs = self.step.input_transform(inputs)
        if self.graph is None:
            self._capture(inputs, targets)
        leaves, spec = pytree.tree_flatten(targets)
        if inputs.shape != self.static_inputs.shape or spec != self.static_target_spec or any(
                getattr(a, "shape", a) != getattr(b, "shape", b)
                for a, b in zip(leaves, self.static_target_leaves, strict=True)):
            raise RuntimeError(f"{NAME}: batch shape {tuple(inputs.shape)} (or its targets' structure) differs from "
                               f"the captured {tuple(self.static_inputs.shape)} (CUDA graphs need static shapes)")
        self.static_inputs.copy_(inputs, non_blocking=True)
        for static, leaf in zip(self.static_target_leaves, leaves, strict=True):
            if torch.is_tensor(static):
                static.copy_(leaf, non_blocking=True)
        self.graph.replay()
        if self.engine.scheduler is not None:
            self.engine.scheduler.step()
        return self.static_loss.clone()


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_compile_step(step, spec, device):
    if spec.compile.params["channels_last"]:
        apply_channels_last(step)
    return CapturedTrainStep(step, device, spec.compile.params["warmup_iters"])
