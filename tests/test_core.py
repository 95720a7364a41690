"""The core harness: hook order, measurements, entry-point plugins, the CLI and its bad-input contract."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from harness import hookimpl
from harness.config import TrialSpec
from harness.measure import DEVICE_PEAK_FLOPS, peak_flops
from harness.plugins import Registry
from harness.testing import make_spec, run_one_trial
from harness.trial import run_trial

# The order DESIGN.md gives for one trial (worker side), as hook names.
DESIGN_ORDER = [
    "build_workload", "compress_before_training", "setup_precision", "build_optimizer", "build_engine",
    "build_lr_scheduler", "build_loss", "compile_step", "trial_start", "trial_window", "trial_evaluated",
    "compress_after_training", "measure_model", "trial_end",
]


class Recorder:
    """Observes every hook without changing anything (returns None from the firstresult ones)."""

    def __init__(self):
        self.calls: list[str] = []

    def _note(self, name):
        if not self.calls or self.calls[-1] != name:
            self.calls.append(name)

    @hookimpl(tryfirst=True)
    def harness_build_workload(self, spec, device, params):
        self._note("build_workload")

    @hookimpl(tryfirst=True)
    def harness_compress_before_training(self, model, workload, spec, device):
        self._note("compress_before_training")

    @hookimpl(tryfirst=True)
    def harness_setup_precision(self, model, spec, device):
        self._note("setup_precision")

    @hookimpl(tryfirst=True)
    def harness_build_optimizer(self, params, spec, device):
        self._note("build_optimizer")

    @hookimpl(tryfirst=True)
    def harness_build_lr_scheduler(self, optimizer, spec, total_steps):
        self._note("build_lr_scheduler")

    @hookimpl(tryfirst=True)
    def harness_build_engine(self, model, optimizer, precision, spec, device, dist):
        self._note("build_engine")

    @hookimpl(tryfirst=True)
    def harness_build_loss(self, model, workload, spec, device):
        self._note("build_loss")

    @hookimpl(tryfirst=True)
    def harness_compile_step(self, step, spec, device):
        self._note("compile_step")

    @hookimpl(tryfirst=True)
    def harness_compress_after_training(self, model, trainer, workload, spec, device):
        self._note("compress_after_training")

    @hookimpl
    def harness_measure_model(self, model, workload, spec, device):
        self._note("measure_model")
        return {"recorder_saw_model": 1.0}

    @hookimpl
    def harness_trial_start(self, trial):
        self._note("trial_start")

    @hookimpl
    def harness_trial_window(self, trial, step, metrics):
        self._note("trial_window")
        self.phases = getattr(self, "phases", []) + [metrics["phase"]]

    @hookimpl
    def harness_trial_evaluated(self, trial, step, metrics):
        self._note("trial_evaluated")

    @hookimpl
    def harness_trial_end(self, trial, result):
        self._note("trial_end")
        self.result_status = result.status


def test_hooks_run_in_design_order_and_observers_see_every_phase():
    rec = Recorder()
    registry = Registry(extra=[rec])
    spec = make_spec(registry=registry, budget={"steps": 40, "warmup_steps": 4, "windows": 4})
    result = run_trial(spec, registry=registry)
    assert result.ok, result.message
    assert rec.calls == DESIGN_ORDER
    assert rec.phases == ["warmup"] + ["timed"] * 4
    assert rec.result_status == "ok"
    assert result.metrics["recorder_saw_model"] == 1.0  # measure_model dicts reach the result


def test_measurements_are_steady_state_and_consistent():
    spec = make_spec(budget={"steps": 60, "warmup_steps": 5, "windows": 5}, batch_size=32)
    m = run_trial(spec).metrics
    # 60 steps: 1 compile step + 4 more warm-up steps, then 55 timed steps in 5 windows of 11.
    assert m["steps"] == 60
    assert m["timed_steps"] == 55
    assert m["timing_windows"] == 5
    assert m["compile_s"] > 0 and m["warmup_s"] >= 0
    # Throughput counts only the timed windows: warm-up and compilation are reported apart.
    assert m["throughput_samples_per_s"] == pytest.approx(55 * 32 / m["train_time_s"], rel=1e-6)
    assert m["throughput_median_samples_per_s"] == pytest.approx(32 / m["step_time_median_s"], rel=1e-6)
    assert m["step_time_cv"] >= 0
    assert m["wall_s"] >= m["compile_s"] + m["warmup_s"] + m["train_time_s"]
    assert 0.0 <= m["accuracy"] <= 1.0 and math.isfinite(m["val_loss"])
    assert "mfu" not in m  # no peak FLOPs known for a CPU: no invented MFU
    assert m["parameter_count"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10  # the digits MLP


def test_digits_reaches_90_percent_in_an_isolated_worker():
    spec = make_spec(optimizer={"name": "adamw", "lr": 0.003}, budget={"epochs": 15, "warmup_steps": 3,
                                                                       "windows": 3})
    result = run_one_trial(spec, isolated=True, timeout_s=300)
    assert result.ok, result.message
    assert result.metrics["accuracy"] >= 0.90
    assert result.metrics["val_loss"] < 0.5


def test_epoch_budget_becomes_steps_and_seconds_budget_stops_in_time():
    epochs = run_trial(make_spec(batch_size=64, budget={"epochs": 2, "warmup_steps": 2, "windows": 2}))
    assert epochs.metrics["steps"] == math.ceil(2 * 1437 / 64)  # 1437 training digits (80% split)
    timed = run_trial(make_spec(budget={"seconds": 1.5, "warmup_steps": 2, "windows": 3}))
    assert timed.ok and timed.metrics["steps"] > 5
    assert timed.metrics["train_time_s"] < 6


def test_trial_spec_round_trips_and_hash_ignores_tags():
    spec = make_spec(optimizer={"name": "sgd", "lr": 0.05})
    again = TrialSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again.to_dict() == spec.to_dict()
    assert again.spec_hash() == spec.spec_hash()
    again.tags["mlflow_run_id"] = "x"
    assert again.spec_hash() == spec.spec_hash()
    again.optimizer.params["lr"] = 0.06
    assert again.spec_hash() != spec.spec_hash()
    flat = spec.flat_params()
    assert flat["optimizer"] == "sgd" and flat["optimizer.lr"] == 0.05 and flat["workload"] == "digits"


def test_peak_table_never_gives_an_a100_peak_to_an_h100():
    import torch

    h100 = peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16)
    a100 = peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16)
    assert h100 == pytest.approx(989e12, rel=0.01)
    assert a100 == pytest.approx(312e12, rel=0.01)
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.float32) < h100
    assert peak_flops("Some Unknown GPU", torch.bfloat16) is None
    assert DEVICE_PEAK_FLOPS


# ---------------------------------------------------------------------------------------------- plugins
def test_third_party_plugin_is_found_through_its_entry_point(harness_cli):
    code, out, _ = harness_cli("plugins")
    assert code == 0
    assert "harness-hello" in out and "hello-sgd" in out and "hello-blobs" in out
    code, out, err = harness_cli("run", "--workload", "hello-blobs", "--optimizer", "hello-sgd", "--steps", "60",
                                 "--device", "cpu", "--json", "r.json")
    assert code == 0, err
    result = json.load(open("r.json"))
    assert result["status"] == "ok" and result["metrics"]["accuracy"] > 0.8


def test_a_disabled_plugin_is_gone_and_named(harness_cli, monkeypatch):
    code, out, err = harness_cli("--disable", "adamw", "run", "--optimizer", "adamw", "--steps", "10")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "adamw" in err and "Traceback" not in err
    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", "sgd")
    code, _, err = harness_cli("run", "--optimizer", "sgd", "--steps", "10")
    assert code == 2 and "sgd" in err


def test_a_plugin_that_fails_to_import_is_named_in_one_line_and_left_out(harness_cli, monkeypatch):
    monkeypatch.setenv("HARNESS_PLUGINS", "no_such_module_for_harness")
    code, out, err = harness_cli("run", "--steps", "10", "--device", "cpu")
    lines = [line for line in err.splitlines() if "no_such_module_for_harness" in line]
    assert len(lines) == 1 and "failed to import" in lines[0] and "Traceback" not in err
    assert code == 0  # the other plugins keep working


# ---------------------------------------------------------------------------------------------- bad input
BAD_TRIALS = [
    ("workload: digitz\n", "workload", "digits"),                        # did-you-mean
    ("optimizer: adamm\n", "optimizer", "adamw"),
    ("optimizer: {name: sgd, lr: fast}\n", "optimizer.lr", "number"),
    ("optimizer: {name: sgd, lr: -1}\n", "optimizer.lr", "allowed"),
    ("optimizer: {name: sgd, momentom: 0.9}\n", "momentom", "momentum"),
    ("batch_size: 0\n", "batch_size", "positive integer"),
    ("budget: {steps: 10, epochs: 2}\n", "budget", "one of"),
    ("bogus_key: 1\n", "bogus_key", "workload"),
    ("workload: [unclosed\n", "trial.yaml", "YAML"),
    ("workload: {name: digits, hidden: many}\n", "workload.hidden", "integer"),
]


@pytest.mark.parametrize("text,field,allowed", BAD_TRIALS)
def test_bad_trial_file_gets_one_line_exit_2(harness_cli, tmp_path, text, field, allowed):
    (tmp_path / "trial.yaml").write_text(text)
    code, out, err = harness_cli("run", "trial.yaml")
    assert code == 2, (out, err)
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert field in line and allowed.lower() in line.lower(), line


@pytest.mark.parametrize("argv,field", [
    (["run", "--steps", "-3"], "steps"),
    (["run", "--set", "optimizer.lr"], "--set"),
    (["run", "--device", "tpu"], "device"),
    (["run", "no_such_trial.yaml"], "no_such_trial.yaml"),
])
def test_bad_cli_arguments_get_one_line_exit_2(harness_cli, argv, field):
    code, out, err = harness_cli(*argv)
    assert code == 2
    assert "Traceback" not in err and field in err and len(err.strip().splitlines()) == 1, err


def test_the_installed_console_script_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("precision: fp33\n")
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(bad)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "precision" in proc.stderr and "fp32" in proc.stderr
