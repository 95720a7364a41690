"""Driver side: an experiment and a parent run per study, a child run per trial (created when the trial launches,
closed once Optuna knows its outcome), orphans of a dead driver closed on resume, the report attached at the end.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import SpecError
from harness.redact import mask_credentials
from harness.storage import INTERRUPTED, create_sqlite_once
from plugins.mlflow_tracking.client import (
    TAG_RUN_ID,
    TAG_SPEC_HASH,
    TAG_STEPS_FILE,
    TAG_URI,
    StepMetric,
    all_runs,
    default_artifact_location,
    experiment_id,
    first_line,
    log_batch,
    log_spec,
    make_client,
    now_ms,
    numeric,
    numeric_metrics,
    resolve_tracking_uri,
    shown,
    warn,
)

if TYPE_CHECKING:
    import optuna

    from harness.config import TrialSpec
    from harness.outcomes import Objective, TrialRecord
    from harness.studyfile import StudyConfig

#: Optuna state -> MLflow run status (a trial the driver was interrupted during is KILLED, like its parent run)
STATUS = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}
#: the directories trial processes leave their step metrics in, one per driver (under the temp directory)
STEPS_DIR_PREFIX = "harness-mlflow-steps-"


# ============================================================================================ what a study is
def describe_distribution(entry: tuple[str, Any]) -> str:
    """``("fixed", 0.1)`` -> ``0.1``; an Optuna distribution -> ``float [0.001, 0.01] log`` / ``one of [a, b]``."""
    kind, value = entry
    if kind == "fixed":
        return str(value)
    choices = getattr(value, "choices", None)
    if choices is not None:
        return f"one of [{', '.join(map(str, choices))}]"
    text = f"{'int' if type(value).__name__.startswith('Int') else 'float'} [{value.low}, {value.high}]"
    if getattr(value, "log", False):
        text += " log"
    if getattr(value, "step", None) not in (None, 1):
        text += f" step {value.step}"
    return text


def space_params(config: StudyConfig) -> dict[str, Any]:
    """The study's search space as flat params: ``space.optimizer = sgd, adamw``,
    ``space.optimizer.sgd.lr = float [0.03, 0.3] log``, ..."""
    out: dict[str, Any] = {"workload": config.workload}
    for key, entry in getattr(config, "workload_space", {}).items():
        out[f"space.workload.{key}"] = describe_distribution(entry)
    for axis, techniques in getattr(config, "axes", {}).items():
        out[f"space.{axis}"] = ", ".join(techniques)
        for tech, params in techniques.items():
            for key, entry in params.items():
                out[f"space.{axis}.{tech}.{key}"] = describe_distribution(entry)
    out["space.batch_size"] = ", ".join(map(str, getattr(config, "batch_sizes", [])))
    out["objectives"] = ", ".join(f"{o.metric} ({o.direction})" for o in config.objectives)
    for c in getattr(config, "constraints", []):
        out[f"constraint.{c.metric}"] = c.text
    budget = getattr(config, "budget", None)
    if budget is not None:
        out["budget"] = ", ".join(f"{k}={v}" for k, v in vars(budget).items() if v not in (None, 0))
    for key in ("sampler", "pruner", "n_trials", "device", "devices", "seed"):
        if getattr(config, key, None) is not None:
            out[key] = getattr(config, key)
    return out


def device_fingerprint() -> dict[str, str]:
    """What the numbers were measured on: GPU name and count, driver, CUDA and torch versions, host."""
    import torch

    from harness.space import Environment

    env = Environment.detect()
    out = {"device.gpu_name": env.device_name if env.cuda else "none", "device.gpu_count": str(env.device_count),
           "device.torch": torch.__version__, "device.cuda": str(torch.version.cuda or "none"),
           "device.host": socket.gethostname(), "device.python": platform.python_version(),
           "device.cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        out["device.driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
    except Exception:  # no NVML (a CPU machine): the driver is simply not recorded
        out["device.driver"] = "none"
    return out


def _create_mlflow_schema(url: str) -> None:
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(url, Path(url[len("sqlite:///"):]).with_name("mlartifacts").as_uri())
    store.engine.dispose()


def _sqlite_lock(uri: str) -> contextlib.AbstractContextManager[None]:
    """The creation lock of a SQLite tracking store (nothing for a server, which serialises its own writes)."""
    from harness.storage import file_lock, sqlite_file

    path = sqlite_file(uri)
    return file_lock(path.with_name(path.name + ".lock")) if path is not None else contextlib.nullcontext()


def _driver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _driver_is_gone(driver: str) -> bool:
    """True when ``host:pid`` names a process of this host that no longer exists."""
    import psutil

    host, _, pid = driver.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid))


def read_step_metrics(path: str | None) -> list[StepMetric]:
    """The step metrics a trial process left in ``path`` (then removed); a torn last line is skipped."""
    if not path or not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            key, value, ts, step = json.loads(line)
            out.append((str(key), float(value), int(ts), int(step)))
        except (ValueError, TypeError):  # a process killed mid-write leaves half a line
            continue
    Path(path).unlink(missing_ok=True)
    return out


def _intermediate_values(study: optuna.Study, number: int) -> dict[int, float]:
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            return dict(t.intermediate_values)
    return {}


def _parent_run(client: Any, experiment: str, config: StudyConfig) -> str:
    """The study's parent run: found again on resume (and set RUNNING), else created with its params."""
    runs = [r for r in all_runs(client, experiment, "tags.`harness.role` = 'study'")
            if r.data.tags.get("harness.study") == config.name]
    fingerprint = device_fingerprint()
    params = space_params(config)
    if runs:
        run = runs[0]
        client.update_run(run.info.run_id, status="RUNNING")
        have = run.data.params
        changed = [k for k, v in params.items() if k in have and have[k] != shown(v)]
        if changed:
            warn(f"study {config.name!r} resumed with a different {', '.join(changed)}; the parent run keeps the "
                 "first values (MLflow params cannot change)")
        log_batch(client, run.info.run_id, params=[(k, v) for k, v in params.items() if k not in have],
                  tags=fingerprint.items())
        return str(run.info.run_id)
    tags = {"harness.role": "study", "harness.study": config.name, "harness.study_file": getattr(config, "path", ""),
            **fingerprint}
    run = client.create_run(experiment, run_name=config.name, tags={k: shown(v) for k, v in tags.items()})
    log_batch(client, run.info.run_id, params=params.items())
    return str(run.info.run_id)


# ============================================================================================ one study's runs
@dataclass
class StudyRun:
    """The MLflow side of the study this driver runs."""

    client: Any
    uri: str
    experiment_id: str
    parent_run_id: str
    #: (objective name, result key) pairs: each objective is also logged under its own name
    objectives: list[tuple[str, str]] = field(default_factory=list)
    #: the trial processes' step-metric files (removed at study end)
    steps_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix=STEPS_DIR_PREFIX)))
    #: the tracking URI as shown in tags, messages and the worker's spec (credentials masked)
    shown_uri: str = ""

    def __post_init__(self) -> None:
        self.shown_uri = mask_credentials(self.uri)

    @classmethod
    def open(cls, config: StudyConfig, settings: dict[str, str]) -> StudyRun:
        """The experiment and parent run of ``config``'s study; SpecError when the tracking store is unusable."""
        uri = resolve_tracking_uri(settings.get("tracking_uri"))
        name = settings.get("experiment") or config.name
        try:
            # a SQLite store is created once, under a lock (drivers starting together would race on its schema),
            # and the lock also keeps them from creating two parent runs of one study
            create_sqlite_once(uri, _create_mlflow_schema)
            with _sqlite_lock(uri):
                client = make_client(uri)
                exp = experiment_id(client, name,
                                    settings.get("artifact_location") or default_artifact_location(uri, name))
                parent = _parent_run(client, exp, config)
        except Exception as exc:  # unreachable server, bad URI: the user's to fix before trials run
            raise SpecError(mask_credentials(f"mlflow.tracking_uri: cannot use {uri!r}: {type(exc).__name__}: "
                                             f"{first_line(exc)}")) from None
        return cls(client, uri, exp, parent, [(o.metric, o.key) for o in config.objectives])

    def close_orphans(self, study: optuna.Study) -> None:
        """Close child runs left RUNNING by a driver that died: their trial finished in Optuna (it was failed as
        stale), or their driver process on this host is gone."""
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        running = all_runs(self.client, self.experiment_id,
                           f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and attributes.status = 'RUNNING'")
        for run in running:
            tags = run.data.tags
            number = int(tags.get("harness.trial_number", "-1"))
            trial = trials.get(number)
            driver = tags.get("harness.driver", "")
            if trial is not None and not trial.state.is_finished() and not _driver_is_gone(driver):
                continue  # still running in a live driver
            message = (f"the driver ({driver or 'unknown'}) stopped while trial #{number} was running; "
                       "closed when the study resumed")
            log_batch(self.client, run.info.run_id, tags=[
                ("harness.state", "FAIL"), ("harness.failure_class", "crashed"), ("harness.failure_message", message)])
            self.client.set_terminated(run.info.run_id, status="FAILED")
        self.log_orphan_step_metrics()

    def log_orphan_step_metrics(self) -> None:
        """Log the step metrics a dead driver's trials left in its temporary directory to their runs (runs of this
        study's experiment whose driver is gone; other files are left for their own study), then remove them."""
        for directory in Path(tempfile.gettempdir()).glob(STEPS_DIR_PREFIX + "*"):
            if directory == self.steps_dir or not directory.is_dir():
                continue
            for path in directory.glob("*.jsonl"):
                try:
                    run = self.client.get_run(path.stem)
                except Exception:  # not a run of this store
                    continue
                if run.info.experiment_id != self.experiment_id \
                        or not _driver_is_gone(run.data.tags.get("harness.driver", "")):
                    continue
                try:
                    log_batch(self.client, path.stem, metrics=read_step_metrics(str(path)))
                except Exception as exc:  # a deleted run: the metrics have nowhere to go
                    warn(mask_credentials(f"dropped the step metrics of run {path.stem}: {type(exc).__name__}: "
                                          f"{first_line(exc)}"))
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty: files of other stores stay

    def _create_child(self, spec: TrialSpec, number: int, study: optuna.Study, tags: dict[str, Any]) -> str:
        """A child run with the spec as params and as ``trial_spec.json`` (its tags plus ``tags``)."""
        run_tags = {"mlflow.parentRunId": self.parent_run_id, "harness.role": "trial",
                    "harness.study": study.study_name, "harness.trial_number": str(number),
                    "harness.spec_hash": spec.spec_hash(), "harness.label": spec.label(),
                    "harness.driver": _driver_id(), "harness.state": "RUNNING"}
        run = self.client.create_run(self.experiment_id, run_name=f"#{number} {spec.label()}", tags=run_tags)
        run_id = str(run.info.run_id)
        log_batch(self.client, run_id, params=spec.flat_params().items())
        spec_dict = spec.to_dict()
        spec_dict["tags"] = {k: mask_credentials(v) if isinstance(v, str) else v
                             for k, v in {**spec_dict.get("tags", {}), **tags, TAG_RUN_ID: run_id}.items()}
        log_spec(self.client, run_id, spec_dict)
        return run_id

    def launch(self, spec: TrialSpec, number: int, study: optuna.Study) -> dict[str, str] | None:
        """The child run of a trial about to launch; returns the tags that tell the worker where to write."""
        try:
            # the worker never contacts the store in a study (it writes the steps file): it gets the masked URI
            tags = {TAG_URI: self.shown_uri, TAG_SPEC_HASH: spec.spec_hash()}
            run_id = self._create_child(spec, number, study, tags)
        except Exception as exc:  # tracking trouble must not stop the study
            warn(mask_credentials(f"could not create the run of trial #{number}: {type(exc).__name__}: {exc}"))
            return None
        return {**tags, TAG_RUN_ID: run_id, TAG_STEPS_FILE: str(self.steps_dir / f"{run_id}.jsonl")}

    def finished(self, spec: TrialSpec, record: TrialRecord, study: optuna.Study) -> None:
        """Log the trial's step and final metrics, objectives, intermediate values and tags; close its run."""
        try:
            run_id = spec.tags.get(TAG_RUN_ID) if spec.tags.get(TAG_URI) == self.shown_uri else None
            if run_id is None:  # never launched (infeasible, or a combination already run): a run all the same
                run_id = self._create_child(spec, record.number, study, {})
            ts = now_ms()
            metrics = record.metrics or {}
            step = int(numeric(metrics.get("steps")) or 0)
            final = read_step_metrics(spec.tags.get(TAG_STEPS_FILE)) + numeric_metrics(metrics, ts, step)
            final += [(metric, value, ts, step) for metric, key in self.objectives
                      if metric != key and (value := numeric(metrics.get(key))) is not None]
            final += [("intermediate_value", value, ts, int(s))
                      for s, v in sorted(_intermediate_values(study, record.number).items())
                      if (value := numeric(v)) is not None]
            tags = [("harness.state", record.state), ("harness.failure_class", record.failure_class or ""),
                    ("harness.failure_message", record.message or ""),
                    ("harness.duration_s", f"{record.duration_s:.3f}"), ("harness.spec_hash", record.spec_hash)]
            if record.duplicate_of is not None:
                tags.append(("harness.duplicate_of", str(record.duplicate_of)))
            if record.constraint_violation is not None:
                tags.append(("harness.constraint_violation", str(record.constraint_violation)))
            tags += [(k, v) for k, v in metrics.items() if k.startswith("condition.") and isinstance(v, str) and v]
            log_batch(self.client, run_id, metrics=final, tags=tags)
            interrupted = record.failure_class == INTERRUPTED
            self.client.set_terminated(run_id, status="KILLED" if interrupted else STATUS.get(record.state, "FAILED"))
        except Exception as exc:
            warn(mask_credentials(f"could not record trial #{record.number}: {type(exc).__name__}: {exc}"))

    def interrupted(self) -> None:
        """The driver was interrupted (Ctrl-C) and is stopping: the parent run is closed KILLED (a resumed study
        sets it RUNNING again)."""
        try:
            self.client.set_terminated(self.parent_run_id, status="KILLED")
        except Exception as exc:
            warn(mask_credentials(f"could not close the study's run: {type(exc).__name__}: {exc}"))
        finally:
            shutil.rmtree(self.steps_dir, ignore_errors=True)

    def end(self, records: Sequence[TrialRecord], pareto: Sequence[TrialRecord], objectives: Sequence[Objective],
            output_dir: Path) -> None:
        """Mark the Pareto front on the child runs, attach the report's files and close the parent run."""
        from harness.report import write_trials_csv

        try:
            front = {r.number for r in pareto}
            for run in all_runs(self.client, self.experiment_id, f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'"):
                number = int(run.data.tags.get("harness.trial_number", "-1"))
                self.client.set_tag(run.info.run_id, "pareto", "true" if number in front else "false")
            files = [p for p in sorted(Path(output_dir).glob("*"))
                     if p.is_file() and p.suffix in (".csv", ".png", ".json")]
            with tempfile.TemporaryDirectory(prefix="harness-mlflow-") as tmp:
                if not any(p.name == "trials.csv" for p in files):  # the report wrote none: the runs still get one
                    files.append(Path(tmp) / "trials.csv")
                    write_trials_csv(list(records), list(objectives), files[-1])
                for path in files:
                    self.client.log_artifact(self.parent_run_id, str(path))
            counts = Counter(r.state for r in records)
            ts = now_ms()
            log_batch(self.client, self.parent_run_id, metrics=[
                ("trials_complete", counts["COMPLETE"], ts, 0), ("trials_failed", counts["FAIL"], ts, 0),
                ("trials_pruned", counts["PRUNED"], ts, 0), ("pareto_size", len(front), ts, 0)])
            self.client.set_terminated(self.parent_run_id, status="FINISHED")
        except Exception as exc:
            warn(mask_credentials(f"could not finish the study's run: {type(exc).__name__}: {exc}"))
        finally:
            shutil.rmtree(self.steps_dir, ignore_errors=True)
