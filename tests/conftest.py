"""The harness's own tests use the fixtures of its pytest plugin (``harness.testing.fixtures``, loaded through
the ``pytest11`` entry point once the package is installed): ``harness_registry``, ``make_registry``,
``tiny_spec``, ``run_trial``, ``hook_recorder``, ``harness_cli``, ``study_storage`` and the ``gpu`` marker."""
from __future__ import annotations

import pytest


@pytest.fixture
def registry(harness_registry):
    """The short name the harness's tests use for a fresh registry of the installed plugins."""
    return harness_registry
