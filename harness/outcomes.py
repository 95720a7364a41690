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

from harness.space import AXES

if TYPE_CHECKING:
    import optuna

    from harness.measure import Metric

#: the constraint value Optuna sees for an infeasible (never launched) trial; > 0 means violated.
INFEASIBLE_VIOLATION = 1.0


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
        return " + ".join(str(self.params.get(a, "?")) for a in AXES)

    @property
    def feasible(self) -> bool:
        return self.state == "COMPLETE" and (self.constraint_violation is None or self.constraint_violation <= 0)

    def failed(self, status: str, message: str, metrics: Mapping[str, Any]) -> None:
        """Record a trial that did not complete: its failure class (``status``) decides the Optuna state."""
        self.metrics, self.failure_class, self.message = dict(metrics), status, message
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
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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


def pareto_front(records: Sequence[TrialRecord], objectives: Sequence[Objective]) -> list[TrialRecord]:
    """The feasible completed trials that no other dominates on the objectives (each combination once)."""
    seen: set[str] = set()
    candidates: list[tuple[TrialRecord, list[float]]] = []
    for r in sorted(records, key=lambda r: (r.duplicate_of is not None, r.number)):
        if r.feasible and r.values and r.spec_hash not in seen:
            seen.add(r.spec_hash)
            candidates.append((r, r.values))
    directions = [o.direction for o in objectives]
    front = [(r, v) for r, v in candidates if not any(dominates(w, v, directions) for _, w in candidates)]
    front.sort(key=lambda rv: rv[1][0], reverse=objectives[0].direction == "maximize")
    return [r for r, _ in front]
