"""A study's report: trial records read back from the Optuna storage, the Pareto front, the table printed on
the terminal, and the files written to the output directory (``trials.csv``, ``pareto.json``, ``pareto.png``,
``history.png``, ``importance.png``).

Everything here reads the records the driver stored in each Optuna trial's user attributes, so
``harness report STUDY`` needs only the storage URL. Every string shown or written (messages of failed trials echo
exceptions, which may hold URLs) goes through :func:`harness.redact.mask_credentials` first.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.outcomes import (
    CI_REL_KEY,
    THROUGHPUT_KEY,
    Objective,
    TrialRecord,
    beats_baseline,
    compare_to_baseline,
    without_results,
)
from harness.redact import mask_all, mask_credentials
from harness.space import AXES, LABEL_CAPTION

if TYPE_CHECKING:
    import optuna
    from rich.console import Console

#: the columns every table shows besides the objectives.
KEY_METRICS = ("throughput_samples_per_s", "accuracy", "peak_memory_bytes")


def fmt(key: str, value: Any) -> str:
    """A metric for people: bytes in MiB, large numbers with thousands separators, fractions to 4 digits."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return mask_credentials(str(value))
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if key.endswith("_bytes"):
        return f"{value / 2**20:,.1f} MiB"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def records_from_study(study: optuna.Study) -> list[TrialRecord]:
    """One record per trial; a trial without one (running, waiting, or interrupted by a killed driver) gets a
    record that says so."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue  # asked by a driver after n_trials were already claimed, never run
        data = t.user_attrs.get("record")
        if data:
            out.append(TrialRecord.from_dict(data))
            continue
        cls = "interrupted" if t.state.name == "FAIL" else None
        out.append(TrialRecord(t.number, t.state.name, cls, "driver stopped during the trial" if cls else "",
                               params=dict(t.params), spec_hash=t.user_attrs.get("spec_hash", "")))
    return out


def objectives_of(study: optuna.Study) -> list[Objective]:
    """The objectives the driver stored on the study (empty for a study it did not create)."""
    return [Objective(*o) for o in study.user_attrs.get("objectives", [])]


def _columns(objectives: Sequence[Objective]) -> list[str]:
    keys = [o.key for o in objectives]
    return keys + [k for k in KEY_METRICS if k not in keys]


#: what the table and the progress line say of a trial no faster or slower than the baseline within the noise.
NO_WINNER = "no combination beat the baseline on this machine"


def shown_metrics(record: TrialRecord, objectives: Sequence[Objective] = (),
                  baseline: TrialRecord | None = None) -> dict[str, Any]:
    """The metrics a report shows for ``record``: none of the results of a trial that did not complete (a crashed
    trial's accuracy before it crashed is no result), and for a completed one its speed-up over the baseline
    (computed here when the record predates it)."""
    if record.state != "COMPLETE":
        return without_results(record.metrics, objectives)
    metrics = dict(record.metrics)
    if "speedup_vs_baseline" not in metrics and baseline is not None and record.number >= 0:
        metrics.update(compare_to_baseline(metrics, baseline.metrics))
    return metrics


def throughput_text(metrics: dict[str, Any]) -> str:
    """``12,345 ±3.1%`` (the 95 % interval's relative half-width), with ``noisy`` when it stayed too wide."""
    value = metrics.get(THROUGHPUT_KEY)
    if value is None:
        return "-"
    text = fmt(THROUGHPUT_KEY, value)
    rel = metrics.get(CI_REL_KEY)
    if isinstance(rel, (int, float)) and math.isfinite(rel):
        text += f" ±{rel:.1%}"
    if metrics.get("throughput_noisy"):
        text += " noisy"
    return text


def speedup_text(metrics: dict[str, Any]) -> str:
    """``1.23x (1.10-1.37)`` over the baseline with its 95 % interval, ``tie 0.98x (0.93-1.04)`` when the
    interval contains 1 (a difference inside the noise), ``-`` without a comparison."""
    ratio = metrics.get("speedup_vs_baseline")
    if not isinstance(ratio, (int, float)):
        return "-"
    low, high = metrics.get("speedup_vs_baseline_ci_low"), metrics.get("speedup_vs_baseline_ci_high")
    text = f"{ratio:.2f}x"
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        text += f" ({low:.2f}-{high:.2f})"
    return ("tie " + text) if metrics.get("tie_with_baseline") else text


def print_table(console: Console, study: optuna.Study, records: Sequence[TrialRecord], pareto: Sequence[TrialRecord],
                baseline: TrialRecord | None = None, objectives: Sequence[Objective] | None = None) -> None:
    """Print the Pareto table (techniques, metrics, speed-up over the baseline with its 95 % interval) and one
    line of counts by outcome. The baseline is a row of its own (``baseline``), on the front or, below it, for
    reference; when no trial made the front beside it, the table says so plainly (:data:`NO_WINNER`)."""
    from rich.table import Table

    objectives = list(objectives or objectives_of(study))
    cols = _columns(objectives)
    directions = {o.key: ("max" if o.direction == "maximize" else "min") for o in objectives}
    on_front = baseline is not None and any(r.number < 0 for r in pareto)
    table = Table(title=mask_credentials(f"study {study.study_name}: Pareto front ({len(pareto)} of {len(records)} "
                                         "trials" + (" + the baseline" if baseline is not None else "") + ")"),
                  caption="techniques: " + LABEL_CAPTION + (
                      "; the baseline is below the front, shown for reference"
                      if baseline is not None and not on_front else ""))
    rows = list(pareto)
    if baseline is not None and not on_front:
        rows.append(baseline)
    # the values Optuna chose for this trial (the axes' techniques are in their own column)
    chosen = {t.number: t.params for t in study.get_trials(deepcopy=False)}
    cells = []
    for r in rows:
        params = {k.split(".", 2)[-1] if k.split(".")[0] in AXES else k: v
                  for k, v in sorted(chosen.get(r.number, {}).items()) if k not in AXES}
        metrics = shown_metrics(r, objectives, baseline)
        row = ["baseline" if r.number < 0 else str(r.number),
               mask_credentials(r.label),
               mask_credentials(", ".join(f"{k}={fmt(k, v)}" for k, v in params.items()) or "-"),
               *[throughput_text(metrics) if k == THROUGHPUT_KEY else fmt(k, metrics.get(k)) for k in cols]]
        if baseline is not None:
            row.append("1.00x (baseline)" if r.number < 0 else speedup_text(metrics))
        cells.append(row)
    heads = ["#", "techniques", "searched params"]
    # metric keys as words, so that a narrow terminal wraps the header rather than the numbers
    heads += [key.replace("_", " ") + (f" ({directions[key]})" if key in directions else "") for key in cols]
    heads += ["speed-up vs baseline (95% CI)"] if baseline is not None else []
    for i, head in enumerate(heads):  # the combination is never wrapped; the axes' order is in the caption
        table.add_column(head, justify="left" if i in (1, 2) else "right", no_wrap=i == 1)
    for row in cells:
        table.add_row(*row)
    console.print(table)
    if baseline is not None and not beats_baseline(pareto, baseline):
        console.print(NO_WINNER, markup=False)
    by_outcome: dict[str, int] = {}
    for r in records:
        key = "complete" if r.state == "COMPLETE" else (r.failure_class or r.state.lower())
        by_outcome[key] = by_outcome.get(key, 0) + 1
    infeasible_constraints = sum(1 for r in records if r.state == "COMPLETE" and not r.feasible)
    line = ", ".join(f"{k} {v}" for k, v in sorted(by_outcome.items()))
    if infeasible_constraints:
        line += f" (of the complete: {infeasible_constraints} violate the constraints)"
    console.print(mask_credentials(f"trials: {line}"), markup=False)


def write_outputs(study: optuna.Study, records: Sequence[TrialRecord], pareto: Sequence[TrialRecord],
                  objectives: Sequence[Objective], output_dir: Path,
                  baseline: TrialRecord | None = None) -> list[Path]:
    """Write trials.csv, pareto.json and the PNG plots; a plot that cannot be drawn (too few trials) is
    skipped with a warning rather than failing the study."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [write_trials_csv(records, objectives, output_dir / "trials.csv", baseline)]
    pareto_json = output_dir / "pareto.json"
    pareto_json.write_text(json.dumps(mask_all({
        "study": study.study_name,
        "objectives": [{"metric": o.metric, "key": o.key, "direction": o.direction} for o in objectives],
        "constraints": study.user_attrs.get("constraints", {}),
        "baseline": baseline.to_dict() if baseline else None,
        # the front's trials; the baseline, when it is on the front, is said by a flag (its record is above)
        "baseline_on_front": any(r.number < 0 for r in pareto),
        "pareto": [r.to_dict() for r in pareto if r.number >= 0]}), indent=1,
        default=lambda v: mask_credentials(str(v))))
    written.append(pareto_json)
    from harness.plots import write_plots

    written += write_plots(study, records, pareto, objectives, output_dir, baseline)
    return written


def write_trials_csv(records: Sequence[TrialRecord], objectives: Sequence[Objective], path: Path,
                     baseline: TrialRecord | None = None) -> Path:
    """One row per trial record (the ``baseline``'s first, number -1): outcome, objective values, parameters,
    numeric metrics (:func:`shown_metrics`: a trial that did not complete has no objective values or results;
    a completed one its speed-up over the baseline) and message, every string with its credentials masked."""
    rows = ([baseline] if baseline is not None else []) + list(records)
    shown = [shown_metrics(r, objectives, baseline) for r in rows]
    param_keys = sorted({k for r in rows for k in r.params})
    # numeric metrics, and the conditions the trial ran under (device, versions, CPU threads)
    metric_keys = sorted({k for m in shown for k, v in m.items()
                          if isinstance(v, (int, float)) or k.startswith("condition.")})
    head = ["number", "state", "failure_class", "feasible", "duplicate_of", "duration_s", "spec_hash"]
    head += [f"value.{o.metric}" for o in objectives] + param_keys + metric_keys + ["message"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(mask_all(head))
        for r, metrics in zip(rows, shown, strict=True):
            values = list(r.values) if r.values and r.state == "COMPLETE" else [""] * len(objectives)
            writer.writerow(mask_all([
                r.number, r.state, r.failure_class or "", r.feasible, "" if r.duplicate_of is None else r.duplicate_of,
                f"{r.duration_s:.2f}", r.spec_hash, *values, *[r.params.get(k, "") for k in param_keys],
                *[metrics.get(k, "") for k in metric_keys], r.message]))
    return path

