"""The parts a train step is assembled from: precision policy, parallelism engine and the step itself.

Plugins return these objects (or subclasses) from their hooks; the core calls only the methods defined here,
so the hot loop is the same few calls whatever the techniques.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from harness.workload import Targets


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a multi-process trial."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Precision:
    """How the trial computes: the autocast context to run forward passes under, an optional gradient scaler,
    and the dtype of the matrix work (for MFU: ``torch.float32``, ``"tf32"``, ``torch.bfloat16``,
    ``torch.float16`` or ``"fp8"``)."""

    compute_dtype: Any = torch.float32
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    scaler: Any = None
    #: the model when the precision converted it (fp8 layers); None keeps the model as it was.
    model: nn.Module | None = None
    #: for engines with their own mixed precision (DeepSpeed, FSDP): the parameter/reduction dtype wanted.
    param_dtype: torch.dtype | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def stats(self) -> dict[str, float]:
        """Numbers to report at the end (e.g. skipped steps of a dynamic loss scaler)."""
        return {k: v() if callable(v) else v for k, v in self.info.items()}


class Engine:
    """Single-process engine: plain backward and optimizer step. Parallelism plugins subclass it.

    ``model`` is what the forward pass calls (possibly wrapped); ``module`` the underlying model for
    evaluation and measurements. ``precision`` is the precision the train step and evaluation run under: an
    engine that casts by itself (DeepSpeed bf16/fp16, FSDP's mixed-precision policy) replaces the given one by a
    copy without autocast, so nothing is autocast twice. ``accumulation_steps`` splits each (per-rank) batch
    into that many micro-batches, the first ones run under :meth:`no_sync`.
    """

    accumulation_steps: int = 1

    def __init__(self, model: nn.Module, optimizer: Any, precision: Precision, scheduler: Any = None) -> None:
        self.model = model
        self.module = model
        self.optimizer = optimizer
        self.precision = precision
        self.scheduler = scheduler
        self.scaler = precision.scaler

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    @property
    def schedule_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer whose ``param_groups`` learning rates the schedule sets and :meth:`lr` reads.

        Engines that step a wrapper (DeepSpeed's ZeRO optimizer) return the torch optimizer inside it.
        """
        return self.optimizer

    def compile(self, options: dict[str, Any]) -> None:
        """Compile what the forward pass calls, the engine's own way (``torch-compile`` ``scope: engine``):
        ``torch.compile(model, **options)`` here; an engine with a compiler of its own overrides it (DeepSpeed's
        ``engine.compile()``, which runs DeepCompile when the technique asks for it)."""
        self.model = cast(nn.Module, torch.compile(self.model, **options))  # an OptimizedModule

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context for micro-batches whose gradients are accumulated without communication."""
        return contextlib.nullcontext()

    def lr(self) -> float:
        group = self.schedule_optimizer.param_groups[0]
        lr = group["lr"]
        return float(lr.item() if torch.is_tensor(lr) else lr)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def close(self) -> None:
        """Release resources (communication groups, hooks) at the end of the trial."""


class TrainStep:
    """One optimizer step on one batch: ``step(inputs, targets) -> loss`` (a detached scalar tensor).

    Nothing here synchronises with the device; the runner reads losses only at timing-window boundaries.
    ``input_transform`` (e.g. channels-last) is applied to inputs before the forward pass. ``targets`` are class
    indices or :class:`harness.workload.SoftTargets`; both split into micro-batches with ``.chunk``.
    """

    def __init__(self, engine: Engine, loss: Callable, precision: Precision, accumulation_steps: int = 1):
        self.engine = engine
        self.loss = loss
        self.precision = precision
        self.accumulation_steps = accumulation_steps
        self.input_transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward_loss(self, inputs: torch.Tensor, targets: Targets) -> torch.Tensor:
        with self.precision.autocast():
            return self.loss(self.engine.model(inputs), targets, inputs)

    def __call__(self, inputs: torch.Tensor, targets: Targets) -> torch.Tensor:
        if self.input_transform is not None:
            inputs = self.input_transform(inputs)
        engine, n = self.engine, self.accumulation_steps
        if n == 1:
            loss = self.forward_loss(inputs, targets)
            engine.backward(loss)
        else:
            losses = []
            parts: tuple[Targets, ...] = targets.chunk(n)
            for i, (x, y) in enumerate(zip(inputs.chunk(n), parts, strict=True)):
                ctx = engine.no_sync() if i < n - 1 else contextlib.nullcontext()
                with ctx:
                    loss = self.forward_loss(x, y) / n
                    engine.backward(loss)
                losses.append(loss.detach())
            loss = sum(losses[1:], losses[0])
        engine.step()
        return loss.detach()
