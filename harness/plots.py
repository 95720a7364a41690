"""A study's plots: ``pareto.png`` (the first two objectives, the front, the baseline), ``history.png`` (the first
objective per trial, failed and pruned trials marked) and ``importance.png`` (Optuna's parameter importances, over
the parameters that varied among the completed trials).

Each plot is built by a function that returns the matplotlib figure (None when there is nothing to draw), so tests
can read what a figure shows before it is saved; :func:`write_plots` saves them. Every label goes through
:func:`harness.redact.mask_credentials`.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.measure import CORE_METRICS
from harness.outcomes import Objective, TrialRecord, objective_values
from harness.redact import mask_credentials
from harness.storage import optuna_experimental

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

#: units of result keys the core does not declare, by suffix; bytes are drawn in MiB
UNIT_SUFFIXES = (("_samples_per_s", "samples/s"), ("_tokens_per_s", "tokens/s"), ("_bytes", "MiB"), ("_ms", "ms"),
                 ("_s", "s"), ("_j", "J"), ("_w", "W"), ("_pct", "%"))


def unit_of(key: str) -> str:
    """The unit a result key is drawn in: the core metric's declared unit (bytes as MiB), else by its suffix."""
    for metric in CORE_METRICS:
        if metric.key == key:
            return "MiB" if metric.unit == "bytes" else metric.unit
    return next((unit for suffix, unit in UNIT_SUFFIXES if key.endswith(suffix)), "")


def _scale(key: str) -> float:
    return 1 / 2**20 if key.endswith("_bytes") else 1.0


def axis_label(objective: Objective) -> str:
    """``throughput (samples/s, higher is better)``."""
    better = "higher" if objective.direction == "maximize" else "lower"
    unit = unit_of(objective.key)
    return mask_credentials(f"{objective.metric} ({unit + ', ' if unit else ''}{better} is better)")


def _baseline_values(baseline: TrialRecord | None, objectives: Sequence[Objective]) -> list[float] | None:
    if baseline is None or baseline.state != "COMPLETE":
        return None
    return baseline.values or objective_values(objectives, baseline.metrics)


def _name(r: TrialRecord) -> str:
    return mask_credentials(f"baseline {r.label}" if r.number < 0 else f"#{r.number} {r.label}")


# ============================================================================================ pareto.png
def pareto_figure(study_name: str, records: Sequence[TrialRecord], pareto: Sequence[TrialRecord],
                  objectives: Sequence[Objective], baseline: TrialRecord | None = None) -> Figure | None:
    """Scatter of the first two objectives (or the first against the trial number): feasible trials in grey,
    constraint violators hollow, the Pareto front in red labelled ``#N techniques``, the baseline as a black star;
    axes named with their units. None when no trial completed."""
    import matplotlib.pyplot as plt

    done = [r for r in records if r.state == "COMPLETE" and r.values and r.duplicate_of is None and r.number >= 0]
    base = _baseline_values(baseline, objectives)
    if not done and base is None:
        return None
    two = len(objectives) >= 2
    sx = _scale(objectives[1].key) if two else 1.0
    sy = _scale(objectives[0].key)

    def xy(values: Sequence[float], number: int) -> tuple[float, float]:
        return (values[1] * sx, values[0] * sy) if two else (float(number), values[0] * sy)

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ok = [xy(r.values, r.number) for r in done if r.feasible and r.values]
    bad = [xy(r.values, r.number) for r in done if not r.feasible and r.values]
    if ok:
        ax.scatter([x for x, _ in ok], [y for _, y in ok], c="0.6", label="feasible trials")
    if bad:
        ax.scatter([x for x, _ in bad], [y for _, y in bad], facecolors="none", edgecolors="0.4",
                   label="violates constraints")
    front = sorted(((xy(r.values, r.number), r) for r in pareto if r.values), key=lambda point: point[0])
    notes: list[tuple[str, float, float, int]] = []
    if front:
        ax.plot([p[0][0] for p in front], [p[0][1] for p in front], "r-o", label="Pareto front")
        notes += [(_name(r), x, y, 4) for (x, y), r in front]
    if base is not None and baseline is not None:
        bx, by = xy(base, -1) if two else (-0.5, base[0] * sy)
        ax.scatter([bx], [by], marker="*", s=180, c="k", zorder=3, label="baseline")
        if not any(r.number < 0 for _, r in front):  # a baseline on the front is labelled there already
            notes.append((_name(baseline), bx, by, -10))
    low, high = ax.get_xlim()
    for text, x, y, dy in notes:  # labels of points in the right half extend leftwards, inside the axes
        right = x > (low + high) / 2
        ax.annotate(text, (x, y), fontsize=7, xytext=(-4 if right else 4, dy), textcoords="offset points",
                    ha="right" if right else "left")
    ax.set_ylabel(axis_label(objectives[0]))
    ax.set_xlabel(axis_label(objectives[1]) if two else "trial number")
    ax.set_title(mask_credentials(f"study {study_name}: {len(pareto)} on the front of {len(done)} complete trials"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ============================================================================================ history.png
def history_figure(study_name: str, records: Sequence[TrialRecord], objectives: Sequence[Objective],
                   baseline: TrialRecord | None = None) -> Figure | None:
    """The first objective per trial number with the best value so far; failed trials as red crosses and pruned
    or infeasible ones as grey triangles along the bottom (they have no value), the baseline as a dashed line.
    None when no trial has finished."""
    import matplotlib.pyplot as plt

    trials = sorted((r for r in records if r.number >= 0 and r.state in ("COMPLETE", "FAIL", "PRUNED")),
                    key=lambda r: r.number)
    if not trials:
        return None
    first, scale = objectives[0], _scale(objectives[0].key)
    maximize = first.direction == "maximize"
    fig, ax = plt.subplots(figsize=(8, 5))
    complete = [r for r in trials if r.state == "COMPLETE" and r.values]
    ok = [(r.number, r.values[0] * scale) for r in complete if r.feasible and r.values]
    bad = [(r.number, r.values[0] * scale) for r in complete if not r.feasible and r.values]
    if ok:
        ax.scatter([n for n, _ in ok], [v for _, v in ok], c="tab:blue", label=f"complete ({len(ok)})")
        best, line = None, []
        for n, v in ok:
            best = v if best is None or (v > best if maximize else v < best) else best
            line.append((n, best))
        ax.step([n for n, _ in line], [b for _, b in line], where="post", c="tab:red", label="best so far")
    if bad:
        ax.scatter([n for n, _ in bad], [v for _, v in bad], facecolors="none", edgecolors="tab:blue",
                   label=f"violates constraints ({len(bad)})")
    # trials without a value sit on the bottom edge: x in trial numbers, y in axes coordinates
    edge = ax.get_xaxis_transform()
    for state, marker, colour, label in (("FAIL", "x", "tab:red", "failed"),
                                         ("PRUNED", "v", "0.5", "pruned or infeasible")):
        numbers = [r.number for r in trials if r.state == state]
        if numbers:
            ax.scatter(numbers, [0.03] * len(numbers), marker=marker, c=colour, transform=edge, clip_on=False,
                       label=f"{label} ({len(numbers)})")
    base = _baseline_values(baseline, objectives)
    if base is not None:
        ax.axhline(base[0] * scale, ls="--", c="k", lw=1, label="baseline")
    if not ok and not bad and base is None:
        ax.set_yticks([])
    ax.set_xlabel("trial number")
    ax.set_ylabel(axis_label(first))
    ax.set_title(mask_credentials(f"study {study_name}: history of {len(trials)} trials"))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ============================================================================================ importance.png
def varied_params(study: optuna.Study) -> list[str]:
    """The parameters every completed trial has that took more than one value among them: the only ones an
    importance can credit."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    common = set.intersection(*(set(t.params) for t in complete))
    return sorted(p for p in common if len({repr(t.params[p]) for t in complete}) > 1)


def importance_figure(study: optuna.Study, objectives: Sequence[Objective]) -> Figure | None:
    """Optuna's parameter importances for the first objective, over :func:`varied_params` only. None with fewer
    than two completed trials; ValueError (the reason, for the user) when no parameter varied."""
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n < 2:
        return None
    params = varied_params(study)
    if not params:
        raise ValueError(f"no parameter took more than one value among the {n} completed trials")
    # Optuna's importance evaluator (PED-ANOVA) ranks parameters for *low* values of a custom target (and warns
    # so): flip a maximised objective's sign so importance means "for a better value".
    sign = -1.0 if objectives[0].direction == "maximize" else 1.0
    with warnings.catch_warnings(), optuna_experimental():
        warnings.filterwarnings("ignore", message=".*computes the importances of params to achieve low",
                                category=UserWarning)
        # a small study has parameters seen in one or two trials: the plot still shows what there is
        warnings.filterwarnings("ignore", message="Some regimes for parameter", category=UserWarning)
        ax = ovm.plot_param_importances(study, params=params, target=lambda t: sign * t.values[0],
                                        target_name=objectives[0].metric)
    from matplotlib.figure import Figure

    figure = ax.figure
    assert isinstance(figure, Figure)  # Optuna draws on a figure of its own, not a subfigure
    ax.set_title(f"importance for {objectives[0].metric} ({len(params)} varied of {n} completed trials)")
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    return figure


# ============================================================================================ writing
def write_plots(study: optuna.Study, records: Sequence[TrialRecord], pareto: Sequence[TrialRecord],
                objectives: Sequence[Objective], output_dir: Path, baseline: TrialRecord | None = None) -> list[Path]:
    """Save ``pareto.png``, ``history.png`` and ``importance.png`` in ``output_dir``; a plot that cannot be drawn
    is skipped with one line saying why, never failing the study. Returns the files written."""
    try:
        import matplotlib
    except ImportError:
        print("harness: plots not written: matplotlib is not installed")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials" is said by the plot's absence
    builders: list[tuple[str, Any]] = [
        ("pareto.png", lambda: pareto_figure(study.study_name, records, pareto, objectives, baseline)),
        ("history.png", lambda: history_figure(study.study_name, records, objectives, baseline)),
        ("importance.png", lambda: importance_figure(study, objectives))]
    written = []
    for name, build in builders:
        try:
            figure = build()
            if figure is None:
                continue
            figure.savefig(Path(output_dir) / name, dpi=110)
            plt.close(figure)
            written.append(Path(output_dir) / name)
        except Exception as exc:  # optuna's importance refuses some studies; a plot never fails the study
            first = str(exc).splitlines()[0] if str(exc) else ""
            print(mask_credentials(f"harness: {name} not written: {type(exc).__name__}: {first}"))
    return written
