"""A real MLflow server (``mlflow server`` or ``mlflow ui``) on a free loopback port for the tests, waited for
until it answers ``/health`` and stopped with its whole process group."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from harness.launch import free_port


@contextlib.contextmanager
def mlflow_process(args: Sequence[str], log_path: Path, cwd: Path | None = None, env: dict | None = None,
                   wait_s: float = 180) -> Iterator[str]:
    """Run ``mlflow ARGS --host 127.0.0.1 --port P`` and yield its base URL once it is healthy."""
    port = free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), *args, "--host", "127.0.0.1", "--port", str(port)],
        cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**(env or os.environ), "MLFLOW_DISABLE_TELEMETRY": "true"})
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow {args[0]} exited: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow {args[0]} did not answer /health in {wait_s:.0f} s: "
                            f"{log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
