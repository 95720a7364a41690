"""Observer ``mlflow``: records studies and trials in MLflow, one experiment per study, so trials compare side by
side in the MLflow UI.

- **Study (driver, :mod:`.driver`)**: an experiment (the study file's ``mlflow.experiment``, default the study
  name; tagged ``mlflow.experimentKind = custom_model_development``) and a parent run per study, found again on
  resume. Params: workload, the techniques per axis, batch sizes, objectives, sampler, budget; the whole search
  space as ``space.json``; tags: the device fingerprint (GPU name and count, driver, CUDA and torch versions, host).
- **Trial**: a child run (tag ``mlflow.parentRunId``) created by the *driver* when the trial launches, with the
  flattened spec as params (``optimizer=adamw``, ``optimizer.lr=...``) and the spec as ``trial_spec.json``; the
  launch hook returns the run id and tracking URI as the trial's tags. The worker (:mod:`.worker`) buffers
  per-step metrics (``train_loss``, ``lr``, ``window/throughput_samples_per_s``, telemetry gauges,
  ``accuracy``/``val_loss`` at evaluations) in memory and writes them to a JSON-lines file named in those tags at
  the trial's end (and at intermediate evaluations, which are untimed): the trial process never imports MLflow nor
  waits on the tracking store, and nothing happens inside a timed window. When the trial has finished the driver
  logs those step metrics, the final metrics under their result names (``throughput_samples_per_s``,
  ``accuracy``, ``peak_memory_bytes``, ...) plus one per objective under the objective's name (``throughput``,
  ``energy_per_sample``...), ``speedup_vs_baseline``, Optuna's intermediate values (``intermediate_value``), tags
  (trial number, state, failure class and message, spec hash) and the trial's ``worker.log`` and ``result.json``,
  and closes the run: COMPLETE -> FINISHED, FAIL -> FAILED, PRUNED -> KILLED.
- **Baseline**: a child run tagged ``baseline=true`` (``harness.role = baseline``), logged once the driver has
  stored the baseline's record, with its params, metrics (``speedup_vs_baseline = 1``) and files.
- **Ctrl-C**: the driver reports the running trial as ``interrupted`` (its child run is closed KILLED), then
  ``harness_study_interrupted`` closes the parent run KILLED, wherever the interrupt came.
- **Resume**: a child run still RUNNING whose trial has finished in Optuna, or whose driver process is gone,
  is closed FAILED (``harness.failure_class=crashed``) when a driver starts the study again; step metrics a dead
  driver's trials left in its temporary directory are logged to their runs and removed.
- **Stores**: a SQLite tracking store is created once, in a temporary file renamed into place under a lock on
  ``<db>.lock``, so drivers starting together never race on its schema nor leave it half-built.
- **Credentials**: the password of a tracking URI (or of any URL in a param, tag or message) is masked.
- **Study end**: ``pareto=true`` (else ``false``) on every child run, the report's files (``trials.csv``,
  ``pareto.png``, ...) as artifacts of the parent run, which is closed FINISHED; two saved views of the runs table
  (:mod:`.ui`: the Pareto front best first, every trial and the baseline) and the printed link that opens the first,
  with the ``mlflow ui`` command that serves a SQLite store.

Settings: the study file's ``mlflow:`` section (``experiment``, ``tracking_uri``, ``artifact_location``), declared
with ``harness_declare_study_settings`` and checked before any storage is opened. Tracking URI: the section's
``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` (no server; artifacts in
``mlartifacts/`` beside the database). ``harness run`` logs nothing unless ``MLFLOW_TRACKING_URI`` or
``HARNESS_MLFLOW_EXPERIMENT`` is set; then each run becomes a standalone run in that experiment (default
``harness-runs``). Disable with ``--disable mlflow`` or ``HARNESS_DISABLE_PLUGINS=mlflow``. MLflow is imported
only where it is used, never at plugin load.

The plugin is a class: the registry makes one instance per process, which holds the study this driver runs
(``_study``) and the trial this worker runs (``_buffer``).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness import hookimpl
from harness.config import Setting
from harness.errors import SpecError
from harness.space import did_you_mean
from plugins.mlflow_tracking.client import TAG_RUN_ID, TAG_SPEC_HASH, TAG_STEPS_FILE, TAG_URI, log_batch
from plugins.mlflow_tracking.driver import StudyRun, read_step_metrics
from plugins.mlflow_tracking.worker import TrialBuffer

if TYPE_CHECKING:
    import optuna

    from harness.config import TrialSpec
    from harness.outcomes import TrialRecord
    from harness.studyfile import StudyConfig
    from harness.trial import Trial, TrialResult

__all__ = ["MLflowTracking", "TAG_RUN_ID", "TAG_SPEC_HASH", "TAG_STEPS_FILE", "TAG_URI", "log_batch",
           "read_step_metrics", "validate_settings"]

NAME = "mlflow"
#: keys of the study file's ``mlflow:`` section
SETTING_KEYS = ("experiment", "tracking_uri", "artifact_location")


def validate_settings(where: str, value: Any) -> dict[str, str]:
    """The study file's ``mlflow:`` section: a mapping of :data:`SETTING_KEYS` to non-empty strings."""
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: expected a mapping ({', '.join(SETTING_KEYS)}), got {value!r}")
    for key, item in value.items():
        if key not in SETTING_KEYS:
            raise SpecError(f"{where}.{key}: unknown key (allowed: {', '.join(SETTING_KEYS)})"
                            f"{did_you_mean(str(key), SETTING_KEYS)}")
        if not isinstance(item, str) or not item.strip():
            raise SpecError(f"{where}.{key}: expected a non-empty string, got {item!r}")
    return dict(value)


class MLflowTracking:
    """The ``mlflow`` plugin: driver-side study and trial runs, worker-side step metrics."""

    def __init__(self) -> None:
        #: the study this driver process runs (one per driver)
        self._study: StudyRun | None = None
        #: the trial this worker process runs (one at a time), on rank 0
        self._buffer: TrialBuffer | None = None

    @hookimpl
    def harness_declare_study_settings(self) -> list[Setting]:
        return [Setting(NAME, validate=validate_settings,
                        help="MLflow tracking: experiment (default: the study name), tracking_uri (default: "
                             "MLFLOW_TRACKING_URI, else sqlite:///mlflow.db), artifact_location")]

    # ---------------------------------------------------------------------------------------- driver
    @hookimpl
    def harness_study_start(self, study: optuna.Study, config: StudyConfig) -> None:
        self._study = StudyRun.open(config, config.settings.get(NAME, {}), study)
        self._study.close_orphans(study)

    @hookimpl
    def harness_trial_launch(self, spec: TrialSpec, trial_number: int, study: optuna.Study) -> dict[str, Any] | None:
        return self._study.launch(spec, trial_number, study) if self._study is not None else None

    @hookimpl
    def harness_trial_finished(self, spec: TrialSpec, record: TrialRecord, study: optuna.Study) -> None:
        if self._study is not None:
            self._study.finished(spec, record, study)

    @hookimpl
    def harness_study_interrupted(self) -> None:
        study_run, self._study = self._study, None
        if study_run is not None:
            study_run.interrupted()

    @hookimpl
    def harness_study_end(self, config: StudyConfig, records: list[TrialRecord], pareto: list[TrialRecord],
                          output_dir: Path) -> None:
        study_run, self._study = self._study, None
        if study_run is not None:
            study_run.end(records, pareto, config.objectives, output_dir)

    # ---------------------------------------------------------------------------------------- worker
    @hookimpl
    def harness_trial_start(self, trial: Trial) -> None:
        self._buffer = TrialBuffer.for_trial(trial) if trial.dist.is_main else None

    @hookimpl
    def harness_trial_window(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._buffer is not None:
            self._buffer.window(step, metrics)

    @hookimpl
    def harness_trial_evaluated(self, trial: Trial, step: int, metrics: Mapping[str, Any]) -> None:
        if self._buffer is not None:
            self._buffer.evaluated(step, metrics, getattr(trial, "phase", None))

    @hookimpl
    def harness_trial_end(self, trial: Trial, result: TrialResult) -> None:
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            buffer.end(trial, result)
