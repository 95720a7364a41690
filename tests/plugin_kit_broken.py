"""Test-only plugin that fails to import (a missing dependency), for ``tests/test_plugin_kit.py``: loaded with
``HARNESS_PLUGINS=plugin_kit_broken``, it must be listed by ``harness plugins`` with its error, not crash it."""
import harness_lion_turbo_kernels  # noqa: F401  (does not exist: this import fails on purpose)
