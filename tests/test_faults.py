"""Faults of the study driver and its stores, with real driver processes: two drivers started together on a fresh
directory (both stores created once, nothing half-built), Ctrl-C during a trial (the Optuna trial and the MLflow
runs marked on the way out, the trial re-run on resume), step-metric buffers left by a SIGKILLed driver (logged
on resume), and credentials masked in what the driver and the tracking plugin write."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from waiting import wait_until

from harness.errors import SpecError
from harness.storage import INTERRUPTED, open_storage

# MLflow 3.17's SQLite store, read here in the test process, uses a loader SQLAlchemy 2.1 deprecates
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")]

TESTS = Path(__file__).resolve().parent
HARNESS = [sys.executable, "-m", "harness.cli"]
ADAMW = {"adamw": {"lr": [0.002, 0.004, 0.008], "weight_decay": 0.0, "implementation": "default",
                   "schedule": "constant", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "warmup_fraction": 0.05}}


def env() -> dict:
    path = os.pathsep.join(p for p in (str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")) if p)
    out = dict(os.environ, PYTHONPATH=path, MPLBACKEND="Agg", MLFLOW_DISABLE_TELEMETRY="true")
    out.pop("MLFLOW_TRACKING_URI", None)
    out.pop("HARNESS_DISABLE_PLUGINS", None)
    return out


def study_file(tmp: Path, name: str, **fields) -> Path:
    """A tiny digits study with default stores: ``harness.db`` and ``mlflow.db`` in the working directory."""
    data = {"name": name, "workload": {"name": "digits", "hidden": 16, "depth": 1}, "axes": {"optimizer": ADAMW},
            "batch_size": 64, "budget": {"steps": 12, "warmup_steps": 2, "windows": 2}, "trial_timeout_s": 90,
            "objectives": ["throughput"], "sampler": "grid", "n_trials": 3, "device": "cpu", "heartbeat_s": 1,
            "output_dir": str(tmp / "out")}
    data.update(fields)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def driver(path: Path, cwd: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([*HARNESS, "study", str(path)], cwd=cwd, env=env(), stdout=out,
                                stderr=subprocess.STDOUT)


def trials(cwd: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd / 'harness.db'}").get_trials()


def counted(ts: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """The trials that count toward n_trials: finished with a record that is not an interruption."""
    return [t for t in ts if t.state.is_finished() and "record" in t.user_attrs and not t.user_attrs.get("surplus")
            and t.user_attrs.get("failure_class") != INTERRUPTED]


def mlflow_runs(cwd: Path, experiment: str) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    return client.search_runs([exp.experiment_id], max_results=1000)


def wait_for(predicate, timeout_s: float, what: str, log: Path):
    return wait_until(predicate, timeout_s, what,
                      lambda: f"; driver output: {log.read_text(errors='replace')[-2000:]}")


def interrupt(proc: subprocess.Popen, log: Path) -> None:
    """Ctrl-C on a driver whose trial is under way: it must exit 130."""
    time.sleep(1.0)  # the trial is under way
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, log.read_text()[-2000:]


def kill_if_alive(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def running_launched_trial(cwd: Path, name: str):
    if not (cwd / "harness.db").exists():
        return None
    try:
        return next((t for t in trials(cwd, name) if t.state == TrialState.RUNNING and t.user_attrs.get("launched")),
                    None)
    except Exception:  # the study is being created
        return None


def kill_family(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the driver; SIGKILL also ends its trial processes (their own sessions), as a dead machine."""
    family = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(sig)
    if sig == signal.SIGKILL:
        proc.wait()
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


# ============================================================================================ concurrency
def test_two_drivers_started_together_on_a_fresh_directory_create_each_store_once(tmp_path):
    path = study_file(tmp_path, "together")
    logs = [tmp_path / f"driver{i}.log" for i in range(2)]
    procs = [driver(path, tmp_path, log) for log in logs]
    for p in procs:
        p.wait(timeout=240)
    outputs = "\n".join(log.read_text(errors="replace")[-1500:] for log in logs)
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "already exists" not in outputs
    ts = trials(tmp_path, "together")
    assert len(counted(ts)) == 3 and not [t for t in ts if t.state == TrialState.RUNNING]
    runs = mlflow_runs(tmp_path, "together")
    parents = [r for r in runs if r.data.tags.get("harness.role") == "study"]
    children = [r for r in runs if r.data.tags.get("harness.role") == "trial"]
    assert len(parents) == 1, "one parent run for the study, whichever driver created it"
    assert parents[0].info.status == "FINISHED"
    assert children and all(r.info.status == "FINISHED" for r in children)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert not list(tmp_path.glob(".*.creating-*")), "no temporary database left behind"


OPEN_STORES = """
import sys, time
from types import SimpleNamespace
import optuna
from harness.storage import open_storage
from plugins.mlflow_tracking.driver import StudyRun
start, dirs = float(sys.argv[1]), sys.argv[2:]
optuna.logging.set_verbosity(optuna.logging.WARNING)
for i, d in enumerate(dirs):
    time.sleep(max(0.0, start + 2.0 * i - time.time()))  # every process opens the stores of dirs[i] together
    storage = open_storage(f"sqlite:///{d}/harness.db", 1)
    optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
    config = SimpleNamespace(name="s", path="s.yaml", workload="digits", objectives=[])
    run = StudyRun.open(config, {"tracking_uri": f"sqlite:///{d}/mlflow.db"})
    print(d, run.parent_run_id, flush=True)
"""


def test_stores_opened_by_several_processes_at_the_same_moment_are_created_once(tmp_path):
    dirs = [tmp_path / f"round{i}" for i in range(2)]
    for d in dirs:
        d.mkdir()
    start = time.time() + 8  # after every process has imported MLflow, Optuna and torch
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORES, str(start), *map(str, dirs)], env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(err[-1500:] for _, err in outputs)
    parents: dict[str, set[str]] = {}
    for out, _ in outputs:
        for line in out.splitlines():
            d, run_id = line.split()
            parents.setdefault(d, set()).add(run_id)
    assert {d: len(ids) for d, ids in parents.items()} == {str(d): 1 for d in dirs}, "one parent run per study"
    for d in dirs:
        assert len(optuna.get_all_study_names(f"sqlite:///{d / 'harness.db'}")) == 1
        runs = MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}").search_runs(
            [MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}").get_experiment_by_name("s").experiment_id])
        assert len(runs) == 1
        assert not list(d.glob(".*.creating-*"))


# ============================================================================================ Ctrl-C
def test_ctrl_c_marks_the_trial_interrupted_and_its_runs_killed_and_resume_reruns_it(tmp_path):
    path = study_file(tmp_path, "ctrlc", budget={"steps": 4000, "warmup_steps": 2, "windows": 2})
    log = tmp_path / "driver.log"
    proc = driver(path, tmp_path, log)
    try:
        running = wait_for(lambda: running_launched_trial(tmp_path, "ctrlc"), 120, "a launched trial", log)
        workers = wait_for(lambda: psutil.Process(proc.pid).children(recursive=True), 30, "the trial process", log)
        interrupt(proc, log)
    finally:
        kill_if_alive(proc)
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "trial killed"
    old = next(t for t in trials(tmp_path, "ctrlc") if t.number == running.number)
    assert old.state == TrialState.FAIL
    assert old.user_attrs["failure_class"] == INTERRUPTED == old.user_attrs["record"]["failure_class"]
    runs = mlflow_runs(tmp_path, "ctrlc")
    child = next(r for r in runs if r.data.tags.get("harness.trial_number") == str(running.number))
    assert child.info.status == "KILLED" and child.data.tags["harness.failure_class"] == INTERRUPTED
    (parent,) = [r for r in runs if r.data.tags.get("harness.role") == "study"]
    assert parent.info.status == "KILLED"

    resumed = subprocess.run([*HARNESS, "study", str(study_file(tmp_path, "ctrlc"))], cwd=tmp_path, env=env(),
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    ts = trials(tmp_path, "ctrlc")
    assert len(counted(ts)) == 3, "the interrupted trial does not count"
    rerun = [t for t in ts if t.system_attrs.get("failed_trial") == running.number]
    assert len(rerun) == 1 and rerun[0].params == running.params and rerun[0].state == TrialState.COMPLETE
    runs = mlflow_runs(tmp_path, "ctrlc")
    assert [r.info.status for r in runs if r.data.tags.get("harness.role") == "study"] == ["FINISHED"]


def test_study_interrupted_reaches_every_plugin_through_the_facade(make_registry):
    from harness import hookimpl

    seen = []

    class Observer:
        @hookimpl
        def harness_study_interrupted(self, study, config):
            seen.append((study, config))

    registry = make_registry(Observer)
    registry.hooks.study_interrupted(study="the study", config="its config")
    assert seen == [("the study", "its config")]


def test_ctrl_c_during_the_baseline_closes_the_study_run_killed(tmp_path):
    """Interrupted outside any Optuna trial (here: while the baseline trial runs), the driver still tells the
    plugins (``harness_study_interrupted``): the MLflow parent run does not stay RUNNING."""
    path = study_file(tmp_path, "ctrlbase", constraints={"accuracy": ">= 0.5 * baseline"},
                      budget={"steps": 4000, "warmup_steps": 2, "windows": 2})
    log = tmp_path / "driver.log"
    proc = driver(path, tmp_path, log)
    try:
        wait_for(lambda: psutil.Process(proc.pid).children(recursive=True), 120, "the baseline trial's process", log)
        interrupt(proc, log)
    finally:
        kill_if_alive(proc)
    (parent,) = [r for r in mlflow_runs(tmp_path, "ctrlbase") if r.data.tags.get("harness.role") == "study"]
    assert parent.info.status == "KILLED"
    assert counted(trials(tmp_path, "ctrlbase")) == []


# ============================================================================================ step buffers
def test_step_metrics_left_by_a_sigkilled_driver_are_logged_on_resume(tmp_path):
    path = study_file(tmp_path, "buffers", n_trials=1, budget={"steps": 4000, "warmup_steps": 2, "windows": 2})
    log = tmp_path / "driver.log"
    proc = driver(path, tmp_path, log)
    try:
        wait_for(lambda: running_launched_trial(tmp_path, "buffers"), 120, "a launched trial", log)

        def orphan_run():
            try:
                return next((r for r in mlflow_runs(tmp_path, "buffers") if r.info.status == "RUNNING"
                             and r.data.tags.get("harness.role") == "trial"), None)
            except Exception:  # the store is being written
                return None

        run = wait_for(orphan_run, 60, "the trial's RUNNING child run", log)
    finally:
        kill_family(proc, signal.SIGKILL)
    # the buffer as the dead driver's trial process would have left it (it writes at evaluations and at the end)
    buffers = Path(tempfile.mkdtemp(prefix="harness-mlflow-steps-"))
    buffer = buffers / f"{run.info.run_id}.jsonl"
    buffer.write_text("".join(json.dumps(["train_loss", 0.25 * i, 1700000000000 + i, i]) + "\n" for i in (1, 2))
                      + '["train_lo')
    foreign = buffers / ("f" * 32 + ".jsonl")  # a run of another tracking store: left for its own study
    foreign.write_text(json.dumps(["train_loss", 1.0, 1700000000000, 1]) + "\n")
    time.sleep(3.5)  # past the heartbeat grace period
    resumed = subprocess.run([*HARNESS, "study", str(study_file(tmp_path, "buffers", n_trials=1))], cwd=tmp_path,
                             env=env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert not buffer.exists()
    assert foreign.exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5)]
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    foreign.unlink()
    buffers.rmdir()


# ============================================================================================ credentials
def test_an_unreachable_storage_url_is_reported_without_its_password():
    with pytest.raises(SpecError) as err:
        open_storage("postgresql://user:secret@127.0.0.1:1/db")
    assert "secret" not in str(err.value) and "user:***@127.0.0.1" in str(err.value)


def test_tracking_params_tags_and_messages_never_carry_the_tracking_password(tmp_path, capsys):
    from plugins.mlflow_tracking.client import log_batch, warn

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("masked"))
    uri = "http://u:secret@127.0.0.1:5000"
    log_batch(client, run.info.run_id, params=[("tracking", uri)], tags=[("harness.failure_message", f"at {uri}")])
    data = client.get_run(run.info.run_id).data
    assert data.params["tracking"] == "http://u:***@127.0.0.1:5000"
    assert data.tags["harness.failure_message"] == "at http://u:***@127.0.0.1:5000"
    warn(f"could not reach {uri}")
    assert "secret" not in capsys.readouterr().err


def test_an_unreachable_tracking_uri_is_reported_without_its_password(monkeypatch):
    from types import SimpleNamespace

    from plugins.mlflow_tracking.driver import StudyRun

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    config = SimpleNamespace(name="masked", path="masked.yaml", workload="digits", objectives=[])
    with pytest.raises(SpecError) as err:  # nothing listens there: the message names the URI, masked
        StudyRun.open(config, {"tracking_uri": "http://u:secret@127.0.0.1:1"})
    assert "secret" not in str(err.value) and "u:***@127.0.0.1:1" in str(err.value)
