"""Worker side: a trial's per-step metrics, buffered in memory and written only at untimed moments.

In a study the buffer goes to the JSON-lines file the driver named in ``spec.tags`` (the driver logs it when the
trial has finished), so the trial process never imports MLflow nor waits on the tracking store. A standalone
``harness run`` with ``MLFLOW_TRACKING_URI`` or ``HARNESS_MLFLOW_EXPERIMENT`` set logs its own run at the end.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import plugins.mlflow_tracking.client as tracking

if TYPE_CHECKING:
    from harness.trial import Trial, TrialResult

STANDALONE_EXPERIMENT = "harness-runs"
EXPERIMENT_ENV = "HARNESS_MLFLOW_EXPERIMENT"
#: window metrics logged under another name: the throughput of each timing window is a series under ``window/``
#: (a chart group of its own in the UI), so ``throughput_samples_per_s`` is only ever the trial's final figure
WINDOW_RENAME = {"throughput_samples_per_s": "window/throughput_samples_per_s"}
SKIP_WINDOW = ("phase",)
SKIP_EVAL = ("eval_samples",)


@dataclass
class TrialBuffer:
    """Per-step metrics of one trial, kept in memory until an untimed moment (evaluation, trial end)."""

    uri: str
    run_id: str | None
    prefix: str = ""
    experiment: str = ""
    #: in a study: the file the driver reads (None: log straight to MLflow, for standalone runs)
    steps_file: str | None = None
    metrics: list[tracking.StepMetric] = field(default_factory=list)

    @classmethod
    def for_trial(cls, trial: Trial) -> TrialBuffer | None:
        """The buffer of a trial launched by a tracked study, or of a standalone run when tracking is asked for
        by environment; None when nothing is to be logged."""
        tags = trial.spec.tags or {}
        if tags.get(tracking.TAG_RUN_ID):
            # a screening run (same trial, shorter budget) logs beside the trial's own metrics, prefixed
            same = tags.get(tracking.TAG_SPEC_HASH) in (None, trial.spec.spec_hash())
            uri = tags.get(tracking.TAG_URI) or tracking.resolve_tracking_uri(None)
            return cls(uri, tags[tracking.TAG_RUN_ID], "" if same else "screening.",
                       steps_file=tags.get(tracking.TAG_STEPS_FILE))
        if os.environ.get(EXPERIMENT_ENV) or os.environ.get("MLFLOW_TRACKING_URI"):
            return cls(tracking.resolve_tracking_uri(None), None,
                       experiment=os.environ.get(EXPERIMENT_ENV) or STANDALONE_EXPERIMENT)
        return None

    def add(self, step: int, metrics: Mapping[str, Any], skip: tuple[str, ...],
            rename: Mapping[str, str] | None = None) -> None:
        ts, rename = tracking.now_ms(), rename or {}
        for key, value in metrics.items():
            number = tracking.numeric(value)
            if key not in skip and number is not None:
                self.metrics.append((self.prefix + rename.get(key, key), number, ts, int(step)))

    def window(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.add(step, metrics, SKIP_WINDOW, WINDOW_RENAME)

    def evaluated(self, step: int, metrics: Mapping[str, Any], phase: str | None) -> None:
        self.add(step, metrics, SKIP_EVAL)
        if phase == "timed":
            self.flush()  # an intermediate evaluation is outside the timed windows: a free moment to write

    def flush(self) -> None:
        if not self.metrics or (self.run_id is None and self.steps_file is None):
            return
        pending, self.metrics = self.metrics, []
        try:
            if self.steps_file is not None:
                with open(self.steps_file, "a") as f:
                    f.write("".join(json.dumps(m) + "\n" for m in pending))
            elif self.run_id is not None:
                tracking.log_batch(tracking.make_client(self.uri), self.run_id, metrics=pending)
        except Exception as exc:  # the trial's result matters more than its charts
            tracking.warn(f"could not record {len(pending)} step metrics of run {self.run_id}: "
                          f"{type(exc).__name__}: {exc}")

    def end(self, trial: Trial, result: TrialResult) -> None:
        """The trial finished: write what is buffered; a standalone run logs its whole run now."""
        if self.run_id is not None:
            self.flush()
            return
        try:
            self._standalone(trial, result)
        except Exception as exc:
            tracking.warn(f"could not record the run: {type(exc).__name__}: {exc}")

    def _standalone(self, trial: Trial, result: TrialResult) -> None:
        client = tracking.make_client(self.uri)
        location = tracking.default_artifact_location(self.uri, self.experiment)
        experiment = tracking.experiment_id(client, self.experiment, location)
        spec = trial.spec
        run = client.create_run(experiment, run_name=spec.label(), tags={
            "harness.role": "run", "harness.spec_hash": spec.spec_hash(), "harness.state": result.status,
            "harness.failure_message": result.message or "",
            **{f"condition.{k}": v for k, v in (result.conditions or {}).items()}})
        self.run_id = run.info.run_id
        self.flush()
        step = int(tracking.numeric(result.metrics.get("steps")) or 0)
        tracking.log_batch(client, run.info.run_id, params=spec.flat_params().items(),
                           metrics=tracking.numeric_metrics(result.metrics, tracking.now_ms(), step))
        tracking.log_spec(client, run.info.run_id, spec.to_dict())
        client.set_terminated(run.info.run_id, status="FINISHED" if result.ok else "FAILED")
