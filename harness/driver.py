"""The study driver behind ``harness study studies/X.yaml``: ask Optuna, check, launch, tell.

The driver asks Optuna for one technique per axis per trial (:mod:`harness.sampling`), rejects infeasible
combinations before launching anything, runs every other trial in its own process group
(:func:`harness.launch.launch`) and tells Optuna the outcome: objective values, or FAIL / PRUNED with a failure
class. The storage (:mod:`harness.storage`) lets a killed driver resume and several drivers share a study.
Every trial's :class:`~harness.outcomes.TrialRecord` is kept in the Optuna trial's user attributes, so
``harness report`` needs nothing but the storage. The hooks it calls are listed in :mod:`harness.hookspecs`.
"""
from __future__ import annotations

import copy
import dataclasses
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from harness import feasibility, report, storage
from harness.concurrency import SlotLoop, kill_children
from harness.errors import SpecError
from harness.outcomes import (
    CI_REL_KEY,
    INFEASIBLE_VIOLATION,
    THROUGHPUT_KEY,
    TrialRecord,
    compare_to_baseline,
    objective_values,
    pareto_front,
    same_within_noise,
    violation,
)
from harness.progress import StudyProgress
from harness.redact import mask_credentials
from harness.sampling import (
    baseline_spec,
    make_pruner,
    make_sampler,
    pruning_reporter,
    record_constraint,
    suggest_spec,
)
from harness.slots import SlotPool, cache_env
from harness.space import Environment, infeasible_reason
from harness.studyfile import StudyConfig

if TYPE_CHECKING:
    import optuna
    from optuna.storages import RDBStorage

    from harness.config import TrialSpec
    from harness.plugins import Registry
    from harness.trial import TrialResult


class StudyDriver(SlotLoop):
    """Runs a study: asks Optuna, checks feasibility, launches, tells; see the module docstring."""

    #: the study's storage, set by :meth:`open`.
    _storage: RDBStorage

    def __init__(self, config: StudyConfig, registry: Registry, console: Console | None = None,
                 n_trials: int | None = None, timeout_s: float | None = None) -> None:
        self.config, self.registry = config, registry
        self.console = console or Console()
        self.n_trials = n_trials if n_trials is not None else config.n_trials
        self.timeout_s = timeout_s if timeout_s is not None else config.timeout_s
        self.output_dir = Path(config.output_dir)
        self.env = Environment.detect()
        self.baseline: TrialRecord | None = None
        self.progress: StudyProgress | None = None
        self._study: optuna.Study | None = None
        #: lines shown when the study starts: techniques left out here, axes no objective measures.
        self.start_lines: list[str] = []
        #: combinations ruled out after repeated identical failures (:func:`harness.feasibility.vetoes`).
        self.vetoes: dict[tuple[tuple[str, str], ...], str] = {}
        self.launched = 0
        self.ruled_out = 0
        #: the host's slots (GPUs, or CPU slots), set by :meth:`open`; trials run concurrently when > 1.
        self.pool = SlotPool([0], "cpu")
        self.cache_env: dict[str, str] = {}
        self._local = threading.local()  # .slots: the slots the current thread's trial holds
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # bookkeeping shared by the trial threads

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            raise RuntimeError("StudyDriver.open() was not called")
        return self._study

    def open(self) -> optuna.Study:
        """Open (or resume) the study in its storage; every check that can fail on user input runs first."""
        import optuna

        cfg = self.config
        self._storage = storage.open_storage(cfg.storage, cfg.heartbeat_s)
        directions = [o.direction for o in cfg.objectives]
        existing = storage.existing_directions(self._storage, cfg.name)
        if existing is not None and existing != directions:
            raise SpecError(f"objectives: study {cfg.name!r} in {mask_credentials(cfg.storage)} was created with "
                            f"directions {existing}; this file asks for {directions} (use another name or storage)")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._study = optuna.create_study(
            storage=self._storage, study_name=cfg.name, load_if_exists=True, sampler=make_sampler(cfg),
            directions=[optuna.study.StudyDirection[d.upper()] for d in directions], pruner=make_pruner(cfg))
        attrs = {"objectives": [dataclasses.astuple(o) for o in cfg.objectives],
                 "constraints": {c.metric: c.text for c in cfg.constraints}, "workload": cfg.workload,
                 "study_file": cfg.path}
        for key, value in attrs.items():
            if self._study.user_attrs.get(key) != value:
                self._study.set_user_attr(key, value)
        # Techniques this machine can never run leave the space (and the sampler) before the first trial.
        unavailable = {**feasibility.unavailable_techniques(cfg, self.registry, self.env),
                       **feasibility.unavailable_choices(cfg, self.registry, self.env)}
        self.config, self.start_lines = feasibility.narrow_space(cfg, unavailable,
                                                                 feasibility.stored_choices(self._study))
        self.pool = self.slot_pool()
        #: what every trial process shares through the study's directory (:func:`harness.slots.cache_env`)
        self.cache_env = cache_env(self.output_dir / "compile-cache")
        if self.pool.size > 1 and (self.config.sampler == "tpe" or (self.config.sampler == "auto"
                                                                    and not self.config.multi_objective)):
            # concurrent trials: running ones count as their worst outcome so far, not as absent
            self.config.sampler_options = {"constant_liar": True, **self.config.sampler_options}
        self._study.sampler = make_sampler(self.config)
        self.start_lines += feasibility.unmeasured_axes(self.config, self.registry)
        return self._study

    def infeasible(self, spec: TrialSpec) -> str | None:
        """Why ``spec`` cannot run here: declared requirements first, then the vetoes of the plugins taking part."""
        if spec.device == "cuda" and not self.env.cuda:
            return "device: 'cuda' requested but this machine has no CUDA GPU"
        kinds = self.registry.workload_kinds(spec.workload)
        reason = (infeasible_reason(spec, self.registry.techniques, self.env, kinds,
                                    self.registry.workload_params(spec.workload))
                  or self.registry.hooks.check_combination(spec=spec, env=self.env, workload_kinds=kinds))
        if reason:
            return reason
        if spec.batch_size % spec.devices:
            return f"batch_size: {spec.batch_size} is not divisible by the {spec.devices} processes"
        if self.pool.kind == "gpu" and spec.devices > self.pool.size:
            return (f"devices: {spec.devices} GPUs per trial, but this study runs on {self.pool.size} "
                    f"(gpus: {', '.join(map(str, self.pool.ids))})")
        return None

    # ------------------------------------------------------------------------------------------ the loop
    def run(self) -> tuple[list[TrialRecord], list[TrialRecord]]:
        """Run trials until n_trials are finished in the storage (by any driver) or the timeout passes; then
        print and write the report. Returns every record and the Pareto front."""
        if self._study is None:
            self.open()
        study, cfg = self.study, self.config
        self.registry.hooks.study_start(study=study, config=cfg)
        t0 = time.monotonic()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for line in self.start_lines:
            self.console.print(f"[yellow]{escape(line)}[/yellow]")
        try:
            if not self._loop(t0):
                return [], []
        except KeyboardInterrupt:
            # a trial that was running has been finished as interrupted; the plugins close the rest
            self.registry.hooks.study_interrupted(study=study, config=cfg)
            raise
        records = report.records_from_study(study)
        pareto = pareto_front(records, cfg.objectives, self.baseline)
        report.print_table(self.console, study, records, pareto, baseline=self.baseline, objectives=cfg.objectives)
        written = report.write_outputs(study, records, pareto, cfg.objectives, self.output_dir, baseline=self.baseline)
        self.console.print(f"wrote {', '.join(p.name for p in written)} to {self.output_dir}")
        overheads = sorted((r.metrics["overhead_s"], r.duration_s) for r in records if "overhead_s" in r.metrics)
        if overheads:
            fixed, wall = overheads[len(overheads) // 2]
            self.console.print(f"per-trial fixed cost (process start, imports, model build, compilation, warm-up): "
                               f"median {fixed:.1f} s of {wall:.1f} s per launched trial")
        self.registry.hooks.study_end(study=study, config=cfg, records=records, pareto=pareto,
                                      output_dir=self.output_dir)
        return records, pareto

    def _loop(self, t0: float) -> bool:
        """The baseline, then trials until n_trials or the timeout; False when the baseline could not run."""
        study, cfg = self.study, self.config
        with StudyProgress(self.console, study, cfg, self.n_trials) as self.progress:
            if cfg.needs_baseline:
                self.baseline = self.ensure_baseline()  # first, and alone
                if self.baseline is None:
                    return False
            if self.pool.size > 1:
                return self._loop_concurrent(t0)
            while True:
                storage.fail_stale(study)
                c = storage.counts(study)
                if self._finished(t0, c):
                    break
                if self._others_cover(c):
                    # the remaining trials run in other drivers; wait in case one of them dies
                    self._status("waiting for other drivers' trials")
                    time.sleep(min(2.0, cfg.heartbeat_s))
                    continue
                trial = self._ask()
                if not storage.give_way_if_surplus(study, trial, self.n_trials) and self._after(self.run_trial(trial)):
                    self.remeasure_baseline()
            self._status("done")
        return True

    def _after(self, record: TrialRecord) -> bool:
        """Bookkeeping after a trial: the ruled-out count, new vetoes; True when the periodic baseline re-measurement
        is due (the caller runs it, outside the concurrent loop's bookkeeping lock)."""
        if record.failure_class == "infeasible" and not record.metrics:
            self.ruled_out += 1
            return False
        if record.duplicate_of is not None:
            return False
        self.launched += 1
        vetoes = feasibility.vetoes(report.records_from_study(self.study), self.registry)
        for combo, why in vetoes.items():
            if combo not in self.vetoes:
                self.console.print(f"[yellow]{escape(mask_credentials(why))}[/yellow]")
        self.vetoes = vetoes
        every = self.config.remeasure_baseline_every
        return self.baseline is not None and bool(every) and self.launched % every == 0

    def trial_timeout_s(self) -> float:
        """The study file's ``trial_timeout_s``, or with ``auto``: 10x the baseline trial's wall time (at least
        300 s), 1800 s while no baseline has run."""
        if self.config.trial_timeout_s is not None:
            return self.config.trial_timeout_s
        if self.baseline is not None and self.baseline.duration_s > 0:
            return max(AUTO_TIMEOUT_MIN_S, AUTO_TIMEOUT_FACTOR * self.baseline.duration_s)
        return AUTO_TIMEOUT_FIRST_S

    def _status(self, current: str, refresh: bool = True) -> None:
        if self.progress is None:
            return
        slots = getattr(self._local, "slots", None)
        if slots is None or self.pool.size == 1:
            self.progress.update(current, refresh)
            return
        self.pool.label(slots, current)  # concurrent trials: one entry per slot
        self.progress.update(" | ".join(f"{self.pool.kind} {slot}: {what}"
                                        for slot, what in sorted(self.pool.running.items())), refresh)

    # ------------------------------------------------------------------------------------------ one trial
    def ensure_baseline(self) -> TrialRecord | None:
        """Run the baseline trial once per study (kept in the study's user attributes across resumes)."""
        stored = storage.claim_baseline(self.study, self.trial_timeout_s() + 60, self._status)
        if stored:
            return TrialRecord.from_dict(stored)
        spec = baseline_spec(self.config, self.registry)
        record = TrialRecord(-1, "FAIL", params=spec.flat_params(), spec_hash=spec.spec_hash(), spec=spec.to_dict())
        reason = self.infeasible(spec)
        t0 = time.monotonic()
        if reason:
            record.failure_class, record.message = "infeasible", reason
        else:
            self._status(f"baseline: {spec.label()}")
            result = self._launch(spec, self.output_dir / "trials" / "baseline", None)
            record.state = "COMPLETE" if result.ok else "FAIL"
            record.failure_class = None if result.ok else result.status
            record.message, record.metrics, record.duration_s = result.message, result.metrics, time.monotonic() - t0
        if record.state != "COMPLETE":
            why = escape(mask_credentials(record.message))
            self.console.print(f"[red]baseline trial failed ({record.failure_class}): {why}[/red]; "
                               "constraints relative to the baseline cannot be evaluated")
            return None
        record.values = objective_values(self.config.objectives, record.metrics)
        self.study.set_user_attr("baseline", record.to_dict())
        bounds = [(c, c.bound(record.metrics)) for c in self.config.constraints]
        self.console.print(f"baseline {spec.label()}: " + ", ".join(
            f"{c.metric} {c.op} {report.fmt(c.key, bound) if bound is not None else '?'}" for c, bound in bounds))
        return record

    def remeasure_baseline(self) -> None:
        """Run the baseline again (every ``remeasure_baseline_every`` launched trials) so that a machine whose
        speed drifts during a long study (heat, a busy neighbour) shows it; kept in ``baseline_checks``."""
        if self.baseline is None:
            return
        after = self.launched  # each multiple of remeasure_baseline_every is due once: a unique folder
        spec = baseline_spec(self.config, self.registry)
        self._status(f"baseline again (after {after} trials): {spec.label()}")
        result = self._launch(spec, self.output_dir / "trials" / f"baseline-after-{after}", None)
        if not result.ok:
            self.console.print(f"[yellow]baseline re-measurement failed ({result.status}): "
                               f"{escape(mask_credentials(result.message))}[/yellow]")
            return
        change = compare_to_baseline(result.metrics, self.baseline.metrics)
        keys = (THROUGHPUT_KEY, CI_REL_KEY)
        with self._lock:  # concurrent slots: another re-measurement may be writing the list
            checks = list(self.study.user_attrs.get("baseline_checks", []))
            checks.append({"after_trials": after, "time": time.time(), **change,
                           **{k: result.metrics[k] for k in keys if k in result.metrics}})
            self.study.set_user_attr("baseline_checks", checks)
        ratio = change.get("speedup_vs_baseline")
        if ratio is None:
            return
        verdict = ("inside the measurement noise" if same_within_noise(result.metrics, self.baseline.metrics,
                                                                         THROUGHPUT_KEY)
                   else "beyond the measurement noise: this machine's speed changed during the study, so compare "
                        "trials measured close together")
        self.console.print(f"baseline re-measured after {after} trials: "
                           f"{report.fmt(THROUGHPUT_KEY, result.metrics[THROUGHPUT_KEY])} samples/s, "
                           f"{ratio - 1:+.1%} against its first measurement ({verdict})")

    def _timeout_hint(self, status: str) -> str:
        if status != "timeout":
            return ""
        limit = self.trial_timeout_s()
        if self.config.trial_timeout_s is not None:
            return f" (trial_timeout_s is {limit:.0f} s in the study file; raise it if such trials need longer)"
        base = f", 10x the baseline's {self.baseline.duration_s:.0f} s" if self.baseline is not None else ""
        return f" (trial_timeout_s: auto allowed {limit:.0f} s{base}; set trial_timeout_s to allow more)"

    def run_trial(self, trial: optuna.Trial, spec: TrialSpec | None = None) -> TrialRecord:
        """Run one asked trial (``spec``: its sampled spec, when already drawn) to its end and tell Optuna;
        never raises for a failing trial."""
        t0 = time.monotonic()
        study, cfg = self.study, self.config
        spec = spec or suggest_spec(trial, cfg, self.registry)
        slots = getattr(self._local, "slots", None)
        if slots is not None:
            spec.tags["slots"] = self.pool.names(slots)  # where it ran, in its record, trials.csv and MLflow
        spec_hash = spec.spec_hash()
        for key, value in (("spec_hash", spec_hash), ("label", spec.label()), ("driver", storage.driver_id())):
            trial.set_user_attr(key, value)
        record = TrialRecord(trial.number, "FAIL", params=spec.flat_params(), spec_hash=spec_hash,
                             spec=spec.to_dict())
        try:
            with storage.Heartbeat(self._storage, trial._trial_id, cfg.heartbeat_s):
                reason = self.infeasible(spec) or feasibility.vetoed(spec, self.vetoes)
                previous = None if reason else self._previous(trial, spec_hash)
                if reason:
                    record.state, record.failure_class, record.message = "PRUNED", "infeasible", reason
                    record.constraint_violation = INFEASIBLE_VIOLATION
                elif previous is not None:
                    record.reuse(previous)
                else:
                    spec.tags.update(self.registry.hooks.trial_launch(spec=spec, trial_number=trial.number,
                                                                      study=study))
                    record.spec = spec.to_dict()
                    trial.set_user_attr("launched", True)
                    self._run_launched(trial, spec, record)
                    if self._stopping.is_set():  # Ctrl-C in the main thread killed this slot's trial
                        self._interrupted(trial, spec, record, t0)
                        return record
        except KeyboardInterrupt:
            self._interrupted(trial, spec, record, t0)
            raise
        record.duration_s = time.monotonic() - t0
        if trial.user_attrs.get("launched") and "train_time_s" in record.metrics:
            # the fixed cost of a trial: process start, imports, model build, compilation, capture, warm-up
            timed = float(record.metrics["train_time_s"]) + float(record.metrics.get("eval_s", 0.0))
            record.metrics["overhead_s"] = max(0.0, record.duration_s - timed)
        self._tell(trial, record)
        self.registry.hooks.trial_finished(spec=spec, record=record, study=study)
        if self.progress is not None:
            self.progress.finished(record)
        return record

    def _interrupted(self, trial: optuna.Trial, spec: TrialSpec, record: TrialRecord, t0: float) -> None:
        """Ctrl-C during a trial: its processes are killed; the Optuna trial is told FAIL with the failure class
        ``interrupted`` (it reruns on resume and does not count) and the plugins hear of it through
        ``harness_trial_finished``, the last hook this driver calls. A second Ctrl-C skips this bookkeeping."""
        kill_children()
        self.console.print(f"[yellow]interrupted during trial #{trial.number}: recording it as "
                           f"{storage.INTERRUPTED} (press Ctrl-C again to skip)[/yellow]")
        record.state, record.failure_class, record.values = "FAIL", storage.INTERRUPTED, None
        record.message = "the driver was interrupted (Ctrl-C) during the trial; it runs again when the study resumes"
        record.duration_s = time.monotonic() - t0
        storage.retry_interrupted(self.study, self._storage, trial._trial_id)
        self._tell(trial, record)
        self.registry.hooks.trial_finished(spec=spec, record=record, study=self.study)

    def _previous(self, trial: optuna.Trial, spec_hash: str) -> TrialRecord | None:
        if self.baseline is not None and self.baseline.spec_hash == spec_hash:
            return self.baseline
        return storage.previous_outcome(self.study, trial, spec_hash, self._status)

    def _tell(self, trial: optuna.Trial, record: TrialRecord) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("failure_class", record.failure_class)
        trial.set_user_attr("failure_message", mask_credentials(record.message)[:2000])
        record_constraint(trial, record.constraint_violation or 0.0)
        trial.set_user_attr("record", record.to_dict())
        state = {"COMPLETE": TrialState.COMPLETE, "PRUNED": TrialState.PRUNED}.get(record.state, TrialState.FAIL)
        try:
            self.study.tell(trial, record.values if state == TrialState.COMPLETE else None, state=state)
        except RuntimeError as exc:  # the grid sampler calls study.stop() when the grid is done
            if "stop" not in str(exc):
                raise

    def _run_launched(self, trial: optuna.Trial, spec: TrialSpec, record: TrialRecord) -> None:
        cfg = self.config
        workdir = self.output_dir / "trials" / f"{trial.number:04d}"
        self._status(f"#{trial.number} {spec.label()}")
        if cfg.screening is not None:
            short = copy.deepcopy(spec)
            short.budget = copy.deepcopy(cfg.screening)
            result = self._launch(short, workdir / "screen", None)
            if not result.ok:
                record.failed(result.status, f"screening: {result.message}", result.metrics, cfg.objectives)
                return
            screen = [float(result.metrics.get("throughput_samples_per_s", 0.0)),
                      float(result.metrics.get("peak_memory_bytes", 0.0))]
            trial.set_user_attr("screen", screen)
            rival = storage.screening_rival(self.study, trial.number, screen, cfg.screening_margin)
            if rival is not None:
                number, (thr, mem) = rival
                message = (f"dominated at screening by trial #{number} ({thr:,.0f} vs {screen[0]:,.0f} "
                           f"samples/s, {mem / 2**20:,.0f} vs {screen[1] / 2**20:,.0f} MiB)")
                # PRUNED with no result shown as if it were one: the short run's figures under their own names
                record.failed("pruned", message, result.metrics, cfg.objectives)
                record.failure_class = "screened"
                record.metrics.update(screen_throughput_samples_per_s=screen[0], screen_peak_memory_bytes=screen[1])
                return
        result = self._launch(spec, workdir, trial)
        if not result.ok:
            record.failed(result.status, result.message + self._timeout_hint(result.status), result.metrics,
                          cfg.objectives)
            return
        record.metrics = dict(result.metrics)
        if self.baseline is not None:
            record.metrics.update(compare_to_baseline(result.metrics, self.baseline.metrics))
        record.metrics.update({f"condition.{k}": v for k, v in result.conditions.items()})
        record.values = objective_values(cfg.objectives, result.metrics)
        if record.values is None:
            missing = [o.key for o in cfg.objectives if not isinstance(result.metrics.get(o.key), (int, float))]
            record.state, record.failure_class = "FAIL", "missing-metric"
            record.message = f"objective metric(s) not measured or not finite: {', '.join(missing) or '?'}"
            return
        record.state = "COMPLETE"
        record.constraint_violation = violation(cfg.constraints, result.metrics,
                                                self.baseline.metrics if self.baseline else None)

    def _launch(self, spec: TrialSpec, workdir: Path, trial: optuna.Trial | None) -> TrialResult:
        """Run ``spec`` in its own process; with ``trial`` (and a pruner) its evaluations reach Optuna, which
        may stop it early."""
        from harness.launch import LaunchOptions, launch
        from harness.trial import TrialResult

        prune, name = None, "baseline"
        if trial is not None:
            name = f"#{trial.number}"
            if self.config.pruner != "none":
                prune = pruning_reporter(trial, self.config.objectives[0].key)

        def on_event(event: dict[str, Any]) -> bool | None:
            if event.get("event") in ("progress", "window") and event.get("total_steps"):
                self._status(f"{name} {spec.label()}: step {event['step']}/{event['total_steps']}", refresh=False)
            return prune(event) if prune is not None else None

        try:
            slots = getattr(self._local, "slots", None)
            env = {**self.cache_env, **(self.pool.env(slots) if slots is not None else {})}
            return launch(spec, workdir, LaunchOptions(timeout_s=self.trial_timeout_s(), env=env),
                          on_event=on_event)
        except KeyboardInterrupt:
            # The trial runs in a session of its own, so Ctrl-C never reached it: end it here (the caller records
            # the trial as interrupted; a baseline trial simply runs again on resume).
            kill_children()
            raise
        except Exception as exc:  # the launcher itself failed (a missing tool, a full disk): this trial crashed
            return TrialResult("crashed", {}, mask_credentials(f"could not launch the trial: {type(exc).__name__}: "
                                                               f"{exc}"), spec=spec.to_dict())


#: ``trial_timeout_s: auto``: this many times the baseline's wall time, at least AUTO_TIMEOUT_MIN_S; before the
#: baseline has run (or in a study without one), AUTO_TIMEOUT_FIRST_S.
AUTO_TIMEOUT_FACTOR, AUTO_TIMEOUT_MIN_S, AUTO_TIMEOUT_FIRST_S = 10.0, 300.0, 1800.0
