"""What a study can run here, decided from declarations and from its own failures rather than by launching:

- techniques whose declared requirements this machine can never meet (CUDA, compute capability, packages)
  leave the search space when the study starts, with one line each saying why (:func:`narrow_space`);
- a technique (or combination) that failed the same way in several trials is vetoed for the rest of the study:
  later trials that choose it are ruled out before launch, like an infeasible combination (:func:`vetoes`);
- an axis whose techniques change metrics that no objective measures is pointed out at the start
  (:func:`unmeasured_axes`): compression, say, changes the model's size and latency, not training throughput.

A trial ruled out before launch does not use up one of ``n_trials``; :data:`RULED_OUT_LIMIT` bounds how many
such proposals a driver accepts, so a space where nothing can run ends with a message instead of looping.
"""
from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from harness.errors import SpecError
from harness.space import AXES, Environment, unavailable_choice, unavailable_reason

if TYPE_CHECKING:
    import optuna

    from harness.config import TrialSpec
    from harness.outcomes import TrialRecord
    from harness.plugins import Registry
    from harness.studyfile import SpaceEntry, StudyConfig

#: failure classes that say something about a technique (not about a budget, a learning rate or a batch size).
VETO_CLASSES = ("crashed", "plugin-error", "compile-error")
#: identical failures of a combination before it is vetoed.
VETO_AFTER = 2


def ruled_out_limit(n_trials: int | None) -> int:
    """How many proposals ruled out before launch one driver accepts before it stops the study."""
    return max(30, 3 * (n_trials or 10))


# ============================================================================================ the start
def unavailable_techniques(cfg: StudyConfig, registry: Registry, env: Environment) -> dict[tuple[str, str], str]:
    """``(axis, technique) -> why`` for every technique of the study's space that this machine can never run."""
    out: dict[tuple[str, str], str] = {}
    for axis, techniques in cfg.axes.items():
        for name in techniques:
            tech = registry.techniques.get((axis, name))
            reason = tech and unavailable_reason(tech, env, cfg.device, "this machine")
            if reason:
                out[(axis, name)] = reason
    return out


def parameters(cfg: StudyConfig) -> dict[str, SpaceEntry]:
    """Every parameter of the study's space by its Optuna name: ``workload.KEY`` and ``AXIS.TECHNIQUE.KEY``."""
    out = {f"workload.{k}": e for k, e in cfg.workload_space.items()}
    for axis, techniques in cfg.axes.items():
        for name, space in techniques.items():
            out.update({f"{axis}.{name}.{k}": e for k, e in (space or {}).items()})
    return out


def choice_lists(entries: Mapping[str, SpaceEntry]) -> dict[str, Sequence[Any]]:
    """The values each categorical or fixed parameter of :func:`parameters` can take."""
    return {name: value.choices if kind == "dist" else (value,) for name, (kind, value) in entries.items()
            if kind != "dist" or hasattr(value, "choices")}


def holder(cfg: StudyConfig, name: str) -> dict[str, SpaceEntry] | None:
    """The mapping of ``cfg`` that holds the parameter ``name`` (see :func:`parameters`), or None when its
    technique is not in the space (any more)."""
    head = name.rpartition(".")[0]
    if head == "workload":
        return cfg.workload_space
    axis, _, technique = head.partition(".")
    return cfg.axes.get(axis, {}).get(technique)


def declaration(name: str, cfg: StudyConfig, registry: Registry) -> Any:
    """The declared parameter behind the Optuna name ``name`` (see :func:`parameters`), or None."""
    head, _, key = name.rpartition(".")
    if head == "workload":
        return registry.workload_params(cfg.workload).get(key)
    axis, _, technique = head.partition(".")
    tech = registry.techniques.get((axis, technique))
    return tech.space.get(key) if tech else None


def unavailable_choices(cfg: StudyConfig, registry: Registry, env: Environment) -> dict[tuple[str, Any], str]:
    """``(parameter, value) -> why`` for every value of a parameter (``workload.KEY``, ``AXIS.TECHNIQUE.KEY``) the
    study searches or fixes that this machine can never run (the parameter's declared per-choice requirements)."""
    out = {}
    for name, choices in choice_lists(parameters(cfg)).items():
        param = declaration(name, cfg, registry)
        for choice in choices:
            reason = unavailable_choice(param, name, choice, env, cfg.device, "this machine")
            if reason:
                out[(name, choice)] = reason
    return out


def stored_choices(study: optuna.Study) -> dict[str, list[Any]]:
    """The choices each axis (technique names) and each categorical parameter had in the study's earlier trials
    (a study shared with other machines or resumed): Optuna does not let a categorical parameter change its
    choices within a study."""
    seen: dict[str, list[Any]] = {}
    for t in study.get_trials(deepcopy=False):
        for name, dist in t.distributions.items():
            if name not in seen and (name in AXES or "." in name) and hasattr(dist, "choices"):
                seen[name] = [str(c) for c in dist.choices] if name in AXES else list(dist.choices)
    return seen


def narrow_space(cfg: StudyConfig, unavailable: Mapping[tuple[str, Any], str],
                 earlier: Mapping[str, Sequence[Any]] | None = None) -> tuple[StudyConfig, list[str]]:
    """``cfg`` without the ``unavailable`` techniques (``(axis, name)``) and parameter values (``(parameter,
    value)``, :func:`unavailable_choices`), and one line per choice left out (or kept because the study's earlier
    trials searched it). An axis or parameter left with nothing is a :class:`SpecError`."""
    narrowed, lines = copy.deepcopy(cfg), list[str]()
    spaces: dict[str, Sequence[Any]] = {axis: list(techniques) for axis, techniques in cfg.axes.items()}
    entries = parameters(cfg)
    spaces.update(choice_lists(entries))
    for name, choices in spaces.items():
        gone = {c: unavailable[(name, c)] for c in choices if (name, c) in unavailable}
        space = None if name in AXES else holder(narrowed, name)
        if not gone or (name not in AXES and space is None):  # nothing to leave out, or its technique left already
            continue
        kept = [c for c in choices if c not in gone]
        where = f"axes.{name}" if name in AXES else name
        if not kept:
            why = "; ".join(gone.values())
            raise SpecError(f"{cfg.path}.{where}: {'no technique' if name in AXES else 'no value'} can run on this "
                            f"machine ({why})")
        before = list((earlier or {}).get(name, ()))
        if before and before != kept:
            lines.extend(f"keeping {name} {c!r} in the space (this study's earlier trials searched it) but "
                         f"every trial choosing it is ruled out here: {why}" for c, why in gone.items())
            continue
        if name in AXES:
            narrowed.axes[name] = {t: cfg.axes[name][t] for t in kept}
        elif space is not None:
            narrowed_entry = ("fixed", kept[0]) if len(kept) == 1 else ("dist", type(entries[name][1])(tuple(kept)))
            space[name.rpartition(".")[2]] = narrowed_entry
        lines.extend(f"left out of the search space: {why}" for why in gone.values())
    return narrowed, lines


def unmeasured_axes(cfg: StudyConfig, registry: Registry) -> list[str]:
    """One line per searched axis whose techniques' plugins declare metrics, none of which is an objective:
    those techniques would be judged only by what they cost the objectives (e.g. compression by training
    throughput, when it changes the model's size and inference latency)."""
    objectives = {o.key for o in cfg.objectives}
    lines = []
    for axis, techniques in cfg.axes.items():
        if len(techniques) < 2:
            continue
        plugins = {t.plugin for name in techniques if (t := registry.techniques.get((axis, name)))}
        declared = {m.name: m for p in plugins if (rec := registry.records.get(p)) for m in rec.metrics}
        if declared and not objectives.intersection(m.key for m in declared.values()):
            names = ", ".join(sorted(declared))
            lines.append(f"axes.{axis}: its techniques change {names}, which no objective measures; the "
                         f"objectives ({', '.join(o.metric for o in cfg.objectives)}) see only what they cost "
                         f"(add e.g. `- {sorted(declared)[0]}: {declared[sorted(declared)[0]].direction[:3]}` "
                         "to objectives)")
    return lines


# ============================================================================================ vetoes
def failure_signature(record: TrialRecord) -> str:
    """A failure's class and message with numbers, addresses and locations blanked, so that the same error
    in two trials (other shapes, other line numbers) reads the same."""
    text = re.sub(r"\(at [^)]*\)|\bat \S+:\d+", "", record.message or "")
    text = re.sub(r"0x[0-9a-fA-F]+|\d+(\.\d+)?", "#", text)
    return f"{record.failure_class}: {' '.join(text.split())[:200]}"


def vetoes(records: Iterable[TrialRecord], registry: Registry) -> dict[tuple[tuple[str, str], ...], str]:
    """Combinations to rule out for the rest of the study: ``((axis, technique), ...) -> why``.

    A group of at least :data:`VETO_AFTER` launched trials that failed with the same signature
    (:func:`failure_signature`, classes :data:`VETO_CLASSES`) vetoes the non-default techniques all of them
    chose, unless a completed trial chose that same combination (then the failure depends on something
    else: a batch size, a parameter)."""
    records = list(records)
    groups: dict[str, list[TrialRecord]] = defaultdict(list)
    for r in records:
        if r.state == "FAIL" and r.failure_class in VETO_CLASSES and r.duplicate_of is None and r.number >= 0:
            groups[failure_signature(r)].append(r)
    defaults = {axis: registry.default_technique(axis).name for axis in AXES}
    # an axis a record does not name ran its default (a record made before the axis existed)
    completed = [{(a, str(r.params.get(a, defaults[a]))) for a in AXES} for r in records if r.state == "COMPLETE"]
    out: dict[tuple[tuple[str, str], ...], str] = {}
    for group in groups.values():
        if len(group) < VETO_AFTER:
            continue
        chosen = [{(a, str(r.params.get(a, defaults[a]))) for a in AXES} for r in group]
        common = {(a, n) for a, n in set.intersection(*chosen) if n != defaults[a]}
        if not common or any(common <= done for done in completed):
            continue
        combo = tuple(sorted(common))
        what = " + ".join(f"{a} {n!r}" for a, n in combo)
        numbers = ", ".join(f"#{r.number}" for r in sorted(group, key=lambda r: r.number)[:5])
        out[combo] = (f"vetoed for this study: {what} failed the same way in trials {numbers} "
                      f"({group[0].failure_class}: {group[0].message[:160]})")
    return out


def vetoed(spec: TrialSpec, active: Mapping[tuple[tuple[str, str], ...], str]) -> str | None:
    """Why ``spec`` is ruled out by a veto, or None."""
    chosen = {(axis, getattr(spec, axis).name) for axis in AXES}
    for combo, why in active.items():
        if set(combo) <= chosen:
            return why
    return None
