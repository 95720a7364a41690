"""What a study makes of its trials: objectives, constraints, the record of each finished trial, dominance and
the Pareto front.

Plain data and pure functions: the driver fills records, the report and observer plugins read them back from
the Optuna storage (each trial's ``record`` user attribute), and nothing here knows how trials run.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.space import AXES, LATER_AXES, NO_TECHNIQUE, techniques_label

if TYPE_CHECKING:
    import optuna

    from harness.measure import Metric

#: the constraint value Optuna sees for an infeasible (never launched) trial; > 0 means violated.
INFEASIBLE_VIOLATION = 1.0

#: the key of a trial's throughput; its interval is ``<key>_ci_low`` / ``<key>_ci_high`` (95 %), its relative
#: half-width ``throughput_ci_rel_half_width`` (see :func:`harness.measure.throughput_interval`).
THROUGHPUT_KEY = "throughput_samples_per_s"
CI_REL_KEY = "throughput_ci_rel_half_width"

#: Student's t at 97.5 % (a two-sided 95 % interval) for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """Student's t quantile of a two-sided 95 % interval with ``df`` degrees of freedom (a table to 30, then two
    terms of its expansion about the normal quantile, within 0.001 of the exact value)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def relative_half_width(metrics: Mapping[str, Any]) -> float | None:
    """The relative half-width of a trial's 95 % throughput interval: the stored one, or (records written before
    intervals were) derived from ``step_time_cv`` and ``timing_windows``; None when neither is there."""
    stored = _number(metrics.get(CI_REL_KEY))
    if stored is not None:
        return stored
    cv, k = _number(metrics.get("step_time_cv")), _number(metrics.get("timing_windows"))
    if cv is None or k is None or int(k) < 2:
        return None
    # step_time_cv is the population CV of the windows' step times: sample sd / mean = cv * sqrt(k / (k - 1))
    return t_quantile_975(int(k) - 1) * cv / math.sqrt(int(k) - 1)


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (missing, not a number, a bool, inf or nan)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return None
    return float(value)


#: the least relative half-width a throughput counts with when compared with another process's. A trial's
#: interval comes from its own timing windows, and one process on a GPU times steadily (+-0.1-0.2 % on an H200):
#: narrower than two processes of the same configuration agree (on one H200 five such trials spread by 1.0 %,
#: docs/benchmarks.md "GPT MFU"), so comparisons widen each side to at least this.
PROCESS_NOISE_FLOOR = 0.01


def comparison_half_width(metrics: Mapping[str, Any]) -> float | None:
    """The relative half-width a trial's throughput counts with when compared with another trial's: its own
    interval's, at least :data:`PROCESS_NOISE_FLOOR`; None when it has no interval."""
    rel = relative_half_width(metrics)
    return None if rel is None else max(rel, PROCESS_NOISE_FLOOR)


def ratio_interval(ratio: float, rel_a: float, rel_b: float) -> tuple[float, float]:
    """A 95 % interval of ``a / b`` from the relative half-widths of ``a``'s and ``b``'s intervals, combined in
    quadrature on the log scale (the delta method: independent measurements' relative errors add as variances)."""
    spread = math.sqrt(rel_a**2 + rel_b**2)
    return ratio * math.exp(-spread), ratio * math.exp(spread)


def compare_to_baseline(metrics: Mapping[str, Any], baseline_metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """A trial's throughput over the baseline's, with its 95 % interval from both trials' intervals.

    Returns ``speedup_vs_baseline``, ``speedup_vs_baseline_ci_low`` / ``_ci_high`` and ``tie_with_baseline``
    (1 when the interval contains 1.0: the difference is inside the measurement noise, each side's interval at
    least :data:`PROCESS_NOISE_FLOOR`, 0 otherwise); the interval and the verdict are left out when a trial has
    no spread, and everything when either throughput is missing."""
    if not baseline_metrics:
        return {}
    a, b = _number(metrics.get(THROUGHPUT_KEY)), _number(baseline_metrics.get(THROUGHPUT_KEY))
    if a is None or b is None or b <= 0:
        return {}
    out: dict[str, Any] = {"speedup_vs_baseline": a / b}
    rel_a, rel_b = comparison_half_width(metrics), comparison_half_width(baseline_metrics)
    if rel_a is not None and rel_b is not None:
        low, high = ratio_interval(out["speedup_vs_baseline"], rel_a, rel_b)
        out.update(speedup_vs_baseline_ci_low=low, speedup_vs_baseline_ci_high=high,
                   tie_with_baseline=int(low <= 1.0 <= high))
    return out


def same_within_noise(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> bool:
    """True when ``a`` and ``b`` measured ``key`` (the throughput) equally within the noise: the 95 % interval of
    their ratio (each side at least :data:`PROCESS_NOISE_FLOOR` wide) contains 1. Only the throughput has an
    interval; any other key is compared exactly."""
    if key != THROUGHPUT_KEY:
        return False
    x, y = _number(a.get(key)), _number(b.get(key))
    rel_a, rel_b = comparison_half_width(a), comparison_half_width(b)
    if x is None or y is None or y <= 0 or rel_a is None or rel_b is None:
        return False
    low, high = ratio_interval(x / y, rel_a, rel_b)
    return low <= 1.0 <= high


@dataclass
class Objective:
    """One objective: the study-file name (``throughput``), the result key and Optuna's direction."""

    metric: str
    key: str
    direction: str

    @classmethod
    def of(cls, metric: Metric, direction: str | None = None) -> Objective:
        """The objective on ``metric``, in its declared direction unless ``direction`` is given."""
        return cls(metric.name, metric.key, direction or metric.direction)


@dataclass
class Constraint:
    """``metric >= factor`` or ``metric <= factor`` (times the baseline trial's value when ``relative``)."""

    metric: str
    key: str
    op: str
    factor: float
    relative: bool
    text: str

    def bound(self, baseline_metrics: Mapping[str, Any] | None) -> float | None:
        if not self.relative:
            return self.factor
        if not baseline_metrics or self.key not in baseline_metrics:
            return None
        return self.factor * float(baseline_metrics[self.key])

    def violation(self, metrics: Mapping[str, Any], baseline_metrics: Mapping[str, Any] | None) -> float:
        """How far ``metrics`` is outside the constraint, relative to the bound (<= 0: satisfied)."""
        bound = self.bound(baseline_metrics)
        value = metrics.get(self.key)
        if bound is None or value is None or not math.isfinite(float(value)):
            return INFEASIBLE_VIOLATION
        scale = abs(bound) or 1.0
        diff = (bound - float(value)) if self.op == ">=" else (float(value) - bound)
        return diff / scale


@dataclass
class TrialRecord:
    """A finished trial as the study sees it: kept in the Optuna trial's user attributes (``record``) so
    reports and observers (MLflow) need nothing else."""

    number: int
    state: str
    failure_class: str | None = None
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    values: list[float] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    spec_hash: str = ""
    spec: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    #: > 0 when a constraint is violated (relative to its bound); None when not evaluated.
    constraint_violation: float | None = None
    #: the trial whose outcome was reused because it ran the same combination (-1: the baseline trial).
    duplicate_of: int | None = None

    @property
    def label(self) -> str:
        return techniques_label(self.params)

    @property
    def feasible(self) -> bool:
        return self.state == "COMPLETE" and (self.constraint_violation is None or self.constraint_violation <= 0)

    def failed(self, status: str, message: str, metrics: Mapping[str, Any],
               objectives: Sequence[Objective] = ()) -> None:
        """Record a trial that did not complete: its failure class (``status``) decides the Optuna state. What it
        measured before failing is kept for diagnosis (``compile_s``, ``wall_s``...), but not its results
        (:func:`without_results`): a crashed trial has no accuracy to show."""
        self.metrics, self.failure_class, self.message = without_results(metrics, objectives), status, message
        if status == "pruned":
            self.state = "PRUNED"
        elif status == "infeasible":
            self.state, self.constraint_violation = "PRUNED", INFEASIBLE_VIOLATION
        else:
            self.state = "FAIL"

    def reuse(self, previous: TrialRecord) -> None:
        """Take the outcome of ``previous``, which ran the same combination (this trial is not launched)."""
        self.state, self.failure_class = previous.state, previous.failure_class
        self.metrics, self.values = dict(previous.metrics), previous.values
        self.constraint_violation, self.duplicate_of = previous.constraint_violation, previous.number
        self.message = f"same combination as trial #{previous.number}: reused its outcome" + (
            f" ({previous.message})" if previous.message else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialRecord:
        """The record stored as ``data``; one stored before an axis of :data:`harness.space.LATER_AXES` existed
        reads as having run no technique (``none``) on it."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        params, spec = fields.get("params") or {}, fields.get("spec") or {}
        if any(axis in params for axis in AXES):
            fields["params"] = {**dict.fromkeys(LATER_AXES, NO_TECHNIQUE), **params}
        if any(axis in spec for axis in AXES):
            fields["spec"] = {**{axis: {"name": NO_TECHNIQUE, "params": {}} for axis in LATER_AXES}, **spec}
        return cls(**fields)


#: the measurements that are a trial's results (the core's metrics, their intervals, the comparison with the
#: baseline, the noise flag): a trial that did not complete shows none of them. A test holds it to the core's
#: metrics (:data:`harness.measure.CORE_METRICS`).
RESULT_KEYS = frozenset({
    "throughput_samples_per_s", "throughput_tokens_per_s", "accuracy", "val_loss", "peak_memory_bytes",
    "time_to_accuracy_s", "mfu", "throughput_samples_per_s_ci_low", "throughput_samples_per_s_ci_high",
    CI_REL_KEY, "throughput_median_samples_per_s", "throughput_noisy", "speedup_vs_baseline",
    "speedup_vs_baseline_ci_low", "speedup_vs_baseline_ci_high", "tie_with_baseline"})


def without_results(metrics: Mapping[str, Any], objectives: Sequence[Objective] = ()) -> dict[str, Any]:
    """``metrics`` less the results (:data:`RESULT_KEYS` and the objectives' keys): what a failed or pruned trial
    may show."""
    hidden = RESULT_KEYS | {o.key for o in objectives}
    return {k: v for k, v in metrics.items() if k not in hidden}


def objective_values(objectives: Sequence[Objective], metrics: Mapping[str, Any]) -> list[float] | None:
    """The objectives' values in ``metrics``, or None when one is missing or not finite."""
    values = []
    for o in objectives:
        v = metrics.get(o.key)
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            return None
        values.append(float(v))
    return values


def violation(constraints: Sequence[Constraint], metrics: Mapping[str, Any],
              baseline_metrics: Mapping[str, Any] | None) -> float:
    """The worst constraint violation of ``metrics`` (<= 0: every constraint holds; 0 without constraints)."""
    return max([c.violation(metrics, baseline_metrics) for c in constraints], default=0.0)


def constraints_from_attrs(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna's ``constraints_func``: the violation stored on the trial (> 0 means infeasible)."""
    return [float(trial.user_attrs.get("constraint", 0.0))]


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str], margin: float = 0.0) -> bool:
    """True when ``a`` is at least as good as ``b`` on every objective and better on one; with ``margin``,
    ``a`` must be better by that fraction where it is better and may be worse by at most it elsewhere."""
    better = False
    for x, y, direction in zip(a, b, directions, strict=False):
        if direction == "minimize":
            x, y = -x, -y
        slack = abs(y) * margin
        if x < y - slack:
            return False
        if x > y + slack or (margin == 0 and x > y):
            better = True
    return better


def dominates_within_noise(a: TrialRecord, b: TrialRecord, objectives: Sequence[Objective]) -> bool:
    """Whether trial ``a`` dominates trial ``b``, where a throughput difference inside the noise (the interval of
    the ratio contains 1) counts as equal: a faster-within-noise but less accurate trial is dominated."""
    assert a.values is not None and b.values is not None
    x, y, directions = list(a.values), list(b.values), []
    for i, o in enumerate(objectives):
        if same_within_noise(a.metrics, b.metrics, o.key):
            x[i] = y[i]
        directions.append(o.direction)
    return dominates(x, y, directions)


def pareto_front(records: Sequence[TrialRecord], objectives: Sequence[Objective],
                 baseline: TrialRecord | None = None) -> list[TrialRecord]:
    """The feasible completed trials that no other dominates on the objectives, each combination once; with the
    ``baseline`` record (number -1) in the dominance test: trials it dominates are not on the front, and it may
    be on the front itself. Throughput differences inside the measurement noise are ties
    (:func:`dominates_within_noise`)."""
    seen: set[str] = set()
    candidates: list[TrialRecord] = []
    pool = ([baseline] if baseline is not None else []) + sorted(
        records, key=lambda r: (r.duplicate_of is not None, r.number))
    for r in pool:
        if r.feasible and r.values and r.spec_hash not in seen:
            seen.add(r.spec_hash)
            candidates.append(r)
    front = [r for r in candidates if not any(dominates_within_noise(o, r, objectives) for o in candidates)]
    maximize = objectives[0].direction == "maximize"
    front.sort(key=lambda r: r.values[0] if r.values else 0.0, reverse=maximize)
    return front


def beats_baseline(front: Sequence[TrialRecord], baseline: TrialRecord | None) -> bool:
    """Whether a trial of the study made the front beside the baseline (when the baseline ran and is feasible)."""
    if baseline is None or not baseline.feasible or not baseline.values:
        return True
    return any(r.number >= 0 and r.spec_hash != baseline.spec_hash for r in front)
