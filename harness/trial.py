"""Runs one trial: TrialSpec -> workload -> techniques (through the hooks, in the order of the lifecycle in
:mod:`harness.hookspecs`) -> timed training (:mod:`harness.loop`) -> held-out evaluation -> compression after
training -> measurements -> a :class:`TrialResult` (failures classified by :mod:`harness.failures`).

This runs inside the trial's own process (``python -m harness.worker``, or each rank under torchrun); the
study driver and ``harness run`` only ever see the result and the event stream.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harness import measure
from harness.config import TrialSpec, fill_defaults
from harness.errors import TrialFailed
from harness.failures import FailureClassifier, plugin_files
from harness.loop import TimedLoop
from harness.plugins import Registry, get_registry
from harness.space import Environment, infeasible_reason
from harness.step import DistInfo, Engine, Precision, TrainStep

if TYPE_CHECKING:
    from harness.hookspecs import LossFn
    from harness.workload import Targets, TrainBatch, Workload


@dataclass
class TrialResult:
    """What a trial produced: ``status`` is ``ok`` or a failure class; ``metrics`` are keyed by result key
    (:data:`harness.measure.CORE_METRICS` and what plugins add)."""

    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    conditions: dict[str, str] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "metrics": self.metrics, "message": self.message,
                "conditions": self.conditions, "spec": self.spec}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        return cls(**data)


def resolve_device(spec: TrialSpec, dist: DistInfo) -> torch.device:
    if spec.device == "cpu" or (spec.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TrialFailed("infeasible", "device: 'cuda' requested but CUDA is not available")
    device = torch.device("cuda", dist.local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def init_distributed(spec: TrialSpec) -> DistInfo:
    """Join the process group torchrun set up (WORLD_SIZE > 1); gloo on the CPU, nccl on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = spec.device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world=world, local_rank=local, backend=backend)


class Trial:
    """One running trial, as plugins receive it (``trial`` in trial hooks, ``trainer`` in
    ``harness_compress_after_training``).

    Read by plugins: ``spec`` (the :class:`TrialSpec`), ``device``, ``dist`` (:class:`DistInfo`), ``conditions``
    (device, driver, versions), ``phase`` (``setup``, ``compile``, ``warmup``, ``timed``, ``evaluate``,
    ``compress``), ``workload``, ``model`` (the engine's underlying model), ``optimizer``, ``engine``,
    ``precision``, ``train_step``, ``step_fn`` (the train step that runs, possibly compiled), ``batches`` (the
    training batches, through the data technique's transform), ``total_steps`` (planned; 0 for a seconds
    budget), ``steps_done``, ``train_seconds`` (timed training so far), ``metrics`` (the core's measurements so
    far). Methods: :meth:`train` (more untimed steps) and :meth:`evaluate`. The parts are None until
    :meth:`setup` built them.
    The trial does not expose the plugin manager or the registry.
    """

    def __init__(self, spec: TrialSpec, registry: Registry | None = None,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._registry = registry or get_registry()
        self._hooks = self._registry.hooks
        self._failures = FailureClassifier(plugin_files(self._registry))
        self._on_event = on_event
        self.spec = fill_defaults(spec, self._registry)
        self.phase = "setup"
        self.dist = DistInfo()
        self.device = torch.device("cpu")
        self.conditions: dict[str, str] = {}
        # None until setup() builds them; observers of a trial that failed in setup see None.
        self.workload: Workload = None  # type: ignore[assignment]
        self.model: torch.nn.Module = None  # type: ignore[assignment]
        self.optimizer: torch.optim.Optimizer = None  # type: ignore[assignment]
        self.engine: Engine = None  # type: ignore[assignment]
        self.precision: Precision = None  # type: ignore[assignment]
        self.train_step: TrainStep = None  # type: ignore[assignment]
        self.step_fn: Callable[..., Any] = None  # type: ignore[assignment]
        self.batches: Iterator[TrainBatch] = iter(())
        self.flops_per_sample: float | None = None
        self.metrics: dict[str, Any] = {}
        self.total_steps = 0
        self.steps_done = 0
        self.train_seconds = 0.0

    def _emit(self, event: str, **data: Any) -> None:
        if self._on_event is not None and self.dist.is_main:
            self._on_event({"event": event, **data})

    def _required(self, value: Any, hook: str, axis: str) -> Any:
        """``value``, or a plugin-error naming the plugin of ``axis`` when its technique hook returned None."""
        if value is None:
            name = getattr(self.spec, axis).name
            tech = self._registry.techniques.get((axis, name))
            raise TrialFailed("plugin-error", f"plugin {tech.plugin if tech else '?'!r}: no implementation of "
                                              f"{hook} returned a result for {axis} {name!r}")
        return value

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Build the workload and the techniques, in the lifecycle's order, up to a runnable ``step_fn``."""
        spec, hooks = self.spec, self._hooks
        self.dist = init_distributed(spec)
        self.device = device = resolve_device(spec, self.dist)
        if spec.batch_size % self.dist.world:
            raise TrialFailed("infeasible", f"batch_size: {spec.batch_size} is not divisible by the "
                                            f"{self.dist.world} processes")
        reason = self.infeasible()
        if reason:
            raise TrialFailed("infeasible", reason)
        torch.manual_seed(spec.seed)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        measure.reset_peak_memory(device)
        self.conditions = measure.conditions(device)
        if device.type == "cpu":
            self.conditions["cpu_threads"] = str(measure.fix_cpu_threads(self.dist.world))
        self._emit("phase", phase="setup")

        wl = self._registry.build_workload(spec, device)
        wl.train, wl.test = wl.train.to(device), wl.test.to(device)
        self.workload = wl
        model = wl.model.to(device)
        model = hooks.compress_before_training(model=model, workload=wl, spec=spec, device=device) or model
        model = model.to(device)
        model = hooks.reduce_memory(model=model, workload=wl, spec=spec, device=device) or model
        self.precision = self._required(hooks.setup_precision(model=model, spec=spec, device=device),
                                        "harness_setup_precision", "precision")
        model = self.precision.model or model
        # Counted before a parallelism engine shards the parameters (ZeRO-3 / FSDP would show a rank's share).
        self.metrics["parameter_count"] = sum(p.numel() for p in model.parameters())
        self.flops_per_sample = wl.flops_per_sample
        if self.flops_per_sample is None and device.type == "cuda" and self.dist.is_main:
            self.flops_per_sample = self._count_flops(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = self._required(hooks.build_optimizer(params=params, spec=spec, device=device),
                                        "harness_build_optimizer", "optimizer")
        self.total_steps = self.planned_steps()
        self.engine = self._required(hooks.build_engine(model=model, optimizer=self.optimizer,
                                                        precision=self.precision, spec=spec, device=device,
                                                        dist=self.dist), "harness_build_engine", "parallelism")
        # The schedule drives the optimizer the engine actually steps (DeepSpeed's, FSDP's rebuilt one).
        scheduler = hooks.build_lr_scheduler(optimizer=self.engine.schedule_optimizer, spec=spec,
                                             total_steps=self.total_steps)
        if scheduler is not None and self.engine.scheduler is None:
            self.engine.scheduler = scheduler
        # An engine with its own mixed precision (DeepSpeed, FSDP) hands back the precision the step runs under
        # (no autocast on top of its own casting); other engines keep the one they were given.
        self.precision = self.engine.precision
        self.model = self.engine.module
        loss = hooks.build_loss(model=self.model, workload=wl, spec=spec, device=device)
        transform = hooks.build_data_transform(workload=wl, spec=spec, device=device)
        self.train_step = TrainStep(self.engine, loss if loss is not None else _workload_loss(wl), self.precision,
                                    accumulation_steps=getattr(self.engine, "accumulation_steps", 1))
        self.step_fn = hooks.compile_step(step=self.train_step, spec=spec, device=device) or self.train_step
        self.batches = wl.train.train_batches(spec.batch_size, spec.seed, self.dist.rank, self.dist.world)
        if transform is not None:  # outside the (compiled, captured) step, which sees plain fixed-shape tensors
            self.batches = (transform(x, y) for x, y in self.batches)

    def _count_flops(self, model: torch.nn.Module) -> float | None:
        wl, n = self.workload, 2
        x, y = next(wl.train.train_batches(n, self.spec.seed))
        with self.precision.autocast():
            flops = measure.count_training_flops(model, x, y, lambda o, t, _i: wl.loss_of(o, t))
        return flops / n if flops else None

    def infeasible(self) -> str | None:
        """Why this trial cannot run here: a declared requirement or incompatibility, or the first reason a
        plugin taking part gives (``harness_check_combination``); None when it can."""
        env = Environment.detect()
        kinds = self._registry.workload_kinds(self.spec.workload)
        reason = infeasible_reason(self.spec, self._registry.techniques, env, kinds,
                                   self._registry.workload_params(self.spec.workload))
        return reason or self._hooks.check_combination(spec=self.spec, env=env, workload_kinds=kinds)

    def planned_steps(self) -> int:
        b, n = self.spec.budget, len(self.workload.train)
        if b.steps is not None:
            return b.steps
        if b.epochs is not None:
            return max(b.warmup_steps + b.windows, math.ceil(b.epochs * n / self.spec.batch_size))
        return 0  # a seconds budget: decided while running

    # ------------------------------------------------------------------------------------------ training
    def train(self, steps: int) -> None:
        """Run ``steps`` more optimizer steps untimed (fine-tuning after compression)."""
        self.engine.train(True)
        for _ in range(steps):
            x, y = next(self.batches)
            self.step_fn(x, y)
        measure.Clock(self.device).sync()

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Accuracy and mean loss on held-out data (sharded over ranks, then summed) of ``model`` (default: the
        trained model); observers see it through ``harness_trial_evaluated``."""
        wl, spec = self.workload, self.spec
        t0 = time.perf_counter()
        model = model if model is not None else getattr(self.engine, "eval_model", self.engine.module)
        model.eval()
        limit = spec.budget.eval_samples
        eval_bs = max(spec.batch_size // self.dist.world, 1)
        batches = wl.test.eval_batches(eval_bs, limit, self.dist.rank, self.dist.world)
        if self.dist.world > 1:  # every rank must run the same number of forwards (sharded engines)
            n = min(len(wl.test), limit or len(wl.test))
            batches = (b for b, _ in zip(batches, range(max(1, n // (eval_bs * self.dist.world))), strict=False))
        correct = torch.zeros((), device=self.device, dtype=torch.float64)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        count = torch.zeros((), device=self.device, dtype=torch.float64)
        for x, y in batches:
            if self.train_step.input_transform is not None:
                x = self.train_step.input_transform(x)
            with self.precision.autocast():
                out = model(x)
            out = out.float()
            loss_sum += wl.loss_of(out, y).double() * y.numel()
            correct += wl.correct(out, y).double()
            count += y.numel()
        if self.dist.world > 1:
            import torch.distributed as dist

            packed = torch.stack([correct, loss_sum, count])
            dist.all_reduce(packed)
            correct, loss_sum, count = packed
        metrics = {"accuracy": float(correct / count), "val_loss": float(loss_sum / count),
                   "eval_samples": int(count)}
        # float() above waited for the device: the evaluation's time is complete
        self.metrics["eval_s"] = self.metrics.get("eval_s", 0.0) + time.perf_counter() - t0
        self._emit("eval", step=self.steps_done, metrics=metrics, train_time_s=self.train_seconds)
        self._hooks.trial_evaluated(trial=self, step=self.steps_done, metrics=metrics)
        target = spec.tags.get("target_accuracy")
        if target is not None and "time_to_accuracy_s" not in self.metrics and metrics["accuracy"] >= target:
            self.metrics["time_to_accuracy_s"] = self.train_seconds
        return metrics

    # ------------------------------------------------------------------------------------------ whole trial
    def run(self) -> TrialResult:
        """Set up, train, evaluate, compress and measure; failures are classified and returned, not raised."""
        t0 = time.perf_counter()
        try:
            self.setup()
            self._hooks.trial_start(trial=self)
            loop = TimedLoop(self, self._hooks, self._emit)
            loop.run()
            self.phase = "evaluate"
            self.metrics.update(self.evaluate())
            self.phase = "compress"
            changed = self._compress_and_measure()
            loop.remeasure(allowed=not changed)
            status, message = "ok", ""
        except Exception as exc:
            status, message = self._failures.classify(exc, self.phase)
        finally:
            self.metrics["wall_s"] = time.perf_counter() - t0
        if self.dist.is_main:
            status, message = self._measure_trial(status, message)
        result = TrialResult(status, self.metrics, message, self.conditions, self.spec.to_dict())
        if self.dist.is_main:
            self._hooks.trial_end(trial=self, result=result)
        if self.engine is not None:
            self.engine.close()
        return result

    def _compress_and_measure(self) -> bool:
        """Compress after training (re-evaluating the compressed model) and take the model's and the precision's
        measurements. True when compression changed the model the train step runs (its parameters replaced or
        turned into another kind of tensor, as pruning and 2:4 sparsity do; a quantised copy changes nothing)."""
        before = [(p, type(p.data)) for p in self.engine.module.parameters()]
        compressed = self._hooks.compress_after_training(model=self.engine.module, trainer=self,
                                                         workload=self.workload, spec=self.spec, device=self.device)
        final_model = self.engine.module
        if compressed is not None:
            self.metrics["accuracy_uncompressed"] = self.metrics["accuracy"]
            self.metrics["val_loss_uncompressed"] = self.metrics["val_loss"]
            final_model = compressed
            self.metrics.update(self.evaluate(model=compressed))
        if self.dist.is_main:
            self.metrics.update(self._hooks.measure_model(model=final_model, workload=self.workload,
                                                          spec=self.spec, device=self.device))
        self.metrics.update(self.precision.stats())
        self.metrics["peak_memory_bytes"] = measure.peak_memory_bytes(self.device)
        after = [(p, type(p.data)) for p in self.engine.module.parameters()]
        return len(before) != len(after) or any(a is not b or ta is not tb for (a, ta), (b, tb) in zip(
            before, after, strict=True))

    def _measure_trial(self, status: str, message: str) -> tuple[str, str]:
        """Add the plugins' whole-trial measurements; a plugin failing there fails a trial that was ok."""
        phase, self.phase = self.phase, "measure"
        try:
            self.metrics.update(self._hooks.measure_trial(trial=self, status=status))
        except Exception as exc:
            if status == "ok":
                return self._failures.classify(exc, self.phase)
        finally:
            self.phase = phase
        return status, message


def _workload_loss(workload: Workload) -> LossFn:
    """The workload's own training loss, in the shape of a technique's ``loss(outputs, targets, inputs)``."""
    def loss(outputs: torch.Tensor, targets: Targets, _inputs: torch.Tensor) -> torch.Tensor:
        return workload.loss_of(outputs, targets)

    return loss


def run_trial(spec: TrialSpec | dict[str, Any], registry: Registry | None = None,
              on_event: Callable[[dict[str, Any]], None] | None = None) -> TrialResult:
    """Run one trial in this process and return its result (failures are returned, not raised)."""
    if not isinstance(spec, TrialSpec):
        spec = TrialSpec.from_dict(spec)
    return Trial(spec, registry, on_event).run()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)
