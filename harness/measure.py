"""Honest measurements: device-synchronised timing windows, steady-state throughput, spread, memory and MFU.

Timing never adds a synchronisation inside a window: a window's start and end are marked with CUDA events
(``time.perf_counter`` on the CPU) and read one window later, when the device has long passed them.
"""
from __future__ import annotations

import datetime
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from harness.outcomes import t_quantile_975

#: Dense peak FLOP/s by device name fragment and compute dtype (vendor datasheets, no sparsity).
#: SXM parts; PCIe parts separately.
DEVICE_PEAK_FLOPS = {
    "H100 PCIe": {"bf16": 756.0e12, "fp16": 756.0e12, "fp8": 1513.0e12, "tf32": 378.0e12, "fp32": 51.2e12},
    "H100": {"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "A100": {"bf16": 312.0e12, "fp16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
}

@dataclass(frozen=True)
class Metric:
    """A metric a study file can name as an objective or constraint: its study-file ``name``, the ``key`` it has
    in a trial's result, its ``unit`` and which ``direction`` is better (``maximize`` / ``minimize``)."""

    name: str
    key: str
    unit: str
    direction: str
    help: str = ""
    #: filled in by the plugin manager: the plugin that declared it ("" for the core's own).
    plugin: str = ""


#: The metrics the core itself measures; plugins declare more (``harness_declare_metrics``).
CORE_METRICS = (
    Metric("throughput", "throughput_samples_per_s", "samples/s", "maximize", "steady-state training throughput"),
    Metric("tokens_per_s", "throughput_tokens_per_s", "tokens/s", "maximize", "throughput in tokens (sequence models)"),
    Metric("accuracy", "accuracy", "fraction", "maximize", "held-out accuracy"),
    Metric("val_loss", "val_loss", "nats", "minimize", "held-out loss"),
    Metric("peak_memory", "peak_memory_bytes", "bytes", "minimize", "peak device memory"),
    Metric("time_to_accuracy", "time_to_accuracy_s", "s", "minimize", "training time to the target accuracy"),
    Metric("mfu", "mfu", "fraction", "maximize", "model FLOP utilisation of the device's dense peak"),
)


def dtype_key(compute_dtype: Any) -> str:
    if compute_dtype in ("tf32", "fp8"):
        return compute_dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype, "fp32")


def peak_flops(device_name: str, compute_dtype: Any) -> float | None:
    """The device's dense peak for the dtype in use, or None for a device not in the table (and for CPUs)."""
    for fragment, table in DEVICE_PEAK_FLOPS.items():
        if fragment in device_name:
            return table.get(dtype_key(compute_dtype))
    return None


def conditions(device: torch.device) -> dict[str, str]:
    """The conditions every figure carries: device, driver, torch/CUDA versions, host, date."""
    out = {"torch": torch.__version__, "cuda": str(torch.version.cuda or "none"), "host": platform.node(),
           "python": platform.python_version(), "date": datetime.date.today().isoformat()}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        out["device_count"] = str(torch.cuda.device_count())
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            out["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        except Exception:  # NVML missing or unusable: the driver is simply not recorded
            out["driver"] = "unknown"
    else:
        out["device_name"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return out


#: the environment variable that sets a CPU trial's thread count (default: see :func:`fix_cpu_threads`).
CPU_THREADS_ENV = "HARNESS_CPU_THREADS"


def fix_cpu_threads(processes: int = 1) -> int:
    """Fix this process's intra-op thread count for a CPU trial and return it: ``$HARNESS_CPU_THREADS`` when set,
    else the cores this process may run on (its CPU affinity) less one, shared by the trial's ``processes``.

    The core left free runs the study driver, the OS and whatever else shares the machine: a trial whose threads
    fill every core waits at each parallel region for a thread that was descheduled, so its step times scatter
    (on 2 cores, docs/benchmarks.md "Repeatability": CV 14 % across runs with 2 threads, 4.6-12 % with 1)."""
    given = os.environ.get(CPU_THREADS_ENV, "").strip()
    if given.isdigit() and int(given) > 0:
        threads = int(given)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, (cores - 1) // max(1, processes))
    torch.set_num_threads(threads)
    return threads


class Clock:
    """Marks points in the device's timeline; ``elapsed(a, b)`` in seconds once both have passed."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        """A CUDA event recorded on the current stream, or the host clock on the CPU."""
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed(self, start: Any, end: Any) -> float:
        if self.cuda:
            end.synchronize()
            return float(start.elapsed_time(end)) / 1e3
        return float(end - start)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class WindowStats:
    """Steady-state timing over the timed windows."""

    steps: int
    seconds: float
    step_time_median_s: float
    step_time_cv: float
    window_step_times_s: list[float]

    @classmethod
    def from_windows(cls, windows: list[tuple[int, float]]) -> WindowStats:
        per_step = [s / n for n, s in windows if n > 0]
        steps = sum(n for n, _ in windows)
        seconds = sum(s for _, s in windows)
        median = statistics.median(per_step) if per_step else float("nan")
        cv = (statistics.pstdev(per_step) / statistics.mean(per_step)) if len(per_step) > 1 else 0.0
        return cls(steps, seconds, median, cv, per_step)


@dataclass(frozen=True)
class ThroughputInterval:
    """A 95 % confidence interval of a trial's steady-state throughput (samples/s), from its timing windows."""

    low: float
    high: float
    #: the half-width relative to the mean step time: about the interval's relative half-width in throughput.
    rel_half_width: float


def throughput_interval(windows: list[tuple[int, float]], samples_per_step: float) -> ThroughputInterval | None:
    """The 95 % interval of the throughput from ``(steps, seconds)`` windows; None with fewer than two windows.

    Each window gives one mean step time; Student's t interval of their mean (``k - 1`` degrees of freedom) is
    turned into throughput as ``samples_per_step / step_time``. The centre is the reported throughput (all timed
    samples over all timed seconds), so the interval is about the figure the trial reports. A mean rather than
    a median: every timed step counts in the reported throughput, and a window slowed by a neighbour widens the
    interval (and so marks the trial noisy) instead of being hidden."""
    per_step = [s / n for n, s in windows if n > 0]
    steps, seconds = sum(n for n, _ in windows), sum(s for _, s in windows)
    if len(per_step) < 2 or steps <= 0 or seconds <= 0:
        return None
    mean_step = seconds / steps
    half = t_quantile_975(len(per_step) - 1) * statistics.stdev(per_step) / len(per_step) ** 0.5
    high = samples_per_step / (mean_step - half) if mean_step > half else float("inf")
    return ThroughputInterval(samples_per_step / (mean_step + half), high, half / mean_step)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA; on the CPU the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def count_training_flops(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                         loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> float | None:
    """FLOPs of one forward + backward on ``inputs``, counted by torch's FLOP counter (None when it fails)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with counter:
            loss = loss_fn(model(inputs), targets, inputs)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())
    except Exception:  # an exotic op the counter cannot see through: MFU is then not reported
        model.zero_grad(set_to_none=True)
        return None
