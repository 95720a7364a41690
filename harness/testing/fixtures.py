"""gpu-harness's pytest plugin (the ``pytest11`` entry point ``harness``): fixtures for testing harness plugins
with real components, loaded in every pytest run of an environment where the harness is installed.

Fixtures (none shadows a pytest builtin):

- ``harness_registry``: a fresh :class:`harness.plugins.Registry` of the installed plugins.
- ``make_registry(*plugins, disable=(), entry_points=True)``: a factory of registries with extra plugins
  (modules, classes or instances) and/or some disabled.
- ``tiny_spec(**fields)``: a factory of TrialSpecs on the tiny workload (CPU, 60 steps), built with
  ``harness_registry`` (fields as for :func:`harness.testing.make_spec`).
- ``run_trial(spec=None, *, isolated=False, timeout_s=0, registry=None, **fields)``: runs one trial and
  returns its TrialResult; ``run_trial.ok(...)`` also asserts it finished ``ok``.
- ``hook_recorder(registry=None)``: a :class:`harness.testing.HookRecorder` on a registry (default:
  ``harness_registry``), detached at teardown.
- ``harness_cli(*argv)``: the ``harness`` command in-process, in ``tmp_path``: ``(exit code, stdout, stderr)``.
- ``study_storage``: a SQLite storage URL in ``tmp_path``.

Marker: ``@pytest.mark.gpu`` skips a test when torch sees no CUDA device.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.testing.recorder import HookRecorder
from harness.testing.trials import TINY_WORKLOAD, assert_trial_ok, make_spec, run_cli, run_one_trial

if TYPE_CHECKING:
    from harness.config import TrialSpec
    from harness.plugins import Registry
    from harness.trial import TrialResult


# ============================================================================================ the gpu marker
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one; gpu-harness's pytest plugin)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not marked:
        return  # torch is imported only where a test asks for a GPU
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in marked:
        item.add_marker(skip)


# ============================================================================================ registries
@pytest.fixture
def make_registry() -> Callable[..., Registry]:
    """``make_registry(*plugins, disable=(), entry_points=True)``: a fresh Registry of the installed plugins
    (unless ``entry_points=False``) plus ``plugins`` (modules, classes or instances), without ``disable``."""
    from harness.plugins import Registry

    def make(*plugins: Any, disable: Iterable[str] = (), entry_points: bool = True) -> Registry:
        return Registry(disable=disable, extra=plugins, entry_points=entry_points)

    return make


@pytest.fixture
def harness_registry(make_registry: Callable[..., Registry]) -> Registry:
    """A fresh Registry of the installed plugins (and ``HARNESS_PLUGINS``, less ``HARNESS_DISABLE_PLUGINS``)."""
    return make_registry()


# ============================================================================================ trials
@pytest.fixture
def tiny_spec(harness_registry: Registry) -> Callable[..., TrialSpec]:
    """``tiny_spec(**fields)``: a TrialSpec on the tiny workload (CPU, 60 steps), every axis at its default
    unless ``fields`` select otherwise (``optimizer={"name": "lion", "lr": 3e-3}``, ``budget={"steps": 80}``)."""

    def make(**fields: Any) -> TrialSpec:
        fields.setdefault("workload", TINY_WORKLOAD)
        fields.setdefault("registry", harness_registry)
        return make_spec(**fields)

    return make


class TrialRunner:
    """The ``run_trial`` fixture: ``run_trial(spec=None, *, isolated=False, timeout_s=0, registry=None,
    **fields)`` runs one trial (by default on the tiny workload, in this process, with the fixture's registry)
    and returns its :class:`harness.trial.TrialResult`."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def __call__(self, spec: TrialSpec | None = None, *, isolated: bool = False, timeout_s: float = 0,
                 registry: Registry | None = None, **fields: Any) -> TrialResult:
        registry = registry or self.registry
        if spec is None:
            fields.setdefault("workload", TINY_WORKLOAD)
        return run_one_trial(spec, isolated=isolated, timeout_s=timeout_s, registry=registry, **fields)

    def ok(self, spec: TrialSpec | None = None, **kwargs: Any) -> TrialResult:
        """Run the trial and assert it finished ``ok`` (failing with its status and message otherwise)."""
        __tracebackhide__ = True
        return assert_trial_ok(self(spec, **kwargs))


@pytest.fixture
def run_trial(harness_registry: Registry) -> TrialRunner:
    """Runs one trial and returns its TrialResult; see :class:`TrialRunner`."""
    return TrialRunner(harness_registry)


@pytest.fixture
def hook_recorder(harness_registry: Registry) -> Iterator[Callable[..., HookRecorder]]:
    """``hook_recorder(registry=None)``: start recording the hook calls made on ``registry`` (default:
    ``harness_registry``, the one ``run_trial`` uses); recording stops at teardown."""
    recorders: list[HookRecorder] = []

    def record(registry: Registry | None = None) -> HookRecorder:
        recorders.append(HookRecorder(registry or harness_registry))
        return recorders[-1]

    yield record
    for recorder in recorders:
        recorder.close()


# ============================================================================================ CLI and storage
@pytest.fixture
def harness_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., tuple[int, str, str]]:
    """``harness_cli(*argv)``: run the ``harness`` command in-process with ``tmp_path`` as the working
    directory; returns ``(exit code, stdout, stderr)``."""
    monkeypatch.chdir(tmp_path)
    return run_cli


@pytest.fixture
def study_storage(tmp_path: Path) -> str:
    """A SQLite storage URL for a study (``sqlite:////.../study.db`` in ``tmp_path``)."""
    return f"sqlite:///{tmp_path / 'study.db'}"
