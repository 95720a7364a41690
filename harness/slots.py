"""Slots: where a study's concurrent trials run on this host.

On CUDA each visible GPU (or each of the study's ``gpus:`` / ``--gpus``) is one slot and holds at most one trial,
so trials never share a GPU and their measurements do not disturb each other; a trial with ``devices: k`` takes
k slots at once (it waits until k are free) and its process group sees only those GPUs
(``CUDA_VISIBLE_DEVICES``). A CPU study keeps one trial at a time by default, since parallel CPU trials would
distort each other's throughput; ``cpu_slots: N`` runs N at once, on purpose. The host's cores are split evenly
between the slots (each trial's ``OMP_NUM_THREADS`` and ``HARNESS_CPU_THREADS``).

Slots are handed out first come, first served: while a 2-GPU trial waits for its second GPU no later trial
takes the one that came free.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import SpecError
from harness.measure import CPU_THREADS_ENV


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_gpus(where: str, value: object) -> list[int] | None:
    """``all`` (None: every visible GPU), a list of GPU indices or a comma-separated string of them."""
    if value is None or value == "all":
        return None
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise SpecError(f"{where}: expected 'all', a list of GPU indices or '0,1', got {value!r}")
    out: list[int] = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not text.isdigit():
            raise SpecError(f"{where}: {item!r} is not a GPU index (allowed: 'all', [0, 1], '0,1')")
        if int(text) in out:
            raise SpecError(f"{where}: GPU {text} is listed twice")
        out.append(int(text))
    return out


def visible_gpus() -> list[int]:
    """The indices of the GPUs this process sees (0 .. n-1 in ``CUDA_VISIBLE_DEVICES`` numbering)."""
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@dataclass
class SlotPool:
    """The host's slots: ``ids`` are GPU indices (``gpu``) or plain numbers (``cpu``)."""

    ids: Sequence[int]
    kind: str = "gpu"
    cores: int = field(default_factory=host_cores)

    def __post_init__(self) -> None:
        self.free = list(self.ids)
        self.running: dict[int, str] = {}  # slot -> what runs there (for the progress display)
        self._cond = threading.Condition()
        self._queue: list[int] = []  # tickets of the callers waiting, first come first served
        self._next_ticket = 0

    @property
    def size(self) -> int:
        return len(self.ids)

    def acquire(self, k: int, label: str = "") -> list[int]:
        """Wait until ``k`` slots are free and take them (first come, first served)."""
        if k > self.size:
            raise SpecError(f"devices: {k} slots requested but this study has {self.size} ({self.kind}s "
                            f"{', '.join(map(str, self.ids))})")
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._queue.append(ticket)
            self._cond.wait_for(lambda: self._queue[0] == ticket and len(self.free) >= k)
            self._queue.pop(0)
            taken, self.free = self.free[:k], self.free[k:]
            for slot in taken:
                self.running[slot] = label
            self._cond.notify_all()
            return taken

    def release(self, taken: Sequence[int]) -> None:
        with self._cond:
            for slot in taken:
                self.running.pop(slot, None)
            self.free = sorted({*self.free, *taken}, key=list(self.ids).index)
            self._cond.notify_all()

    def label(self, taken: Sequence[int], text: str) -> None:
        """Say what runs on ``taken`` now (a step count, a phase)."""
        with self._cond:
            for slot in taken:
                if slot in self.running:
                    self.running[slot] = text

    def wait_free(self, timeout: float | None = None) -> bool:
        """Wait until a slot is free and nobody is queued for one; False after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self.free) and not self._queue, timeout)

    def env(self, taken: Sequence[int]) -> dict[str, str]:
        """The environment of a trial on ``taken``: only its GPUs visible, its share of the host's cores."""
        # CPU slots leave one core to the driver and the OS, as a lone CPU trial does (harness.measure)
        cores = self.cores - 1 if self.kind == "cpu" and self.cores > 1 else self.cores
        threads = str(max(1, cores // max(1, self.size)) * len(taken))
        env = {"OMP_NUM_THREADS": threads, CPU_THREADS_ENV: threads}
        if self.kind == "gpu":
            # indices count the GPUs this driver sees: under its own CUDA_VISIBLE_DEVICES, name those devices
            parent = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(parent[i] if i < len(parent) else str(i) for i in taken)
        return env

    def names(self, taken: Sequence[int]) -> str:
        return f"{self.kind} {','.join(map(str, taken))}"


def cache_env(root: Path) -> dict[str, str]:
    """What a study's trial processes share through ``root`` (``output_dir/compile-cache``), kept across resumes:
    torch.compile's caches (Inductor's FX graphs and AOTAutograd, Triton's kernels) and, where the installed torch
    carries no bytecode (an image built with PYTHONDONTWRITEBYTECODE, a read-only site-packages), Python's bytecode
    cache: otherwise every trial compiles the sources of torch's lazily imported modules again (dynamo, sympy,
    FSDP: 8-11 s per process on the H200 image, 3 s with the cache). Variables the user set win."""
    root = root.resolve()
    env = {k: str(v) for k, v in (("TORCHINDUCTOR_CACHE_DIR", root / "inductor"), ("TRITON_CACHE_DIR", root / "triton"))
           if k not in os.environ}
    if "PYTHONPYCACHEPREFIX" not in os.environ and not torch_bytecode_cached():
        env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
        env["PYTHONDONTWRITEBYTECODE"] = ""  # empty: Python writes bytecode (to the prefix, not site-packages)
    return env


def torch_bytecode_cached() -> bool:
    """Whether torch's own package has its compiled bytecode next to its sources."""
    import importlib.util

    import torch

    return Path(importlib.util.cache_from_source(torch.__file__)).exists()
