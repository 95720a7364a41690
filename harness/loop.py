"""The timed training loop of a trial: the compiling first step (``compile_s``), warm-up (``warmup_s``), then
timing windows whose steady-state throughput is the trial's figure, with its 95 % interval from the windows'
spread. A trial whose interval is wider than ``budget.noise_threshold`` is timed again once with as many windows
(:meth:`TimedLoop.remeasure`, after the trial's results are measured so the extra steps change none of them) and
is marked ``throughput_noisy`` when it still is.

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
from harness.outcomes import CI_REL_KEY

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
        #: steps per timing window (decided when the timed phase starts).
        self.window_steps = 1

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
        self.window_steps = window_steps
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

    def _close(self, pending: _Pending, event: bool = True) -> None:
        seconds = self.clock.elapsed(pending.start, pending.end)
        self.windows.append((pending.steps, seconds))
        loss = float(pending.loss)
        check_finite(loss, pending.step)
        metrics = {"train_loss": loss,
                   "throughput_samples_per_s": pending.steps * self.trial.spec.batch_size / seconds,
                   "lr": self.trial.engine.lr(), "phase": "timed"}
        self._observe(pending.step, metrics, event=event)

    # ------------------------------------------------------------------------------------------ noise
    def remeasure(self, allowed: bool = True) -> None:
        """Time the trial again when its throughput's 95 % interval is wider than ``budget.noise_threshold``
        (relative half-width): once, with as many windows as the budget's, pooled with the first ones; then set
        ``throughput_noisy`` (1: still too wide) and ``throughput_remeasured``.

        Called after the trial's results (held-out metrics, compression, model measurements) are taken, so the
        extra steps, which do train the model, change nothing reported but the timing. ``allowed`` is False when
        compression changed the model the train step runs (pruned, sparse weights), whose steps would then time
        something else: the trial is only marked. The extra windows send no window events (a pruner must not
        stop a trial that is measured), and a failure during them keeps the first measurement. Every rank takes
        the same decision (the widest interval of all ranks), since their steps communicate."""
        trial = self.trial
        threshold = trial.spec.budget.noise_threshold
        rel = self._widest(trial.metrics.get(CI_REL_KEY))
        if not threshold or rel is None:
            return
        remeasured = False
        if rel > threshold and allowed:
            phase, trial.phase = trial.phase, "timed"
            try:
                trial.engine.train(True)
                self._extra_windows(len(self.windows))
                remeasured = True
            except Exception:  # the trial's results stand; its timing is marked noisy below
                pass
            finally:
                trial.phase = phase
            self._timing_metrics()
            rel = self._widest(trial.metrics.get(CI_REL_KEY))
        trial.metrics["throughput_remeasured"] = int(remeasured)
        trial.metrics["throughput_noisy"] = int(rel is None or rel > threshold)

    def _extra_windows(self, count: int) -> None:
        """``count`` more timing windows of the same length (their ends read one window later, as in the budget's)."""
        trial, clock = self.trial, self.clock
        pending: _Pending | None = None
        loss: Any = None
        for _ in range(count):
            start = clock.mark()
            for _ in range(self.window_steps):
                loss = trial.step_fn(*next(trial.batches))
            end = clock.mark()
            snap = _LossSnapshot(loss)
            trial.steps_done += self.window_steps
            if pending is not None:
                self._close(pending, event=False)
            pending = _Pending(start, end, self.window_steps, snap, trial.steps_done)
        if pending is not None:
            self._close(pending, event=False)
        clock.sync()

    def _widest(self, value: Any) -> float | None:
        """The largest ``value`` over the trial's ranks (None: no interval on this rank)."""
        if self.trial.dist.world == 1:
            return None if value is None else float(value)
        import torch.distributed as dist

        t = torch.tensor([-1.0 if value is None else float(value)], device=self.trial.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return None if float(t) < 0 else float(t)

    def _observe(self, step: int, metrics: dict[str, Any], event: bool = False) -> None:
        """Add the plugins' window measurements (the core's own names win), then tell the observers."""
        trial = self.trial
        metrics = {**self.hooks.measure_window(trial=trial, step=step, phase=metrics["phase"]), **metrics}
        if event:
            self.emit("window", step=step, total_steps=trial.total_steps, metrics=metrics)
        self.hooks.trial_window(trial=trial, step=step, metrics=metrics)

    # ------------------------------------------------------------------------------------------ summary
    def _summarise(self, loss: Any) -> None:
        trial = self.trial
        trial.train_seconds = sum(s for _, s in self.windows)
        trial.metrics.update(steps=trial.steps_done, train_time_s=trial.train_seconds, train_loss=float(loss))
        self._timing_metrics()

    def _timing_metrics(self) -> None:
        """Throughput, its interval and spread, and MFU from the timing windows so far."""
        trial, per_step_samples = self.trial, self.trial.spec.batch_size
        stats = measure.WindowStats.from_windows(self.windows)
        samples_per_s = stats.steps * per_step_samples / stats.seconds if stats.seconds > 0 else float("nan")
        trial.metrics.update(
            throughput_samples_per_s=samples_per_s,
            step_time_median_s=stats.step_time_median_s,
            step_time_cv=stats.step_time_cv,
            throughput_median_samples_per_s=per_step_samples / stats.step_time_median_s,
            timed_steps=stats.steps, timing_windows=len(self.windows),
        )
        interval = measure.throughput_interval(self.windows, per_step_samples)
        if interval is not None:
            trial.metrics.update({"throughput_samples_per_s_ci_low": interval.low,
                                  "throughput_samples_per_s_ci_high": interval.high,
                                  CI_REL_KEY: interval.rel_half_width})
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

