"""Observer ``mlflow``: records studies and trials in MLflow, one experiment per study, so trials compare side by
side in the MLflow UI.

- **Study (driver)**: an experiment (the study file's ``mlflow.experiment``, default the study name) and a
  parent run per study, found again on resume. Params: workload, search-space summary, objectives, sampler,
  budget; tags: the device fingerprint (GPU name and count, driver, CUDA and torch versions, host).
- **Trial**: a child run (tag ``mlflow.parentRunId``) created by the *driver* when the trial launches, with the
  flattened spec as params (``optimizer=adamw``, ``optimizer.lr=...``) and the spec as ``trial_spec.json``.
  The worker buffers per-step metrics (``train_loss``, ``lr``, ``window_throughput_samples_per_s``, telemetry
  gauges, ``accuracy``/``val_loss`` at evaluations) in memory and writes them to a JSON-lines file named in
  ``spec.tags`` at the trial's end (and at intermediate evaluations, which are untimed): the trial process never
  imports MLflow nor waits on the tracking store, and nothing happens inside a timed window. When the trial has
  finished the driver logs those step metrics, the final metrics under their result names
  (``throughput_samples_per_s``, ``accuracy``, ``peak_memory_bytes``, ...) plus one per objective under the
  objective's name (``throughput``, ``energy_per_sample``...), Optuna's intermediate values
  (``intermediate_value``) and tags (trial number, state, failure class and message, spec hash), and closes the
  run: COMPLETE -> FINISHED, FAIL -> FAILED, PRUNED -> KILLED.
- **Resume**: a child run still RUNNING whose trial has finished in Optuna, or whose driver process is gone,
  is closed FAILED (``harness.failure_class=crashed``) when a driver starts the study again.
- **Study end**: ``pareto=true`` (else ``false``) on every child run, the report's files (``trials.csv``,
  ``pareto.png``, ...) as artifacts of the parent run, which is closed FINISHED.

Tracking URI: the study file's ``mlflow.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else
``sqlite:///mlflow.db`` (no server; artifacts in ``mlartifacts/`` beside the database). ``harness run`` logs
nothing unless ``MLFLOW_TRACKING_URI`` or ``HARNESS_MLFLOW_EXPERIMENT`` is set; then each run becomes a
standalone run in that experiment (default ``harness-runs``). Disable with ``--disable mlflow`` or
``HARNESS_DISABLE_PLUGINS=mlflow``. MLflow is imported only where it is used, never at plugin load.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from harness import hookimpl
from harness.errors import SpecError

NAME = "mlflow"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
STANDALONE_EXPERIMENT = "harness-runs"
EXPERIMENT_ENV = "HARNESS_MLFLOW_EXPERIMENT"
#: keys of the study file's ``mlflow:`` mapping
TRACKING_KEYS = ("experiment", "tracking_uri", "artifact_location")
#: spec.tags entries the driver hands to the worker
TAG_RUN_ID, TAG_URI, TAG_SPEC_HASH = "mlflow.run_id", "mlflow.tracking_uri", "mlflow.spec_hash"
#: where the worker leaves its per-step metrics for the driver to log (JSON lines: key, value, ms, step)
TAG_STEPS_FILE = "mlflow.step_metrics_file"
#: Optuna state -> MLflow run status
STATUS = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED"}
#: MLflow's per-request limits of log_batch
BATCH_METRICS, BATCH_TAGS, BATCH_PARAMS, VALUE_CHARS = 1000, 100, 100, 6000


def _warn(message: str) -> None:
    print(f"harness mlflow: {message}", file=sys.stderr)


# ============================================================================================ helpers
def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI to use: ``uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; a relative
    SQLite path is made absolute so trial processes started elsewhere write to the same database."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path and path != ":memory:" and not Path(path).is_absolute():
            uri = "sqlite:///" + str(Path(path).resolve())
    elif "://" not in uri and not uri.startswith("databricks"):
        uri = Path(uri).resolve().as_uri()  # a bare directory: MLflow's file store
    return uri


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts beside a SQLite database (``mlartifacts/<experiment>``); a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment) or "experiment"
    return (db.parent / "mlartifacts" / safe).as_uri()


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def log_batch(client, run_id: str, metrics=(), params=(), tags=()) -> None:
    """``client.log_batch`` within MLflow's per-request limits."""
    from mlflow.entities import Metric, Param, RunTag

    metrics = [Metric(k, v, ts, step) for k, v, ts, step in metrics]
    params = [Param(k, str(v)[:VALUE_CHARS]) for k, v in params]
    tags = [RunTag(k, str(v)[:VALUE_CHARS]) for k, v in tags]
    for chunk in _chunks(metrics, BATCH_METRICS):
        client.log_batch(run_id, metrics=chunk)
    for chunk in _chunks(params, BATCH_PARAMS):
        client.log_batch(run_id, params=chunk)
    for chunk in _chunks(tags, BATCH_TAGS):
        client.log_batch(run_id, tags=chunk)


def _all_runs(client, experiment_id: str, filter_string: str = "") -> list:
    out, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def describe_distribution(entry: tuple) -> str:
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


def space_params(config) -> dict[str, str]:
    """The study's search space as flat params: ``space.optimizer = sgd, adamw``,
    ``space.optimizer.sgd.lr = float [0.03, 0.3] log``, ..."""
    out = {"workload": config.workload}
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
    import platform

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


def _driver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _driver_is_gone(driver: str) -> bool:
    """True when ``host:pid`` names a process of this host that no longer exists."""
    import psutil

    host, _, pid = driver.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid))


def _now_ms() -> int:
    return int(time.time() * 1000)


# ============================================================================================ driver side
@dataclass
class StudyRun:
    """The MLflow side of one study in this driver."""

    client: Any
    uri: str
    experiment_id: str
    parent_run_id: str
    objectives: list[tuple[str, str]] = field(default_factory=list)
    #: the trial processes' step-metric files (removed at study end)
    steps_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="harness-mlflow-steps-")))


_studies: dict[int, StudyRun] = {}  # id(optuna study) -> its MLflow side


def _check_tracking(config) -> dict[str, Any]:
    tracking = dict(getattr(config, "tracking", None) or {})
    where = f"{getattr(config, 'path', '') or 'study'}.mlflow"
    for key, value in tracking.items():
        if key not in TRACKING_KEYS:
            raise SpecError(f"{where}: unknown key {key!r} (allowed: {', '.join(TRACKING_KEYS)})")
        if not isinstance(value, str) or not value.strip():
            raise SpecError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return tracking


def _experiment(client, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # another driver created it in the meantime
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _parent_run(client, experiment_id: str, config) -> str:
    """The study's parent run: found again on resume (and set RUNNING), else created with its params."""
    runs = [r for r in _all_runs(client, experiment_id, "tags.`harness.role` = 'study'")
            if r.data.tags.get("harness.study") == config.name]
    fingerprint = device_fingerprint()
    params = space_params(config)
    if runs:
        run = runs[0]
        client.update_run(run.info.run_id, status="RUNNING")
        have = run.data.params
        changed = [k for k, v in params.items() if k in have and have[k] != str(v)[:VALUE_CHARS]]
        if changed:
            _warn(f"study {config.name!r} resumed with a different {', '.join(changed)}; the parent run keeps the "
                  "first values (MLflow params cannot change)")
        log_batch(client, run.info.run_id, params=[(k, v) for k, v in params.items() if k not in have],
                  tags=fingerprint.items())
        return run.info.run_id
    tags = {"harness.role": "study", "harness.study": config.name, "harness.study_file": getattr(config, "path", ""),
            **fingerprint}
    run = client.create_run(experiment_id, run_name=config.name, tags=tags)
    log_batch(client, run.info.run_id, params=params.items())
    return run.info.run_id


def _close_orphans(st: StudyRun, study) -> None:
    """Close child runs left RUNNING by a driver that died: their trial finished in Optuna (it was failed as
    stale), or their driver process on this host is gone."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    running = _all_runs(st.client, st.experiment_id,
                        f"tags.`mlflow.parentRunId` = '{st.parent_run_id}' and attributes.status = 'RUNNING'")
    for run in running:
        tags = run.data.tags
        number = int(tags.get("harness.trial_number", "-1"))
        trial = trials.get(number)
        driver = tags.get("harness.driver", "")
        if trial is not None and not trial.state.is_finished() and not _driver_is_gone(driver):
            continue  # still running in a live driver
        message = (f"the driver ({driver or 'unknown'}) stopped while trial #{number} was running; "
                   "closed when the study resumed")
        log_batch(st.client, run.info.run_id, tags=[("harness.state", "FAIL"), ("harness.failure_class", "crashed"),
                                                     ("harness.failure_message", message)])
        st.client.set_terminated(run.info.run_id, status="FAILED")


@hookimpl
def harness_study_start(study, config):
    tracking = _check_tracking(config)
    uri = resolve_tracking_uri(tracking.get("tracking_uri"))
    name = tracking.get("experiment") or config.name
    try:
        client = _client(uri)
        experiment_id = _experiment(client, name, tracking.get("artifact_location")
                                    or default_artifact_location(uri, name))
        parent = _parent_run(client, experiment_id, config)
    except SpecError:
        raise
    except Exception as exc:  # unreachable server, bad URI: the user's to fix before trials run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SpecError(f"mlflow.tracking_uri: cannot use {uri!r}: {type(exc).__name__}: {first[:200]}") from None
    st = StudyRun(client, uri, experiment_id, parent, [(o.metric, o.key) for o in config.objectives])
    _studies[id(study)] = st
    _close_orphans(st, study)


def _create_child(st: StudyRun, spec, number: int, study) -> str:
    tags = {"mlflow.parentRunId": st.parent_run_id, "harness.role": "trial", "harness.study": study.study_name,
            "harness.trial_number": str(number), "harness.spec_hash": spec.spec_hash(),
            "harness.label": spec.label(), "harness.driver": _driver_id(), "harness.state": "RUNNING"}
    run = st.client.create_run(st.experiment_id, run_name=f"#{number} {spec.label()}", tags=tags)
    log_batch(st.client, run.info.run_id, params=spec.flat_params().items())
    return run.info.run_id


@hookimpl
def harness_trial_launch(spec, trial_number, study):
    st = _studies.get(id(study))
    if st is None:
        return
    try:
        run_id = _create_child(st, spec, trial_number, study)
        spec.tags.update({TAG_RUN_ID: run_id, TAG_URI: st.uri, TAG_SPEC_HASH: spec.spec_hash(),
                          TAG_STEPS_FILE: str(st.steps_dir / f"{run_id}.jsonl")})
        st.client.log_text(run_id, json.dumps(spec.to_dict(), indent=1, default=str), "trial_spec.json")
    except Exception as exc:  # tracking trouble must not stop the study
        _warn(f"could not create the run of trial #{trial_number}: {type(exc).__name__}: {exc}")


def read_step_metrics(path: str | None) -> list[tuple[str, float, int, int]]:
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


def _intermediate_values(study, number: int) -> dict[int, float]:
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            return dict(t.intermediate_values)
    return {}


@hookimpl
def harness_trial_finished(spec, record, study):
    st = _studies.get(id(study))
    if st is None:
        return
    try:
        run_id = spec.tags.get(TAG_RUN_ID) if spec.tags.get(TAG_URI) == st.uri else None
        if run_id is None:  # never launched (infeasible, or a combination already run): a run all the same
            run_id = _create_child(st, spec, record.number, study)
            st.client.log_text(run_id, json.dumps(spec.to_dict(), indent=1, default=str), "trial_spec.json")
        ts = _now_ms()
        metrics = record.metrics or {}
        step = int(_numeric(metrics.get("steps")) or 0)
        final = read_step_metrics(spec.tags.get(TAG_STEPS_FILE))
        final += [(k, v, ts, step) for k, v in ((k, _numeric(v)) for k, v in metrics.items()) if v is not None]
        final += [(metric, _numeric(metrics[key]), ts, step) for metric, key in st.objectives
                  if metric != key and _numeric(metrics.get(key)) is not None]
        final += [("intermediate_value", float(v), ts, int(s))
                  for s, v in sorted(_intermediate_values(study, record.number).items()) if _numeric(v) is not None]
        tags = [("harness.state", record.state), ("harness.failure_class", record.failure_class or ""),
                ("harness.failure_message", record.message or ""), ("harness.duration_s", f"{record.duration_s:.3f}"),
                ("harness.spec_hash", record.spec_hash)]
        if record.duplicate_of is not None:
            tags.append(("harness.duplicate_of", str(record.duplicate_of)))
        if record.constraint_violation is not None:
            tags.append(("harness.constraint_violation", str(record.constraint_violation)))
        tags += [(k, v) for k, v in metrics.items() if k.startswith("condition.") and isinstance(v, str) and v]
        log_batch(st.client, run_id, metrics=final, tags=tags)
        st.client.set_terminated(run_id, status=STATUS.get(record.state, "FAILED"))
    except Exception as exc:
        _warn(f"could not record trial #{record.number}: {type(exc).__name__}: {exc}")


def write_trials_csv(records, path: Path) -> Path:
    """A CSV of every trial (number, state, failure, params, metrics), when the report wrote none."""
    params = sorted({k for r in records for k in r.params})
    metrics = sorted({k for r in records for k, v in r.metrics.items() if _numeric(v) is not None})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", "failure_class", "message", *params, *metrics])
        for r in records:
            w.writerow([r.number, r.state, r.failure_class or "", r.message, *(r.params.get(k, "") for k in params),
                        *(r.metrics.get(k, "") for k in metrics)])
    return path


@hookimpl
def harness_study_end(study, config, records, pareto, output_dir):
    st = _studies.pop(id(study), None)
    if st is None:
        return
    try:
        front = {r.number for r in pareto}
        children = _all_runs(st.client, st.experiment_id, f"tags.`mlflow.parentRunId` = '{st.parent_run_id}'")
        for run in children:
            number = int(run.data.tags.get("harness.trial_number", "-1"))
            st.client.set_tag(run.info.run_id, "pareto", "true" if number in front else "false")
        out = Path(output_dir)
        files = [p for p in sorted(out.glob("*")) if p.is_file() and p.suffix in (".csv", ".png", ".json")]
        with tempfile.TemporaryDirectory(prefix="harness-mlflow-") as tmp:
            if not any(p.name == "trials.csv" for p in files):
                files.append(write_trials_csv(records, Path(tmp) / "trials.csv"))
            for path in files:
                st.client.log_artifact(st.parent_run_id, str(path))
        counts: dict[str, int] = {}
        for r in records:
            counts[r.state] = counts.get(r.state, 0) + 1
        ts = _now_ms()
        log_batch(st.client, st.parent_run_id, metrics=[
            ("trials_complete", counts.get("COMPLETE", 0), ts, 0), ("trials_failed", counts.get("FAIL", 0), ts, 0),
            ("trials_pruned", counts.get("PRUNED", 0), ts, 0), ("pareto_size", len(front), ts, 0)])
        st.client.set_terminated(st.parent_run_id, status="FINISHED")
    except Exception as exc:
        _warn(f"could not finish the study's run: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(st.steps_dir, ignore_errors=True)


# ============================================================================================ worker side
@dataclass
class TrialBuffer:
    """Per-step metrics of one trial, kept in memory until an untimed moment (evaluation, trial end)."""

    uri: str
    run_id: str | None
    prefix: str = ""
    experiment: str = ""
    #: in a study: the file the driver reads (None: log straight to MLflow, for standalone runs)
    steps_file: str | None = None
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)

    def add(self, step: int, metrics: Mapping[str, Any], rename: Mapping[str, str] | None = None) -> None:
        ts, rename = _now_ms(), rename or {}
        for key, value in metrics.items():
            value = _numeric(value)
            if value is not None:
                self.metrics.append((self.prefix + rename.get(key, key), value, ts, int(step)))

    def flush(self) -> None:
        if not self.metrics or (self.run_id is None and self.steps_file is None):
            return
        pending, self.metrics = self.metrics, []
        try:
            if self.steps_file is not None:
                with open(self.steps_file, "a") as f:
                    f.write("".join(json.dumps(m) + "\n" for m in pending))
            else:
                log_batch(_client(self.uri), self.run_id, metrics=pending)
        except Exception as exc:  # the trial's result matters more than its charts
            _warn(f"could not record {len(pending)} step metrics of run {self.run_id}: {type(exc).__name__}: {exc}")


_buffers: dict[int, TrialBuffer] = {}  # id(trial) -> its buffer
WINDOW_RENAME = {"throughput_samples_per_s": "window_throughput_samples_per_s"}
SKIP_EVAL = ("eval_samples",)


@hookimpl
def harness_trial_start(trial):
    if not trial.dist.is_main:
        return
    tags = trial.spec.tags or {}
    if tags.get(TAG_RUN_ID):
        # a screening run (same trial, shorter budget) logs beside the trial's own metrics, prefixed
        same = tags.get(TAG_SPEC_HASH) in (None, trial.spec.spec_hash())
        _buffers[id(trial)] = TrialBuffer(tags.get(TAG_URI) or resolve_tracking_uri(None), tags[TAG_RUN_ID],
                                          "" if same else "screening.", steps_file=tags.get(TAG_STEPS_FILE))
    elif os.environ.get(EXPERIMENT_ENV) or os.environ.get("MLFLOW_TRACKING_URI"):
        _buffers[id(trial)] = TrialBuffer(resolve_tracking_uri(None), None,
                                          experiment=os.environ.get(EXPERIMENT_ENV) or STANDALONE_EXPERIMENT)


@hookimpl(trylast=True)
def harness_trial_window(trial, step, metrics):
    buf = _buffers.get(id(trial))
    if buf is not None:
        buf.add(step, {k: v for k, v in metrics.items() if k != "phase"}, WINDOW_RENAME)


@hookimpl(trylast=True)
def harness_trial_evaluated(trial, step, metrics):
    buf = _buffers.get(id(trial))
    if buf is None:
        return
    buf.add(step, {k: v for k, v in metrics.items() if k not in SKIP_EVAL})
    if getattr(trial, "phase", None) == "timed":
        buf.flush()  # an intermediate evaluation is outside the timed windows: a free moment to write


def _standalone(buf: TrialBuffer, trial, result) -> None:
    client = _client(buf.uri)
    experiment_id = _experiment(client, buf.experiment, default_artifact_location(buf.uri, buf.experiment))
    spec = trial.spec
    run = client.create_run(experiment_id, run_name=spec.label(), tags={
        "harness.role": "run", "harness.spec_hash": spec.spec_hash(), "harness.state": result.status,
        "harness.failure_message": result.message or "",
        **{f"condition.{k}": v for k, v in (result.conditions or {}).items()}})
    buf.run_id = run.info.run_id
    buf.flush()
    ts = _now_ms()
    step = int(_numeric(result.metrics.get("steps")) or 0)
    log_batch(client, buf.run_id, params=spec.flat_params().items(),
              metrics=[(k, v, ts, step) for k, v in ((k, _numeric(v)) for k, v in result.metrics.items())
                       if v is not None])
    client.log_text(buf.run_id, json.dumps(spec.to_dict(), indent=1, default=str), "trial_spec.json")
    client.set_terminated(buf.run_id, status="FINISHED" if result.ok else "FAILED")


@hookimpl(trylast=True)
def harness_trial_end(trial, result):
    buf = _buffers.pop(id(trial), None)
    if buf is None:
        return
    if buf.run_id is not None:
        buf.flush()
        return
    try:
        _standalone(buf, trial, result)
    except Exception as exc:
        _warn(f"could not record the run: {type(exc).__name__}: {exc}")
