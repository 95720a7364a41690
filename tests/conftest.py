"""Shared fixtures: a plugin registry, temp working directories, GPU marker handling."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def registry():
    from harness.plugins import get_registry

    return get_registry()


@pytest.fixture
def harness_cli(monkeypatch, tmp_path):
    """Run the ``harness`` CLI in-process: returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from harness.cli import main

    def run(*argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in argv])
        return code, out.getvalue(), err.getvalue()

    monkeypatch.chdir(tmp_path)
    return run
