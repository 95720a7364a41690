"""Waiting in tests for something another process does (a driver creating a study, a trial starting)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str,
               detail: Callable[[], str] = lambda: "") -> Any:
    """The first truthy value of ``predicate()``, polled until ``timeout_s``; else an AssertionError naming
    ``what`` and ``detail()`` (the storage, the driver's output...)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}{detail()}")
