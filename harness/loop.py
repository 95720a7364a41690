"""The timed training loop of a trial: the compiling first step (``compile_s``), warm-up (``warmup_s``), then
timing windows whose steady-state throughput is the trial's figure.

Nothing inside the timed region waits for the device: a window's start and end are device events (host clock
on the CPU) read one window later, and its last loss is copied to the host behind its work
(:class:`_LossSnapshot`). Hooks run only at window boundaries, never per step.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from harness import measure
from harness.errors import TrialFailed
from harness.failures import compile_failure

if TYPE_CHECKING:
    from harness.hooks import Hooks
    from harness.trial import Trial


def check_finite(loss: Any, step: int) -> None:
    """Fail the trial as ``diverged`` when the training loss is not a finite number."""
    value = float(loss)
    if not math.isfinite(value):
        raise TrialFailed("diverged", f"training loss is {value} at step {step}")


@dataclass
class _Pending:
    """A timed window whose end event has not been read yet."""

    start: Any
    end: Any
    steps: int
    loss: _LossSnapshot
    step: int


class TimedLoop:
    """Runs a set-up trial's training budget and records its timing metrics in ``trial.metrics``.

    ``emit`` sends an event to the trial's event stream (rank 0); window metrics go through
    ``harness_measure_window`` and then to ``harness_trial_window`` observers.
    """

    def __init__(self, trial: Trial, hooks: Hooks, emit: Callable[..., None]) -> None:
        self.trial = trial
        self.hooks = hooks
        self.emit = emit
        self.clock = measure.Clock(trial.device)
        #: (steps, seconds) of every closed timed window.
        self.windows: list[tuple[int, float]] = []

    def run(self) -> None:
        trial = self.trial
        trial.engine.train(True)
        self.emit("start", total_steps=trial.total_steps)
        compile_s, warmup_s = self._warm_up()
        loss = self._timed(compile_s, warmup_s)
        self._summarise(loss)

    # ------------------------------------------------------------------------------------------ warm-up
    def _warm_up(self) -> tuple[float, float]:
        """The first step compiles / captures (``compile_s``); the rest of the warm-up settles caches."""
        trial, clock = self.trial, self.clock
        budget, step_fn, batches = trial.spec.budget, trial.step_fn, trial.batches
        trial.phase = "compile"
        clock.sync()
        t0 = time.perf_counter()
        try:
            loss = step_fn(*next(batches))
            clock.sync()
        except Exception as exc:
            failure = compile_failure(exc, trial.spec.compile.name)
            if failure is not None:
                raise failure from exc
            raise
        compile_s = time.perf_counter() - t0
        trial.phase = "warmup"
        t1 = time.perf_counter()
        for _ in range(max(0, budget.warmup_steps - 1)):
            loss = step_fn(*next(batches))
        clock.sync()
        warmup_s = time.perf_counter() - t1
        trial.steps_done = max(1, budget.warmup_steps)
        check_finite(loss, trial.steps_done)
        trial.metrics.update(compile_s=compile_s, warmup_s=warmup_s)
        self._observe(trial.steps_done, {"train_loss": float(loss), "phase": "warmup", "lr": trial.engine.lr()})
        return compile_s, warmup_s

    # ------------------------------------------------------------------------------------------ timed windows
    def _timed(self, compile_s: float, warmup_s: float) -> Any:
        """Timed windows until the budget is spent. A window ends at a window boundary or an evaluation point;
        its end event is read one window later, so the host never waits on the device inside the timed region.
        Returns the last loss."""
        trial, clock = self.trial, self.clock
        budget, step_fn, batches = trial.spec.budget, trial.step_fn, trial.batches
        warm_per_step = warmup_s / max(1, budget.warmup_steps - 1) if budget.warmup_steps > 1 else compile_s
        timed_total: int | None
        if budget.seconds is not None:
            window_steps = max(1, int(budget.seconds / budget.windows / max(warm_per_step, 1e-6)))
            timed_total = None
        else:
            timed_total = max(1, trial.total_steps - trial.steps_done)
            window_steps = max(1, math.ceil(timed_total / budget.windows))
        pending: _Pending | None = None
        trial.phase = "timed"
        timed_done = 0
        report_every = max(1, (trial.total_steps or 1000) // 100)
        loss = None
        t_start_host = time.perf_counter()
        while True:
            n = window_steps if timed_total is None else min(window_steps, timed_total - timed_done)
            if budget.eval_every_steps:
                to_eval = budget.eval_every_steps - trial.steps_done % budget.eval_every_steps
                n = min(n, to_eval)
            if n <= 0:
                break
            start = clock.mark()
            for i in range(n):
                loss = step_fn(*next(batches))
                if (i + 1) % report_every == 0:
                    self.emit("progress", step=trial.steps_done + i + 1, total_steps=trial.total_steps)
            end = clock.mark()
            snap = _LossSnapshot(loss)
            trial.steps_done += n
            timed_done += n
            if pending is not None:
                self._close(pending)
            pending = _Pending(start, end, n, snap, trial.steps_done)
            if budget.eval_every_steps and trial.steps_done % budget.eval_every_steps == 0:
                self._close(pending)
                pending = None
                trial.train_seconds = sum(s for _, s in self.windows)
                trial.evaluate()
                trial.engine.train(True)
            if timed_total is not None and timed_done >= timed_total:
                break
            if budget.seconds is not None and time.perf_counter() - t_start_host >= budget.seconds:
                break
        if pending is not None:
            self._close(pending)
        clock.sync()
        return loss

    def _close(self, pending: _Pending) -> None:
        seconds = self.clock.elapsed(pending.start, pending.end)
        self.windows.append((pending.steps, seconds))
        loss = float(pending.loss)
        check_finite(loss, pending.step)
        metrics = {"train_loss": loss,
                   "throughput_samples_per_s": pending.steps * self.trial.spec.batch_size / seconds,
                   "lr": self.trial.engine.lr(), "phase": "timed"}
        self._observe(pending.step, metrics, event=True)

    def _observe(self, step: int, metrics: dict[str, Any], event: bool = False) -> None:
        """Add the plugins' window measurements (the core's own names win), then tell the observers."""
        trial = self.trial
        metrics = {**self.hooks.measure_window(trial=trial, step=step, phase=metrics["phase"]), **metrics}
        if event:
            self.emit("window", step=step, total_steps=trial.total_steps, metrics=metrics)
        self.hooks.trial_window(trial=trial, step=step, metrics=metrics)

    # ------------------------------------------------------------------------------------------ summary
    def _summarise(self, loss: Any) -> None:
        trial, per_step_samples = self.trial, self.trial.spec.batch_size
        stats = measure.WindowStats.from_windows(self.windows)
        trial.train_seconds = stats.seconds
        samples_per_s = stats.steps * per_step_samples / stats.seconds if stats.seconds > 0 else float("nan")
        trial.metrics.update(
            throughput_samples_per_s=samples_per_s,
            step_time_median_s=stats.step_time_median_s,
            step_time_cv=stats.step_time_cv,
            throughput_median_samples_per_s=per_step_samples / stats.step_time_median_s,
            timed_steps=stats.steps, timing_windows=len(self.windows), steps=trial.steps_done,
            train_time_s=stats.seconds, train_loss=float(loss),
        )
        if trial.workload.tokens_per_sample:
            trial.metrics["throughput_tokens_per_s"] = samples_per_s * trial.workload.tokens_per_sample
        peak = measure.peak_flops(trial.conditions.get("device_name", ""), trial.precision.compute_dtype)
        if trial.flops_per_sample and peak:
            trial.metrics["flops_per_sample"] = trial.flops_per_sample
            trial.metrics["mfu"] = samples_per_s * trial.flops_per_sample / (peak * trial.dist.world)


class _LossSnapshot:
    """A timing window's last loss, copied to pinned host memory behind the window's work without waiting.

    ``float(snapshot)`` is read one window later, when the copy has long completed. A plain ``float(loss)`` at a
    window boundary would wait for every step queued behind it, so each window would start with an empty device
    queue and pay the host's launch latency that the hand-written loop hides (about 1% on GPT-124M).
    """

    __slots__ = ("host", "event")

    def __init__(self, loss: Any) -> None:
        self.event: torch.cuda.Event | None = None
        self.host: Any
        if torch.is_tensor(loss) and loss.is_cuda:
            loss = loss.detach()
            self.host = torch.empty(loss.shape, dtype=loss.dtype, pin_memory=True)
            self.host.copy_(loss, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(loss.device))
        else:
            self.host = loss.detach().clone() if torch.is_tensor(loss) else loss

    def __float__(self) -> float:
        if self.event is not None:
            self.event.synchronize()
        return float(self.host)
