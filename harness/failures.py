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


#: how many characters of an exception's first line a failure message keeps.
MESSAGE_CHARS = 300


def first_line(exc: BaseException) -> str:
    """``TypeName: first line of the message`` (cut to :data:`MESSAGE_CHARS`)."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    if len(line) > MESSAGE_CHARS:
        line = line[:MESSAGE_CHARS] + "..."
    return f"{type(exc).__name__}: {line}".rstrip(": ")


def short_path(path: str) -> str:
    """A source file as people read it: from the package root for installed code (``torch/nn/...``), relative
    to the current directory when under it, else as given."""
    norm = path.replace(os.sep, "/")
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in norm:
            return norm.rsplit(marker, 1)[1]
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


def where_raised(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame of ``exc``'s traceback (empty without one)."""
    frames = list(traceback.walk_tb(exc.__traceback__))
    if not frames:
        return ""
    frame, line = frames[-1]
    return f"{short_path(frame.f_code.co_filename)}:{line} in {frame.f_code.co_name}"


def report_traceback(exc: BaseException, phase: str) -> None:
    """Write ``exc``'s full traceback to stderr: a trial's ``worker.log`` in its working directory, whose path
    the launcher adds to the failure message (the message itself stays one line)."""
    print(f"harness: the trial failed during {phase}; full traceback:", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)
    sys.stderr.flush()


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
        """``(failure class, one-line message)`` for an exception raised during ``phase`` of the trial.

        The message is one sentence: the exception's type and first line, the phase and where it was raised;
        the full traceback goes to stderr (the trial's ``worker.log``) for any exception the harness did not
        raise on purpose."""
        if isinstance(exc, TrialFailed):
            return exc.failure_class, exc.message
        report_traceback(exc, phase)
        if isinstance(exc, torch.OutOfMemoryError):
            return "oom", f"out of memory during {phase}: {(str(exc).splitlines() or [''])[0]}"
        text = first_line(exc)
        if "out of memory" in str(exc).lower():
            return "oom", f"out of memory during {phase}: {text}"
        if looks_like_compile_error(exc):
            return "compile-error", text
        where = where_raised(exc)
        plugin = self.blame(exc)
        if plugin is not None:
            return "plugin-error", f"plugin {plugin!r} raised during {phase}: {text}" + (f" (at {where})" * bool(where))
        return "crashed", f"{text} (during {phase}" + (f", at {where})" if where else ")")
