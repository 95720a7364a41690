"""Concurrent trials: slot assignment (a trial never shares a GPU; a 2-GPU trial waits for two free slots, first
come first served), each trial's environment (its GPUs only, its share of the cores), and the concurrent study
loop with real trial processes on CPU slots: n_trials exact, no combination launched twice, trials overlapping,
resume after SIGKILL with several trials running."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import optuna
import psutil
import pytest
from test_study import env_with_test_plugin, kill_driver_when, load, run_cli, study_file
from waiting import wait_until

from harness.errors import SpecError
from harness.slots import SlotPool, parse_gpus

LR_RANGE = {"adamw": {"lr": {"low": 0.001, "high": 0.01, "log": True}, "weight_decay": 0.0,
                      "implementation": "default", "schedule": "constant"}}


def test_a_trial_never_shares_a_slot_and_a_two_gpu_trial_waits_for_two():
    pool = SlotPool([0, 1], "gpu", cores=8)
    first = pool.acquire(1, "#0")
    order: list[tuple[str, list[int]]] = []

    def take(name: str, k: int) -> None:
        slots = pool.acquire(k, name)
        order.append((name, slots))

    wide = threading.Thread(target=take, args=("#1 (2 GPUs)", 2))
    wide.start()
    time.sleep(0.2)
    narrow = threading.Thread(target=take, args=("#2 (1 GPU)", 1))
    narrow.start()
    time.sleep(0.2)
    # GPU 1 is free, but #1 came first and needs both: #2 must not take it
    assert order == [] and pool.free == [1]
    pool.release(first)
    wide.join(timeout=5)
    assert order == [("#1 (2 GPUs)", [0, 1])] and narrow.is_alive()
    pool.release([0, 1])
    narrow.join(timeout=5)
    assert order[1] == ("#2 (1 GPU)", [0])
    with pytest.raises(SpecError, match="3 slots requested but this study has 2"):
        pool.acquire(3)


def test_a_trial_sees_only_its_gpus_and_its_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pool = SlotPool([0, 1, 2, 3], "gpu", cores=16)
    assert pool.env([2]) == {"CUDA_VISIBLE_DEVICES": "2", "OMP_NUM_THREADS": "4", "HARNESS_CPU_THREADS": "4"}
    assert pool.env([0, 1])["CUDA_VISIBLE_DEVICES"] == "0,1" and pool.env([0, 1])["OMP_NUM_THREADS"] == "8"
    # under the driver's own CUDA_VISIBLE_DEVICES, slot indices name the devices it sees
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")
    assert SlotPool([0, 2], "gpu", cores=4).env([2])["CUDA_VISIBLE_DEVICES"] == "7"
    assert "CUDA_VISIBLE_DEVICES" not in SlotPool([0, 1], "cpu", cores=2).env([1])


@pytest.mark.parametrize("value,expected", [("all", None), ("0,1", [0, 1]), ([1, 3], [1, 3]), ("2", [2])])
def test_gpus_field_accepts_all_a_list_or_a_comma_string(value, expected):
    assert parse_gpus("gpus", value) == expected


@pytest.mark.parametrize("value,message", [([0, "x"], "'x' is not a GPU index"), ([1, 1], "GPU 1 is listed twice"),
                                          ([], "expected 'all'"), (True, "expected 'all'")])
def test_bad_gpus_field_is_one_line(value, message):
    with pytest.raises(SpecError, match=message):
        parse_gpus("study.yaml.gpus", value)


def overlapping(trials: list[optuna.trial.FrozenTrial]) -> bool:
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    return any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))


@pytest.mark.slow
def test_cpu_slots_run_trials_at_once_with_exact_n_trials_and_no_duplicates(tmp_path):
    path = study_file(tmp_path, "slots", n_trials=6, cpu_slots=2, sampler="tpe", axes={"optimizer": LR_RANGE},
                      budget={"steps": 150, "warmup_steps": 2, "windows": 2})
    proc = run_cli(["study", path], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    trials = load(tmp_path, "slots").get_trials()
    finished = [t for t in trials if t.state.is_finished() and "record" in t.user_attrs]
    assert len(finished) == 6 and len(trials) == 6
    launched = [t for t in finished if t.user_attrs.get("launched")]
    hashes = [t.user_attrs["spec_hash"] for t in launched]
    assert len(hashes) == len(set(hashes))
    assert overlapping(launched), "two CPU slots: some trials ran at the same time"
    slots = {t.user_attrs["record"]["spec"]["tags"]["slots"] for t in launched}
    assert slots <= {"cpu 0", "cpu 1"} and len(slots) == 2


@pytest.mark.slow
def test_sigkilled_driver_with_several_running_trials_resumes_exactly(tmp_path):
    path = study_file(tmp_path, "slots-resume", n_trials=4, cpu_slots=2, objectives=["throughput"],
                      axes={"optimizer": LR_RANGE}, budget={"steps": 600, "warmup_steps": 2, "windows": 2})
    log = tmp_path / "driver.log"
    import subprocess

    from test_study import HARNESS
    with open(log, "wb") as out:
        driver = subprocess.Popen([*HARNESS, "study", str(path)], cwd=tmp_path, env=env_with_test_plugin(),
                                  stdout=out, stderr=subprocess.STDOUT)

    def two_running():
        if not (tmp_path / "optuna.db").exists():
            return None
        try:
            trials = load(tmp_path, "slots-resume").get_trials()
        except Exception:  # the study is being created
            return None
        running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("launched")]
        return running if len(running) == 2 else None

    running = kill_driver_when(driver, two_running, "two running trials", tmp_path, "slots-resume", log)
    proc = run_cli(["study", path], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    trials = load(tmp_path, "slots-resume").get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4
    for old in running:  # each killed trial ran again, with the same parameters
        rerun = [t for t in trials if t.system_attrs.get("failed_trial") == old.number]
        assert len(rerun) == 1 and rerun[0].params == old.params and rerun[0].state.name == "COMPLETE"
    hashes = [t.user_attrs["spec_hash"] for t in complete if t.user_attrs.get("launched")]
    assert len(hashes) == len(set(hashes))


@pytest.mark.slow
def test_trials_share_the_study_compile_cache_and_report_their_fixed_cost(tmp_path, monkeypatch):
    # torch sets TORCHINDUCTOR_CACHE_DIR in its own process once it compiles (an earlier in-process test): a user's
    # variable wins over the study's directory, so start the driver without it
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    path = study_file(tmp_path, "cache", n_trials=2, sampler="random", objectives=["throughput"],
                      axes={"optimizer": LR_RANGE, "compile": {"torch-compile": {"mode": "default"}}},
                      budget={"steps": 30, "warmup_steps": 2, "windows": 2})
    proc = run_cli(["study", path], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    cache = tmp_path / "out" / "compile-cache" / "inductor"
    assert cache.is_dir() and any(p.is_file() for p in cache.rglob("*")), "Inductor wrote to the study's cache"
    records = [t.user_attrs["record"] for t in load(tmp_path, "cache").get_trials()]
    for rec in records:
        m = rec["metrics"]
        assert 0 < m["overhead_s"] < rec["duration_s"]
        assert m["overhead_s"] == pytest.approx(rec["duration_s"] - m["train_time_s"] - m.get("eval_s", 0.0), abs=1e-6)
    assert "per-trial fixed cost (process start, imports, model build, compilation, warm-up): median" in proc.stdout


@pytest.mark.slow
def test_ctrl_c_stops_every_slots_trial_and_records_each_interrupted(tmp_path):
    from test_faults import driver, interrupt, kill_if_alive, trials
    from test_faults import study_file as faults_study

    from harness.storage import INTERRUPTED

    path = faults_study(tmp_path, "slots-ctrlc", cpu_slots=2, sampler="random",
                        axes={"optimizer": LR_RANGE}, budget={"steps": 4000, "warmup_steps": 2, "windows": 2})
    log = tmp_path / "driver.log"
    proc = driver(path, tmp_path, log)

    def two_launched():
        if not (tmp_path / "harness.db").exists():
            return None
        try:
            running = [t for t in trials(tmp_path, "slots-ctrlc")
                       if t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("launched")]
        except Exception:  # the study is being created
            return None
        return running if len(running) == 2 else None

    try:
        running = wait_until(two_launched, 180, "two running trials", lambda: log.read_text(errors="replace")[-2000:])
        workers = psutil.Process(proc.pid).children(recursive=True)
        interrupt(proc, log)
    finally:
        kill_if_alive(proc)
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "every trial killed"
    after = {t.number: t for t in trials(tmp_path, "slots-ctrlc")}
    for t in running:
        assert after[t.number].state == optuna.trial.TrialState.FAIL
        assert after[t.number].user_attrs["failure_class"] == INTERRUPTED


def test_trial_processes_share_the_study_caches_and_bytecode_where_torch_has_none(tmp_path, monkeypatch):
    import harness.slots as slots

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "PYTHONPYCACHEPREFIX"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "compile-cache"
    monkeypatch.setattr(slots, "torch_bytecode_cached", lambda: True)
    assert slots.cache_env(root) == {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
                                     "TRITON_CACHE_DIR": str(root / "triton")}
    # an image whose torch carries no bytecode (PYTHONDONTWRITEBYTECODE): trials write and share it in the study
    monkeypatch.setattr(slots, "torch_bytecode_cached", lambda: False)
    env = slots.cache_env(root)
    assert env["PYTHONPYCACHEPREFIX"] == str(root / "pycache") and env["PYTHONDONTWRITEBYTECODE"] == ""
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", "/mine")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/mine/triton")
    assert slots.cache_env(root) == {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")}, "the user's variables win"


def test_loading_every_plugin_leaves_the_compile_cache_variables_alone():
    # importing torch._dynamo sets TORCHINDUCTOR_CACHE_DIR in the process; a plugin doing so when it loads would make
    # the driver take it for the user's setting and drop the study's shared cache
    code = ("import os; from harness.plugins import get_registry; get_registry(); "
            "print(os.environ.get('TORCHINDUCTOR_CACHE_DIR'))")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None", "a plugin imports torch._dynamo when it loads"
