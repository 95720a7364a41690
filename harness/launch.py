"""Starts a trial's processes, isolated from the caller: one worker, or torchrun with N workers.

The trial runs in its own process session; on a timeout (or when the caller stops it early) the whole tree
is killed, torchrun's workers included, so nothing is left running and no GPU memory outlives the trial.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from harness.config import TrialSpec
from harness.trial import TrialResult


@dataclass
class LaunchOptions:
    """Process layout for multi-process trials; the multi-node fields pass straight to torchrun."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    #: seconds allowed for the whole trial (setup, compile, training, evaluation); 0 means no limit.
    timeout_s: float = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(spec: TrialSpec, spec_path: Path, result_path: Path, events_path: Path,
                   options: LaunchOptions) -> list[str]:
    worker = ["-m", "harness.worker", str(spec_path), "--result", str(result_path), "--events", str(events_path)]
    if spec.devices == 1 and options.nnodes == 1:
        return [sys.executable, *worker]
    endpoint = options.rdzv_endpoint or f"127.0.0.1:{free_port()}"
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={spec.devices}",
            f"--nnodes={options.nnodes}", f"--node-rank={options.node_rank}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}", "--max-restarts=0", "--monitor-interval=0.5", *worker]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and every descendant (torchrun puts its workers in sessions of their own)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    psutil.wait_procs(family, timeout=10)
    proc.wait()


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return str(-code)


def launch(spec: TrialSpec, workdir: Path, options: LaunchOptions | None = None,
           on_event: Callable[[dict], bool | None] | None = None, poll_s: float = 0.2) -> TrialResult:
    """Run ``spec`` in fresh processes and return its result; never raises for a failed trial.

    ``on_event`` receives the worker's events (``start``, ``progress``, ``window``, ``eval``) as they come;
    returning True stops the trial (used for pruning), which is then reported with status ``pruned``.
    """
    options = options or LaunchOptions()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = workdir / "spec.json", workdir / "result.json"
    events_path, log_path = workdir / "events.jsonl", workdir / "worker.log"
    for p in (result_path, events_path):
        p.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec.to_dict(), indent=1, default=str))
    events_path.touch()
    cmd = worker_command(spec, spec_path, result_path, events_path, options)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    stopped = None
    with open(log_path, "ab") as log, open(events_path) as events:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        buffer = ""
        while True:
            code = proc.poll()
            buffer += events.read()
            *lines, buffer = buffer.split("\n")
            for line in lines:
                if line.strip() and on_event is not None and on_event(json.loads(line)):
                    stopped = "pruned"
            if code is not None:
                break
            if stopped:
                kill_tree(proc)
                break
            if options.timeout_s and time.monotonic() - t0 > options.timeout_s:
                kill_tree(proc)
                stopped = "timeout"
                break
            time.sleep(poll_s)
    wall = time.monotonic() - t0
    if stopped == "timeout":
        return TrialResult("timeout", {"wall_s": wall}, f"trial exceeded its {options.timeout_s:g} s timeout "
                                                         "and its processes were killed", spec=spec.to_dict())
    if stopped == "pruned":
        return TrialResult("pruned", {"wall_s": wall}, "stopped early by the pruner", spec=spec.to_dict())
    rank_failures = sorted(workdir.glob("result.json.rank*.json"))
    if result_path.exists():
        result = TrialResult.from_dict(json.loads(result_path.read_text()))
        if result.ok or not rank_failures:
            return result
    if rank_failures:
        result = TrialResult.from_dict(json.loads(rank_failures[0].read_text()))
        rank = rank_failures[0].name.split("rank")[-1].split(".")[0]
        result.message = f"rank {rank}: {result.message}"
        return result
    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:] if log_path.exists() else []
    how = f"killed by {_signal_name(proc.returncode)}" if proc.returncode < 0 else f"exited with {proc.returncode}"
    detail = " | ".join(tail)[-500:]
    return TrialResult("crashed", {"wall_s": wall}, f"trial process {how}" + (f": {detail}" if detail else ""),
                       spec=spec.to_dict())
