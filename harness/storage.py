"""The Optuna storage a study lives in, and how drivers coordinate through it.

The storage (SQLite by default, any RDB URL) records heartbeats, so a killed driver's running trial is noticed,
failed and retried. Several drivers may share one storage; everything they must agree on is read from it:
which trials count toward ``n_trials`` (:func:`slot`), who runs the baseline (:func:`claim_baseline`), whether a
combination is already running elsewhere (:func:`previous_outcome`).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import SpecError
from harness.outcomes import TrialRecord, dominates
from harness.redact import mask_credentials

if TYPE_CHECKING:
    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import FrozenTrial


@contextlib.contextmanager
def optuna_experimental() -> Iterator[None]:
    """Silence Optuna's ``ExperimentalWarning`` only: the harness relies on features Optuna still marks
    experimental (heartbeats, the stale-trial retry callback, ``fail_stale_trials``, the matplotlib plots)."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ExperimentalWarning)
        yield


#: the failure class of a trial its driver was interrupted (Ctrl-C) during: recorded, but it reruns and does
#: not count toward n_trials, like a trial whose driver was killed
INTERRUPTED = "interrupted"


def driver_id() -> str:
    """How trials and claims name the driver process that owns them: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


# ============================================================================================ opening
def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other URLs, in-memory databases and URLs with a
    query string)."""
    if not url.startswith("sqlite:///") or "?" in url:
        return None
    path = url[len("sqlite:///"):]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing) for the duration of the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create_sqlite_once(url: str, create: Callable[[str], None]) -> None:
    """Make sure the SQLite database of ``url`` exists complete before anyone opens it.

    When its file is missing (or empty), ``create(temp_url)`` builds the schema in a temporary file beside it,
    which is then renamed into place, all under an exclusive lock on ``<file>.lock``: drivers starting together
    create it once, and a process killed while creating leaves no half-built database (an existing file is
    always complete). Other URLs are left alone: their servers serialise schema creation themselves."""
    path = sqlite_file(url)

    def missing() -> bool:
        return path is not None and (not path.exists() or path.stat().st_size == 0)

    if path is None or not missing():
        return
    with file_lock(path.with_name(path.name + ".lock")):
        if not missing():
            return  # another process created it while this one waited for the lock
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        try:
            tmp.unlink(missing_ok=True)
            create("sqlite:///" + str(tmp))
            os.replace(tmp, path)
        finally:
            for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
                leftover.unlink(missing_ok=True)


def _create_optuna_schema(url: str) -> None:
    import optuna

    created = optuna.storages.RDBStorage(url)
    created.remove_session()
    created.engine.dispose()


def open_storage(url: str, heartbeat_s: int = 10) -> RDBStorage:
    """Open an Optuna RDB storage with heartbeats; a stale (killed) trial is failed and re-enqueued.

    A SQLite database is created once, safely under concurrency (:func:`create_sqlite_once`). Raises
    :class:`SpecError` when the URL is unusable, before anything is created; the message masks credentials."""
    import optuna

    shown = mask_credentials(url)
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:" and not Path(path).resolve().parent.is_dir():
            raise SpecError(f"storage: {shown!r}: directory {str(Path(path).parent)!r} does not exist")
    elif "://" not in url:
        raise SpecError(f"storage: {shown!r} is not a database URL (e.g. sqlite:///harness.db, "
                        "postgresql://host/db, mysql://host/db)")
    engine_kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True})
    # Optuna 4.9 renamed RetryFailedTrialCallback (the old name warns, deprecated) to RetryHeartbeatStaleTrialCallback
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", optuna.storages.RetryFailedTrialCallback)
    for attempt in range(SCHEMA_RACE_ATTEMPTS):
        try:
            with optuna_experimental():
                create_sqlite_once(url, _create_optuna_schema)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                    grace_period=2 * heartbeat_s + 1, heartbeat_stale_trial_callback=retry(max_retry=3))
        except Exception as exc:  # driver missing, host unreachable, bad credentials: all the user's to fix
            if _lost_schema_race(exc) and attempt + 1 < SCHEMA_RACE_ATTEMPTS:
                time.sleep(random.uniform(0.2, 1.0))  # another driver is creating the tables: they exist next time
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise SpecError(mask_credentials(f"storage: cannot open {shown!r}: {type(exc).__name__}: "
                                             f"{first[:200]}")) from None
    raise AssertionError("unreachable")


#: how often a driver tries to open a server database whose tables another driver is creating at that moment.
SCHEMA_RACE_ATTEMPTS = 8


def _lost_schema_race(exc: BaseException) -> bool:
    """True for the errors of two drivers creating a server database's tables at once (PostgreSQL's
    ``duplicate key ... pg_type_typname_nsp_index``, MySQL's ``Table ... already exists``): the other driver's
    CREATE won, and opening again finds the tables."""
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(k in text for k in ("already exists", "duplicate key", "uniqueviolation", "duplicate entry",
                                   "integrityerror"))


def existing_directions(storage: RDBStorage, name: str) -> list[str] | None:
    """The directions (``maximize``/``minimize``) of the study ``name`` already in ``storage``, or None."""
    import optuna

    for summary in optuna.study.get_all_study_summaries(storage, include_best_trial=False):
        if summary.study_name == name:
            return [d.name.lower() for d in summary.directions]
    return None


class Heartbeat:
    """Records the running trial's heartbeat from a thread, so a driver killed mid-trial is noticed."""

    def __init__(self, storage: RDBStorage, trial_id: int, interval_s: float) -> None:
        self.storage, self.trial_id, self.interval_s = storage, trial_id, interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a busy database skips one beat; the grace period covers it
                pass

    def __enter__(self) -> Heartbeat:
        self.storage.record_heartbeat(self.trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def retry_interrupted(study: optuna.Study, storage: RDBStorage, trial_id: int) -> None:
    """Enqueue the rerun of a trial its driver was interrupted during, as the storage's stale-trial callback
    does for a killed driver's trial (same parameters, ``failed_trial`` system attribute, retry limit)."""
    retry = storage.get_heartbeat_stale_trial_callback()
    if retry is not None:
        with optuna_experimental():
            retry(study, storage.get_trial(trial_id))


def fail_stale(study: optuna.Study) -> None:
    """Fail the trials whose driver stopped beating (their retry is enqueued by the storage's callback)."""
    import optuna

    with optuna_experimental():
        optuna.storages.fail_stale_trials(study)


# ============================================================================================ trial slots
def slot(t: FrozenTrial) -> str | None:
    """How a stored trial stands toward n_trials: "running", "waiting", "interrupted" (its driver died before
    a record was written, or recorded it as :data:`INTERRUPTED` on Ctrl-C: it reruns and does not count),
    "ruled-out" (infeasible or vetoed before launch: it never ran and does not count) or "finished"; None for
    a surplus trial, which never ran and never counts."""
    from optuna.trial import TrialState

    if t.user_attrs.get("surplus"):
        return None
    if t.state == TrialState.RUNNING:
        return "running"
    if t.state == TrialState.WAITING:
        return "waiting"
    if t.state == TrialState.FAIL and ("record" not in t.user_attrs
                                       or t.user_attrs.get("failure_class") == INTERRUPTED):
        return "interrupted"
    if (t.state == TrialState.PRUNED and t.user_attrs.get("failure_class") == "infeasible"
            and not t.user_attrs.get("launched")):
        return "ruled-out"
    return "finished"


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials by outcome; ``finished`` counts toward n_trials (an interrupted trial does not: it reruns; nor
    does one ruled out before launch, which ``infeasible`` and ``ruled-out`` count)."""
    from optuna.trial import TrialState

    out = dict.fromkeys(("finished", "running", "waiting", "complete", "failed", "pruned", "infeasible",
                         "screened", "interrupted", "ruled-out"), 0)
    for t in study.get_trials(deepcopy=False):
        where = slot(t)
        if where is None:
            continue
        out[where] += 1
        if where == "ruled-out":
            out["infeasible"] += 1
        if where != "finished":
            continue
        cls = t.user_attrs.get("failure_class")
        if t.state == TrialState.COMPLETE:
            out["complete"] += 1
        elif cls in ("infeasible", "screened"):
            out[cls] += 1
        elif t.state == TrialState.PRUNED:
            out["pruned"] += 1
        else:
            out["failed"] += 1
    return out


def give_way_if_surplus(study: optuna.Study, trial: optuna.Trial, n_trials: int | None) -> bool:
    """Whether n_trials were already claimed by lower-numbered trials when ``trial`` was asked: two drivers
    that read the counts at the same moment both ask, and the higher trial number gives way. A surplus trial
    is failed at once, marked so, and left out of the counts and the report."""
    from optuna.trial import TrialState

    if n_trials is None:
        return False
    ahead = sum(1 for t in study.get_trials(deepcopy=False)
                if t.number < trial.number and slot(t) in ("running", "finished"))
    if ahead < n_trials:
        return False
    trial.set_user_attr("surplus", True)
    study.tell(trial, state=TrialState.FAIL)
    return True


# ============================================================================================ coordination
def previous_outcome(study: optuna.Study, trial: optuna.Trial, spec_hash: str,
                     waiting: Callable[[str], None]) -> TrialRecord | None:
    """The outcome of this combination if another trial of the study already ran it; waits (calling
    ``waiting`` with a status line) while a lower-numbered trial of another driver is running it, so that no
    combination is launched twice."""
    from optuna.trial import TrialState

    while True:
        running = False
        for t in study.get_trials(deepcopy=False):
            if t.number == trial.number or t.user_attrs.get("spec_hash") != spec_hash:
                continue
            if t.state.is_finished() and "record" in t.user_attrs and slot(t) == "finished":
                return TrialRecord.from_dict(t.user_attrs["record"])
            if t.state == TrialState.RUNNING and t.number < trial.number:
                running = True
        if not running:
            return None
        waiting(f"#{trial.number}: waiting for the same combination running elsewhere")
        time.sleep(1.0)
        fail_stale(study)


def screening_rival(study: optuna.Study, number: int, screen: list[float],
                    margin: float) -> tuple[int, list[float]] | None:
    """An earlier trial whose screening result (``screen`` user attribute: throughput, peak memory) beats
    ``screen`` by ``margin`` (throughput up, memory down): ``(its number, its screen)``, or None."""
    for t in study.get_trials(deepcopy=False):
        other = t.user_attrs.get("screen")
        if t.number != number and other and dominates(other, screen, ("maximize", "minimize"), margin):
            return t.number, other
    return None


def claim_baseline(study: optuna.Study, claim_s: float, waiting: Callable[[str], None]) -> dict[str, Any] | None:
    """The stored baseline record, or None once this driver holds the claim to run it. Several drivers
    starting together: the last claim written wins and the others wait for its record (or for the claim to
    expire after ``claim_s``, or at once when its driver on this machine is gone)."""
    me = driver_id()
    while True:
        attrs = study.user_attrs  # read from the storage each time: other drivers' writes included
        if attrs.get("baseline"):
            return dict(attrs["baseline"])
        claim = attrs.get("baseline_claim") or {}
        alive = time.time() - claim.get("time", 0) < claim_s
        host, _, pid = str(claim.get("driver", "")).rpartition(":")
        if alive and host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
            alive = False  # its driver on this machine is gone (killed during the baseline)
        if claim.get("driver") not in (None, me) and alive:
            waiting(f"waiting for the baseline trial run by {claim['driver']}")
            time.sleep(2.0)
            continue
        if claim.get("driver") == me:
            return None
        study.set_user_attr("baseline_claim", {"driver": me, "time": time.time()})
        time.sleep(0.5)  # let a simultaneous claim land; whichever was written last wins


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
