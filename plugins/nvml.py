"""Observer ``nvml``: GPU telemetry of a trial from NVML (utilisation, memory, power, SM clock, temperature) and
the energy of its timed windows, read from NVML's cumulative energy counter -> ``energy_j`` and the
``energy_per_sample`` objective (``energy_per_sample_j``).

How it measures:

- rank 0 of a trial watches every GPU the trial's processes on its host use (CUDA device index -> NVML device,
  matched by UUID, so ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER`` are honoured);
- a sampling thread reads the gauges every ``HARNESS_NVML_INTERVAL_S`` seconds (default 0.1), and one sample
  is taken at every timing-window boundary so even a short window has one;
- the energy counter is read at the boundaries of the timed region only: after the warm-up window (the device
  is synchronised there) and at the end of each timed window (whose end the runner has waited for);
  intermediate evaluations inside the timed region are subtracted, so energy and samples cover training only;
- per window, ``harness_measure_window`` returns the window's gauges (the core adds them to the metrics every
  ``harness_trial_window`` observer sees, so trackers log them per step); ``harness_measure_trial`` returns the
  timed region's summary and energy, which join the trial's result metrics, and records ``energy_source`` in
  the trial's conditions. ``energy_per_sample`` is a declared metric: a study can minimise it while this plugin
  is loaded.

``HARNESS_NVML_DEVICES=0,1`` (NVML indices or UUIDs) watches those GPUs instead of the mapped ones, whatever
the trial's device. Without NVML, or on a trial that uses no GPU, the plugin says once per process that
telemetry is unavailable and the trial runs on without it. Disable with ``--disable nvml`` or
``HARNESS_DISABLE_PLUGINS=nvml``.
"""
from __future__ import annotations

import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from harness import hookimpl
from harness.errors import SpecError
from harness.measure import Metric

if TYPE_CHECKING:
    from harness.trial import Trial

NAME = "nvml"
INTERVAL_ENV = "HARNESS_NVML_INTERVAL_S"
DEVICES_ENV = "HARNESS_NVML_DEVICES"
DEFAULT_INTERVAL_S = 0.1

log = logging.getLogger("harness.nvml")
_said: set[str] = set()  # "telemetry unavailable" is said once per process, whatever the registry


# ============================================================================================ configuration
def interval_s() -> float:
    """The sampling interval from ``HARNESS_NVML_INTERVAL_S`` (seconds > 0)."""
    text = os.environ.get(INTERVAL_ENV, "").strip()
    if not text:
        return DEFAULT_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise SpecError(f"{INTERVAL_ENV}: {text!r} is not allowed (a number of seconds > 0, e.g. 0.1)")
    return value


def say_unavailable(reason: str) -> None:
    """Log once per process that telemetry is unavailable, and why."""
    if _said:
        return
    _said.add(reason)
    log.warning("harness nvml: GPU telemetry unavailable (%s); trials run without power and energy metrics",
                reason)


def nvml_index_for_cuda(cuda_index: int, visible: str | None, cuda_uuid: str | None,
                        nvml_uuids: Sequence[str]) -> int | None:
    """The NVML index of CUDA device ``cuda_index``.

    Matched by UUID when torch reports one (exact whatever ``CUDA_DEVICE_ORDER``); otherwise through
    ``CUDA_VISIBLE_DEVICES`` (``visible``: indices, or full or abbreviated ``GPU-`` UUIDs), assuming the PCI
    bus order NVML uses. None when the device cannot be found (a MIG instance, a bad entry).
    """
    if cuda_uuid:
        want = cuda_uuid.lower().removeprefix("gpu-")
        for i, u in enumerate(nvml_uuids):
            if u.lower().removeprefix("gpu-") == want:
                return i
    if visible is None or not visible.strip():
        return cuda_index if cuda_index < len(nvml_uuids) else None
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if cuda_index >= len(entries):
        return None
    entry = entries[cuda_index]
    if entry.isdigit():
        idx = int(entry)
        return idx if idx < len(nvml_uuids) else None
    if entry.lower().startswith("gpu-"):
        matches = [i for i, u in enumerate(nvml_uuids) if u.lower().startswith(entry.lower())]
        return matches[0] if len(matches) == 1 else None
    return None  # MIG-... and anything else: NVML's device-level counters do not describe a MIG slice


# ============================================================================================ sampling
@dataclass
class Sample:
    """One reading of all watched GPUs: power summed over them, utilisation and clock averaged, memory and
    temperature at their maximum."""

    t: float
    power_w: float
    util_pct: float
    sm_clock_mhz: float
    temperature_c: float
    memory_used_bytes: float


def summarize(samples: Sequence[Sample]) -> dict[str, float]:
    """The summary metrics of ``samples`` (empty dict without samples)."""
    if not samples:
        return {}
    return {
        "gpu_util_mean_pct": statistics.fmean(s.util_pct for s in samples),
        "gpu_util_max_pct": max(s.util_pct for s in samples),
        "gpu_power_mean_w": statistics.fmean(s.power_w for s in samples),
        "gpu_power_max_w": max(s.power_w for s in samples),
        "gpu_sm_clock_mean_mhz": statistics.fmean(s.sm_clock_mhz for s in samples),
        "gpu_temperature_max_c": max(s.temperature_c for s in samples),
        "gpu_memory_used_max_bytes": max(s.memory_used_bytes for s in samples),
        "nvml_samples": len(samples),
    }


def window_metrics(samples: Sequence[Sample]) -> dict[str, float]:
    """Per-window gauges for ``harness_trial_window`` metrics (logged per step by trackers)."""
    if not samples:
        return {}
    return {
        "gpu_util_pct": statistics.fmean(s.util_pct for s in samples),
        "gpu_power_w": statistics.fmean(s.power_w for s in samples),
        "gpu_sm_clock_mhz": statistics.fmean(s.sm_clock_mhz for s in samples),
        "gpu_temperature_c": max(s.temperature_c for s in samples),
        "gpu_memory_used_bytes": max(s.memory_used_bytes for s in samples),
    }


def integrate_power_j(samples: Sequence[Sample]) -> float:
    """Energy by the trapezoidal rule over the samples' power (when the GPU has no energy counter)."""
    return sum((b.t - a.t) * (a.power_w + b.power_w) / 2 for a, b in pairwise(samples))


@dataclass
class Telemetry:
    """One trial's NVML session: the watched devices, the sampling thread and the timed-region bookkeeping."""

    nvml: Any
    handles: list
    interval_s: float
    samples: list[Sample] = field(default_factory=list)
    energy_counter: bool = True
    timed_start_s: float | None = None
    timed_end_s: float | None = None
    timed_start_step: int = 0
    timed_end_step: int = 0
    energy_start_mj: float | None = None
    energy_last_mj: float | None = None
    excluded_mj: float = 0.0
    #: host-time intervals inside the timed region that are not training (intermediate evaluations).
    excluded: list[tuple[float, float]] = field(default_factory=list)
    window_start_s: float = 0.0

    def __post_init__(self):
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="harness-nvml", daemon=True)

    # -------------------------------------------------------------------------------------- readings
    def read(self) -> Sample:
        n = self.nvml
        power = util = clock = 0.0
        temp = mem = 0.0
        for h in self.handles:
            power += n.nvmlDeviceGetPowerUsage(h) / 1e3  # mW
            util += n.nvmlDeviceGetUtilizationRates(h).gpu
            clock += n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)
            temp = max(temp, n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU))
            mem = max(mem, n.nvmlDeviceGetMemoryInfo(h).used)
        k = len(self.handles)
        return Sample(time.monotonic(), power, util / k, clock / k, float(temp), float(mem))

    def sample(self) -> Sample | None:
        try:
            s = self.read()
        except Exception as exc:  # a GPU fallen off the bus must not take the trial with it
            log.warning("harness nvml: reading the GPU failed (%s: %s); sampling stops", type(exc).__name__, exc)
            self.stop_event.set()
            return None
        with self.lock:
            self.samples.append(s)
        return s

    def energy_mj(self) -> float | None:
        """The watched GPUs' cumulative energy counter (mJ), or None where the GPU has none."""
        if not self.energy_counter:
            return None
        try:
            return float(sum(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles))
        except self.nvml.NVMLError:
            self.energy_counter = False  # pre-Volta GPUs: energy is then integrated from the power samples
            return None

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            self.sample()

    def start(self) -> None:
        self.window_start_s = time.monotonic()
        self.sample()
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(timeout=5)

    def between(self, t0: float, t1: float) -> list[Sample]:
        with self.lock:
            return [s for s in self.samples if t0 < s.t <= t1]

    def timed_samples(self) -> list[Sample]:
        if self.timed_start_s is None or self.timed_end_s is None:
            return []
        return [s for s in self.between(self.timed_start_s, self.timed_end_s)
                if not any(a < s.t <= b for a, b in self.excluded)]

    # -------------------------------------------------------------------------------------- trial events
    def on_window(self, step: int, phase: str) -> dict[str, float]:
        """A window ended: sample, read the energy counter; returns the window's gauges."""
        self.sample()
        now = time.monotonic()
        gauges = window_metrics(self.between(self.window_start_s, now))
        self.window_start_s = now
        if phase == "warmup":  # the device was synchronised just before: the timed region starts here
            self.timed_start_s, self.timed_start_step = now, step
            self.energy_start_mj = self.energy_last_mj = self.energy_mj()
        elif self.timed_start_s is not None:
            self.timed_end_s, self.timed_end_step = now, step
            self.energy_last_mj = self.energy_mj()
        return gauges

    def on_evaluated(self) -> None:
        """An evaluation inside the timed region finished: leave it out of energy and samples."""
        if self.timed_start_s is None:
            return
        now = time.monotonic()
        self.excluded.append((self.window_start_s, now))
        energy = self.energy_mj()
        if energy is not None and self.energy_last_mj is not None:
            self.excluded_mj += energy - self.energy_last_mj
        self.window_start_s = now

    def result_metrics(self, samples_per_step: int, timed_steps: int | None) -> tuple[dict[str, float], str]:
        """Summary and energy of the timed region, for the trial's result, and where the energy came from
        (``nvml-energy-counter``, ``power-integral`` or ``""`` when not measured)."""
        samples = self.timed_samples()
        out: dict[str, float] = summarize(samples)
        if self.timed_end_s is None:
            return out, ""
        energy_j, source = None, ""
        if self.energy_start_mj is not None and self.energy_last_mj is not None:
            energy_j = (self.energy_last_mj - self.energy_start_mj - self.excluded_mj) / 1e3
            source = "nvml-energy-counter"
        elif len(samples) > 1:
            energy_j, source = integrate_power_j(samples), "power-integral"
        steps = timed_steps if timed_steps else self.timed_end_step - self.timed_start_step
        if energy_j is not None:
            out["energy_j"] = energy_j
            if steps > 0:
                out["energy_per_sample_j"] = energy_j / (steps * samples_per_step)
        out["nvml_gpus"] = len(self.handles)
        return out, source


# ============================================================================================ opening NVML
def _import_nvml():
    try:
        import pynvml
    except ImportError:
        return None, "the nvidia-ml-py package (module pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver / no library / no permission: all mean "no telemetry"
        return None, f"NVML did not initialise: {type(exc).__name__}: {exc}"
    return pynvml, ""


def _uuid(nvml, handle) -> str:
    u = nvml.nvmlDeviceGetUUID(handle)
    return u.decode() if isinstance(u, bytes) else str(u)


def _cuda_indices(trial) -> list[int]:
    """The CUDA devices of this host the trial's processes use (rank 0 watches them all)."""
    import torch

    count = torch.cuda.device_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", trial.dist.world))
    return sorted({r % count for r in range(max(1, local_world))}) if count else []


def _cuda_uuid(index: int) -> str | None:
    import torch

    try:
        return str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # an older torch without .uuid: fall back to CUDA_VISIBLE_DEVICES
        return None


def open_devices(nvml, trial) -> tuple[list, str]:
    """NVML handles of the trial's GPUs, or ([], reason)."""
    count = nvml.nvmlDeviceGetCount()
    all_handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    uuids = [_uuid(nvml, h) for h in all_handles]
    override = os.environ.get(DEVICES_ENV, "").strip()
    if override:
        chosen = []
        for entry in (e.strip() for e in override.split(",") if e.strip()):
            idx = int(entry) if entry.isdigit() else nvml_index_for_cuda(0, entry, None, uuids)
            if idx is None or idx >= count:
                raise SpecError(f"{DEVICES_ENV}: {entry!r} is not an NVML device (have {count}: indices "
                                f"0..{count - 1} or UUIDs {', '.join(uuids)})")
            chosen.append(idx)
        return [all_handles[i] for i in dict.fromkeys(chosen)], ""
    if getattr(trial.device, "type", "cpu") != "cuda":
        return [], "the trial runs on the CPU"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    chosen = []
    for cuda_index in _cuda_indices(trial):
        idx = nvml_index_for_cuda(cuda_index, visible, _cuda_uuid(cuda_index), uuids)
        if idx is None:
            return [], f"CUDA device {cuda_index} (CUDA_VISIBLE_DEVICES={visible!r}) has no NVML device"
        chosen.append(idx)
    return [all_handles[i] for i in dict.fromkeys(chosen)], ""


# ============================================================================================ the plugin
class NvmlTelemetry:
    """The ``nvml`` plugin. The registry makes one instance per process; it holds the NVML session of the trial
    this process runs (rank 0, one trial at a time), opened at trial start and closed when its metrics are
    measured."""

    def __init__(self) -> None:
        self._session: Telemetry | None = None

    @hookimpl
    def harness_declare_metrics(self) -> list[Metric]:
        return [Metric("energy_per_sample", "energy_per_sample_j", "J", "minimize",
                       help="GPU energy per training sample over the timed windows (NVML energy counter)")]

    @hookimpl
    def harness_study_start(self) -> None:
        interval_s()  # a bad HARNESS_NVML_INTERVAL_S is the user's to fix before any trial runs

    @hookimpl
    def harness_trial_start(self, trial: Trial) -> None:
        self._close()  # a session a failed trial left open
        if trial.dist.is_main:
            self._session = open_session(trial)

    @hookimpl
    def harness_measure_window(self, step: int, phase: str) -> dict[str, float] | None:
        return self._session.on_window(step, phase) if self._session is not None else None

    @hookimpl
    def harness_trial_evaluated(self, trial: Trial) -> None:
        if self._session is not None and getattr(trial, "phase", None) == "timed":
            self._session.on_evaluated()

    @hookimpl
    def harness_measure_trial(self, trial: Trial) -> dict[str, float] | None:
        session = self._session
        if session is None:
            return None
        session.stop()
        try:
            metrics, source = session.result_metrics(trial.spec.batch_size, trial.metrics.get("timed_steps"))
        finally:
            self._close()
        if source:
            # how the energy was measured is a condition of the figure (like the device), not a metric
            trial.conditions["energy_source"] = source
        return metrics

    @hookimpl
    def harness_trial_end(self) -> None:
        self._close()  # measure_trial closes it; this covers a trial whose measurements never ran

    def _close(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        session.stop()
        try:
            session.nvml.nvmlShutdown()
        except Exception:  # shutting down is best effort: the process ends soon anyway
            pass


def open_session(trial: Trial) -> Telemetry | None:
    """Start sampling the trial's GPUs, or say (once per process) why there is no telemetry and return None."""
    interval = interval_s()
    nvml, reason = _import_nvml()
    if nvml is None:
        say_unavailable(reason)
        return None
    try:
        handles, reason = open_devices(nvml, trial)
    except Exception:
        nvml.nvmlShutdown()
        raise
    if not handles:
        nvml.nvmlShutdown()
        say_unavailable(reason)
        return None
    session = Telemetry(nvml, handles, interval)
    session.start()
    return session
