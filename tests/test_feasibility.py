"""What a study can run here: techniques this machine can never run leave the space at the start, combinations
ruled out before launch do not use up n_trials (and a space where nothing runs stops with a message), a
technique that fails the same way twice is vetoed, axes no objective measures are pointed out, the trial
timeout follows the baseline, and the baseline is measured again during the study."""
from __future__ import annotations

import optuna
import pytest
from test_study import adamw, load, run_cli, study_file

from harness import feasibility, storage
from harness.errors import SpecError
from harness.outcomes import TrialRecord
from harness.studyfile import StudyConfig

FAULT_OK = {"fault": {"mode": "ok"}}


def finished_and_ruled_out(study: optuna.Study) -> tuple[list, list]:
    trials = study.get_trials()
    return ([t for t in trials if storage.slot(t) == "finished"],
            [t for t in trials if storage.slot(t) == "ruled-out"])


@pytest.mark.slow
def test_techniques_this_machine_cannot_run_leave_the_space_at_study_start(tmp_path):
    path = study_file(tmp_path, "narrow", n_trials=3, axes={"optimizer": adamw(lr=[0.003, 0.01]),
                                                             "compile": ["eager", "needs-cuda"]})
    proc = run_cli(["study", path], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert "left out of the search space: compile technique 'needs-cuda' requires CUDA" in proc.stdout
    trials = load(tmp_path, "narrow").get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert all(t.user_attrs["record"]["params"]["compile"] == "eager" for t in trials)
    assert not (tmp_path / "launched-needs-cuda").exists()


def test_an_axis_with_nothing_this_machine_can_run_is_one_line_exit_2(tmp_path):
    path = study_file(tmp_path, "nothing", axes={"optimizer": adamw(lr=0.003), "compile": ["needs-cuda"]})
    proc = run_cli(["study", path], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "axes.compile: no technique can run on this machine" in proc.stderr and "needs-cuda" in proc.stderr


@pytest.mark.slow
def test_combinations_ruled_out_before_launch_do_not_use_up_n_trials(tmp_path):
    path = study_file(tmp_path, "ruled", n_trials=4,
                      axes={"optimizer": {"adamw": {"lr": {"low": 0.001, "high": 0.01, "log": True}}},
                            "compile": ["eager", "shuns-fault"], "compression": FAULT_OK})
    proc = run_cli(["study", path], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    finished, ruled_out = finished_and_ruled_out(load(tmp_path, "ruled"))
    assert len(finished) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in finished)
    for t in ruled_out:
        assert t.user_attrs["record"]["params"]["compile"] == "shuns-fault"
        assert "cannot be combined with compression 'fault': test-only rule" in t.user_attrs["record"]["message"]
        assert "launched" not in t.user_attrs


@pytest.mark.slow
def test_a_space_where_nothing_can_run_stops_with_a_message(tmp_path):
    path = study_file(tmp_path, "never", n_trials=3, sampler="random",
                      axes={"optimizer": adamw(lr=0.003), "compile": ["shuns-fault"], "compression": FAULT_OK})
    proc = run_cli(["study", path], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    finished, ruled_out = finished_and_ruled_out(load(tmp_path, "never"))
    assert not finished and len(ruled_out) >= feasibility.ruled_out_limit(3)
    assert f"stopping: the sampler proposed {feasibility.ruled_out_limit(3)} combinations" in proc.stdout


@pytest.mark.slow
def test_a_technique_failing_the_same_way_twice_is_vetoed_for_the_study(tmp_path):
    path = study_file(tmp_path, "veto", n_trials=5, sampler="random",
                      axes={"optimizer": {"adamw": {"lr": {"low": 0.001, "high": 0.01, "log": True}}},
                            "compression": {"fault": {"mode": "raise"}}})
    proc = run_cli(["study", path], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    study = load(tmp_path, "veto")
    launched = [t for t in study.get_trials() if t.user_attrs.get("launched")]
    assert [t.user_attrs["failure_class"] for t in launched] == ["plugin-error"] * feasibility.VETO_AFTER
    assert "vetoed for this study: compression 'fault' failed the same way in trials #0, #1" in proc.stdout
    _, ruled_out = finished_and_ruled_out(study)
    assert len(ruled_out) == feasibility.ruled_out_limit(5)
    assert all(t.user_attrs["record"]["message"].startswith("vetoed for this study: compression 'fault'")
               for t in ruled_out)


def record(number: int, state: str, compression: str, message: str = "", failure: str | None = None,
           optimizer: str = "adamw") -> TrialRecord:
    params = {"optimizer": optimizer, "precision": "fp32", "compile": "eager", "parallelism": "single",
              "compression": compression}
    return TrialRecord(number, state, failure_class=failure, message=message, params=params)


def test_veto_needs_the_same_failure_twice_and_no_completed_trial_of_that_combination(harness_registry):
    bug = "plugin 'quantize' raised during compress: RuntimeError: shape [3, 64] (at torch/x.py:12 in f)"
    other_shape = bug.replace("[3, 64]", "[5, 128]").replace(":12", ":99")
    once = [record(0, "FAIL", "quantize", bug, "plugin-error")]
    assert feasibility.vetoes(once, harness_registry) == {}
    twice = [*once, record(1, "FAIL", "quantize", other_shape, "plugin-error")]
    veto = feasibility.vetoes(twice, harness_registry)
    assert list(veto) == [(("compression", "quantize"),)]
    assert "trials #0, #1" in veto[(("compression", "quantize"),)]
    different = [*once, record(1, "FAIL", "quantize", "plugin 'quantize' raised: KeyError: 'w'", "plugin-error")]
    assert feasibility.vetoes(different, harness_registry) == {}
    ran_once = [*twice, record(2, "COMPLETE", "quantize")]
    assert feasibility.vetoes(ran_once, harness_registry) == {}
    timeouts = [record(i, "FAIL", "quantize", "timed out after 9 s", "timeout") for i in range(3)]
    assert feasibility.vetoes(timeouts, harness_registry) == {}


def quick_study(registry, **fields) -> StudyConfig:
    data = {"name": "s", "workload": {"name": "digits", "hidden": 32, "depth": 1}, "n_trials": 2,
            "axes": {"optimizer": adamw(lr=0.003)}, **fields}
    return StudyConfig.from_mapping("s.yaml", data, registry)


def test_a_searched_axis_whose_metrics_no_objective_measures_is_pointed_out(harness_registry):
    cfg = quick_study(harness_registry, axes={"optimizer": adamw(lr=0.003), "compression": ["none", "prune"]},
                      objectives=[{"throughput": "max"}, {"accuracy": "max"}])
    (line,) = feasibility.unmeasured_axes(cfg, harness_registry)
    assert line.startswith("axes.compression: its techniques change ") and "model_size" in line
    measured = quick_study(harness_registry, axes={"optimizer": adamw(lr=0.003), "compression": ["none", "prune"]},
                           objectives=[{"accuracy": "max"}, {"model_size": "min"}])
    assert feasibility.unmeasured_axes(measured, harness_registry) == []


def test_trial_timeout_auto_follows_the_baseline(harness_registry):
    from harness.driver import AUTO_TIMEOUT_FIRST_S, AUTO_TIMEOUT_MIN_S, StudyDriver

    auto = StudyDriver(quick_study(harness_registry), harness_registry)
    assert auto.config.trial_timeout_s is None and auto.trial_timeout_s() == AUTO_TIMEOUT_FIRST_S
    auto.baseline = TrialRecord(-1, "COMPLETE", duration_s=4.0)
    assert auto.trial_timeout_s() == AUTO_TIMEOUT_MIN_S
    auto.baseline.duration_s = 100.0
    assert auto.trial_timeout_s() == 1000.0
    fixed = StudyDriver(quick_study(harness_registry, trial_timeout_s=42), harness_registry)
    fixed.baseline = auto.baseline
    assert fixed.trial_timeout_s() == 42.0
    assert "trial_timeout_s is 42 s in the study file" in fixed._timeout_hint("timeout")
    assert "auto allowed 1000 s, 10x the baseline's 100 s" in auto._timeout_hint("timeout")


@pytest.mark.slow
@pytest.mark.parametrize("slots", [1, 2])
def test_the_baseline_is_measured_again_during_the_study(tmp_path, slots):
    # with two slots the re-measurement runs on the slot of the trial that made it due, beside the other slot
    path = study_file(tmp_path, "drift", n_trials=4, remeasure_baseline_every=2, cpu_slots=slots,
                      axes={"optimizer": {"adamw": {"lr": {"low": 0.001, "high": 0.01, "log": True}}}},
                      constraints={"accuracy": ">= 0.5 * baseline"})
    proc = run_cli(["study", path], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    study = load(tmp_path, "drift")
    checks = study.user_attrs["baseline_checks"]
    assert sorted(c["after_trials"] for c in checks) == [2, 4]
    assert all(c["speedup_vs_baseline"] > 0 and c["throughput_samples_per_s"] > 0 for c in checks)
    assert "baseline re-measured after 2 trials" in proc.stdout
    assert all((tmp_path / "out" / "trials" / f"baseline-after-{n}").is_dir() for n in (2, 4))
    for t in study.get_trials():
        rec = t.user_attrs["record"]
        if rec["state"] == "COMPLETE":
            assert rec["metrics"]["speedup_vs_baseline"] > 0


@pytest.mark.slow
def test_an_uncompressed_trial_reports_its_model_size_when_the_study_asks_for_it(tmp_path):
    path = study_file(tmp_path, "size", n_trials=1, objectives=[{"throughput": "max"}, {"model_size": "min"}],
                      axes={"optimizer": adamw(lr=0.003)})
    proc = run_cli(["study", path], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    (trial,) = load(tmp_path, "size").get_trials()
    rec = trial.user_attrs["record"]
    assert rec["state"] == "COMPLETE" and rec["params"]["compression"] == "none"
    assert rec["spec"]["tags"]["wanted_metrics"] == ["model_size_bytes", "throughput_samples_per_s"]
    assert rec["metrics"]["model_size_bytes"] > 0 and rec["values"][1] == rec["metrics"]["model_size_bytes"]


def test_workload_values_this_machine_cannot_run_leave_the_space_and_earlier_searches_keep_them(registry):
    from harness.space import Environment

    cpu = Environment(cuda=False, device_count=0, compute_capability=None, device_name="cpu")
    cfg = StudyConfig.from_mapping("s.yaml", {"workload": {"name": "gpt", "size": "tiny",
                                                           "kernels": ["native", "liger"],
                                                           "attention": ["math", "flash", "cudnn"]},
                                              "n_trials": 2}, registry)
    gone = feasibility.unavailable_choices(cfg, registry, cpu)
    assert set(gone) == {("workload.kernels", "liger"), ("workload.attention", "cudnn")}
    narrowed, lines = feasibility.narrow_space(cfg, gone)
    assert narrowed.workload_space["kernels"] == ("fixed", "native")  # one value left: fixed
    assert narrowed.workload_space["attention"][1].choices == ("math", "flash")
    assert lines == [f"left out of the search space: {why}" for why in gone.values()]
    assert cfg.workload_space["kernels"][1].choices == ("native", "liger")  # the parsed file is left as it was
    # a study whose earlier trials searched liger keeps it (Optuna cannot change a parameter's choices) and says
    # that every trial choosing it is ruled out here
    kept, lines = feasibility.narrow_space(cfg, gone, {"workload.kernels": ["native", "liger"]})
    assert kept.workload_space["kernels"][1].choices == ("native", "liger")
    assert any(line.startswith("keeping workload.kernels 'liger' in the space") for line in lines)
    with pytest.raises(SpecError, match=r"s.yaml.workload.kernels: no value can run on this machine"):
        fixed = StudyConfig.from_mapping("s.yaml", {"workload": {"name": "gpt", "kernels": "liger-flce"},
                                                    "n_trials": 2}, registry)
        feasibility.narrow_space(fixed, feasibility.unavailable_choices(fixed, registry, cpu))
