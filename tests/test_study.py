"""The study driver end to end: study files, the search loop with real trial processes, failure classes,
infeasible combinations, resume after SIGKILL, two drivers on one storage, the report, and bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
import yaml
from waiting import wait_until

TESTS = Path(__file__).resolve().parent
HARNESS = [sys.executable, "-m", "harness.cli"]


def adamw(**params) -> dict:
    """adamw with every parameter pinned (an omitted one would be searched over its declared range)."""
    return {"adamw": {"weight_decay": 0.0, "implementation": "default", "schedule": "constant", "beta1": 0.9,
                      "beta2": 0.999, "eps": 1e-8, "warmup_fraction": 0.05, **params}}


def study_file(tmp: Path, name: str, **fields) -> Path:
    """A small digits study (a few seconds per trial on a CPU) with ``fields`` replacing the defaults."""
    data = {
        "name": name,
        "workload": {"name": "digits", "hidden": 32, "depth": 1},
        "axes": {"optimizer": {"sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
                                       "implementation": "default", "schedule": "constant"},
                               "adamw": {"lr": [0.003, 0.01], "weight_decay": 0.0, "implementation": "default",
                                         "schedule": "constant"}}},
        "batch_size": 64,
        "budget": {"steps": 24, "warmup_steps": 2, "windows": 2},
        "trial_timeout_s": 90,
        "objectives": [{"throughput": "max"}, {"accuracy": "max"}],
        "sampler": "random",
        "n_trials": 3,
        "seed": 0,
        "device": "cpu",
        "heartbeat_s": 1,
        "storage": f"sqlite:///{tmp / 'optuna.db'}",
        "output_dir": str(tmp / "out"),
    }
    data.update(fields)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


#: tracking is another plugin's subject (tests/test_mlflow*.py); here it would only slow every trial down.
NOT_HERE = "mlflow"


def env_with_test_plugin() -> dict:
    path = os.pathsep.join(p for p in (str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, HARNESS_PLUGINS="failing_plugin", HARNESS_DISABLE_PLUGINS=NOT_HERE,
                MPLBACKEND="Agg")


def run_cli(args, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([*HARNESS, *map(str, args)], cwd=cwd, env=env_with_test_plugin(), capture_output=True,
                          text=True, timeout=timeout)


def load(tmp: Path, name: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp / 'optuna.db'}")


def records(study) -> dict[int, dict]:
    return {t.number: t.user_attrs.get("record") for t in study.get_trials()}


# ============================================================================================ end to end
@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """A reduced quickstart: a baseline, 4 trials over two optimizers and two batch sizes, accuracy constraint."""
    tmp = tmp_path_factory.mktemp("quickstart")
    path = study_file(tmp, "mini", n_trials=4, batch_size=[32, 64],
                      constraints={"accuracy": ">= 0.98 * baseline"})
    t0 = time.monotonic()
    proc = run_cli(["study", path], tmp)
    return tmp, proc, time.monotonic() - t0


@pytest.mark.slow
def test_quickstart_study_runs_trials_and_writes_its_report(quickstart):
    tmp, proc, _ = quickstart
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert "Pareto front" in proc.stdout
    out = tmp / "out"
    for name in ("trials.csv", "pareto.json", "pareto.png", "history.png", "importance.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    study = load(tmp, "mini")
    trials = study.get_trials()
    assert len(trials) == 4
    for t in trials:
        rec = t.user_attrs["record"]
        assert t.state == optuna.trial.TrialState.COMPLETE, rec
        assert rec["values"] == list(t.values)
        assert rec["metrics"]["throughput_samples_per_s"] > 0 and 0 <= rec["metrics"]["accuracy"] <= 1
        assert rec["params"]["batch_size"] in (32, 64) and rec["params"]["optimizer"] in ("sgd", "adamw")
        assert rec["constraint_violation"] is not None
    baseline = study.user_attrs["baseline"]
    assert baseline["params"]["optimizer"] == "sgd" and baseline["params"]["precision"] == "fp32"
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["pareto"], "a Pareto front of at least one feasible trial"
    for rec in pareto["pareto"]:
        assert rec["state"] == "COMPLETE" and rec["constraint_violation"] <= 0
    rows = (out / "trials.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 1 + 4 and rows[0].startswith("number,state,failure_class"), "head, baseline, trials"


@pytest.mark.slow
def test_report_reprints_the_pareto_table_from_storage_alone(quickstart, harness_cli):
    tmp, proc, _ = quickstart
    assert proc.returncode == 0
    code, out, err = harness_cli("report", "mini", "--storage", f"sqlite:///{tmp / 'optuna.db'}")
    assert code == 0, err
    assert "study mini: Pareto front" in out and "base" in out
    pareto = json.loads((tmp / "out" / "pareto.json").read_text())["pareto"]
    for rec in pareto:
        assert f"{rec['params']['optimizer']} + fp32 + eager + single + none" in out


def test_report_of_an_unknown_study_is_one_line(tmp_path, harness_cli):
    optuna.create_study(study_name="real", storage=f"sqlite:///{tmp_path / 'r.db'}")
    code, out, err = harness_cli("report", "reel", "--storage", f"sqlite:///{tmp_path / 'r.db'}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "did you mean 'real'" in err


# ============================================================================================ failures
@pytest.mark.slow
def test_injected_failures_get_their_class_and_infeasible_techniques_are_never_launched(tmp_path):
    modes = {"raise": "plugin-error", "oom": "oom", "nan": "diverged", "hang": "timeout", "sigkill": "crashed"}
    path = study_file(
        tmp_path, "faults", sampler="grid", n_trials=5, trial_timeout_s=25, objectives=["throughput"],
        axes={"optimizer": adamw(lr=0.003), "compile": ["eager", "needs-cuda"],
              "compression": {"fault": {"mode": list(modes)}}})
    proc = run_cli(["study", path], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert "left out of the search space: compile technique 'needs-cuda' requires CUDA" in proc.stdout
    study = load(tmp_path, "faults")
    trials = study.get_trials()
    assert len(trials) == len(modes)  # the grid without needs-cuda
    seen = {}
    for t in trials:
        rec = t.user_attrs["record"]
        mode = rec["params"]["compression.mode"]
        assert rec["params"]["compile"] == "eager"
        assert t.state == optuna.trial.TrialState.FAIL, rec
        assert t.user_attrs["failure_class"] == modes[mode], (mode, rec["message"])
        seen[mode] = rec["failure_class"]
    assert seen == modes
    assert not (tmp_path / "launched-needs-cuda").exists()
    failures = {r["failure_class"]: r["message"] for r in records(study).values()}
    assert "plugin 'failing_plugin'" in failures["plugin-error"]
    assert "trial_timeout_s is 25 s in the study file" in failures["timeout"]


# ============================================================================================ resume, scale-out
def kill_driver_when(driver: subprocess.Popen, ready, what: str, tmp: Path, name: str, log: Path):
    """Wait until ``ready()`` returns something (returned), then SIGKILL the driver; its trial processes (their
    own sessions) outlive it, so end them as a dead machine would, and wait past the heartbeat grace period
    (2 x heartbeat_s + 1 s)."""
    try:
        value = wait_until(ready, 240, what, lambda: _study_state(tmp, name, log))
        workers = psutil.Process(driver.pid).children(recursive=True)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    for p in workers:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    time.sleep(4)
    return value


def _study_state(tmp: Path, name: str, log: Path) -> str:
    """What a study's storage and its driver's log say, for a failed wait's message."""
    try:
        trials = [(t.number, t.state.name, t.user_attrs.get("failure_class")) for t in load(tmp, name).get_trials()]
    except Exception as exc:  # only for the message
        trials = f"unreadable: {type(exc).__name__}: {exc}"
    text = log.read_text(errors="replace") if log.exists() else ""
    return f"; trials {trials}; driver output: {text[-1500:]!r}"


@pytest.mark.slow
def test_sigkilled_driver_resumes_and_reruns_the_interrupted_trial(tmp_path):
    path = study_file(tmp_path, "resume", sampler="grid", n_trials=3, objectives=["throughput"],
                      budget={"steps": 400, "warmup_steps": 2, "windows": 2},
                      axes={"optimizer": adamw(lr=[0.001, 0.002, 0.004])})
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:
        driver = subprocess.Popen([*HARNESS, "study", str(path)], cwd=tmp_path, env=env_with_test_plugin(),
                                  stdout=out, stderr=subprocess.STDOUT)
    db = tmp_path / "optuna.db"

    def running_after_one_complete():
        if not db.exists():  # the storage's file appears complete (created aside, then renamed)
            return None
        try:
            trials = load(tmp_path, "resume").get_trials()
        except Exception:  # the study is being created
            return None
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("launched")]
        return (done, running[0]) if done and running else None

    done_before, interrupted = kill_driver_when(driver, running_after_one_complete,
                                                "a running trial after a complete one", tmp_path, "resume", log)
    proc = run_cli(["study", path], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    trials = load(tmp_path, "resume").get_trials()
    old = next(t for t in trials if t.number == interrupted.number)
    assert old.state == optuna.trial.TrialState.FAIL and "record" not in old.user_attrs
    rerun = [t for t in trials if t.system_attrs.get("failed_trial") == interrupted.number]
    assert len(rerun) == 1 and rerun[0].params == interrupted.params
    assert rerun[0].state == optuna.trial.TrialState.COMPLETE and rerun[0].user_attrs.get("launched")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    for t in done_before:  # nothing completed before the kill is lost or redone
        again = next(x for x in trials if x.number == t.number)
        assert again.state == optuna.trial.TrialState.COMPLETE and again.values == t.values


@pytest.mark.slow
def test_two_drivers_on_one_storage_share_n_trials_without_duplicates(tmp_path):
    path = study_file(tmp_path, "shared", n_trials=6, objectives=["throughput"],
                      constraints={"accuracy": ">= 0.5 * baseline"},
                      axes={"optimizer": adamw(lr=[0.001, 0.002, 0.003, 0.004, 0.005, 0.006])},
                      budget={"steps": 40, "warmup_steps": 2, "windows": 2})
    optuna.create_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    procs = [subprocess.Popen([*HARNESS, "study", str(path)], cwd=tmp_path, env=env_with_test_plugin(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-1500:] for o in outputs)
    trials = load(tmp_path, "shared").get_trials()
    finished = [t for t in trials if t.state.is_finished() and "record" in t.user_attrs]
    assert len(finished) == 6 and not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    launched = [t for t in finished if t.user_attrs.get("launched")]
    hashes = [t.user_attrs["spec_hash"] for t in launched]
    assert len(hashes) == len(set(hashes)), "a combination was launched twice"
    assert len({t.user_attrs["driver"] for t in finished}) == 2, "both drivers ran trials"
    assert sum("baseline adamw + fp32 + eager + single + none: accuracy >=" in o for o in outputs) == 1, \
        "one driver ran the baseline, once"
    for t in finished:  # a duplicate reuses the outcome of the trial that ran its combination
        rec = t.user_attrs["record"]
        if rec["duplicate_of"] is not None:
            assert not t.user_attrs.get("launched")
            assert rec["spec_hash"] in hashes or rec["duplicate_of"] == -1, "-1: the baseline trial's outcome"


# ============================================================================================ bad input
BAD = [
    ("name: [unclosed\n", "malformed YAML"),
    ({"n_trail": 3}, "did you mean 'n_trials'"),
    ({"axes": {"precision": []}}, "axes.precision: an empty axis"),
    ({"axes": {"optimizer": {"adamw": {"lr": {"low": 0.1, "high": 0.01}}}}}, "inverted range"),
    ({"objectives": ["throughput", {"acuracy": "max"}]}, "did you mean 'accuracy'"),
    ({"constraints": {"peak_memroy": "<= 8e9"}}, "did you mean 'peak_memory'"),
    ({"constraints": {"accuracy": "about 0.9"}}, "is not a constraint"),
    ({"axes": {"optimizer": ["adamw", "adamww"]}}, "did you mean 'adamw'"),
    ({"axes": {"optimiser": ["adamw"]}}, "did you mean 'optimizer'"),
    ({"sampler": "tpee"}, "did you mean 'tpe'"),
    ({"pruner": "median"}, "needs a single objective"),
    ({"storage": "postgresql://nohost/x"}, "storage: cannot open"),
    ({"storage": "sqlite:///{tmp}/missing/dir/x.db"}, "does not exist"),
    ({"objectives": ["throughput"]}, "was created with directions"),
]


@pytest.mark.parametrize("change,expected", BAD, ids=[e for _, e in BAD])
def test_bad_study_input_is_one_line_exit_2_and_leaves_the_db_untouched(tmp_path, harness_cli, change, expected):
    db = tmp_path / "optuna.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="bad", storage=f"sqlite:///{db}", directions=["maximize", "maximize"])
    before = (db.read_bytes(), db.stat().st_mtime_ns)
    path = study_file(tmp_path, "bad")
    if isinstance(change, str):
        path.write_text(change)
    else:
        data = yaml.safe_load(path.read_text())
        data.update(json.loads(json.dumps(change).replace("{tmp}", str(tmp_path))))
        path.write_text(yaml.safe_dump(data))
    code, out, err = harness_cli("study", path)
    assert code == 2, out + err
    assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert "Traceback" not in err
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before
    assert not (tmp_path / "out").exists()


# ============================================================================================ units
def test_domination_rule_with_and_without_margin():
    from harness.outcomes import dominates

    up_down = ("maximize", "minimize")
    assert dominates([100, 10], [90, 10], up_down)
    assert not dominates([100, 10], [100, 10], up_down)
    assert not dominates([100, 12], [90, 10], up_down)
    assert not dominates([103, 10], [100, 10], up_down, margin=0.05), "within the margin: not dominated"
    assert dominates([110, 10.2], [100, 10], up_down, margin=0.05)


def test_study_file_defaults_and_searched_parameters(tmp_path, registry):
    from harness.studyfile import StudyConfig

    cfg = StudyConfig.from_yaml(study_file(tmp_path, "cfg"), registry)
    assert [o.direction for o in cfg.objectives] == ["maximize", "maximize"]
    assert list(cfg.axes["precision"]) == ["fp32"], "an axis left out keeps its default technique"
    kind, dist = cfg.axes["optimizer"]["adamw"]["lr"]
    assert kind == "dist" and tuple(dist.choices) == (0.003, 0.01)
    kind, dist = cfg.axes["optimizer"]["adamw"]["beta1"]
    assert kind == "dist" and (dist.low, dist.high) == (0.5, 0.999), "omitted: the declared search space"
    assert cfg.axes["optimizer"]["sgd"]["lr"] == ("fixed", 0.1)


# ============================================================================================ early stopping
def _driver(path: Path, monkeypatch):
    from rich.console import Console

    from harness.driver import StudyDriver
    from harness.plugins import get_registry
    from harness.studyfile import StudyConfig

    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", NOT_HERE)
    registry = get_registry()

    driver = StudyDriver(StudyConfig.from_yaml(path, registry), registry, Console(width=160))
    driver.open()
    return driver


# the test asks outside Study.optimize, as the driver does, on a storage with heartbeats
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used:UserWarning")
def test_simultaneous_asks_past_n_trials_give_way_to_the_lower_trial_number(tmp_path, monkeypatch):
    """Two drivers that read "5 of 6 claimed" at the same moment both ask: the higher number is surplus."""
    from harness.report import records_from_study
    from harness.storage import counts, give_way_if_surplus

    monkeypatch.chdir(tmp_path)
    driver = _driver(study_file(tmp_path, "race", n_trials=2, axes={"optimizer": adamw(lr=0.003)}), monkeypatch)
    study = driver.study
    done = study.ask()
    done.set_user_attr("record", {"number": 0, "state": "COMPLETE"})
    study.tell(done, [1.0, 1.0])
    mine, theirs = study.ask(), study.ask()  # both asked when one trial of two was claimed
    assert not give_way_if_surplus(study, mine, driver.n_trials), "the lower number runs"
    assert give_way_if_surplus(study, theirs, driver.n_trials), "the higher number gives way"
    frozen = {t.number: t for t in study.get_trials()}
    assert frozen[theirs.number].state == optuna.trial.TrialState.FAIL and frozen[theirs.number].user_attrs["surplus"]
    assert frozen[mine.number].state == optuna.trial.TrialState.RUNNING
    c = counts(study)
    assert (c["finished"], c["running"], c["interrupted"]) == (1, 1, 0), c
    assert [r.number for r in records_from_study(study)] == [0, mine.number], "a surplus trial is not reported"


@pytest.mark.slow
def test_single_objective_pruner_stops_a_trial_behind_the_median(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = study_file(tmp_path, "prune", objectives=["accuracy"], n_trials=2, sampler="tpe",
                      pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
                      budget={"steps": 60, "warmup_steps": 2, "windows": 2, "eval_every_steps": 15},
                      axes={"optimizer": adamw(lr=[0.01, 0.00001])})
    driver = _driver(path, monkeypatch)
    driver.study.enqueue_trial({"optimizer.adamw.lr": 0.01})
    driver.study.enqueue_trial({"optimizer.adamw.lr": 0.00001})
    records, _ = driver.run()
    good, bad = sorted(records, key=lambda r: r.number)
    assert good.state == "COMPLETE" and good.metrics["accuracy"] > 0.5
    assert bad.state == "PRUNED" and bad.failure_class == "pruned", bad
    assert driver.study.trials[0].intermediate_values, "eval events reached trial.report"


@pytest.mark.slow
def test_screening_prunes_a_combination_dominated_on_throughput_and_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = study_file(tmp_path, "screen", n_trials=2, sampler="random", screening={"steps": 12, "margin": 0.05},
                      workload={"name": "digits", "hidden": [16, 4096], "depth": 2},
                      axes={"optimizer": adamw(lr=0.003)})
    driver = _driver(path, monkeypatch)
    driver.study.enqueue_trial({"workload.hidden": 16})
    driver.study.enqueue_trial({"workload.hidden": 4096})
    records, pareto = driver.run()
    small, big = sorted(records, key=lambda r: r.number)
    assert small.state == "COMPLETE" and small.metrics["steps"] == 24, "not dominated: trained on the full budget"
    assert big.state == "PRUNED" and big.failure_class == "screened", big
    assert "dominated at screening by trial #0" in big.message and big.metrics["steps"] == 12
    assert [r.number for r in pareto] == [0]


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_study_file_validates_against_the_installed_plugins(path, tmp_path, monkeypatch):
    from harness.plugins import get_registry
    from harness.studyfile import StudyConfig
    from plugins._cifar import write_tiny_cifar

    monkeypatch.chdir(tmp_path)  # the CIFAR studies name data/cifar-10-batches-py, which must exist
    write_tiny_cifar(tmp_path / "data" / "cifar-10-batches-py")
    cfg = StudyConfig.from_yaml(path, get_registry())
    assert cfg.n_trials and cfg.objectives
    assert {"optimizer", "precision", "compile"} <= set(cfg.axes)
