"""The plugin authors' kit: conformance checks (``harness.testing.check_plugin``), the pytest plugin's fixtures,
dispatch by declaration as a third party sees it, ``harness plugins`` with broken plugins, the example third-party
package ``examples/harness-lion`` (installed into the test environment by tox) trained through ``harness run``
and picked by ``harness study``, and the tutorial's code snippets."""
from __future__ import annotations

import configparser
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from harness import hookimpl
from harness.cli import plugin_listing
from harness.plugins import ENTRY_POINT_GROUP, Registry
from harness.space import Float, Technique
from harness.testing import assert_trial_status, check_plugin, tiny_workload

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "harness-lion"
BROKEN = "plugin_kit_broken"  # tests/plugin_kit_broken.py: fails to import
#: tracking and telemetry are not under test here, and MLflow's database set-up is the slowest part of a study
NO_OBSERVERS = "mlflow,nvml"


def _entry_points():
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _plugin(name: str, **hooks) -> types.ModuleType:
    """A plugin module built in the test, with the given hook implementations."""
    module = types.ModuleType(name)
    for hookname, func in hooks.items():
        func.__name__ = hookname
        setattr(module, hookname, hookimpl(func))
    return module


def _bad_declaration():
    return [Technique(axis="optimizer", name="bad-range", space={"lr": Float(1.0, 0.1)})]


def _bad_signature(params, sepc):  # noqa: ARG001 (the misspelt argument is what is tested)
    return None


def _a_technique():
    return [Technique(axis="optimizer", name="fine", space={"lr": Float(1e-4, 1.0, default=0.1, log=True)})]


def _greedy():
    """A plugin that implements a compression build hook but declares no compression technique."""
    return _plugin("greedy", harness_compress_before_training=lambda model: model)


def _probe():
    """A third party's optimizer ``probe-sgd`` (plain SGD) that notes every trial its hooks were called in."""
    calls: list[tuple[str, str]] = []

    def declare():
        return [Technique(axis="optimizer", name="probe-sgd", space={"lr": Float(1e-3, 1.0, default=0.1, log=True)})]

    def build(params, spec):
        calls.append(("harness_build_optimizer", spec.optimizer.name))
        return torch.optim.SGD(params, lr=spec.optimizer.params["lr"])

    def trial_end(trial):
        calls.append(("harness_trial_end", trial.spec.optimizer.name))

    return _plugin("probe", harness_declare_techniques=declare, harness_build_optimizer=build,
                   harness_trial_end=trial_end), calls


# ---------------------------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("entry_point", _entry_points(), ids=lambda ep: ep.name)
def test_every_installed_plugin_conforms(entry_point):
    assert check_plugin(entry_point.load()) == []


def test_the_example_package_is_installed_through_its_entry_point():
    lion = [ep for ep in _entry_points() if ep.name == "lion"]
    assert lion, "pip install examples/harness-lion (tox does it in commands_pre)"
    assert lion[0].value == "harness_lion.plugin" and lion[0].dist.name == "harness-lion"


def test_conformance_names_a_bad_declaration():
    plugin = _plugin("bad_decl", harness_declare_techniques=_bad_declaration)
    with pytest.raises(AssertionError) as info:
        check_plugin(plugin)
    assert "bad_decl: technique optimizer:bad-range: parameter 'lr': low 1.0 > high 0.1" in str(info.value)
    assert check_plugin(plugin, raises=False) == [
        "bad_decl: technique optimizer:bad-range: parameter 'lr': low 1.0 > high 0.1",
        "bad_decl: technique optimizer:bad-range: the plugin implements no harness_build_optimizer, "
        "so a trial selecting it would fail"]


def test_conformance_names_a_bad_hook_signature_with_the_allowed_arguments():
    plugin = _plugin("bad_sig", harness_declare_techniques=_a_technique, harness_build_optimizer=_bad_signature)
    assert check_plugin(plugin, raises=False) == [
        "bad_sig: hook signature error: harness_build_optimizer(params, sepc): unknown argument 'sepc' "
        "(allowed: params, spec, device); did you mean 'spec'?"]


def test_conformance_suggests_the_hook_a_typo_meant():
    plugin = _plugin("typo", harness_build_optimiser=lambda: None)
    assert check_plugin(plugin, raises=False) == [
        "typo: implements unknown hook 'harness_build_optimiser'; did you mean 'harness_build_optimizer'?"]


def test_conformance_reports_a_technique_hook_of_an_axis_the_plugin_declares_nothing_on():
    assert check_plugin(_greedy(), raises=False) == [
        "greedy: harness_compress_before_training is a technique hook of the compression axis, but the plugin "
        "declares no compression technique, so the harness never calls it"]


def test_conformance_accepts_a_technique_hook_of_a_declared_axis():
    plugin = _plugin("fine", harness_declare_techniques=_a_technique, harness_build_optimizer=lambda: None)
    assert check_plugin(plugin) == []


class _ClassPlugin:
    """A plugin written as a class: its state lives on the instance the plugin manager creates."""

    def __init__(self):
        self.built = 0

    @hookimpl
    def harness_declare_techniques(self):
        return _a_technique()

    @hookimpl
    def harness_build_optimizer(self, params, spec):
        self.built += 1
        return torch.optim.SGD(params, lr=spec.optimizer.params["lr"])

    @hookimpl
    def harness_setup_precision(self):
        return None


def test_conformance_checks_class_and_instance_plugins_by_their_methods():
    expected = ["_ClassPlugin: harness_setup_precision is a technique hook of the precision axis, but the plugin "
                "declares no precision technique, so the harness never calls it"]
    assert check_plugin(_ClassPlugin, raises=False) == expected
    assert check_plugin(_ClassPlugin(), raises=False) == expected


# ---------------------------------------------------------------------------------------------- dispatch
def test_a_third_party_build_hook_is_called_only_for_its_own_technique(make_registry, run_trial, hook_recorder):
    probe, calls = _probe()
    registry = make_registry(probe)
    recorder = hook_recorder(registry)
    run_trial.ok(registry=registry, optimizer="sgd", budget={"steps": 10})
    assert calls == []  # another optimizer's trial: neither its build hook nor its observer hook ran
    assert recorder.plugins_called("build_optimizer") == {"sgd"}
    assert "probe" not in recorder.plugins_called("trial_end")
    recorder.clear()
    run_trial.ok(registry=registry, optimizer="probe-sgd", budget={"steps": 10})
    assert calls == [("harness_build_optimizer", "probe-sgd"), ("harness_trial_end", "probe-sgd")]
    assert recorder.plugins_called("build_optimizer") == {"probe"}


def test_a_plugin_implementing_a_hook_for_an_axis_it_declares_nothing_on_is_never_called(make_registry,
                                                                                         hook_recorder, tiny_spec):
    registry = make_registry(_greedy())
    recorder = hook_recorder(registry)
    spec = tiny_spec(compression={"name": "prune", "when": "after"})
    workload = tiny_workload()
    registry.hooks.compress_before_training(model=workload.model, workload=workload, spec=spec,
                                            device=torch.device("cpu"))
    assert recorder.plugins_called("compress_before_training") == {"prune"}


# ---------------------------------------------------------------------------------------------- the pytest plugin
def test_run_trial_and_its_assert_helpers_report_status_and_message(run_trial):
    result = run_trial.ok(budget={"steps": 20})
    assert result.spec["workload"] == "harness.testing:tiny_workload"
    infeasible = run_trial(compile="cuda-graph")
    assert_trial_status(infeasible, "infeasible", "requires CUDA")
    with pytest.raises(AssertionError, match=r"the trial ended 'infeasible', not 'ok': compile technique "
                                             r"'cuda-graph' requires CUDA"):
        run_trial.ok(compile="cuda-graph")


def test_the_hook_recorder_sees_hooks_and_the_plugins_they_reached(run_trial, hook_recorder):
    recorder = hook_recorder()
    run_trial.ok(precision="amp-bf16", budget={"steps": 10})
    (call,) = recorder.calls_of("harness_setup_precision")
    assert call.plugins == ("amp-bf16",) and call.done and call.result.compute_dtype == torch.bfloat16
    assert recorder.called("trial_start") and not recorder.called("build_optimizer", plugin="sgd")
    names = recorder.names()
    assert names.index("harness_build_optimizer") < names.index("harness_trial_start") < names.index(
        "harness_trial_end")


def test_a_plugin_projects_tests_get_the_fixtures_by_installing_the_harness(tmp_path):
    (tmp_path / "test_fixtures.py").write_text(
        "import pytest\n\n\n"
        "def test_fixtures(harness_registry, tiny_spec, run_trial, hook_recorder, study_storage, harness_cli):\n"
        "    assert ('optimizer', 'adamw') in harness_registry.techniques\n"
        "    assert tiny_spec(optimizer='sgd').optimizer.name == 'sgd'\n"
        "    assert study_storage.startswith('sqlite:///') and study_storage.endswith('study.db')\n"
        "    code, out, _ = harness_cli('plugins', '--json')\n"
        "    assert code == 0 and '\"adamw\"' in out\n\n\n"
        "@pytest.mark.gpu\n"
        "def test_on_a_gpu():\n"
        "    import torch\n"
        "    assert torch.cuda.is_available()\n")
    env = {**os.environ, "HARNESS_DISABLE_PLUGINS": NO_OBSERVERS}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error",
                           "test_fixtures.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    outcome = "2 passed" if torch.cuda.is_available() else "1 passed, 1 skipped"
    assert outcome in proc.stdout, proc.stdout[-3000:]


# ---------------------------------------------------------------------------------------------- harness plugins
def test_harness_plugins_lists_a_plugin_that_fails_to_import_with_its_error(harness_cli, monkeypatch):
    monkeypatch.setenv("HARNESS_PLUGINS", BROKEN)
    code, out, err = harness_cli("plugins", "--json")
    assert code == 0 and "Traceback" not in err  # without --check, a broken plugin is listed, not an error
    listing = {entry["name"]: entry for entry in json.loads(out)}
    assert listing[BROKEN]["error"] == (f"failed to import {BROKEN}: ModuleNotFoundError: "
                                        "No module named 'harness_lion_turbo_kernels'")
    assert listing["lion"]["distribution"] == "harness-lion" and listing["lion"]["version"] == "0.1.0"
    (lion,) = listing["lion"]["techniques"]
    assert (lion["axis"], lion["name"], sorted(lion["params"])) == ("optimizer", "lion",
                                                                    ["beta1", "beta2", "lr", "weight_decay"])
    assert listing["lion"]["hooks"] == ["harness_build_optimizer", "harness_declare_techniques"]
    code, out, err = harness_cli("plugins")
    assert code == 0
    assert BROKEN in out and "error: failed to import" in out and "optimizer: lion" in out


def test_harness_plugins_lists_bad_declarations_and_signatures_with_their_errors():
    registry = Registry(entry_points=False, extra=[_plugin("bad_decl", harness_declare_techniques=_bad_declaration),
                                                   _plugin("bad_sig", harness_build_optimizer=_bad_signature)])
    listing = {entry["name"]: entry for entry in plugin_listing(registry)}
    assert listing["bad_decl"]["error"] == "bad declaration: technique 'bad-range': parameter 'lr' has low > high"
    assert listing["bad_sig"]["error"] == ("hook signature error: harness_build_optimizer(params, sepc): unknown "
                                           "argument 'sepc' (allowed: params, spec, device); did you mean 'spec'?")
    assert ("optimizer", "bad-range") not in registry.techniques


def test_harness_plugins_check_runs_the_conformance_check_on_every_plugin(capsys):
    import argparse

    from harness.cli import cmd_plugins

    registry = Registry(extra=[_greedy()])
    code = cmd_plugins(argparse.Namespace(json=True, check=True), registry)
    listing = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert code == 1
    assert listing["greedy"]["problems"] == check_plugin(_greedy(), raises=False) and len(
        listing["greedy"]["problems"]) == 1
    assert listing["lion"]["problems"] == [] and listing["sgd"]["problems"] == []


def test_harness_run_selecting_a_broken_plugins_technique_exits_2_naming_the_plugin(harness_cli, monkeypatch):
    monkeypatch.setenv("HARNESS_PLUGINS", BROKEN)
    code, out, err = harness_cli("run", "--optimizer", "turbo-lion", "--steps", "20", "--device", "cpu")
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("harness: error:")]
    assert len(errors) == 1
    assert errors[0].startswith("harness: error: trial.optimizer: unknown technique 'turbo-lion' (known: ")
    assert f"plugin '{BROKEN}' failed to load (failed to import {BROKEN}: ModuleNotFoundError" in errors[0]


# ---------------------------------------------------------------------------------------------- the example
@pytest.mark.slow
def test_lion_trains_digits_through_harness_run_in_a_worker(harness_cli, tmp_path):
    code, out, err = harness_cli("run", "--workload", "digits", "--set", "workload.hidden=64", "--optimizer", "lion",
                                 "--set", "optimizer.lr=0.002", "--steps", "80", "--device", "cpu",
                                 "--json", "result.json")
    assert code == 0, err
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "ok" and result["spec"]["optimizer"]["name"] == "lion"
    # 10 classes: an untrained model's loss is about log(10) = 2.3; Lion must have brought it well down
    assert result["metrics"]["train_loss"] < 0.3 * math.log(10)
    assert result["metrics"]["accuracy"] > 0.9



@pytest.mark.slow
def test_a_study_that_offers_only_lion_runs_it_through_harness_study(harness_cli, tmp_path, monkeypatch):
    import optuna

    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", NO_OBSERVERS)

    (tmp_path / "lion.yaml").write_text(
        "name: lion-study\n"
        "workload: {name: digits, hidden: 32, depth: 1}\n"
        "axes:\n"
        "  optimizer:\n"
        "    lion: {lr: {low: 0.0003, high: 0.003, log: true}}\n"
        "budget: {steps: 40, warmup_steps: 3, windows: 3}\n"
        "objectives: [throughput, accuracy]\n"
        "n_trials: 2\n"
        "device: cpu\n"
        "trial_timeout_s: 120\n"
        "storage: sqlite:///lion.db\n")
    code, out, err = harness_cli("study", "lion.yaml")
    assert code == 0, err
    study = optuna.load_study(study_name="lion-study", storage="sqlite:///lion.db")
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert all(t.user_attrs["record"]["spec"]["optimizer"]["name"] == "lion" for t in trials)


@pytest.mark.slow
def test_the_example_packages_own_tests_pass():
    env = {**os.environ, "HARNESS_DISABLE_PLUGINS": NO_OBSERVERS}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=EXAMPLE,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 passed" in proc.stdout


def test_the_single_file_workload_example_conforms_and_trains(monkeypatch):
    from harness.testing import run_one_trial

    monkeypatch.syspath_prepend(str(ROOT / "examples" / "workloads"))
    monkeypatch.setenv("HARNESS_PLUGINS", "two_moons")
    import two_moons

    assert check_plugin(two_moons) == []
    result = run_one_trial(workload="two-moons", workload_params={"samples": 1000, "hidden": 32}, optimizer={
                           "name": "adamw", "lr": 0.01}, budget={"steps": 100, "warmup_steps": 3, "windows": 3})
    assert result.ok, result.message
    assert result.metrics["accuracy"] > 0.9


# ---------------------------------------------------------------------------------------------- the tutorial
FENCE = re.compile(r"(?:<!-- file: (?P<file>\S+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def _snippets():
    return list(FENCE.finditer((ROOT / "docs" / "plugins.md").read_text()))


def test_tutorial_blocks_said_to_be_files_are_those_files_whole():
    copied = [m for m in _snippets() if m["file"]]
    assert len(copied) >= 6
    for m in copied:
        source = (ROOT / m["file"]).read_text()
        assert m["body"] == source, f"docs/plugins.md: the block of {m['file']} is not that file, imports included"


def test_tutorial_python_snippets_run_and_conform():
    standalone = [m for m in _snippets() if m["lang"] == "python" and not m["file"]]
    assert standalone
    for i, m in enumerate(standalone):
        module = types.ModuleType(f"plugins_md_snippet_{i}")
        exec(compile(m["body"], f"docs/plugins.md snippet {i}", "exec"), module.__dict__)
        if any(name.startswith("harness_") for name in vars(module)):
            assert check_plugin(module) == []


def test_tutorial_snippets_parse():
    for m in _snippets():
        where = f"docs/plugins.md: {m['lang']} snippet starting {m['body'][:40]!r}"
        if m["lang"] == "python":
            compile(m["body"], where, "exec")
        elif m["lang"] == "yaml":
            assert yaml.safe_load(m["body"]) is not None, where
        elif m["lang"] == "ini":
            configparser.ConfigParser().read_string(m["body"], where)
        elif m["lang"] == "toml":
            import tomllib

            tomllib.loads(m["body"])
