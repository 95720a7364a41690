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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import TrialSpec
from harness.errors import SpecError
from harness.trial import TrialResult


@dataclass
class LaunchOptions:
    """Process layout for multi-process trials; the multi-node fields pass straight to torchrun."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    #: seconds allowed for the whole trial (setup, compile, training, evaluation); 0 means no limit.
    timeout_s: float = 0
    #: environment variables for the trial's processes (a study slot's CUDA_VISIBLE_DEVICES and thread count).
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    """A TCP port nothing listens on now (each multi-process trial gets its own rendezvous port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_multiprocess(spec: TrialSpec, options: LaunchOptions) -> bool:
    return spec.devices > 1 or options.nnodes > 1


def runs_on_cpu(spec: TrialSpec) -> bool:
    import torch

    return spec.device == "cpu" or not torch.cuda.is_available()


def worker_command(spec: TrialSpec, spec_path: Path, result_path: Path, events_path: Path,
                   options: LaunchOptions) -> list[str]:
    """The command line of a trial: the worker itself, or torchrun starting ``spec.devices`` workers per node.

    ``spec.devices`` counts the processes on this node; with ``nnodes > 1`` every node runs the same command
    with its own ``node_rank`` and the shared ``rdzv_endpoint`` (required then), and the rendezvous id is the
    spec's hash so that the nodes of one trial find each other.
    """
    worker = ["-m", "harness.worker", str(spec_path), "--result", str(result_path), "--events", str(events_path)]
    if not is_multiprocess(spec, options):
        return [sys.executable, *worker]
    if options.nnodes < 1 or not 0 <= options.node_rank < options.nnodes:
        raise SpecError(f"node_rank: {options.node_rank} is not allowed with nnodes {options.nnodes} "
                        f"(allowed: 0 .. {max(options.nnodes - 1, 0)})")
    if options.nnodes > 1 and not options.rdzv_endpoint:
        raise SpecError(f"rdzv_endpoint: '' is not allowed with nnodes {options.nnodes} "
                        "(give host:port of the rendezvous, the same on every node)")
    endpoint = options.rdzv_endpoint or f"127.0.0.1:{free_port()}"
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={spec.devices}",
            f"--nnodes={options.nnodes}", f"--node-rank={options.node_rank}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}", f"--rdzv-id=trial-{spec.spec_hash()}", "--max-restarts=0",
            "--monitor-interval=0.5", *worker]


def worker_env(spec: TrialSpec, options: LaunchOptions) -> dict[str, str]:
    """The trial's environment. CPU ranks share the machine's cores: each gets ``cores / processes`` threads
    (1 on a 2-core machine) unless the caller set ``OMP_NUM_THREADS``, so ranks do not oversubscribe."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if is_multiprocess(spec, options) and "OMP_NUM_THREADS" not in os.environ and runs_on_cpu(spec):
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // spec.devices))
    env.update(options.env)
    return env


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and every descendant (torchrun puts its workers in sessions of their own, so killing
    the process group alone would miss them). The root is suspended first so it cannot start new children
    between listing and killing them."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        parent.suspend()
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
           on_event: Callable[[dict[str, Any]], bool | None] | None = None, poll_s: float = 0.2) -> TrialResult:
    """Run ``spec`` in fresh processes and return its result; never raises for a failed trial.

    ``on_event`` receives the worker's events (``start``, ``progress``, ``window``, ``eval``) as they come;
    returning True stops the trial (used for pruning), which is then reported with status ``pruned``.
    """
    options = options or LaunchOptions()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = workdir / "spec.json", workdir / "result.json"
    events_path, log_path = workdir / "events.jsonl", workdir / "worker.log"
    for p in (result_path, events_path, *workdir.glob(result_path.name + ".rank*.json")):
        p.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec.to_dict(), indent=1, default=str))
    events_path.touch()
    cmd = worker_command(spec, spec_path, result_path, events_path, options)
    env = worker_env(spec, options)
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
    result = first_failure(workdir, result_path)
    if result is not None:
        if not result.ok and log_path.exists() and "Traceback (most recent call last)" in log_path.read_text(
                errors="replace"):  # the worker wrote the full traceback there (harness.failures)
            result.message += f"; full traceback: {log_path}"
        return result
    if proc.returncode == 0 and options.node_rank > 0:
        # rank 0 lives on node 0 and writes the result there; this node's ranks all finished cleanly
        return TrialResult("ok", {"wall_s": wall}, f"node {options.node_rank}: all ranks finished; node 0 reports "
                                                   "the result", spec=spec.to_dict())
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path.exists() else []
    how = f"killed by {_signal_name(proc.returncode)}" if proc.returncode < 0 else f"exited with {proc.returncode}"
    detail = f"{tail[0].strip()[:300]}; full log: {log_path}" if tail else ""
    return TrialResult("crashed", {"wall_s": wall}, f"trial process {how}" + (f": {detail}" if detail else ""),
                       spec=spec.to_dict())


def first_failure(workdir: Path, result_path: Path) -> TrialResult | None:
    """The trial's result: rank 0's when it succeeded, otherwise the failure written first by any rank.

    When one rank fails, the others fail after it (a collective loses its peer, torchrun stops them), so the
    earliest written failure names the rank and error that caused it.
    """
    found: list[tuple[float, int, TrialResult]] = []
    if result_path.exists():
        result = TrialResult.from_dict(json.loads(result_path.read_text()))
        if result.ok:
            return result
        found.append((result_path.stat().st_mtime, 0, result))
    for path in workdir.glob(result_path.name + ".rank*.json"):
        rank = int(path.name[len(result_path.name) + len(".rank"):-len(".json")])
        found.append((path.stat().st_mtime, rank, TrialResult.from_dict(json.loads(path.read_text()))))
    if not found:
        return None
    _, rank, result = min(found, key=lambda item: (item[0], item[1]))
    if len(found) > 1 or rank != 0:
        result.message = f"rank {rank}: {result.message}"
    return result
