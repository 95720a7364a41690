"""A recorder of the hook calls the core makes on a registry, through pluggy's ``add_hookcall_monitoring``
(pytest's ``HookRecorder`` idea): which hook, dispatched to which plugins, with which arguments and result."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pluggy import HookImpl

    from harness.plugins import Registry


@dataclass
class HookCall:
    """One hook call: its ``name``, the ``plugins`` whose implementations it was dispatched to (in pluggy's
    calling order), its ``kwargs``, and once it returned, its ``result`` or ``exception``."""

    name: str
    plugins: tuple[str, ...]
    kwargs: dict[str, Any]
    result: Any = None
    exception: BaseException | None = None
    done: bool = field(default=False, repr=False)


def _hook_name(hook: str) -> str:
    return hook if hook.startswith("harness_") else f"harness_{hook}"


class HookRecorder:
    """Records every hook call made through ``registry`` until :meth:`close` (or the end of a ``with`` block).

    Hook names may be given with or without their ``harness_`` prefix: ``recorder.plugins_called("build_optimizer")``.
    """

    def __init__(self, registry: Registry) -> None:
        self.calls: list[HookCall] = []
        self._open: list[HookCall] = []
        # The testing kit may reach the plugin manager (the core goes through registry.hooks only).
        self._undo = registry.pm.add_hookcall_monitoring(self._before, self._after)

    def _before(self, hook_name: str, hook_impls: Sequence[HookImpl], kwargs: Mapping[str, Any]) -> None:
        call = HookCall(hook_name, tuple(impl.plugin_name for impl in hook_impls), dict(kwargs))
        self.calls.append(call)
        self._open.append(call)

    def _after(self, outcome: Any, *_: Any) -> None:
        call = self._open.pop()  # hook calls nest (a hook may call hooks), so they finish last-in first-out
        call.exception = outcome.exception
        call.result = None if outcome.exception is not None else outcome.get_result()
        call.done = True

    def close(self) -> None:
        """Stop recording (idempotent)."""
        self._undo()
        self._undo = lambda: None

    def __enter__(self) -> HookRecorder:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ queries
    def names(self) -> list[str]:
        """The hooks called, in order (one entry per call)."""
        return [call.name for call in self.calls]

    def calls_of(self, hook: str) -> list[HookCall]:
        """Every call of ``hook``."""
        name = _hook_name(hook)
        return [call for call in self.calls if call.name == name]

    def plugins_called(self, hook: str) -> set[str]:
        """The plugins any call of ``hook`` was dispatched to."""
        return {plugin for call in self.calls_of(hook) for plugin in call.plugins}

    def called(self, hook: str, plugin: str | None = None) -> bool:
        """Whether ``hook`` was called at all, or (with ``plugin``) dispatched to that plugin."""
        calls = self.calls_of(hook)
        return bool(calls) if plugin is None else any(plugin in call.plugins for call in calls)

    def clear(self) -> None:
        """Forget the calls recorded so far."""
        self.calls.clear()
