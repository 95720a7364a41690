"""Concurrent trials: the study loop with one trial per free slot (:mod:`harness.slots`), for a host with several
GPUs (or ``cpu_slots`` > 1). A mixin of :class:`harness.driver.StudyDriver`, which runs a study one trial at a
time when it has one slot.

The sampler is asked only when a slot is free, so it always knows every finished trial; running trials are
told to TPE through ``constant_liar``. n_trials, the timeout, resume, duplicates by spec hash, screening and
vetoes work as in the sequential loop: the storage, not this process, counts trials. The baseline runs first
and alone. Ctrl-C kills every slot's trial; each is recorded as interrupted and runs again on resume.
"""
from __future__ import annotations

import abc
import threading
import time
import warnings
from typing import TYPE_CHECKING

from harness import feasibility, storage
from harness.errors import SpecError
from harness.sampling import suggest_spec
from harness.slots import SlotPool, visible_gpus

if TYPE_CHECKING:
    import optuna
    from rich.console import Console

    from harness.config import TrialSpec
    from harness.outcomes import TrialRecord
    from harness.plugins import Registry
    from harness.space import Environment
    from harness.studyfile import StudyConfig


class SlotLoop(abc.ABC):
    """The concurrent loop of :class:`~harness.driver.StudyDriver` (see the module docstring). The driver gives it
    the attributes below and the abstract methods (its study, one trial's run, the bookkeeping after a trial, the
    baseline's re-measurement and the status line)."""

    config: StudyConfig
    registry: Registry
    env: Environment
    console: Console
    n_trials: int | None
    timeout_s: float | None
    ruled_out: int
    pool: SlotPool
    _local: threading.local
    _stopping: threading.Event
    _lock: threading.Lock

    @property
    @abc.abstractmethod
    def study(self) -> optuna.Study:
        ...

    @abc.abstractmethod
    def run_trial(self, trial: optuna.Trial, spec: TrialSpec | None = None) -> TrialRecord:
        ...

    @abc.abstractmethod
    def _after(self, record: TrialRecord) -> bool:
        ...

    @abc.abstractmethod
    def remeasure_baseline(self) -> None:
        ...

    @abc.abstractmethod
    def _status(self, current: str, refresh: bool = True) -> None:
        ...

    # ------------------------------------------------------------------ shared with the sequential loop
    def _finished(self, t0: float, counts: dict[str, int]) -> bool:
        """Whether this driver starts no more trials: n_trials finished in the storage, the timeout passed, or too
        many proposals ruled out before launch (said in one line)."""
        if self.n_trials is not None and counts["finished"] >= self.n_trials:
            return True
        if self.timeout_s is not None and time.monotonic() - t0 >= self.timeout_s:
            return True
        if self.ruled_out >= feasibility.ruled_out_limit(self.n_trials):
            self.console.print(f"[red]stopping: the sampler proposed {self.ruled_out} combinations that were ruled "
                               "out before launch (infeasible here or vetoed); widen the search space or remove "
                               "the techniques named above[/red]")
            return True
        return False

    def _others_cover(self, counts: dict[str, int]) -> bool:
        """Every trial still needed is running (here or in other drivers) and none waits to be rerun."""
        return (self.n_trials is not None and counts["finished"] + counts["running"] >= self.n_trials
                and not counts["waiting"])

    def _ask(self) -> optuna.Trial:
        with warnings.catch_warnings():
            # ask/tell with the driver's own heartbeat thread is how heartbeats work outside optimize()
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used",
                                    category=UserWarning)
            return self.study.ask()

    # ------------------------------------------------------------------ concurrent trials
    def slot_pool(self) -> SlotPool:
        """One slot per GPU to use (``gpus``, else every visible one) on CUDA; ``cpu_slots`` on a CPU."""
        cfg = self.config
        if cfg.device == "cuda" or (cfg.device == "auto" and self.env.cuda):
            visible = visible_gpus()
            ids = cfg.gpus if cfg.gpus is not None else visible
            missing = [i for i in ids if i not in visible]
            if missing:
                raise SpecError(f"gpus: GPU {missing[0]} is not visible on this host (visible: "
                                f"{', '.join(map(str, visible)) or 'none'})")
            return SlotPool(ids or [0], "gpu")
        return SlotPool(list(range(cfg.cpu_slots)), "cpu")

    def _loop_concurrent(self, t0: float) -> bool:
        """The loop with one trial per free slot: ask when a slot is free, take the trial's slots (k GPUs for
        ``devices: k``, first come first served), run it in a thread; Ctrl-C stops every slot's trial."""
        study, threads = self.study, list[threading.Thread]()
        errors: list[BaseException] = []
        try:
            while not errors:
                storage.fail_stale(study)
                c = storage.counts(study)
                threads = [t for t in threads if t.is_alive()]
                if self._finished(t0, c):
                    break
                if self._others_cover(c) or not self.pool.wait_free(timeout=1.0):
                    time.sleep(0.5)  # every trial still needed is running (here or in other drivers)
                    continue
                trial = self._ask()
                if storage.give_way_if_surplus(study, trial, self.n_trials):
                    continue
                spec = suggest_spec(trial, self.config, self.registry)
                # a trial with more devices than slots is ruled out by StudyDriver.infeasible on the slots it gets
                need = min(spec.devices, self.pool.size) if self.pool.kind == "gpu" else 1
                slots = self.pool.acquire(need, f"#{trial.number}")
                thread = threading.Thread(target=self._slot_trial, args=(trial, spec, slots, errors),
                                          name=f"trial-{trial.number}", daemon=True)
                thread.start()
                threads.append(thread)
            for thread in threads:
                thread.join()
        except KeyboardInterrupt:
            self._stopping.set()  # every running trial is recorded as interrupted by its own thread
            kill_children()
            for thread in threads:
                thread.join(timeout=60)
            raise
        if errors:
            raise errors[0]
        self._status("done")
        return True

    def _slot_trial(self, trial: optuna.Trial, spec: TrialSpec, slots: list[int],
                    errors: list[BaseException]) -> None:
        """A trial thread: run the trial on its slots, then give them back."""
        self._local.slots = slots
        try:
            record = self.run_trial(trial, spec)
            with self._lock:
                due = self._after(record)
            if due:  # on this trial's slots, while the other slots go on
                self.remeasure_baseline()
        except BaseException as exc:  # a storage or plugin failure of the driver itself: the main loop raises it
            errors.append(exc)
        finally:
            self.pool.release(slots)


def kill_children() -> None:
    """SIGKILL the trial processes this driver started (its descendants)."""
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
    except Exception:  # psutil missing: nothing more can be done here
        return
    for child in children:
        try:
            child.kill()
        except Exception:  # already gone
            pass
