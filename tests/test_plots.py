"""The report's plots, read from the figure objects before they are saved: importance credits only the
parameters that varied among completed trials, history shows failed and pruned trials, pareto shows the
baseline, trial numbers and units."""
from __future__ import annotations

import optuna
import pytest
from matplotlib.figure import Figure
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from harness.outcomes import Objective, TrialRecord
from harness.plots import history_figure, importance_figure, pareto_figure, varied_params, write_plots

THROUGHPUT = Objective("throughput", "throughput_samples_per_s", "maximize")
MEMORY = Objective("peak_memory", "peak_memory_bytes", "minimize")


def record(number: int, state: str = "COMPLETE", values: list[float] | None = None, **fields) -> TrialRecord:
    params = {"optimizer": "adam", "precision": "fp32", "compile": "eager", "parallelism": "single",
              "compression": "none", "data": "none", "memory": "none"}
    return TrialRecord(number, state, values=values, params=params, spec_hash=f"h{number}", **fields)


def legend_entries(fig: Figure) -> dict[str, object]:
    """The labelled artists of the figure's only axes, by label."""
    (ax,) = fig.axes
    return {artist.get_label(): artist for artist in [*ax.collections, *ax.lines]
            if not artist.get_label().startswith("_")}


@pytest.fixture
def study(study_storage) -> optuna.Study:
    """Six trials: the optimizer and lr varied among the four completed ones; compile was eager in every
    completed trial (the two cuda-graph trials failed)."""
    study = optuna.create_study(storage=study_storage, study_name="plots", directions=["maximize"])
    dists = {"optimizer": CategoricalDistribution(["adam", "sgd"]),
             "compile": CategoricalDistribution(["eager", "cuda-graph"]),
             "optimizer.lr": FloatDistribution(1e-4, 1e-1, log=True)}
    done = [("adam", 1e-3, 100.0), ("sgd", 1e-2, 60.0), ("adam", 3e-2, 140.0), ("sgd", 1e-3, 50.0)]
    for opt, lr, value in done:
        study.add_trial(create_trial(params={"optimizer": opt, "compile": "eager", "optimizer.lr": lr},
                                     distributions=dists, values=[value]))
    for opt in ("adam", "sgd"):
        study.add_trial(create_trial(params={"optimizer": opt, "compile": "cuda-graph", "optimizer.lr": 1e-3},
                                     distributions=dists, state=TrialState.FAIL))
    return study


def test_importance_credits_only_params_that_varied_among_completed_trials(study):
    assert varied_params(study) == ["optimizer", "optimizer.lr"]
    fig = importance_figure(study, [THROUGHPUT])
    assert fig is not None
    credited = {label.get_text() for label in fig.axes[0].get_yticklabels()}
    assert credited == {"optimizer", "optimizer.lr"}  # never compile, the same in every completed trial


def test_importance_is_not_drawn_when_no_parameter_varied(study_storage, tmp_path, capsys):
    study = optuna.create_study(storage=study_storage, study_name="flat", directions=["maximize"])
    dist = {"compile": CategoricalDistribution(["eager", "cuda-graph"])}
    for value in (10.0, 12.0):
        study.add_trial(create_trial(params={"compile": "eager"}, distributions=dist, values=[value]))
    with pytest.raises(ValueError, match="no parameter took more than one value among the 2 completed trials"):
        importance_figure(study, [THROUGHPUT])
    written = write_plots(study, [record(0, values=[10.0]), record(1, values=[12.0])], [], [THROUGHPUT], tmp_path)
    assert {p.name for p in written} == {"pareto.png", "history.png"}
    assert "importance.png not written: ValueError: no parameter took more than one value" in capsys.readouterr().out


def test_history_marks_failed_and_pruned_trials():
    records = [record(0, values=[100.0]), record(1, "FAIL", failure_class="crashed"), record(2, values=[150.0]),
               record(3, "PRUNED", failure_class="infeasible"), record(4, "FAIL", failure_class="oom"),
               record(5, values=[120.0])]
    base = record(-1, values=[110.0])
    fig = history_figure("s", records, [THROUGHPUT], base)
    assert fig is not None
    shown = legend_entries(fig)
    assert list(shown["failed (2)"].get_offsets()[:, 0]) == [1, 4]
    assert list(shown["pruned or infeasible (1)"].get_offsets()[:, 0]) == [3]
    assert [tuple(p) for p in shown["complete (3)"].get_offsets()] == [(0, 100.0), (2, 150.0), (5, 120.0)]
    assert list(shown["best so far"].get_ydata()) == [100.0, 150.0, 150.0]
    assert list(shown["baseline"].get_ydata()) == [110.0, 110.0]
    assert fig.axes[0].get_ylabel() == "throughput (samples/s, higher is better)"


def test_history_of_a_study_whose_trials_all_failed_still_shows_them():
    fig = history_figure("s", [record(0, "FAIL"), record(1, "FAIL")], [THROUGHPUT])
    assert fig is not None and list(legend_entries(fig)["failed (2)"].get_offsets()[:, 0]) == [0, 1]


def test_pareto_shows_baseline_trial_numbers_and_units():
    a = record(3, values=[200.0, 3 * 2**20])
    b = record(5, values=[120.0, 2 * 2**20])
    c = record(6, values=[100.0, 4 * 2**20])  # dominated
    base = record(-1, values=[150.0, 2.5 * 2**20])
    fig = pareto_figure("s", [a, b, c], [a, b], [THROUGHPUT, MEMORY], base)
    assert fig is not None
    (ax,) = fig.axes
    assert ax.get_ylabel() == "throughput (samples/s, higher is better)"
    assert ax.get_xlabel() == "peak_memory (MiB, lower is better)"
    notes = {t.get_text() for t in ax.texts}
    techniques = "adam + fp32 + eager + single + none"
    assert f"#3 {techniques}" in notes and f"#5 {techniques}" in notes
    assert f"baseline {techniques}" in notes
    shown = legend_entries(fig)
    assert [tuple(p) for p in shown["baseline"].get_offsets()] == [(2.5, 150.0)]  # bytes drawn in MiB
    assert sorted(zip(*shown["Pareto front"].get_data(), strict=True)) == [(2.0, 120.0), (3.0, 200.0)]
    assert len(shown["feasible trials"].get_offsets()) == 3


def test_pareto_with_one_objective_plots_against_trial_number_with_the_baseline():
    fig = pareto_figure("s", [record(0, values=[10.0]), record(1, values=[12.0])], [record(1, values=[12.0])],
                        [THROUGHPUT], record(-1, values=[11.0]))
    assert fig is not None
    assert fig.axes[0].get_xlabel() == "trial number"
    assert [tuple(p) for p in legend_entries(fig)["baseline"].get_offsets()][0][1] == 11.0


def test_write_plots_writes_the_three_pngs(study, tmp_path):
    records = [record(t.number, values=t.values) if t.state == TrialState.COMPLETE else record(t.number, "FAIL")
               for t in study.get_trials()]
    written = write_plots(study, records, records[2:3], [THROUGHPUT], tmp_path, record(-1, values=[90.0]))
    assert sorted(p.name for p in written) == ["history.png", "importance.png", "pareto.png"]
    assert all(p.stat().st_size > 1000 for p in written)
