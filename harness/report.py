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
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.outcomes import Objective, TrialRecord
from harness.redact import mask_all, mask_credentials
from harness.space import AXES
from harness.storage import optuna_experimental

if TYPE_CHECKING:
    import optuna
    from rich.console import Console

#: draws one plot of a study into a PNG file; False when there is too little to draw.
Drawer = Callable[["optuna.Study", Sequence[TrialRecord], Sequence[TrialRecord], Sequence[Objective], Path], bool]

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


def print_table(console: Console, study: optuna.Study, records: Sequence[TrialRecord], pareto: Sequence[TrialRecord],
                baseline: TrialRecord | None = None, objectives: Sequence[Objective] | None = None) -> None:
    """Print the Pareto table (techniques + metrics) and one line of counts by outcome."""
    from rich.table import Table

    objectives = list(objectives or objectives_of(study))
    cols = _columns(objectives)
    directions = {o.key: ("max" if o.direction == "maximize" else "min") for o in objectives}
    table = Table(title=mask_credentials(f"study {study.study_name}: Pareto front ({len(pareto)} of {len(records)} "
                                         "trials)"))
    table.add_column("#", justify="right")
    table.add_column("techniques (" + " + ".join(AXES) + ")")
    table.add_column("searched params")
    for key in cols:
        table.add_column(key + (f" ({directions[key]})" if key in directions else ""), justify="right")
    rows = list(pareto)
    if baseline is not None:
        rows.append(baseline)
    # the values Optuna chose for this trial (the axes' techniques are in their own column)
    chosen = {t.number: t.params for t in study.get_trials(deepcopy=False)}
    for r in rows:
        params = {k.split(".", 2)[-1] if k.split(".")[0] in AXES else k: v
                  for k, v in sorted(chosen.get(r.number, {}).items()) if k not in AXES}
        extra = ", ".join(f"{k}={fmt(k, v)}" for k, v in params.items()) or "-"
        table.add_row("base" if r.number < 0 else str(r.number),
                      mask_credentials(" + ".join(str(r.params.get(a, "")) for a in AXES)),
                      mask_credentials(extra), *[fmt(k, r.metrics.get(k)) for k in cols])
    console.print(table)
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
    written = [write_trials_csv(records, objectives, output_dir / "trials.csv")]
    pareto_json = output_dir / "pareto.json"
    pareto_json.write_text(json.dumps(mask_all({
        "study": study.study_name,
        "objectives": [{"metric": o.metric, "key": o.key, "direction": o.direction} for o in objectives],
        "constraints": study.user_attrs.get("constraints", {}),
        "baseline": baseline.to_dict() if baseline else None,
        "pareto": [r.to_dict() for r in pareto]}), indent=1, default=lambda v: mask_credentials(str(v))))
    written.append(pareto_json)
    try:
        import matplotlib
    except ImportError:
        print("harness: plots not written: matplotlib is not installed")
        return written
    matplotlib.use("Agg")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials" is said by the plot's absence
    for name, draw in (("pareto.png", _plot_pareto), ("history.png", _plot_optuna("plot_optimization_history")),
                       ("importance.png", _plot_optuna("plot_param_importances"))):
        try:
            with optuna_experimental():  # Optuna's matplotlib plots are experimental
                if draw(study, records, pareto, objectives, output_dir / name):
                    written.append(output_dir / name)
        except Exception as exc:  # optuna's plots refuse studies with too few or unvarying trials
            first = str(exc).splitlines()[0] if str(exc) else ""
            print(mask_credentials(f"harness: {name} not written: {type(exc).__name__}: {first}"))
    return written


def write_trials_csv(records: Sequence[TrialRecord], objectives: Sequence[Objective], path: Path) -> Path:
    """One row per trial record: outcome, objective values, parameters, numeric metrics and message (every string
    with its credentials masked)."""
    param_keys = sorted({k for r in records for k in r.params})
    metric_keys = sorted({k for r in records for k, v in r.metrics.items() if isinstance(v, (int, float))})
    head = ["number", "state", "failure_class", "feasible", "duplicate_of", "duration_s", "spec_hash"]
    head += [f"value.{o.metric}" for o in objectives] + param_keys + metric_keys + ["message"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(mask_all(head))
        for r in records:
            values = list(r.values) if r.values else [""] * len(objectives)
            writer.writerow(mask_all([
                r.number, r.state, r.failure_class or "", r.feasible, "" if r.duplicate_of is None else r.duplicate_of,
                f"{r.duration_s:.2f}", r.spec_hash, *values, *[r.params.get(k, "") for k in param_keys],
                *[r.metrics.get(k, "") for k in metric_keys], r.message]))
    return path


def _plot_pareto(study: optuna.Study, records: Sequence[TrialRecord], pareto: Sequence[TrialRecord],
                 objectives: Sequence[Objective], path: Path) -> bool:
    """Scatter of the first two objectives (or the first against trial number): every feasible trial in grey,
    constraint violators hollow, the Pareto front in red and labelled with its techniques."""
    import matplotlib.pyplot as plt

    done = [r for r in records if r.state == "COMPLETE" and r.values and r.duplicate_of is None]
    if not done:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    two = len(objectives) >= 2

    def xy(r: TrialRecord) -> tuple[float, float]:
        assert r.values
        return (r.values[1], r.values[0]) if two else (r.number, r.values[0])

    ok = [xy(r) for r in done if r.feasible]
    bad = [xy(r) for r in done if not r.feasible]
    if ok:
        ax.scatter([x for x, _ in ok], [y for _, y in ok], c="0.6", label="feasible")
    if bad:
        ax.scatter([x for x, _ in bad], [y for _, y in bad], facecolors="none", edgecolors="0.4",
                   label="violates constraints")
    front = sorted(((xy(r), r) for r in pareto), key=lambda point: point[0])
    if front:
        ax.plot([p[0][0] for p in front], [p[0][1] for p in front], "r-o", label="Pareto front")
        for (x, y), r in front:
            ax.annotate(r.label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_ylabel(f"{objectives[0].metric} ({objectives[0].direction})")
    ax.set_xlabel(f"{objectives[1].metric} ({objectives[1].direction})" if two else "trial")
    ax.set_title(f"study {study.study_name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_optuna(plot_name: str) -> Drawer:
    """A drawer for one of Optuna's matplotlib plots (``plot_optimization_history``, ``plot_param_importances``)
    of the first objective; it needs two complete trials at least."""

    def draw(study: optuna.Study, records: Sequence[TrialRecord], _pareto: Sequence[TrialRecord],
             objectives: Sequence[Objective], path: Path) -> bool:
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib as ovm

        if sum(1 for r in records if r.state == "COMPLETE") < 2:
            return False

        if plot_name == "plot_param_importances":
            # Optuna's importance evaluator (PED-ANOVA) ranks parameters for *low* values of a custom target (and
            # warns so): flip a maximised objective's sign so importance means "for a better value".
            sign = -1.0 if objectives[0].direction == "maximize" else 1.0
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*computes the importances of params to achieve low",
                                        category=UserWarning)
                # a small study has parameters seen in one or two trials: the plot still shows what there is
                warnings.filterwarnings("ignore", message="Some regimes for parameter", category=UserWarning)
                ax = ovm.plot_param_importances(study, target=lambda t: sign * t.values[0],
                                                target_name=objectives[0].metric)
        else:
            ax = getattr(ovm, plot_name)(study, target=lambda t: t.values[0], target_name=objectives[0].metric)
        from matplotlib.figure import Figure

        figure = ax.figure
        assert isinstance(figure, Figure)  # Optuna draws on a figure of its own, not a subfigure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return True

    return draw
