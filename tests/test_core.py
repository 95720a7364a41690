"""The core harness: hook order, measurements, entry-point plugins, the CLI and its bad-input contract."""
from __future__ import annotations

import importlib.metadata
import json
import math
import subprocess
import sys

import pytest
import torch

from harness import hookimpl
from harness.config import TrialSpec
from harness.errors import SpecError
from harness.measure import DEVICE_PEAK_FLOPS, peak_flops
from harness.plugins import Registry, get_registry
from harness.space import Technique
from harness.testing import make_spec, run_one_trial
from harness.trial import run_trial

# The worker's side of the lifecycle in harness/hookspecs.py, as hook names (each listed once, at its first call).
LIFECYCLE = [
    "check_combination", "compress_before_training", "reduce_memory", "setup_precision", "build_optimizer",
    "build_engine", "build_lr_scheduler", "build_loss", "build_data_transform", "compile_step", "trial_start",
    "measure_window", "trial_window", "trial_evaluated", "compress_after_training", "measure_model",
    "measure_trial", "trial_end",
]


class Observer:
    """Declares no technique and no workload, so it takes part in every trial; records the trial hooks."""

    def __init__(self):
        self.calls: list[str] = []
        self.phases: list[str] = []
        self.result_status = None

    @hookimpl
    def harness_measure_model(self):
        self.calls.append("measure_model")
        return {"observer_saw_model": 1.0}

    @hookimpl
    def harness_trial_start(self):
        self.calls.append("trial_start")

    @hookimpl
    def harness_trial_window(self, metrics):
        self.calls.append("trial_window")
        self.phases.append(metrics["phase"])

    @hookimpl
    def harness_trial_evaluated(self):
        self.calls.append("trial_evaluated")

    @hookimpl
    def harness_trial_end(self, result):
        self.calls.append("trial_end")
        self.result_status = result.status


def test_hooks_run_in_lifecycle_order_and_observers_see_every_phase(make_registry, hook_recorder):
    observer = Observer()
    registry = make_registry(observer)
    recorder = hook_recorder(registry)
    spec = make_spec(registry=registry, budget={"steps": 40, "warmup_steps": 4, "windows": 4})
    result = run_trial(spec, registry=registry)
    assert result.ok, result.message
    names = [name.removeprefix("harness_") for name in recorder.names()]
    assert list(dict.fromkeys(names)) == LIFECYCLE
    # every window is measured, then observed: the warm-up window and 4 timed ones, all before the evaluation
    windows = [n for n in names if n in ("measure_window", "trial_window")]
    assert windows == ["measure_window", "trial_window"] * 5
    assert names.index("trial_evaluated") > max(i for i, n in enumerate(names) if n == "trial_window")
    assert observer.calls == ["trial_start"] + ["trial_window"] * 5 + ["trial_evaluated", "measure_model",
                                                                         "trial_end"]
    assert observer.phases == ["warmup"] + ["timed"] * 4
    assert observer.result_status == "ok"
    assert result.metrics["observer_saw_model"] == 1.0  # measure_model dicts reach the result


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
    with open("r.json") as f:
        result = json.load(f)
    assert result["status"] == "ok" and result["metrics"]["accuracy"] > 0.8


class OptimizerPlugin:
    """Declares one optimizer technique (plain SGD) and records the hooks it receives."""

    def __init__(self, name: str):
        self.name = name
        self.calls: list[str] = []

    @hookimpl
    def harness_declare_techniques(self):
        return [Technique(axis="optimizer", name=self.name, description="test-only plain SGD")]

    @hookimpl
    def harness_build_optimizer(self, params):
        self.calls.append("build_optimizer")
        return torch.optim.SGD(params, lr=0.05)

    @hookimpl
    def harness_build_lr_scheduler(self):
        self.calls.append("build_lr_scheduler")

    @hookimpl
    def harness_trial_start(self):
        self.calls.append("trial_start")


class StartObserver:
    """Declares nothing (an observer); counts the trials it sees start."""

    def __init__(self):
        self.started = 0

    @hookimpl
    def harness_trial_start(self):
        self.started += 1


def test_a_technique_hook_reaches_only_the_plugin_of_the_selected_technique(make_registry):
    a, b = OptimizerPlugin("opt-a"), OptimizerPlugin("opt-b")
    registry = make_registry(a, b)

    assert run_trial(make_spec(registry=registry, optimizer="opt-a"), registry).ok
    assert a.calls.count("build_optimizer") == 1 and a.calls.count("build_lr_scheduler") == 1
    assert "build_optimizer" not in b.calls and "build_lr_scheduler" not in b.calls

    assert run_trial(make_spec(registry=registry, optimizer="opt-b"), registry).ok
    assert b.calls.count("build_optimizer") == 1 and a.calls.count("build_optimizer") == 1


def test_a_trial_hook_reaches_observers_and_participants_but_not_other_technique_plugins(make_registry):
    a, b, observer = OptimizerPlugin("opt-a"), OptimizerPlugin("opt-b"), StartObserver()
    registry = make_registry(a, b, observer)

    assert run_trial(make_spec(registry=registry, optimizer="opt-a"), registry).ok

    assert a.calls.count("trial_start") == 1  # takes part: its technique is the trial's optimizer
    assert observer.started == 1  # declares nothing: sees every trial
    assert "trial_start" not in b.calls  # its technique is not selected: not part of the trial


class Probe:
    """Adds a metric to every window and one to the trial, and records what the observers then saw."""

    def __init__(self):
        self.windows: list[tuple[int, dict]] = []
        self.statuses: list[str] = []
        self.end_metrics: dict = {}

    @hookimpl
    def harness_measure_window(self, step, phase):
        return {"probe_step": float(step), "probe_phase": phase, "train_loss": -1.0}

    @hookimpl
    def harness_measure_trial(self, trial, status):
        self.statuses.append(status)
        return {"probe_trial": 1.0, "probe_saw_steps": float(trial.metrics.get("steps", -1))}

    @hookimpl
    def harness_trial_window(self, step, metrics):
        self.windows.append((step, dict(metrics)))

    @hookimpl
    def harness_trial_end(self, result):
        self.end_metrics = dict(result.metrics)


def test_measured_window_and_trial_metrics_reach_the_observers_and_the_result(make_registry):
    probe = Probe()
    registry = make_registry(probe)

    result = run_trial(make_spec(registry=registry, budget={"steps": 30, "warmup_steps": 3, "windows": 3}),
                       registry)

    assert result.ok, result.message
    assert len(probe.windows) == 4  # the warm-up window and 3 timed ones
    for step, metrics in probe.windows:
        assert metrics["probe_step"] == step and metrics["probe_phase"] == metrics["phase"]
        assert metrics["train_loss"] != -1.0  # the core's own names win
    assert probe.statuses == ["ok"]
    assert result.metrics["probe_trial"] == 1.0 and result.metrics["probe_saw_steps"] == 30
    assert probe.end_metrics["probe_trial"] == 1.0  # measured before harness_trial_end


def test_a_failed_trial_is_measured_too(make_registry):
    probe = Probe()
    registry = make_registry(probe)

    result = run_trial(make_spec(registry=registry, parallelism="ddp"), registry)  # ddp needs 2 processes

    assert result.status == "infeasible", result.message
    assert probe.statuses == ["infeasible"] and result.metrics["probe_trial"] == 1.0


class DupOne:
    """A plugin registered under the entry-point name ``dup``."""


class DupTwo:
    """Another distribution's plugin registered under the same name."""


def test_a_plugin_name_registered_twice_is_a_one_line_error_naming_both(monkeypatch, capsys):
    group = "harness.plugins"
    real = importlib.metadata.entry_points
    dups = [importlib.metadata.EntryPoint("dup", f"{__name__}:{cls.__name__}", group) for cls in (DupOne, DupTwo)]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [*real(group=group), *dups])

    registry = Registry()

    lines = [line for line in capsys.readouterr().err.splitlines() if "dup" in line]
    assert len(lines) == 1, lines
    assert f"{__name__}:DupOne" in lines[0] and f"{__name__}:DupTwo" in lines[0], lines[0]
    assert isinstance(registry.plugin("dup"), DupOne)  # the first keeps the name


@pytest.mark.parametrize("essential", ["fp32", "eager", "single", "none", "adamw", "digits"])
def test_disabling_an_essential_plugin_is_a_spec_error_naming_it(essential):
    with pytest.raises(SpecError, match=f"'{essential}' is essential") as info:
        get_registry(disable=[essential])
    assert "\n" not in str(info.value)


def test_a_plugin_class_is_instantiated_once_per_registry(make_registry):
    first, second = make_registry(StartObserver), make_registry(StartObserver)
    mine, theirs = first.plugin("StartObserver"), second.plugin("StartObserver")
    assert isinstance(mine, StartObserver) and isinstance(theirs, StartObserver) and mine is not theirs

    assert run_trial(make_spec(registry=first), first).ok

    assert mine.started == 1 and theirs.started == 0  # the state lives on each registry's instance


class _CompilerError(RuntimeError):
    """Stands for an error of torch's compiler stack: classified by the module of its type alone."""


_CompilerError.__module__ = "torch._dynamo.exc"


class BrokenCompiler:
    """Declares the compile technique ``broken-compile``, whose compiled step fails in the compiler."""

    @hookimpl
    def harness_declare_techniques(self):
        return [Technique(axis="compile", name="broken-compile", description="test-only: fails to compile")]

    @hookimpl
    def harness_compile_step(self):
        def step(*_batch):
            raise _CompilerError("backend failed on purpose")

        return step


def test_a_compiler_error_is_a_compile_error_whatever_the_technique(make_registry):
    registry = make_registry(BrokenCompiler)

    result = run_trial(make_spec(registry=registry, compile="broken-compile"), registry)

    assert result.status == "compile-error", result.message
    assert result.message.startswith("broken-compile: _CompilerError: backend failed on purpose")


def test_a_disabled_plugin_is_gone_and_named(harness_cli, monkeypatch):
    code, out, err = harness_cli("--disable", "sgd", "run", "--optimizer", "sgd", "--steps", "10")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "'sgd'" in err and "Traceback" not in err
    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", "rmsprop")
    code, _, err = harness_cli("run", "--optimizer", "rmsprop", "--steps", "10")
    assert code == 2 and "'rmsprop'" in err


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
