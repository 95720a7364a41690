"""The ``nvml`` telemetry plugin: energy over the timed window, sample aggregation, per-window gauges, GPU
mapping, the "telemetry unavailable" path, its declared ``energy_per_sample`` metric and its per-registry state,
driven on the CPU by a recorded fake of NVML (tests/nvml_fake.py) and, on a GPU machine, by the real NVML."""
from __future__ import annotations

import logging
import math
import statistics
from types import SimpleNamespace

import pytest
from nvml_fake import RECORDED, FakeNVML

from harness import hookimpl
from harness.config import Budget, TrialSpec
from harness.errors import SpecError
from harness.plugins import get_registry
from harness.step import DistInfo
from harness.testing import make_spec
from harness.trial import run_trial
from plugins import nvml as nvml_plugin

ENERGY = "nvmlDeviceGetTotalEnergyConsumption"
POWER = "nvmlDeviceGetPowerUsage"


class Spy:
    """Records what observers see: the window metrics with the gauges nvml's ``harness_measure_window`` returned
    (merged by the core before any ``harness_trial_window``), and the energy counter at each boundary."""

    def __init__(self, fake: FakeNVML | None = None):
        self.fake = fake
        self.windows: list[dict] = []
        self.boundaries: list[tuple[str, float | None]] = []

    def _last_energy(self):
        values = self.fake.values(ENERGY) if self.fake else []
        return values[-1] if values else None

    @hookimpl
    def harness_trial_window(self, step, metrics):
        self.windows.append(dict(metrics, step=step))
        self.boundaries.append((metrics["phase"], self._last_energy()))

    @hookimpl(trylast=True)  # after nvml's own harness_trial_evaluated has read the counter
    def harness_trial_evaluated(self, trial):
        if trial.phase == "timed":
            self.boundaries.append(("eval", self._last_energy()))


def tiny_spec(steps: int = 25, device: str = "cpu", batch_size: int = 32, **budget) -> TrialSpec:
    return make_spec(workload="digits", workload_params={"hidden": 32, "depth": 1}, batch_size=batch_size,
                     device=device, budget=Budget(steps=steps, warmup_steps=3, windows=4, **budget))


def run(spec: TrialSpec, spy: Spy | None = None):
    registry = get_registry(disable=["mlflow"], extra=[spy] if spy else [])
    return run_trial(spec, registry)


@pytest.fixture
def fake(monkeypatch):
    """One recorded H100 watched as NVML device 0; samples only at window boundaries (deterministic)."""
    monkeypatch.setenv("HARNESS_NVML_DEVICES", "0")
    monkeypatch.setenv("HARNESS_NVML_INTERVAL_S", "3600")
    return FakeNVML(devices=1).install(monkeypatch)


def test_energy_is_the_counter_difference_over_the_timed_windows(fake):
    spy = Spy(fake)
    result = run(tiny_spec(), spy)
    assert result.ok, result.message
    energy = fake.values(ENERGY)
    phases = [p for p, _ in spy.boundaries]
    assert phases[0] == "warmup" and set(phases[1:]) == {"timed"}
    # read once after warm-up (start of the timed region), then once per timed window
    assert len(energy) == len(phases)
    expected_j = (energy[-1] - energy[0]) / 1e3
    assert result.metrics["energy_j"] == pytest.approx(expected_j)
    samples = result.metrics["timed_steps"] * 32
    assert result.metrics["energy_per_sample_j"] == pytest.approx(expected_j / samples)
    assert result.conditions["energy_source"] == "nvml-energy-counter"


def test_timed_summary_aggregates_exactly_the_timed_samples(fake):
    result = run(tiny_spec())
    assert result.ok, result.message
    # samples: one at trial start, one after warm-up, then one per timed window (the thread never fires)
    power_w = [v / 1e3 for v in fake.values(POWER)]
    timed = power_w[2:]
    m = result.metrics
    assert m["nvml_samples"] == len(timed) == m["timing_windows"]
    assert m["gpu_power_mean_w"] == pytest.approx(statistics.fmean(timed))
    assert m["gpu_power_max_w"] == pytest.approx(max(timed))
    util = fake.values("nvmlDeviceGetUtilizationRates")[2:]
    assert m["gpu_util_mean_pct"] == pytest.approx(statistics.fmean(util))
    assert m["gpu_util_max_pct"] == max(util)
    assert m["gpu_sm_clock_mean_mhz"] == pytest.approx(statistics.fmean(fake.values("nvmlDeviceGetClockInfo")[2:]))
    assert m["gpu_temperature_max_c"] == max(fake.values("nvmlDeviceGetTemperature")[2:])
    assert m["gpu_memory_used_max_bytes"] == max(fake.values("nvmlDeviceGetMemoryInfo")[2:])
    assert m["nvml_gpus"] == 1
    assert fake.initialised == 0  # every nvmlInit was matched by an nvmlShutdown


def test_window_metrics_carry_that_windows_gauges(fake):
    spy = Spy(fake)
    assert run(tiny_spec(), spy).ok
    power_w = [v / 1e3 for v in fake.values(POWER)]
    timed_windows = [w for w in spy.windows if w["phase"] == "timed"]
    assert [w["gpu_power_w"] for w in timed_windows] == pytest.approx(power_w[2:])
    # the warm-up window covers the start sample and the one taken at its end
    assert spy.windows[0]["gpu_power_w"] == pytest.approx(statistics.fmean(power_w[:2]))
    for w in spy.windows:
        assert {"gpu_util_pct", "gpu_sm_clock_mhz", "gpu_temperature_c", "gpu_memory_used_bytes"} <= set(w)


def test_intermediate_evaluations_are_left_out_of_energy(fake):
    spy = Spy(fake)
    result = run(tiny_spec(steps=27, eval_every_steps=8), spy)
    assert result.ok, result.message
    phases = [p for p, _ in spy.boundaries]
    assert "eval" in phases
    expected_mj, previous = 0.0, None
    for phase, energy in spy.boundaries:
        if phase == "timed":
            expected_mj += energy - previous
        previous = energy
    assert result.metrics["energy_j"] == pytest.approx(expected_mj / 1e3)
    everything_j = (spy.boundaries[-1][1] - spy.boundaries[0][1]) / 1e3
    assert result.metrics["energy_j"] < everything_j


def test_every_watched_gpu_counts(monkeypatch):
    monkeypatch.setenv("HARNESS_NVML_DEVICES", "0,1")
    monkeypatch.setenv("HARNESS_NVML_INTERVAL_S", "3600")
    fake = FakeNVML(devices=2).install(monkeypatch)
    result = run(tiny_spec())
    assert result.ok, result.message
    e0, e1 = fake.values(ENERGY, 0), fake.values(ENERGY, 1)
    assert result.metrics["energy_j"] == pytest.approx((e0[-1] - e0[0] + e1[-1] - e1[0]) / 1e3)
    p = [(a + b) / 1e3 for a, b in zip(fake.values(POWER, 0), fake.values(POWER, 1), strict=True)]
    assert result.metrics["gpu_power_mean_w"] == pytest.approx(statistics.fmean(p[2:]))
    assert result.metrics["nvml_gpus"] == 2


def test_without_an_energy_counter_power_is_integrated(monkeypatch):
    monkeypatch.setenv("HARNESS_NVML_DEVICES", "0")
    monkeypatch.setenv("HARNESS_NVML_INTERVAL_S", "0.002")
    FakeNVML(energy_counter=False).install(monkeypatch)
    result = run(tiny_spec(steps=60))
    assert result.ok, result.message
    m = result.metrics
    assert result.conditions["energy_source"] == "power-integral"
    hi = max(RECORDED["power_mw"]) / 1e3
    # the integral spans the timed samples, which lie within the trial's host time
    assert 0 < m["energy_j"] <= hi * m["wall_s"]


def test_sampling_thread_adds_samples_between_windows(monkeypatch):
    monkeypatch.setenv("HARNESS_NVML_DEVICES", "0")
    monkeypatch.setenv("HARNESS_NVML_INTERVAL_S", "0.001")
    fake = FakeNVML().install(monkeypatch)
    result = run(tiny_spec(steps=80))
    assert result.ok, result.message
    m = result.metrics
    assert len(fake.values(POWER)) > m["timing_windows"] + 2  # the thread sampled, not only the boundaries
    assert m["nvml_samples"] >= m["timing_windows"]
    assert min(RECORDED["util_gpu_pct"]) <= m["gpu_util_mean_pct"] <= max(RECORDED["util_gpu_pct"])
    assert min(RECORDED["power_mw"]) / 1e3 <= m["gpu_power_mean_w"] <= max(RECORDED["power_mw"]) / 1e3


def test_without_nvml_it_says_once_and_the_trial_runs_on(monkeypatch, caplog):
    import pynvml

    def no_library():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    monkeypatch.setattr(nvml_plugin, "_said", set())
    monkeypatch.setenv("HARNESS_NVML_DEVICES", "0")
    with caplog.at_level(logging.WARNING, logger="harness.nvml"):
        first, second = run(tiny_spec()), run(tiny_spec())
    assert first.ok and second.ok
    said = [r.getMessage() for r in caplog.records if "telemetry unavailable" in r.getMessage()]
    assert len(said) == 1 and "NVML did not initialise" in said[0]
    assert "energy_j" not in first.metrics and "gpu_power_mean_w" not in second.metrics


def test_a_cpu_trial_has_no_telemetry_unless_devices_are_named(monkeypatch, caplog):
    fake = FakeNVML().install(monkeypatch)
    monkeypatch.setattr(nvml_plugin, "_said", set())
    monkeypatch.delenv("HARNESS_NVML_DEVICES", raising=False)
    with caplog.at_level(logging.WARNING, logger="harness.nvml"):
        result = run(tiny_spec())
    assert result.ok and "energy_j" not in result.metrics
    assert any("the trial runs on the CPU" in r.getMessage() for r in caplog.records)
    assert fake.initialised == 0


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan"])
def test_a_bad_interval_is_a_spec_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("HARNESS_NVML_INTERVAL_S", value)
    with pytest.raises(SpecError, match=r"HARNESS_NVML_INTERVAL_S: .* seconds > 0"):
        nvml_plugin.interval_s()


def test_a_device_that_is_not_there_is_a_spec_error(monkeypatch):
    monkeypatch.setenv("HARNESS_NVML_DEVICES", "3")
    FakeNVML(devices=1).install(monkeypatch)
    result = run(tiny_spec())
    assert not result.ok and "HARNESS_NVML_DEVICES: '3' is not an NVML device" in result.message


def test_cuda_devices_map_to_nvml_devices():
    uuids = ["GPU-aaaa1111-0000", "GPU-bbbb2222-0000", "GPU-cccc3333-0000"]
    index = nvml_plugin.nvml_index_for_cuda
    assert index(0, None, "bbbb2222-0000", uuids) == 1  # torch's UUID wins over any ordering
    assert index(1, None, None, uuids) == 1
    assert index(0, "2,0", None, uuids) == 2
    assert index(1, "2,0", None, uuids) == 0
    assert index(0, "GPU-cccc", None, uuids) == 2  # abbreviated UUIDs, as CUDA accepts them
    assert index(0, "GPU-", None, uuids) is None  # ambiguous
    assert index(0, "MIG-1234", None, uuids) is None
    assert index(2, "0,1", None, uuids) is None


def test_energy_per_sample_is_a_metric_only_while_nvml_is_loaded():
    registry = get_registry()
    assert "harness_declare_metrics" in registry.records["nvml"].hooks
    metric = registry.metric("objectives[0]", "energy_per_sample")
    assert (metric.key, metric.unit, metric.direction, metric.plugin) == ("energy_per_sample_j", "J", "minimize",
                                                                          "nvml")
    with pytest.raises(SpecError, match=r"^objectives\[0\]: unknown metric 'energy_per_sample' \(known: "):
        get_registry(disable=["nvml"]).metric("objectives[0]", "energy_per_sample")


def test_two_registries_keep_their_own_telemetry(fake):
    first, second = get_registry(disable=["mlflow"]), get_registry(disable=["mlflow"])
    assert first.plugin("nvml") is not second.plugin("nvml")
    # a trial held open in the first registry (hooks called the way the trial runner calls them)...
    held = SimpleNamespace(spec=tiny_spec(), dist=DistInfo(), phase="timed", metrics={"timed_steps": 4},
                           conditions={})
    first.hooks.trial_start(trial=held)
    assert first.hooks.measure_window(trial=held, step=3, phase="warmup")["gpu_power_w"] > 0
    # ...while a whole trial runs in the second, which opens, measures and closes a session of its own
    result = run_trial(tiny_spec(), second)
    assert result.ok, result.message
    second_reads = fake.values(ENERGY)[1:]
    assert result.metrics["energy_j"] == pytest.approx((second_reads[-1] - second_reads[0]) / 1e3)
    assert fake.initialised == 1  # the first registry's session is still open
    assert "gpu_power_w" in first.hooks.measure_window(trial=held, step=7, phase="timed")
    metrics = first.hooks.measure_trial(trial=held, status="ok")
    energy = fake.values(ENERGY)  # the first session read the counter first and last
    assert metrics["energy_j"] == pytest.approx((energy[-1] - energy[0]) / 1e3)
    assert metrics["nvml_gpus"] == 1 and metrics["energy_per_sample_j"] == pytest.approx(metrics["energy_j"] / 128)
    assert held.conditions["energy_source"] == "nvml-energy-counter"
    assert fake.initialised == 0
    assert first.hooks.measure_trial(trial=held, status="ok") == {}  # the session ended with its trial


@pytest.mark.gpu
def test_real_nvml_measures_a_cuda_trial(monkeypatch):
    monkeypatch.delenv("HARNESS_NVML_DEVICES", raising=False)
    # a few seconds of real GPU work, so the energy counter (updated every few ms) resolves it well
    spec = make_spec(workload="digits", workload_params={"hidden": 4096, "depth": 4}, batch_size=1024,
                     device="cuda", budget=Budget(steps=1500, warmup_steps=20, windows=5))
    result = run(spec)
    assert result.ok, result.message
    m = result.metrics
    assert m["nvml_gpus"] == 1 and result.conditions["energy_source"] == "nvml-energy-counter"
    assert 20 < m["gpu_power_mean_w"] < 1500
    assert 0 <= m["gpu_util_mean_pct"] <= 100 and m["gpu_sm_clock_mean_mhz"] > 100
    assert m["energy_j"] > 0 and math.isfinite(m["energy_per_sample_j"])
    # the counter and the sampled power agree within a factor of two over the timed windows
    assert 0.5 < m["energy_j"] / (m["gpu_power_mean_w"] * m["train_time_s"]) < 2.0
