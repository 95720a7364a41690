"""The plugin authors' kit: conformance checks (``harness.testing.check_plugin``), ``harness plugins`` with
broken plugins, the example third-party package ``examples/harness-lion`` (installed into the test environment
by tox) trained through ``harness run`` and picked by ``harness study``, and the tutorial's code snippets."""
from __future__ import annotations

import configparser
import importlib.metadata
import inspect
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from harness import hookimpl
from harness.cli import plugin_listing
from harness.plugins import ENTRY_POINT_GROUP, Registry
from harness.space import Float, Technique
from harness.testing import check_plugin

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "harness-lion"
BROKEN = "plugin_kit_broken"  # tests/plugin_kit_broken.py: fails to import


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


def _bad_signature(params, sepc):
    return None


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


def test_conformance_names_a_bad_hook_signature_through_pluggy():
    plugin = _plugin("bad_sig", harness_build_optimizer=_bad_signature)
    problems = check_plugin(plugin, raises=False)
    assert len(problems) == 1
    assert problems[0].startswith("bad_sig: hook signature error: hookimpl definition: "
                                  "harness_build_optimizer(params, sepc)")
    assert "{'sepc'}" in problems[0] and "can not be found in the hookspec" in problems[0]


def test_conformance_suggests_the_hook_a_typo_meant():
    plugin = _plugin("typo", harness_build_optimiser=lambda params: None)
    assert check_plugin(plugin, raises=False) == [
        "typo: implements unknown hook 'harness_build_optimiser'; did you mean 'harness_build_optimizer'?"]


def test_conformance_catches_a_hook_that_takes_over_other_techniques_trials():
    plugin = _plugin("greedy", harness_compress_before_training=lambda model: model)
    (problem,) = check_plugin(plugin, raises=False)
    assert "harness_compress_before_training returned Linear when the trial selected another technique" in problem


# ---------------------------------------------------------------------------------------------- harness plugins
def test_harness_plugins_lists_a_plugin_that_fails_to_import_with_its_error(harness_cli, monkeypatch):
    monkeypatch.setenv("HARNESS_PLUGINS", BROKEN)
    code, out, err = harness_cli("plugins", "--json")
    assert code == 0 and "Traceback" not in err
    listing = {entry["name"]: entry for entry in json.loads(out)}
    assert listing[BROKEN]["error"] == (f"failed to import {BROKEN}: ModuleNotFoundError: "
                                        "No module named 'harness_lion_turbo_kernels'")
    assert listing["lion"]["distribution"] == "harness-lion" and listing["lion"]["version"] == "0.1.0"
    assert listing["lion"]["techniques"] == [
        {"axis": "optimizer", "name": "lion", "params": ["beta1", "beta2", "lr", "weight_decay"]}]
    assert listing["lion"]["hooks"] == ["harness_build_optimizer", "harness_declare_techniques"]
    code, out, err = harness_cli("plugins")
    assert code == 0
    assert BROKEN in out and "error: failed to import" in out and "optimizer: lion" in out


def test_harness_plugins_lists_bad_declarations_and_signatures_with_their_errors():
    registry = Registry(entry_points=False, extra=[_plugin("bad_decl", harness_declare_techniques=_bad_declaration),
                                                   _plugin("bad_sig", harness_build_optimizer=_bad_signature)])
    listing = {entry["name"]: entry for entry in plugin_listing(registry)}
    assert listing["bad_decl"]["error"] == "bad declaration: technique 'bad-range': parameter 'lr' has low > high"
    assert "hook signature error" in listing["bad_sig"]["error"] and "{'sepc'}" in listing["bad_sig"]["error"]
    assert ("optimizer", "bad-range") not in registry.techniques


def test_harness_plugins_check_runs_the_conformance_check_on_every_plugin(capsys):
    import argparse

    from harness.cli import cmd_plugins

    greedy = _plugin("greedy", harness_compress_before_training=lambda model: model)
    registry = Registry(extra=[greedy])
    code = cmd_plugins(argparse.Namespace(json=True, check=True), registry)
    listing = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert code == 1
    assert len(listing["greedy"]["problems"]) == 1 and "greedy: harness_compress_before_training returned Linear" \
        in listing["greedy"]["problems"][0]
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


#: tracking and telemetry are not under test here, and MLflow's database set-up is the slowest part of a study
NO_OBSERVERS = "mlflow,nvml"


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


def test_tutorial_snippets_copied_from_the_example_match_it():
    copied = [m for m in _snippets() if m["file"]]
    assert len(copied) >= 4
    for m in copied:
        source = (ROOT / m["file"]).read_text()
        assert m["body"] in source, f"docs/plugins.md: the snippet of {m['file']} no longer matches it"


def test_tutorial_hook_table_matches_the_hookspecs():
    from harness import hookspecs

    rows = re.findall(r"^\| `(harness_\w+)\(([^)]*)\)` \|[^|]*\|[^|]*\| (yes|no) \|", (ROOT / "docs" / "plugins.md")
                      .read_text(), re.M)
    documented = {name: (args, firstresult) for name, args, firstresult in rows}
    specs = {name: getattr(hookspecs, name) for name in dir(hookspecs) if name.startswith("harness_")}
    assert sorted(documented) == sorted(specs)
    for name, spec in specs.items():
        args = ", ".join(inspect.signature(spec).parameters)
        firstresult = "yes" if spec.harness_spec.get("firstresult") else "no"
        assert documented[name] == (args, firstresult), name


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
