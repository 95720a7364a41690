"""Measurements a user can trust: the throughput's 95 % interval from the timing windows, re-measuring and marking
noisy trials, a fixed CPU thread count, the speed-up over the baseline with its interval (a tie inside the noise),
the baseline in the dominance test, and no results shown for a trial that did not complete."""
from __future__ import annotations

import csv
import math
import os
import statistics
import time

import optuna
import pytest
import torch
from torch import nn

from harness.measure import CORE_METRICS, WindowStats, throughput_interval
from harness.outcomes import (
    PROCESS_NOISE_FLOOR,
    RESULT_KEYS,
    Objective,
    TrialRecord,
    beats_baseline,
    compare_to_baseline,
    pareto_front,
    ratio_interval,
    relative_half_width,
    same_within_noise,
    t_quantile_975,
)
from harness.report import NO_WINNER, write_trials_csv
from harness.workload import TensorSource, Workload

THROUGHPUT = Objective("throughput", "throughput_samples_per_s", "maximize")
ACCURACY = Objective("accuracy", "accuracy", "maximize")
BOTH = [THROUGHPUT, ACCURACY]


# ---------------------------------------------------------------------------------------------- the interval
def test_throughput_interval_is_students_t_of_the_windows_step_times():
    windows = [(10, 1.0), (10, 1.1), (10, 0.9), (10, 1.0)]  # step times 0.10, 0.11, 0.09, 0.10 s
    interval = throughput_interval(windows, samples_per_step=32)
    assert interval is not None
    sd = statistics.stdev([0.10, 0.11, 0.09, 0.10])
    half = 3.182 * sd / 2  # t(0.975, 3 df) * sd / sqrt(4)
    assert interval.low == pytest.approx(32 / (0.1 + half))
    assert interval.high == pytest.approx(32 / (0.1 - half))
    assert interval.rel_half_width == pytest.approx(half / 0.1)
    assert interval.low < 32 / 0.1 < interval.high, "the interval holds the reported throughput"


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (*range(1, 40), 60, 120, 1000):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3), df


def test_one_window_has_no_interval():
    assert throughput_interval([(10, 1.0)], samples_per_step=32) is None


def test_old_records_interval_comes_from_their_cv():
    windows = [(10, 1.0), (10, 1.2), (10, 0.9), (10, 1.05), (10, 0.95)]
    stats = WindowStats.from_windows(windows)
    interval = throughput_interval(windows, samples_per_step=1)
    assert interval is not None
    old = {"step_time_cv": stats.step_time_cv, "timing_windows": len(windows)}
    assert relative_half_width(old) == pytest.approx(interval.rel_half_width)
    assert relative_half_width({"throughput_samples_per_s": 5.0}) is None


# ---------------------------------------------------------------------------------------------- vs the baseline
def timed(throughput: float, rel: float) -> dict[str, float]:
    return {"throughput_samples_per_s": throughput, "throughput_ci_rel_half_width": rel}


def test_speedup_inside_the_noise_is_a_tie():
    out = compare_to_baseline(timed(1030.0, 0.03), timed(1000.0, 0.03))
    assert out["speedup_vs_baseline"] == pytest.approx(1.03)
    assert out["speedup_vs_baseline_ci_low"] < 1.0 < out["speedup_vs_baseline_ci_high"]
    assert out["tie_with_baseline"] == 1


def test_speedup_beyond_the_noise_is_no_tie():
    out = compare_to_baseline(timed(1300.0, 0.02), timed(1000.0, 0.02))
    assert 1.0 < out["speedup_vs_baseline_ci_low"] < 1.3 < out["speedup_vs_baseline_ci_high"]
    assert out["tie_with_baseline"] == 0


def test_two_processes_agreeing_within_the_floor_tie_however_steady_each_timed():
    # GPU-like: each process's own windows agree to 0.01 %, the two processes differ by 0.6 %
    steady = compare_to_baseline(timed(1006.0, 0.0001), timed(1000.0, 0.0001))
    assert steady["tie_with_baseline"] == 1
    assert steady["speedup_vs_baseline_ci_low"] < 1.0 < steady["speedup_vs_baseline_ci_high"]
    assert same_within_noise(timed(1006.0, 0.0001), timed(1000.0, 0.0001), "throughput_samples_per_s")
    # but 5 % apart is a difference however the floor widens the intervals
    assert compare_to_baseline(timed(1050.0, 0.0001), timed(1000.0, 0.0001))["tie_with_baseline"] == 0
    assert not same_within_noise(timed(1050.0, 0.0001), timed(1000.0, 0.0001), "throughput_samples_per_s")
    # a side wider than the floor keeps its own width
    low, high = ratio_interval(1.0, max(0.05, PROCESS_NOISE_FLOOR), PROCESS_NOISE_FLOOR)
    wide = compare_to_baseline(timed(1000.0, 0.05), timed(1000.0, 0.0001))
    assert (wide["speedup_vs_baseline_ci_low"], wide["speedup_vs_baseline_ci_high"]) == pytest.approx((low, high))


def test_no_comparison_without_a_baseline_throughput():
    assert compare_to_baseline(timed(1000.0, 0.02), None) == {}
    assert compare_to_baseline(timed(1000.0, 0.02), {"accuracy": 0.9}) == {}
    assert "tie_with_baseline" not in compare_to_baseline({"throughput_samples_per_s": 10.0},
                                                          timed(1000.0, 0.02))


# ---------------------------------------------------------------------------------------------- the front
def record(number: int, throughput: float, accuracy: float, rel: float = 0.01, spec_hash: str = "",
           duplicate_of: int | None = None) -> TrialRecord:
    return TrialRecord(number, "COMPLETE", values=[throughput, accuracy], spec_hash=spec_hash or f"h{number}",
                       metrics={**timed(throughput, rel), "accuracy": accuracy}, duplicate_of=duplicate_of,
                       params={"optimizer": f"opt{number}"})


def test_trials_the_baseline_dominates_are_not_on_the_front():
    base = record(-1, 2268.0, 0.9938)
    beaten = [record(0, 1698.0, 0.975), record(1, 1465.0, 0.976)]
    front = pareto_front(beaten, BOTH, base)
    assert [r.number for r in front] == [-1]
    assert not beats_baseline(front, base)


def test_the_baseline_shares_the_front_with_what_beats_it():
    base = record(-1, 1000.0, 0.99)
    faster = record(0, 1500.0, 0.98)
    front = pareto_front([faster, record(1, 900.0, 0.97)], BOTH, base)
    assert [r.number for r in front] == [0, -1]
    assert beats_baseline(front, base)


def test_faster_within_the_noise_but_less_accurate_is_dominated():
    base = record(-1, 1000.0, 0.99, rel=0.04)
    front = pareto_front([record(0, 1020.0, 0.985, rel=0.04)], BOTH, base)
    assert [r.number for r in front] == [-1], "a 2 % speed-up inside a 4 % noise is a tie, and accuracy is lower"


def test_a_rerun_of_the_baseline_configuration_is_not_a_second_point():
    base = record(-1, 1000.0, 0.99, spec_hash="same")
    rerun = record(3, 1100.0, 0.99, spec_hash="same", duplicate_of=-1)
    assert [r.number for r in pareto_front([rerun], BOTH, base)] == [-1]


# ---------------------------------------------------------------------------------------------- failed trials
def test_a_failed_trial_keeps_no_results():
    rec = TrialRecord(4, "FAIL")
    rec.failed("crashed", "during compress", {"accuracy": 0.9869, "throughput_samples_per_s": 900.0,
                                              "compile_s": 1.5, "energy_j": 3.0}, objectives=[
        Objective("energy", "energy_j", "minimize")])
    assert rec.metrics == {"compile_s": 1.5}


def test_result_keys_cover_the_core_metrics():
    assert {m.key for m in CORE_METRICS} <= RESULT_KEYS


def test_trials_csv_shows_no_objective_values_for_a_failed_trial(tmp_path):
    ok = record(0, 1000.0, 0.98)
    ok.metrics["condition.cpu_threads"] = "1"
    # as stored by a driver before failed trials dropped their results
    crashed = TrialRecord(1, "FAIL", "crashed", "quantize failed", values=[800.0, 0.9869],
                          metrics={"accuracy": 0.9869, "throughput_samples_per_s": 800.0, "compile_s": 2.0})
    base = record(-1, 1000.0, 0.99)
    path = write_trials_csv([ok, crashed], BOTH, tmp_path / "t.csv", base)
    rows = list(csv.DictReader(path.read_text().splitlines()))
    assert [r["number"] for r in rows] == ["-1", "0", "1"], "the baseline's row first"
    fail = rows[2]
    assert fail["value.accuracy"] == fail["accuracy"] == fail["value.throughput"] == ""
    assert fail["throughput_samples_per_s"] == "" and fail["compile_s"] == "2.0"
    assert float(rows[1]["speedup_vs_baseline"]) == pytest.approx(1.0) and rows[1]["tie_with_baseline"] == "1"
    assert rows[1]["condition.cpu_threads"] == "1", "the conditions a trial ran under are columns too"


# ---------------------------------------------------------------------------------------------- the table
def stored_study(storage: str, base: TrialRecord, records: list[TrialRecord]) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="mine", storage=storage, directions=["maximize", "maximize"])
    study.set_user_attr("objectives", [[o.metric, o.key, o.direction] for o in BOTH])
    study.set_user_attr("baseline", base.to_dict())
    for r in records:
        study.add_trial(optuna.trial.create_trial(values=r.values, user_attrs={"record": r.to_dict()}))


def test_report_says_plainly_when_nothing_beat_the_baseline(study_storage, harness_cli):
    stored_study(study_storage, record(-1, 2268.0, 0.9938), [record(0, 1698.0, 0.975), record(1, 1465.0, 0.976)])
    code, out, err = harness_cli("report", "mine", "--storage", study_storage)
    assert code == 0, err
    assert NO_WINNER in out and "baseline" in out
    assert "1,698" not in out, "a trial the baseline dominates is not in the front's table"


def test_report_shows_speedup_with_its_interval_and_calls_a_tie(study_storage, harness_cli):
    base = record(-1, 1000.0, 0.98, rel=0.03)
    stored_study(study_storage, base, [record(0, 1020.0, 0.99, rel=0.03), record(1, 2000.0, 0.97, rel=0.01)])
    code, out, err = harness_cli("report", "mine", "--storage", study_storage)
    assert code == 0, err
    assert "tie 1.02x" in out, out
    assert "2.00x (1.94-2.06)" in out and "2,000 ±1.0%" in out
    assert NO_WINNER not in out


# ---------------------------------------------------------------------------------------------- noisy trials
class Sleepy(nn.Module):
    """A linear classifier whose training forward passes sleep ``delay_s`` in every other block of ``period``
    calls (``jitter``) or in every call: timing windows of ``period`` steps that disagree, or agree."""

    def __init__(self, features: int, classes: int, delay_s: float, period: int, jitter: bool, warmup: int):
        super().__init__()
        self.linear = nn.Linear(features, classes)
        self.delay_s, self.period, self.jitter, self.calls = delay_s, period, jitter, -warmup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            slow = not self.jitter or self.calls < 0 or (self.calls // self.period) % 2 == 0
            self.calls += 1
            if slow:
                time.sleep(self.delay_s)
        return self.linear(x)


def sleepy(device=None, seed: int = 0, jitter: bool = True, period: int = 5, warmup: int = 3,  # noqa: ARG001
           delay_s: float = 0.01) -> Workload:
    """A bring-your-own workload (``test_measurement:sleepy``) whose step times are set by sleeping."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 4, generator=gen), torch.randint(0, 2, (256,), generator=gen)
    torch.manual_seed(seed)
    return Workload(name="sleepy", model=Sleepy(4, 2, delay_s, period, jitter, warmup),
                    train=TensorSource(x[:192], y[:192]), test=TensorSource(x[192:], y[192:]), kinds=("mlp",),
                    input_shape=(4,))


BUDGET = {"steps": 23, "warmup_steps": 3, "windows": 4}  # 20 timed steps: 4 windows of 5


@pytest.fixture
def torch_threads():
    """Restores torch's thread count, which an in-process CPU trial fixes."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread(monkeypatch):
    """One thread for the sleeping workload: its steps are then the sleeps, whatever else runs on the machine."""
    before = torch.get_num_threads()
    monkeypatch.setenv("HARNESS_CPU_THREADS", "1")
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_a_noisy_trial_is_measured_again_then_marked_noisy(run_trial):
    result = run_trial.ok(workload="test_measurement:sleepy", budget={**BUDGET, "noise_threshold": 0.05})
    m = result.metrics
    assert m["throughput_remeasured"] == 1 and m["timing_windows"] == 8, "measured again with as many windows"
    assert m["throughput_noisy"] == 1, "windows alternating between 0 and 10 ms steps stay noisy"
    assert m["steps"] == 23, "the budget's steps: the extra windows change no reported result"
    assert m["throughput_samples_per_s_ci_low"] < m["throughput_samples_per_s"] < m["throughput_samples_per_s_ci_high"]


@pytest.mark.usefixtures("one_thread")
def test_agreeing_windows_are_measured_once(run_trial):
    result = run_trial.ok(workload="test_measurement:sleepy", workload_params={"jitter": False},
                          budget={**BUDGET, "noise_threshold": 0.5})
    m = result.metrics
    assert (m["throughput_remeasured"], m["throughput_noisy"], m["timing_windows"]) == (0, 0, 4)
    assert m["throughput_ci_rel_half_width"] < 0.5


@pytest.mark.usefixtures("one_thread")
def test_a_zero_threshold_turns_remeasuring_off(run_trial):
    result = run_trial.ok(workload="test_measurement:sleepy", budget={**BUDGET, "noise_threshold": 0})
    assert result.metrics["timing_windows"] == 4 and "throughput_noisy" not in result.metrics


def test_noise_threshold_is_a_fraction(harness_cli):
    code, _, err = harness_cli("run", "--device", "cpu", "--steps", "10", "--set", "budget.noise_threshold=2")
    assert code == 2 and "budget.noise_threshold" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- CPU threads
@pytest.mark.usefixtures("torch_threads")
def test_cpu_trial_fixes_and_records_its_thread_count(run_trial, monkeypatch):
    monkeypatch.delenv("HARNESS_CPU_THREADS", raising=False)
    result = run_trial.ok(device="cpu", budget={"steps": 8})
    threads = max(1, len(os.sched_getaffinity(0)) - 1)  # a core left to the driver and the rest of the machine
    assert result.conditions["cpu_threads"] == str(threads)
    assert torch.get_num_threads() == threads


@pytest.mark.usefixtures("torch_threads")
def test_cpu_thread_count_can_be_set(run_trial, monkeypatch):
    monkeypatch.setenv("HARNESS_CPU_THREADS", "3")
    result = run_trial.ok(device="cpu", budget={"steps": 8})
    assert result.conditions["cpu_threads"] == "3" and torch.get_num_threads() == 3
    assert math.isfinite(result.metrics["throughput_samples_per_s"])


@pytest.mark.usefixtures("one_thread")
def test_a_quantised_copy_leaves_the_trained_model_to_time_again(run_trial):
    result = run_trial.ok(workload="test_measurement:sleepy", budget={**BUDGET, "noise_threshold": 0.05},
                          compression={"name": "quantize", "method": "dynamic-int8"})
    assert result.metrics["throughput_remeasured"] == 1 and result.metrics["timing_windows"] == 8


@pytest.mark.usefixtures("one_thread")
def test_a_pruned_model_is_marked_but_not_timed_again(run_trial):
    result = run_trial.ok(workload="test_measurement:sleepy", budget={**BUDGET, "noise_threshold": 0.05},
                          compression={"name": "prune", "when": "after", "sparsity": 0.5, "finetune_steps": 0})
    m = result.metrics
    assert (m["throughput_remeasured"], m["throughput_noisy"], m["timing_windows"]) == (0, 1, 4), \
        "the pruned model's steps would time something else"
