"""What a study is, as the parent run records it: the search space (``space.json``), the few summary params,
and the device fingerprint of the machine the numbers were measured on."""
from __future__ import annotations

import os
import platform
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.studyfile import StudyConfig


def describe_distribution(entry: tuple[str, Any]) -> str:
    """``("fixed", 0.1)`` -> ``0.1``; an Optuna distribution -> ``float [0.001, 0.01] log`` / ``one of [a, b]``."""
    kind, value = entry
    if kind == "fixed":
        return str(value)
    choices = getattr(value, "choices", None)
    if choices is not None:
        return f"one of [{', '.join(map(str, choices))}]"
    text = f"{'int' if type(value).__name__.startswith('Int') else 'float'} [{value.low}, {value.high}]"
    if getattr(value, "log", False):
        text += " log"
    if getattr(value, "step", None) not in (None, 1):
        text += f" step {value.step}"
    return text


def search_space(config: StudyConfig) -> dict[str, Any]:
    """The study's search space as plain data, logged as the parent run's ``space.json``: the workload's searched
    params, each axis's techniques with their params (``float [0.03, 0.3] log``), the batch sizes."""
    return {"workload": config.workload,
            "workload_params": {k: describe_distribution(e) for k, e in getattr(config, "workload_space", {}).items()},
            "axes": {axis: {tech: {k: describe_distribution(e) for k, e in params.items()}
                            for tech, params in techniques.items()}
                     for axis, techniques in getattr(config, "axes", {}).items()},
            "batch_size": list(getattr(config, "batch_sizes", []))}


def summary_params(config: StudyConfig) -> dict[str, Any]:
    """The few params of the parent run (the full space is its ``space.json``): workload, the techniques searched
    per axis (``optimizer: adamw, sgd | compile: eager``), batch sizes, objectives, constraints, budget, sampler."""
    axes = getattr(config, "axes", {})
    out: dict[str, Any] = {"workload": config.workload}
    if axes:
        out["techniques"] = " | ".join(f"{axis}: {', '.join(techniques)}" for axis, techniques in axes.items())
    if getattr(config, "batch_sizes", None):
        out["batch_size"] = ", ".join(map(str, config.batch_sizes))
    out["objectives"] = ", ".join(f"{o.metric} ({o.direction})" for o in config.objectives)
    for c in getattr(config, "constraints", []):
        out[f"constraint.{c.metric}"] = c.text
    budget = getattr(config, "budget", None)
    if budget is not None:
        out["budget"] = ", ".join(f"{k}={v}" for k, v in vars(budget).items() if v not in (None, 0))
    for key in ("sampler", "pruner", "n_trials", "device", "devices", "seed"):
        if getattr(config, key, None) is not None:
            out[key] = getattr(config, key)
    return out


def device_fingerprint() -> dict[str, str]:
    """What the numbers were measured on: GPU name and count, driver, CUDA and torch versions, host."""
    import torch

    from harness.space import Environment

    env = Environment.detect()
    out = {"device.gpu_name": env.device_name if env.cuda else "none", "device.gpu_count": str(env.device_count),
           "device.torch": torch.__version__, "device.cuda": str(torch.version.cuda or "none"),
           "device.host": socket.gethostname(), "device.python": platform.python_version(),
           "device.cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        out["device.driver"] = driver.decode() if isinstance(driver, bytes) else str(driver)
    except Exception:  # no NVML (a CPU machine): the driver is simply not recorded
        out["device.driver"] = "none"
    return out
