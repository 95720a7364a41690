"""Many hosts, one study: drivers sharing a study through a real PostgreSQL server (started here, on loopback),
and MLflow's side through a real ``mlflow server`` whose backend store is that PostgreSQL.

Each driver is its own process, as it would be on its own host; they share nothing but the two URLs.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow_server import mlflow_process
from postgres import PostgresServer
from test_study import HARNESS, adamw, env_with_test_plugin, study_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


def run_drivers(path: Path, cwd: Path, n: int = 2, **env: str) -> list[str]:
    """Start ``n`` drivers of one study file at the same moment; their outputs once all have ended (exit 0)."""
    procs = [subprocess.Popen([*HARNESS, "study", str(path)], cwd=cwd, env={**env_with_test_plugin(), **env},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(n)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, "\n".join(o[-2000:] for o in outputs)
    return outputs


def check_shared(study: optuna.Study, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    """n_trials finished, none running, no combination launched twice, both drivers took part."""
    trials = study.get_trials()
    finished = [t for t in trials if t.state.is_finished() and "record" in t.user_attrs]
    assert len(finished) == n_trials and not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    hashes = [t.user_attrs["spec_hash"] for t in finished if t.user_attrs.get("launched")]
    assert len(hashes) == len(set(hashes)), "a combination was launched twice"
    assert len({t.user_attrs["driver"] for t in finished}) == 2, "both drivers ran trials"
    return finished


def test_two_drivers_share_n_trials_through_postgresql(postgres, tmp_path):
    url = postgres.create_database("shared_study")
    path = study_file(tmp_path, "pg-shared", n_trials=6, storage=url, objectives=["throughput"],
                      axes={"optimizer": adamw(lr=[0.001, 0.002, 0.003, 0.004, 0.005, 0.006])},
                      constraints={"accuracy": ">= 0.5 * baseline"},
                      budget={"steps": 30, "warmup_steps": 2, "windows": 2})
    outputs = run_drivers(path, tmp_path)
    check_shared(optuna.load_study(study_name="pg-shared", storage=url), 6)
    assert sum("baseline adamw + fp32 + eager + single + none: accuracy >=" in o for o in outputs) == 1, \
        "one driver ran the baseline, once"
    assert all("s3cret-pw" not in o for o in outputs), "the password is masked in what the drivers print"


@pytest.fixture(scope="module")
def mlflow_on_postgres(postgres, tmp_path_factory):
    """A real MLflow tracking server whose backend store is the PostgreSQL server (artifacts proxied)."""
    tmp = tmp_path_factory.mktemp("mlflow-pg")
    backend = postgres.create_database("mlflow")
    with mlflow_process(["server", "--workers", "2", "--backend-store-uri", backend, "--artifacts-destination",
                         str(tmp / "artifacts")], tmp / "server.log") as uri:
        yield uri


def test_two_drivers_log_one_study_to_an_mlflow_server_on_postgresql(postgres, mlflow_on_postgres, tmp_path):
    from mlflow.tracking import MlflowClient

    url = postgres.create_database("tracked_study")
    path = study_file(tmp_path, "pg-tracked", n_trials=4, storage=url, objectives=["throughput"],
                      axes={"optimizer": adamw(lr=[0.001, 0.002, 0.003, 0.004])},
                      budget={"steps": 20, "warmup_steps": 2, "windows": 2},
                      mlflow={"experiment": "pg-tracked", "tracking_uri": mlflow_on_postgres})
    run_drivers(path, tmp_path, HARNESS_DISABLE_PLUGINS="")
    finished = check_shared(optuna.load_study(study_name="pg-tracked", storage=url), 4)
    client = MlflowClient(tracking_uri=mlflow_on_postgres)
    exp = client.get_experiment_by_name("pg-tracked")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    numbers = sorted(int(r.data.tags["harness.trial_number"]) for r in children
                     if "harness.trial_number" in r.data.tags)
    assert numbers == sorted(t.number for t in finished), "one child run per trial, none twice"
    assert all(r.info.status == "FINISHED" for r in children if r.data.tags.get("harness.state") == "COMPLETE")


def test_drivers_opening_a_fresh_postgresql_database_at_once_all_succeed(postgres):
    # Each process waits for the same instant, then creates Optuna's tables: the losers of the CREATE race
    # (PostgreSQL: duplicate key in pg_type) open the storage again and find the tables.
    url = postgres.create_database("fresh_race")
    start = time.time() + 3
    code = ("import sys, time; from harness.storage import open_storage; time.sleep(max(0, float(sys.argv[2]) - "
            "time.time())); open_storage(sys.argv[1]); print('opened')")
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(6)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [o.strip().splitlines()[-1] for o in outputs] == ["opened"] * 6, outputs
