"""How a trial's failure is classified: which of :data:`harness.errors.FAILURE_CLASSES` an exception means, and
which plugin's code raised it.

The classification looks only at the exception (its type, its message, the files of its traceback), never at
the names of the trial's techniques: a failure inside ``torch._dynamo`` or ``torch._inductor`` is a
compile error whatever technique compiled the step.
"""
from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from harness.errors import TrialFailed

if TYPE_CHECKING:
    from harness.plugins import Registry


def looks_like_compile_error(exc: BaseException) -> bool:
    """True for an exception raised by torch's compiler stack (dynamo, inductor, a failed backend)."""
    mro = type(exc).__mro__
    if any(c.__module__.startswith(("torch._dynamo", "torch._inductor")) for c in mro):
        return True
    return any(c.__module__.split(".")[0] == "torch" and c.__name__ == "BackendCompilerFailed" for c in mro)


def first_line(exc: BaseException) -> str:
    """``TypeName: first line of the message``."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def compile_failure(exc: BaseException, technique: str) -> TrialFailed | None:
    """The ``compile-error`` failure for an exception of the first (compiling) train step, or None when the
    exception does not come from the compiler."""
    if not looks_like_compile_error(exc):
        return None
    return TrialFailed("compile-error", f"{technique}: {first_line(exc)}")


def plugin_files(registry: Registry) -> dict[str, str]:
    """Source file of every loaded plugin -> the plugin's name (to name the plugin a failure came from)."""
    files: dict[str, str] = {}
    for name in registry.records:
        plugin = registry.plugin(name)
        if plugin is None:  # failed to load: it cannot have raised
            continue
        module = plugin if hasattr(plugin, "__file__") else sys.modules.get(getattr(plugin, "__module__", "") or "")
        path = getattr(module, "__file__", None)
        if path:
            files[os.path.realpath(path)] = name
    return files


class FailureClassifier:
    """Classifies the exceptions of one trial; ``files`` maps plugin source files to plugin names."""

    def __init__(self, files: Mapping[str, str]) -> None:
        self.files = files

    def blame(self, exc: BaseException) -> str | None:
        """The plugin whose code raised ``exc`` (the innermost plugin frame of its traceback), if any."""
        name = None
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            name = self.files.get(os.path.realpath(frame.f_code.co_filename), name)
        return name

    def classify(self, exc: Exception, phase: str) -> tuple[str, str]:
        """``(failure class, one-line message)`` for an exception raised during ``phase`` of the trial."""
        if isinstance(exc, TrialFailed):
            return exc.failure_class, exc.message
        if isinstance(exc, torch.OutOfMemoryError):
            return "oom", f"out of memory during {phase}: {(str(exc).splitlines() or [''])[0]}"
        text = first_line(exc)
        if "out of memory" in str(exc).lower():
            return "oom", f"out of memory during {phase}: {text}"
        if looks_like_compile_error(exc):
            return "compile-error", text
        plugin = self.blame(exc)
        if plugin is not None:
            return "plugin-error", f"plugin {plugin!r} raised during {phase}: {text}"
        tb = "".join(traceback.format_exception(exc)[-3:]).strip().replace("\n", " | ")
        return "crashed", f"{text} (during {phase}; {tb[-300:]})"
