"""Talking to MLflow: the tracking URI, experiments, searches and ``log_batch`` within MLflow's request limits.

MLflow is imported inside the functions that use it, never when the plugin loads.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.redact import mask_credentials

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: spec.tags entries the driver hands to the worker
TAG_RUN_ID, TAG_URI, TAG_SPEC_HASH = "mlflow.run_id", "mlflow.tracking_uri", "mlflow.spec_hash"
#: where the worker leaves its per-step metrics for the driver to log (JSON lines: key, value, ms, step)
TAG_STEPS_FILE = "mlflow.step_metrics_file"
#: the experiment tag MLflow 3's UI reads to open an experiment on its training runs rather than on GenAI traces
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
#: the most of a trial's file (worker log) kept as an artifact: its end, where a traceback is
LOG_CHARS = 2_000_000
#: MLflow's per-request limits of log_batch
BATCH_METRICS, BATCH_TAGS, BATCH_PARAMS, VALUE_CHARS = 1000, 100, 100, 6000

#: a metric as logged: (key, value, timestamp in ms, step)
StepMetric = tuple[str, float, int, int]


def warn(message: str) -> None:
    print(f"harness mlflow: {mask_credentials(message)}", file=sys.stderr)


def shown(value: Any) -> str:
    """A param or tag value as MLflow keeps it: a string within its length limit, credentials masked."""
    return mask_credentials(str(value))[:VALUE_CHARS]


def now_ms() -> int:
    return int(time.time() * 1000)


def numeric(value: Any) -> float | None:
    """``value`` as a finite float, or None for anything MLflow cannot log as a metric."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def numeric_metrics(metrics: dict[str, Any], ts: int, step: int) -> list[StepMetric]:
    """The loggable entries of a result's ``metrics``, all at ``step``."""
    return [(k, v, ts, step) for k, v in ((k, numeric(v)) for k, v in metrics.items()) if v is not None]


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


def make_client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _chunks(items: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def log_batch(client: Any, run_id: str, metrics: Iterable[StepMetric] = (),
              params: Iterable[tuple[str, Any]] = (), tags: Iterable[tuple[str, Any]] = ()) -> None:
    """``client.log_batch`` within MLflow's per-request limits; param and tag values pass through :func:`shown`."""
    from mlflow.entities import Metric, Param, RunTag

    entries = [Metric(k, v, ts, step) for k, v, ts, step in metrics]
    param_entries = [Param(k, shown(v)) for k, v in params]
    tag_entries = [RunTag(k, shown(v)) for k, v in tags]
    for chunk in _chunks(entries, BATCH_METRICS):
        client.log_batch(run_id, metrics=chunk)
    for chunk in _chunks(param_entries, BATCH_PARAMS):
        client.log_batch(run_id, params=chunk)
    for chunk in _chunks(tag_entries, BATCH_TAGS):
        client.log_batch(run_id, tags=chunk)


def all_runs(client: Any, experiment_id: str, filter_string: str = "") -> list[Any]:
    """Every run of the experiment matching ``filter_string`` (all pages)."""
    out: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``: created when missing (racing drivers tolerated), restored when deleted, and
    marked a model-training experiment unless its kind was set already."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return str(client.create_experiment(name, artifact_location=artifact_location,
                                                tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}))
        except MlflowException:  # another driver created it in the meantime
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older harness or by hand
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return str(exp.experiment_id)


def log_spec(client: Any, run_id: str, spec_dict: dict[str, Any]) -> None:
    """The trial's spec as the run's ``trial_spec.json`` artifact."""
    client.log_text(run_id, json.dumps(spec_dict, indent=1, default=str), "trial_spec.json")


def log_files(client: Any, run_id: str, paths: Iterable[Path], limit: int = LOG_CHARS) -> None:
    """Each existing text file of ``paths`` as an artifact of the run under its own name, credentials masked (a
    worker log echoes exceptions, which may hold URLs); of a longer file, its last ``limit`` characters."""
    for path in paths:
        if path.is_file():
            text = path.read_text(errors="replace")
            if len(text) > limit:
                text = f"[the first {len(text) - limit} characters are left out; the whole file: {path}]\n" \
                       + text[-limit:]
            client.log_text(run_id, mask_credentials(text), path.name)


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""

