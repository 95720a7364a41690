"""Bringing your own model: the README's example (equal to ``examples/byo/``) trains through ``harness run`` and
``harness study`` with the module found next to the study file or in the current directory (in the driver and
in the trial processes), one-line import errors that say how to fix them, ``quantize`` on a
``nn.TransformerEncoder`` model, and a failed trial's message: one sentence plus the path of the traceback."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = ROOT / "tests"
BYO = ROOT / "examples" / "byo"
README = (ROOT / "README.md").read_text()
NO_OBSERVERS = "mlflow,nvml"  # tracking and telemetry are not under test here
SMALL = ("--set", "workload.samples=512", "--set", "workload.width=16", "--steps", "12", "--device", "cpu")


def _section() -> str:
    start, end = README.index("<!-- section:byo -->"), README.index("<!-- /section:byo -->")
    return README[start:end]


def _copy_model(directory: Path, module: str, monkeypatch) -> str:
    """``examples/byo/my_model.py`` copied as ``directory/module.py`` (a fresh name per test, so no module cached
    by an earlier test can stand in for the path under test); returns the workload name."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(BYO / "my_model.py", directory / f"{module}.py")
    monkeypatch.delitem(sys.modules, module, raising=False)
    return f"{module}:build"


# ---------------------------------------------------------------------------------------------- the README
def test_the_readme_example_is_the_example_file_whole():
    blocks = dict(re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", _section(), re.S))
    assert set(blocks) == {"examples/byo/my_model.py", "examples/byo/study.yaml"}
    for path, body in blocks.items():
        assert body == (ROOT / path).read_text(), f"README.md: the block of {path} is not that file"


def test_the_readme_shows_the_import_error_the_harness_prints(harness_cli):
    code, _, err = harness_cli("run", "--workload", "my_model:build", "--device", "cpu")
    shown = re.search(r"```text\n(harness: error: .*?)\n```", _section(), re.S)
    assert code == 2 and shown is not None
    assert err.strip() == shown.group(1)


# ---------------------------------------------------------------------------------------------- finding the module
def test_a_workload_module_in_the_current_directory_runs_in_the_trial_process(harness_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", NO_OBSERVERS)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    workload = _copy_model(tmp_path, "byo_cwd_model", monkeypatch)
    code, out, err = harness_cli("run", "--workload", workload, *SMALL, "--json", "result.json")
    assert code == 0, err + out
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "ok" and result["spec"]["workload"] == workload
    assert result["metrics"]["steps"] == 12
    assert str(tmp_path) not in sys.path  # the CLI leaves the interpreter's path as it found it


def test_a_workload_module_next_to_the_study_file_runs_from_another_directory(harness_cli, tmp_path, monkeypatch):
    import optuna

    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", NO_OBSERVERS)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    workload = _copy_model(tmp_path / "project", "byo_study_model", monkeypatch)
    (tmp_path / "project" / "study.yaml").write_text(
        f"name: byo\nworkload: {{name: '{workload}', samples: 512, width: 16}}\n"
        "axes: {optimizer: {adamw: {lr: [0.001, 0.003]}}}\nomitted_params: default\n"
        "budget: {steps: 12, warmup_steps: 2, windows: 2}\nobjectives: [throughput, accuracy]\nn_trials: 1\n"
        f"device: cpu\nstorage: sqlite:///{tmp_path / 'byo.db'}\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # after harness_cli's own chdir: neither has the module
    code, out, err = harness_cli("study", tmp_path / "project" / "study.yaml")
    assert code == 0, err + out
    (trial,) = optuna.load_study(study_name="byo", storage=f"sqlite:///{tmp_path / 'byo.db'}").get_trials()
    record = trial.user_attrs["record"]
    assert trial.state == optuna.trial.TrialState.COMPLETE, record.get("message")
    assert record["spec"]["workload"] == workload and record["metrics"]["steps"] == 12


def test_a_missing_workload_module_is_one_line_that_says_how_to_fix_it(harness_cli):
    code, out, err = harness_cli("run", "--workload", "no_such_model_here:build", "--device", "cpu")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("harness: error: trial.workload: cannot import module 'no_such_model_here' of workload "
                          "'no_such_model_here:build': no no_such_model_here.py on the Python path")
    assert "add its directory to PYTHONPATH" in err


def test_a_workload_module_whose_own_import_fails_names_the_missing_package(harness_cli, tmp_path, monkeypatch):
    (tmp_path / "byo_needs_a_package.py").write_text(
        "import harness_no_such_package_xyz\n\n\ndef build(device, seed):\n    pass\n")
    monkeypatch.delitem(sys.modules, "byo_needs_a_package", raising=False)
    code, _, err = harness_cli("run", "--workload", "byo_needs_a_package:build", "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert ("module 'byo_needs_a_package' of workload 'byo_needs_a_package:build' imports "
            "'harness_no_such_package_xyz', which is not installed") in err


def test_a_workload_module_without_the_function_lists_its_functions(harness_cli, tmp_path, monkeypatch):
    workload = _copy_model(tmp_path, "byo_typo_model", monkeypatch)
    code, _, err = harness_cli("run", "--workload", workload.replace(":build", ":biuld"), "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "has no function 'biuld' (its functions: build, make_data); did you mean 'build'?" in err


# ---------------------------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("method", ["dynamic-int8", "qat"])
def test_quantize_works_on_a_transformer_encoder_model(run_trial, monkeypatch, method):
    monkeypatch.syspath_prepend(str(BYO))
    result = run_trial.ok(workload="my_model:build", workload_params={"samples": 1024, "width": 32},
                          optimizer={"name": "adamw", "lr": 0.003}, compression={"name": "quantize", "method": method},
                          budget={"steps": 60})
    m = result.metrics
    assert m["accuracy_uncompressed"] > 0.5  # it learned (4 classes: chance is 0.25)
    assert m["accuracy"] >= m["accuracy_uncompressed"] - 0.05  # the int8 model predicts like the float one
    assert m["model_size_bytes"] < 0.9 * m["uncompressed_model_size_bytes"]
    assert m["inference_latency_s"] > 0
    assert torch.backends.mha.get_fastpath_enabled()  # switched off only while the quantised model runs


# ---------------------------------------------------------------------------------------------- failure messages
def test_a_crashed_trials_message_is_one_sentence_naming_where(run_trial, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    result = run_trial(workload="byo_workload:refuses_to_evaluate", budget={"steps": 6})
    assert result.status == "crashed"
    message = result.message
    assert message.startswith("RuntimeError: this model refuses evaluation of a ")
    assert re.search(r"\(during evaluate, at \S*byo_workload\.py:\d+ in _refuse\)$", message), message
    assert "\n" not in message and " | " not in message and "^" not in message and "second line" not in message


def test_a_failed_trial_in_its_own_process_points_to_its_full_traceback(harness_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", NO_OBSERVERS)
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    code, out, err = harness_cli("run", "--workload", "byo_workload:refuses_to_evaluate", "--steps", "6",
                                 "--device", "cpu", "--json", "result.json")
    assert code == 1, err + out
    message = json.loads((tmp_path / "result.json").read_text())["message"]
    sentence, _, log = message.partition("; full traceback: ")
    assert sentence.startswith("RuntimeError: this model refuses evaluation") and "(during evaluate, at " in sentence
    assert Path(log).name == "worker.log", message
    text = Path(log).read_text()  # kept: the message points into the trial's directory
    assert "Traceback (most recent call last)" in text and "_refuse(" in text
    assert "RuntimeError: this model refuses evaluation" in text and "second line of the message" in text
    shutil.rmtree(Path(log).parent)
