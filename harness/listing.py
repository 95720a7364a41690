"""What ``harness plugins`` and ``harness run`` show, as plain data: every plugin with what it adds (each
technique's and workload's parameters, and whether this machine can run each technique), and the settings a
trial runs with. The CLI prints them; scripts read ``harness plugins --json``."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from harness.space import AXES, Categorical, Environment, Float, Int, unavailable_choice, unavailable_reason

if TYPE_CHECKING:
    from harness.config import TrialSpec
    from harness.launch import LaunchOptions
    from harness.plugins import Registry


def param_listing(param: Any, label: str = "", env: Environment | None = None) -> dict[str, Any]:
    """A parameter's declaration as JSON-able data: its type, range or choices, default and help; with ``env``, the
    choices that machine can never run (``choices_not_here``: choice -> why), when there are any."""
    out: dict[str, Any]
    if isinstance(param, (Float, Int)):
        out = {"type": "float" if isinstance(param, Float) else "int", "low": param.low, "high": param.high,
               "log": param.log}
        if isinstance(param, Int) and param.step != 1:
            out["step"] = param.step
    elif isinstance(param, Categorical):
        out = {"type": "categorical", "choices": list(param.choices)}
        missing = {str(c): why for c in param.choices
                   if env is not None and (why := unavailable_choice(param, label, c, env, where="this machine"))}
        if missing:
            out["choices_not_here"] = missing
    else:
        out = {"type": "string"}
    return {**out, "default": param.default, "help": param.help}


def plugin_listing(registry: Registry) -> list[dict[str, Any]]:
    """One JSON-able entry per plugin: name, module, distribution, version, what it adds (each technique with
    its parameters and whether this machine can run it), its hooks, its error."""
    env = Environment.detect()
    out = []
    for name, rec in sorted(registry.records.items()):
        if name == "harness-core":
            continue
        techniques = []
        for t in rec.techniques:
            why = unavailable_reason(t, env, where="this machine")
            techniques.append({"axis": t.axis, "name": t.name, "default": t.default,
                               "params": {k: param_listing(p, f"{t.axis}.{k}", env) for k, p in t.space.items()},
                               "runs_here": why is None, "why_not": why or ""})
        out.append({"name": name, "module": rec.module, "distribution": rec.distribution, "version": rec.version,
                    "techniques": techniques,
                    "workloads": [{"name": w.name, "default": w.default,
                                   "params": {k: param_listing(p, f"workload.{k}", env) for k, p in w.params.items()}}
                                  for w in rec.workloads],
                    "hooks": list(rec.hooks), "error": rec.error})
    return out


def axis_listing(registry: Registry) -> list[tuple[str, list[str]]]:
    """Every axis, in :data:`harness.space.AXES` order, with its techniques' names (the default first)."""
    out = []
    for axis in AXES:
        default = registry.default_technique(axis, required=False)
        names = registry.names(axis)
        if default is not None:
            names = [default.name] + [n for n in names if n != default.name]
        out.append((axis, names))
    return out


def _values(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def trial_settings(spec: TrialSpec, options: LaunchOptions | None = None) -> list[tuple[str, str]]:
    """What a trial runs with, as (setting, value) rows: workload, batch size, budget, seed, device, the
    technique of every axis with its parameter values (defaults filled in), the timeout."""
    import torch

    b = spec.budget
    length = (f"{b.steps} steps" if b.steps else f"{b.epochs:g} epochs" if b.epochs else
              f"{b.seconds:g} s" if b.seconds else "the workload's default")
    extra = [f"{b.warmup_steps} warm-up steps", f"{b.windows} timing windows"]
    if b.eval_every_steps:
        extra.append(f"evaluation every {b.eval_every_steps} steps")
    if b.eval_samples:
        extra.append(f"at most {b.eval_samples} held-out samples")
    device = spec.device
    if device == "auto":
        device = f"auto ({'cuda' if torch.cuda.is_available() else 'cpu'} here)"
    per = f", {spec.batch_size // spec.devices} per process" if spec.devices > 1 else ""
    rows = [("workload", spec.workload + (f" ({_values(spec.workload_params)})" if spec.workload_params else "")),
            ("batch_size", f"{spec.batch_size} (global{per})"),
            ("budget", f"{length} ({', '.join(extra)})"),
            ("seed", str(spec.seed)),
            ("device", f"{device}, {spec.devices} process{'es' if spec.devices > 1 else ''}")]
    for axis in AXES:
        choice = getattr(spec, axis)
        rows.append((axis, choice.name + (f" ({_values(choice.params)})" if choice.params else "")))
    if options is not None:
        rows.append(("timeout", f"{options.timeout_s:g} s" if options.timeout_s else "none"))
    return rows
