"""The ``mlflow`` plugin against a real ``mlflow server`` on loopback: a study through the real driver (``harness
study``) read back with MlflowClient (parent/child links, params and the search space, per-step and final metrics,
statuses for COMPLETE / FAIL / PRUNED, tags, artifacts, the baseline's run, the saved views and the printed link),
a child left RUNNING by a killed driver closed FAILED on resume, standalone runs of ``harness run``, disabling by
name, bad tracking settings, and per-registry plugin state. What the UI renders is tested in test_browser.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import psutil
import pytest
import yaml
from mlflow import MlflowClient
from mlflow_server import mlflow_process

from harness.errors import SpecError
from harness.outcomes import TrialRecord
from harness.plugins import get_registry
from harness.space import Environment
from harness.step import DistInfo
from harness.testing import make_spec

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
HARNESS = [sys.executable, "-m", "harness.cli"]
ADAMW = {"adamw": {"lr": 0.01, "weight_decay": 0.0, "implementation": "default", "schedule": "constant",
                   "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "warmup_fraction": 0.05}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, proxied artifacts) on a free loopback port."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_process(["server", "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
                         "--artifacts-destination", str(tmp / "artifacts")], tmp / "server.log") as uri:
        yield uri


def env(**extra) -> dict:
    path = os.pathsep.join(p for p in (str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")) if p)
    out = dict(os.environ, PYTHONPATH=path, HARNESS_PLUGINS="failing_plugin", MPLBACKEND="Agg",
               MLFLOW_DISABLE_TELEMETRY="true")
    out.pop("MLFLOW_TRACKING_URI", None)
    out.update(extra)
    return out


def study_file(tmp: Path, name: str, uri: str, **fields) -> Path:
    data = {
        "name": name,
        "workload": {"name": "digits", "hidden": 32, "depth": 1},
        "axes": {"optimizer": ADAMW, "compile": ["eager"],
                 "compression": {"none": None, "fault": {"mode": "raise"}}},
        "batch_size": 64,
        "budget": {"steps": 24, "warmup_steps": 2, "windows": 3, "eval_every_steps": 12, "noise_threshold": 0},
        "trial_timeout_s": 120,
        "objectives": [{"throughput": "max"}, {"accuracy": "max"}],
        "sampler": "grid",
        "n_trials": 2,
        "device": "cpu",
        "heartbeat_s": 1,
        "storage": f"sqlite:///{tmp / 'optuna.db'}",
        "output_dir": str(tmp / "out"),
        "mlflow": {"experiment": f"exp-{name}", "tracking_uri": uri},
    }
    data.update(fields)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def harness(args, cwd: Path, timeout: float = 300, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([*HARNESS, *map(str, args)], cwd=cwd, env=env(**extra_env), capture_output=True,
                          text=True, timeout=timeout)


def runs_of(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], max_results=1000)


# ============================================================================================ a study
@pytest.fixture(scope="module")
def study_run(server, tmp_path_factory):
    """The grid over compression {none, fault(raise)}: one COMPLETE trial and one FAIL (plugin-error); and a
    baseline at batch size 32, measured again after each trial."""
    tmp = tmp_path_factory.mktemp("mlflow-study")
    proc = harness(["study", study_file(tmp, "grid", server, baseline={"batch_size": 32},
                                        remeasure_baseline_every=1)], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = optuna.load_study(study_name="grid", storage=f"sqlite:///{tmp / 'optuna.db'}")
    client = MlflowClient(tracking_uri=server)
    runs = runs_of(client, "exp-grid")
    parent = [r for r in runs if r.data.tags.get("harness.role") == "study"]
    children = {int(r.data.tags["harness.trial_number"]): r for r in runs if r.data.tags.get("harness.role") == "trial"}
    records = {t.number: t.user_attrs["record"] for t in study.get_trials()}
    baseline = [r for r in runs if r.data.tags.get("harness.role") == "baseline"]
    return dict(tmp=tmp, client=client, parent=parent, children=children, records=records, baseline=baseline,
                baseline_record=study.user_attrs["baseline"], checks=study.user_attrs.get("baseline_checks", []),
                stdout=proc.stdout,
                experiment=client.get_experiment_by_name("exp-grid"))


def by_state(study_run, state: str) -> list[tuple[dict, object]]:
    return [(rec, study_run["children"][n]) for n, rec in study_run["records"].items() if rec["state"] == state]


def test_one_parent_run_per_study_with_summary_objectives_and_device(study_run):
    assert len(study_run["parent"]) == 1
    parent = study_run["parent"][0]
    assert parent.info.status == "FINISHED"
    p = parent.data.params
    assert p["workload"] == "digits"
    assert p["techniques"] == ("optimizer: adamw | precision: fp32 | compile: eager | parallelism: single | "
                               "compression: none, fault | data: none | memory: none")
    assert p["objectives"] == "throughput (maximize), accuracy (maximize)"
    t = parent.data.tags
    assert t["device.host"] == socket.gethostname()
    assert t["device.gpu_count"] == str(Environment.detect().device_count)
    assert t["device.torch"] and t["device.cuda"] and t["device.gpu_name"] and t["device.driver"]
    assert parent.data.metrics["trials_complete"] == 1 and parent.data.metrics["trials_failed"] == 1


def test_search_space_is_an_artifact_not_params(study_run):
    client, tmp = study_run["client"], study_run["tmp"]
    parent = study_run["parent"][0]
    assert not [k for k in parent.data.params if k.startswith("space.")]
    assert len(parent.data.params) <= 12  # a few summary params; the column picker is for the trials' own
    space = json.loads(Path(client.download_artifacts(parent.info.run_id, "space.json", str(tmp))).read_text())
    assert space["axes"]["compile"] == {"eager": {}} and space["axes"]["compression"]["none"] == {}
    assert space["axes"]["compression"]["fault"]["mode"] == "raise"
    assert space["axes"]["optimizer"]["adamw"]["lr"] == "0.01" and space["batch_size"] == [64]


def test_experiment_is_marked_as_model_training(study_run):
    assert study_run["experiment"].tags["mlflow.experimentKind"] == "custom_model_development"


def test_every_trial_is_a_child_run_with_its_status(study_run):
    parent_id = study_run["parent"][0].info.run_id
    assert sorted(study_run["children"]) == sorted(study_run["records"]) and len(study_run["records"]) == 2
    expected = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}
    for number, rec in study_run["records"].items():
        run = study_run["children"][number]
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.info.status == expected[rec["state"]], (number, rec["state"], run.info.status)
        assert run.data.tags["harness.state"] == rec["state"]
        assert run.data.tags["harness.spec_hash"] == rec["spec_hash"]
        assert run.data.params["compile"] == rec["params"]["compile"]
        assert run.data.params["optimizer.lr"] == "0.01"
    assert sorted(r["state"] for r in study_run["records"].values()) == ["COMPLETE", "FAIL"]


def test_failed_trial_carries_class_and_message(study_run):
    (rec, run), = by_state(study_run, "FAIL")
    assert run.data.tags["harness.failure_class"] == "plugin-error"
    assert "injected plugin bug" in run.data.tags["harness.failure_message"]
    assert run.data.tags["pareto"] == "false" and "speedup_vs_baseline" not in run.data.metrics


def test_complete_trial_has_step_metrics_final_metrics_and_objectives(study_run):
    client = study_run["client"]
    (rec, run), = by_state(study_run, "COMPLETE")
    m = run.data.metrics
    assert m["throughput_samples_per_s"] == pytest.approx(rec["metrics"]["throughput_samples_per_s"])
    assert m["throughput"] == pytest.approx(rec["metrics"]["throughput_samples_per_s"])  # the objective's name
    assert m["accuracy"] == pytest.approx(rec["metrics"]["accuracy"])
    assert m["peak_memory_bytes"] == pytest.approx(rec["metrics"]["peak_memory_bytes"])
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    steps = sorted(p.step for p in loss)
    assert steps[0] == 2 and steps[-1] == 24 and len(set(steps)) == 1 + rec["metrics"]["timing_windows"]
    window = client.get_metric_history(run.info.run_id, "window/throughput_samples_per_s")
    assert len(window) == rec["metrics"]["timing_windows"] and all(p.value > 0 for p in window)
    assert len(client.get_metric_history(run.info.run_id, "throughput_samples_per_s")) == 1  # only the final one
    assert len(client.get_metric_history(run.info.run_id, "lr")) >= 3
    # evaluations: the intermediate one (step 12) and the final one
    assert sorted({p.step for p in client.get_metric_history(run.info.run_id, "accuracy")}) == [12, 24]
    assert run.data.tags["pareto"] == "true"
    assert run.data.tags["condition.device_name"].startswith("cpu")
    base = study_run["baseline_record"]["metrics"]["throughput_samples_per_s"]
    expected = rec["metrics"].get("speedup_vs_baseline", rec["metrics"]["throughput_samples_per_s"] / base)
    assert m["speedup_vs_baseline"] == pytest.approx(expected)


def test_artifacts_spec_log_and_result_on_children_and_report_on_parent(study_run):
    client, tmp = study_run["client"], study_run["tmp"]
    for run in study_run["children"].values():
        names = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert "trial_spec.json" in names
    (rec, run), = by_state(study_run, "COMPLETE")
    spec = json.loads(Path(client.download_artifacts(run.info.run_id, "trial_spec.json", str(tmp))).read_text())
    assert spec["tags"]["mlflow.run_id"] == run.info.run_id and spec["compile"]["name"] == "eager"
    result = json.loads(Path(client.download_artifacts(run.info.run_id, "result.json", str(tmp))).read_text())
    assert result["metrics"]["throughput_samples_per_s"] == pytest.approx(rec["metrics"]["throughput_samples_per_s"])
    (_, failed), = by_state(study_run, "FAIL")
    log = Path(client.download_artifacts(failed.info.run_id, "worker.log", str(tmp))).read_text()
    assert "injected plugin bug" in log  # the failed trial's own traceback
    parent = study_run["parent"][0]
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    written = {p.name for p in (tmp / "out").iterdir() if p.suffix in (".csv", ".png", ".json")}
    assert "trials.csv" in names and written <= names


def test_baseline_is_a_child_run_tagged_baseline(study_run):
    client, tmp = study_run["client"], study_run["tmp"]
    (run,) = study_run["baseline"]
    record = study_run["baseline_record"]
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("baseline ")
    assert run.data.tags["baseline"] == "true" and run.data.tags["harness.trial_number"] == "-1"
    assert run.data.tags["mlflow.parentRunId"] == study_run["parent"][0].info.run_id
    assert run.data.params["batch_size"] == "32"
    m = run.data.metrics
    assert m["throughput_samples_per_s"] == pytest.approx(record["metrics"]["throughput_samples_per_s"])
    assert m["throughput"] == m["throughput_samples_per_s"] and m["speedup_vs_baseline"] == 1.0
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"trial_spec.json", "worker.log", "result.json"} <= names
    result = json.loads(Path(client.download_artifacts(run.info.run_id, "result.json", str(tmp))).read_text())
    assert result["metrics"]["throughput_samples_per_s"] == pytest.approx(m["throughput_samples_per_s"])


def test_baseline_remeasurements_are_a_series_on_its_run(study_run):
    (run,) = study_run["baseline"]
    checks = study_run["checks"]
    assert [c["after_trials"] for c in checks] == [1, 2]
    series = study_run["client"].get_metric_history(run.info.run_id, "remeasured/throughput_samples_per_s")
    assert [(p.step, p.value) for p in sorted(series, key=lambda p: p.step)] == [
        (c["after_trials"], pytest.approx(c["throughput_samples_per_s"])) for c in checks]
    drift = study_run["client"].get_metric_history(run.info.run_id, "remeasured/speedup_vs_baseline")
    assert [p.value for p in sorted(drift, key=lambda p: p.step)] == pytest.approx(
        [c["speedup_vs_baseline"] for c in checks])


def test_saved_views_open_on_the_front_and_the_link_is_printed(study_run, server):
    exp, parent = study_run["experiment"], study_run["parent"][0].info.run_id
    view = json.loads(exp.tags[f"mlflow.sharedViewState.pareto-{parent}"])
    assert view["name"] == "grid: Pareto front, best throughput first"
    state = json.loads(view["state"])
    assert state["searchFilter"] == "tags.pareto = 'true' and tags.`harness.study` = 'grid'"
    assert state["orderByKey"] == "metrics.`throughput`" and state["orderByAsc"] is False
    assert {"params.`optimizer`", "params.`compile`", "metrics.`throughput`", "metrics.`accuracy`",
            "metrics.`speedup_vs_baseline`"} <= set(state["selectedColumns"])
    trials = json.loads(json.loads(exp.tags[f"mlflow.sharedViewState.trials-{parent}"])["state"])
    assert trials["searchFilter"] == "tags.`harness.role` != 'study' and tags.`harness.study` = 'grid'"
    # the filters select what they say: the front, and every trial and the baseline
    client = study_run["client"]
    front = client.search_runs([exp.experiment_id], state["searchFilter"])
    assert {r.data.tags["harness.trial_number"] for r in front} == {
        str(n) for n, rec in study_run["records"].items() if rec["state"] == "COMPLETE"}
    every = client.search_runs([exp.experiment_id], trials["searchFilter"])
    assert len(every) == len(study_run["records"]) + 1
    link = (f"{server}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning&"
            f"viewStateShareKey=pareto-{parent}")
    assert f"MLflow: grid: Pareto front, best throughput first: {link}" in study_run["stdout"]


def test_a_sqlite_store_is_served_by_the_command_printed():
    from plugins.mlflow_tracking.ui import where_to_look

    first, second = where_to_look("sqlite:////data/mlflow.db", "3", "pareto-abc", "s: Pareto front")
    assert first == "MLflow: start the UI with  mlflow ui --backend-store-uri sqlite:////data/mlflow.db"
    assert second == ("then open s: Pareto front: http://127.0.0.1:5000/#/experiments/3/runs?"
                      "workflowType=machine_learning&viewStateShareKey=pareto-abc")


# ============================================================================================ resume
def test_running_child_of_a_killed_driver_is_closed_failed_on_resume(server, tmp_path):
    client = MlflowClient(tracking_uri=server)
    hang = {"compile": ["eager"], "compression": {"fault": {"mode": "hang"}}, "optimizer": ADAMW}
    path = study_file(tmp_path, "killed", server, axes=hang, n_trials=1, sampler="random")
    driver = subprocess.Popen([*HARNESS, "study", str(path)], cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        running = []
        while not running:
            assert driver.poll() is None, "the driver ended before its trial started"
            assert time.monotonic() < deadline, "no RUNNING child run appeared"
            time.sleep(0.5)
            exp = client.get_experiment_by_name("exp-killed")
            if exp is not None:
                running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING' and "
                                             "tags.`harness.role` = 'trial'")
        family = psutil.Process(driver.pid).children(recursive=True)
    finally:
        driver.kill()
        driver.wait()
    for p in family:  # the trial's worker runs in a session of its own
        p.kill()
    orphan = running[0].info.run_id
    assert client.get_run(orphan).info.status == "RUNNING"

    ok = {"compile": ["eager"], "compression": {"fault": {"mode": "ok"}}, "optimizer": ADAMW}
    proc = harness(["study", study_file(tmp_path, "killed", server, axes=ok, n_trials=1, sampler="random")],
                   tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    closed = client.get_run(orphan)
    assert closed.info.status == "FAILED"
    assert closed.data.tags["harness.failure_class"] == "crashed"
    assert "stopped while trial #0 was running" in closed.data.tags["harness.failure_message"]
    runs = runs_of(client, "exp-killed")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert [r.info.status for r in runs if r.data.tags.get("harness.role") == "trial"
            and r.info.run_id != orphan] == ["FINISHED"]
    assert len([r for r in runs if r.data.tags.get("harness.role") == "study"]) == 1  # the same parent run


# ============================================================================================ harness run
def test_harness_run_logs_a_standalone_run_when_a_tracking_uri_is_set(server, tmp_path):
    proc = harness(["run", "--workload", "digits", "--device", "cpu", "--steps", "12", "--set", "budget.warmup_steps=2",
                    "--set", "workload.hidden=16"], tmp_path, MLFLOW_TRACKING_URI=server,
                   HARNESS_MLFLOW_EXPERIMENT="standalone-test")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    client = MlflowClient(tracking_uri=server)
    (run,) = runs_of(client, "standalone-test")
    assert run.info.status == "FINISHED" and run.data.params["workload"] == "digits"
    assert run.data.metrics["throughput_samples_per_s"] > 0
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 2


def test_disabled_by_name_nothing_is_logged(server, tmp_path):
    # --disable must reach the trial process, where the worker side of the plugin would log
    proc = harness(["--disable", "mlflow", "run", "--workload", "digits", "--device", "cpu", "--steps", "8", "--set",
                    "budget.warmup_steps=2", "--set", "workload.hidden=16"], tmp_path, MLFLOW_TRACKING_URI=server,
                   HARNESS_MLFLOW_EXPERIMENT="disabled-test")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert MlflowClient(tracking_uri=server).get_experiment_by_name("disabled-test") is None


def test_unknown_tracking_key_is_a_one_line_spec_error_before_any_storage(server, tmp_path):
    path = study_file(tmp_path, "badkey", server, mlflow={"experimnt": "x"})
    proc = harness(["study", path], tmp_path)
    assert proc.returncode == 2
    (line,) = [line for line in proc.stderr.splitlines() if "experimnt" in line]
    assert line.endswith("mlflow.experimnt: unknown key (allowed: experiment, tracking_uri, artifact_location); "
                         "did you mean 'experiment'?")
    assert not (tmp_path / "optuna.db").exists()  # the section is checked before the storage is opened
    assert MlflowClient(tracking_uri=server).get_experiment_by_name("x") is None


def test_a_tracking_value_that_is_not_a_string_is_a_spec_error(server, tmp_path):
    path = study_file(tmp_path, "badvalue", server, mlflow={"experiment": ["a", "b"]})
    proc = harness(["study", path], tmp_path)
    assert proc.returncode == 2
    assert "mlflow.experiment: expected a non-empty string, got ['a', 'b']" in proc.stderr


def test_two_registries_keep_their_own_tracking_state(server, tmp_path):
    first, second = get_registry(), get_registry()
    assert first.plugin("mlflow") is not second.plugin("mlflow")
    # driver side: only the registry whose study started creates runs
    study = optuna.create_study(study_name="two", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    objective = SimpleNamespace(metric="throughput", key="throughput_samples_per_s", direction="maximize")
    config = SimpleNamespace(name="two", path="two.yaml", workload="digits", objectives=[objective],
                             settings={"mlflow": {"experiment": "exp-two", "tracking_uri": server}})
    first.hooks.study_start(study=study, config=config)
    spec = make_spec(workload="digits")
    tags = first.hooks.trial_launch(spec=spec, trial_number=0, study=study)
    assert tags["mlflow.tracking_uri"] == server and tags["mlflow.run_id"]
    assert second.hooks.trial_launch(spec=spec, trial_number=0, study=study) == {}
    assert spec.tags == {}  # the tags are returned, not written into the spec
    # worker side: each registry buffers its own trial's step metrics; ending one leaves the other's alone
    spec.tags.update(tags)
    trial = SimpleNamespace(spec=spec, dist=DistInfo(), phase="timed")
    result = SimpleNamespace(ok=True, status="ok", metrics={}, message="", conditions={})
    first.hooks.trial_start(trial=trial)
    second.hooks.trial_start(trial=trial)
    first.hooks.trial_window(trial=trial, step=3, metrics={"train_loss": 0.5, "phase": "timed"})
    second.hooks.trial_end(trial=trial, result=result)
    assert not Path(tags["mlflow.step_metrics_file"]).exists()  # the second registry had nothing to write
    first.hooks.trial_end(trial=trial, result=result)
    lines = Path(tags["mlflow.step_metrics_file"]).read_text().splitlines()
    assert [json.loads(line)[0::3] for line in lines] == [["train_loss", 3]]
    # driver side again: the first registry's study closes the child run with the worker's step metrics
    record = TrialRecord(number=0, state="COMPLETE", metrics={"throughput_samples_per_s": 123.0, "steps": 3},
                         spec_hash=spec.spec_hash())
    second.hooks.trial_finished(spec=spec, record=record, study=study)
    first.hooks.trial_finished(spec=spec, record=record, study=study)
    client = MlflowClient(tracking_uri=server)
    child = client.get_run(tags["mlflow.run_id"])
    assert child.info.status == "FINISHED" and child.data.tags["harness.state"] == "COMPLETE"
    assert child.data.metrics["throughput"] == child.data.metrics["throughput_samples_per_s"] == 123.0
    assert [(p.step, p.value) for p in client.get_metric_history(child.info.run_id, "train_loss")] == [(3, 0.5)]
    # a trial ruled out before launch still gets a run, closed KILLED like every PRUNED trial
    infeasible = make_spec(workload="digits", batch_size=16)
    pruned = TrialRecord(number=1, state="PRUNED", failure_class="infeasible", message="needs a GPU",
                         spec_hash=infeasible.spec_hash())
    first.hooks.trial_finished(spec=infeasible, record=pruned, study=study)
    (killed,) = [r for r in runs_of(client, "exp-two") if r.data.tags.get("harness.trial_number") == "1"]
    assert killed.info.status == "KILLED" and killed.data.tags["harness.failure_class"] == "infeasible"
    second.hooks.study_end(study=study, config=config, records=[record], pareto=[record], output_dir=tmp_path)
    (parent,) = [r for r in runs_of(client, "exp-two") if r.data.tags.get("harness.role") == "study"]
    assert parent.info.status == "RUNNING"  # the second registry never started this study
    first.hooks.study_end(study=study, config=config, records=[record, pruned], pareto=[record],
                          output_dir=tmp_path)
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert client.get_run(child.info.run_id).data.tags["pareto"] == "true"
    # no report was written to output_dir: the plugin attaches one made by harness.report.write_trials_csv
    trials_csv = client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path))
    assert Path(trials_csv).read_text().splitlines()[1].startswith("0,COMPLETE")


def test_the_mlflow_section_is_declared_by_the_plugin_and_validated_by_it():
    registry = get_registry()
    assert "harness_declare_study_settings" in registry.records["mlflow"].hooks
    setting = registry.settings["mlflow"]
    assert setting.plugin == "mlflow" and "tracking_uri" in setting.help
    kept = setting.validate("s.yaml.mlflow", {"experiment": "e", "tracking_uri": "http://127.0.0.1:1"})
    assert kept == {"experiment": "e", "tracking_uri": "http://127.0.0.1:1"}
    with pytest.raises(SpecError, match=r"^s\.yaml\.mlflow\.artifact_locaton: unknown key \(allowed: experiment, "
                                        r"tracking_uri, artifact_location\); did you mean 'artifact_location'\?$"):
        setting.validate("s.yaml.mlflow", {"artifact_locaton": "/tmp/a"})
    with pytest.raises(SpecError, match=r"^s\.yaml\.mlflow: expected a mapping"):
        setting.validate("s.yaml.mlflow", "http://127.0.0.1:1")
    assert "mlflow" not in get_registry(disable=["mlflow"]).settings


def test_step_metrics_file_skips_a_torn_last_line(tmp_path):
    from plugins.mlflow_tracking.driver import read_step_metrics

    path = tmp_path / "run.jsonl"
    path.write_text('["train_loss", 0.5, 1700000000000, 3]\n["lr", 0.001, 1700000000001, 3]\n["train_lo')
    assert read_step_metrics(str(path)) == [("train_loss", 0.5, 1700000000000, 3), ("lr", 0.001, 1700000000001, 3)]
    assert not path.exists() and read_step_metrics(str(path)) == []
