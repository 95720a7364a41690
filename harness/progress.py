"""What a running study shows on the terminal: a progress bar with the counts by outcome, the best trial so far
and the current trial's state, and one line per finished trial."""
from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from harness import report, storage
from harness.outcomes import THROUGHPUT_KEY, TrialRecord
from harness.redact import mask_credentials

if TYPE_CHECKING:
    import optuna
    from rich.console import Console

    from harness.studyfile import StudyConfig


class StudyProgress:
    """The live display of one driver's study (a context manager). The counts come from the storage, so other
    drivers' trials are included."""

    def __init__(self, console: Console, study: optuna.Study, config: StudyConfig, total: int | None) -> None:
        self.console, self.study, self.config = console, study, config
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[status]}")]
        self._progress = Progress(*columns, console=console, transient=False)
        self._task: TaskID = self._progress.add_task(f"study {config.name}", total=total, status="")
        self._summary: tuple[int, str] | None = None

    def __enter__(self) -> StudyProgress:
        self._progress.__enter__()
        self.update()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.__exit__(kind, exc, tb)

    def update(self, current: str = "", refresh: bool = True) -> None:
        """Show the counts, the best trial and ``current`` (the running trial's line); the counts are re-read
        from the storage only when ``refresh`` (the trial's step events come often)."""
        if refresh or self._summary is None:
            c = storage.counts(self.study)
            best = self._best_text()
            self._summary = (c["finished"], f"done {c['complete']}  failed {c['failed']}  infeasible "
                             f"{c['infeasible']}  pruned {c['pruned'] + c['screened']}  running {c['running']}"
                             + (f"  | best {best}" if best else ""))
        finished, summary = self._summary
        self._progress.update(self._task, completed=finished,
                              status=summary + (f"\n  {current}" if current else ""))

    def _baseline(self) -> TrialRecord | None:
        """The baseline's record once the driver stored it on the study."""
        data = self.study.user_attrs.get("baseline")
        return TrialRecord.from_dict(data) if data else None

    def _best_text(self) -> str:
        """The best first objective so far, the baseline included (a study where nothing beat it says so)."""
        baseline = self._baseline()
        records = report.records_from_study(self.study) + ([baseline] if baseline is not None else [])
        scored = [(r.values[0], r) for r in records if r.feasible and r.values]
        if not scored:
            return ""
        o = self.config.objectives[0]
        pick = max if o.direction == "maximize" else min
        value, best = pick(scored, key=lambda vr: (vr[0], vr[1].number < 0))
        who = "the baseline" if best.number < 0 else f"#{best.number}"
        return f"{o.metric} {report.fmt(o.key, value)} ({who} {best.label})"

    def finished(self, record: TrialRecord) -> None:
        """Print the line of a finished trial: its state, techniques, objective values or failure, duration."""
        color = {"COMPLETE": "green", "PRUNED": "yellow"}.get(record.state, "red")
        if record.state == "COMPLETE":
            metrics = report.shown_metrics(record, self.config.objectives, self._baseline())
            what = "  ".join(f"{o.metric} " + (report.throughput_text(metrics) if o.key == THROUGHPUT_KEY
                                                else report.fmt(o.key, v))
                             for o, v in zip(self.config.objectives, record.values or [], strict=False))
            if "speedup_vs_baseline" in metrics:
                what += f"  vs baseline {report.speedup_text(metrics)}"
            if record.constraint_violation and record.constraint_violation > 0:
                what += "  (violates the constraints)"
        else:
            what = f"{record.failure_class}: {mask_credentials(record.message)[:160]}"
        self.console.print(f"[{color}]#{record.number:<3} {record.state:<8}[/{color}] "
                           f"{escape(record.label)}  {escape(what)}  ({record.duration_s:.1f} s)")
        self.update()
