"""Driver side: an experiment and a parent run per study, a child run per trial (created when the trial launches,
closed once Optuna knows its outcome), orphans of a dead driver closed on resume, the report attached at the end.
"""
from __future__ import annotations

import contextlib
import json
import os
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
from plugins.mlflow_tracking import ui
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
    log_files,
    log_spec,
    make_client,
    now_ms,
    numeric,
    numeric_metrics,
    resolve_tracking_uri,
    shown,
    warn,
)
from plugins.mlflow_tracking.describe import device_fingerprint, search_space, summary_params

if TYPE_CHECKING:
    import optuna

    from harness.config import TrialSpec
    from harness.outcomes import Objective, TrialRecord
    from harness.studyfile import StudyConfig

#: Optuna state -> MLflow run status (a trial the driver was interrupted during is KILLED, like its parent run)
STATUS = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}
#: the directories trial processes leave their step metrics in, one per driver (under the temp directory)
STEPS_DIR_PREFIX = "harness-mlflow-steps-"
#: the files of a trial's working directory logged as artifacts of its run
TRIAL_FILES = ("worker.log", "result.json")
#: throughput relative to the baseline's, logged for every trial that measured one
SPEEDUP = "speedup_vs_baseline"
THROUGHPUT = "throughput_samples_per_s"


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
    params = summary_params(config)
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
    client.log_text(run.info.run_id, json.dumps(search_space(config), indent=1, default=str), "space.json")
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
    #: where the trials' working directories are (``trials/NNNN`` with ``worker.log`` and ``result.json``)
    output_dir: Path | None = None
    #: the study (its ``baseline`` user attribute holds the baseline's record once it has run)
    study: optuna.Study | None = None
    #: the baseline's run id, once it is logged (or found, on resume)
    baseline_run_id: str | None = None

    def __post_init__(self) -> None:
        self.shown_uri = mask_credentials(self.uri)

    @classmethod
    def open(cls, config: StudyConfig, settings: dict[str, str], study: optuna.Study | None = None) -> StudyRun:
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
        output_dir = getattr(config, "output_dir", None)
        return cls(client, uri, exp, parent, [(o.metric, o.key) for o in config.objectives],
                   output_dir=Path(output_dir) if output_dir else None, study=study)

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
        """Log the trial's step and final metrics, objectives, speed-up over the baseline, intermediate values,
        tags, worker log and result file; close its run. The baseline's own run is logged first, once."""
        self.log_baseline()
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
            speedup = self.speedup(metrics) if record.state == "COMPLETE" else None
            if speedup is not None and SPEEDUP not in metrics:
                final.append((SPEEDUP, speedup, ts, step))
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
            tags += [(k, str(v).lower()) for k, v in metrics.items() if isinstance(v, bool)]  # flags such as noisy
            log_batch(self.client, run_id, metrics=final, tags=tags)
            log_files(self.client, run_id, self.trial_files(record.number))
            interrupted = record.failure_class == INTERRUPTED
            self.client.set_terminated(run_id, status="KILLED" if interrupted else STATUS.get(record.state, "FAILED"))
        except Exception as exc:
            warn(mask_credentials(f"could not record trial #{record.number}: {type(exc).__name__}: {exc}"))

    def trial_files(self, number: int) -> list[Path]:
        """The worker log and result file of trial ``number`` (-1: the baseline) that the launcher left in its
        working directory under the study's output directory."""
        if self.output_dir is None:
            return []
        workdir = self.output_dir / "trials" / ("baseline" if number < 0 else f"{number:04d}")
        return [workdir / name for name in TRIAL_FILES]

    def baseline(self) -> TrialRecord | None:
        """The baseline trial's record, once the driver has stored it on the study."""
        from harness.outcomes import TrialRecord

        data = self.study.user_attrs.get("baseline") if self.study is not None else None
        return TrialRecord.from_dict(data) if data else None

    def speedup(self, metrics: dict[str, Any]) -> float | None:
        """The record's own ``speedup_vs_baseline``, else its throughput over the baseline's."""
        if numeric(metrics.get(SPEEDUP)) is not None:
            return numeric(metrics.get(SPEEDUP))
        base = self.baseline()
        theirs = numeric(base.metrics.get(THROUGHPUT)) if base is not None else None
        ours = numeric(metrics.get(THROUGHPUT))
        return ours / theirs if ours is not None and theirs else None

    def log_baseline(self) -> None:
        """The baseline trial as a child run tagged ``baseline=true`` (``harness.role = baseline``), once per study:
        found again on resume, logged as soon as the driver has stored the baseline's record."""
        if self.baseline_run_id is not None:
            return
        record = self.baseline()
        if record is None:
            return
        try:
            with _sqlite_lock(self.uri):  # drivers of one study must not log it twice
                found = all_runs(self.client, self.experiment_id, f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
                                 " and tags.`harness.role` = 'baseline'")
                if found:
                    self.baseline_run_id = str(found[0].info.run_id)
                    return
                tags = {"mlflow.parentRunId": self.parent_run_id, "harness.role": "baseline", "baseline": "true",
                        "harness.study": getattr(self.study, "study_name", ""), "harness.trial_number": "-1",
                        "harness.label": record.label, "harness.spec_hash": record.spec_hash,
                        "harness.state": record.state, "harness.driver": _driver_id(),
                        "harness.duration_s": f"{record.duration_s:.3f}"}
                run = self.client.create_run(self.experiment_id, run_name=f"baseline {record.label}",
                                             tags={k: shown(v) for k, v in tags.items()})
                self.baseline_run_id = run_id = str(run.info.run_id)
            ts, metrics = now_ms(), record.metrics
            step = int(numeric(metrics.get("steps")) or 0)
            final = numeric_metrics(metrics, ts, step)
            if SPEEDUP not in metrics:
                final.append((SPEEDUP, 1.0, ts, step))
            final += [(metric, value, ts, step) for metric, key in self.objectives
                      if metric != key and (value := numeric(metrics.get(key))) is not None]
            log_batch(self.client, run_id, metrics=final, params=record.params.items(),
                      tags=[(k, v) for k, v in metrics.items() if k.startswith("condition.") and isinstance(v, str)])
            if record.spec:
                log_spec(self.client, run_id, record.spec)
            log_files(self.client, run_id, self.trial_files(-1))
            self.client.set_terminated(run_id, status=STATUS.get(record.state, "FAILED"))
        except Exception as exc:
            warn(mask_credentials(f"could not record the baseline: {type(exc).__name__}: {exc}"))

    def log_baseline_checks(self) -> None:
        """The baseline's re-measurements during the study (the driver's ``baseline_checks``) as series on its run,
        step = the launched trials before each: ``remeasured/throughput_samples_per_s`` and
        ``remeasured/speedup_vs_baseline`` (against its first measurement), so drift shows as a chart."""
        checks = self.study.user_attrs.get("baseline_checks", []) if self.study is not None else []
        if self.baseline_run_id is None or not checks:
            return
        points = [(f"remeasured/{key}", value, int(float(check.get("time", 0)) * 1000), int(check["after_trials"]))
                  for check in checks for key in (THROUGHPUT, SPEEDUP)
                  if (value := numeric(check.get(key))) is not None and "after_trials" in check]
        try:
            log_batch(self.client, self.baseline_run_id, metrics=points)
        except Exception as exc:
            warn(mask_credentials(f"could not record the baseline's re-measurements: {type(exc).__name__}: {exc}"))

    def save_views(self, objectives: Sequence[Objective]) -> None:
        """Save the study's two views of the runs table in the experiment (the Pareto front, every trial) and print
        the link that opens the first, with how to start the UI for a SQLite store."""
        keys = {key for _, key in self.objectives}
        extra = [SPEEDUP] if THROUGHPUT in keys else [SPEEDUP, THROUGHPUT]
        study = getattr(self.study, "study_name", "") or "study"
        views = ui.saved_views(study, self.parent_run_id, [(o.metric, o.direction) for o in objectives], extra,
                               now_ms())
        for key, value in views.items():
            self.client.set_experiment_tag(self.experiment_id, key, value)
        key = next(iter(views))
        name = json.loads(views[key])["name"]
        for line in ui.where_to_look(self.uri, self.experiment_id, key[len(ui.VIEW_TAG_PREFIX):], name):
            print(line)

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
        """Mark the Pareto front on the child runs, attach the report's files, close the parent run and print where
        to look at the front in the MLflow UI."""
        from harness.report import write_trials_csv

        self.log_baseline()  # a study whose trials were all run before (resumed): the baseline still gets its run
        self.log_baseline_checks()
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
            self.save_views(objectives)
        except Exception as exc:
            warn(mask_credentials(f"could not finish the study's run: {type(exc).__name__}: {exc}"))
        finally:
            shutil.rmtree(self.steps_dir, ignore_errors=True)
