"""Compression ``distill``: train a smaller student to match a trained teacher (knowledge distillation,
Hinton et al. 2015).

The teacher is the workload's own model. It is trained first, with a fixed recipe (AdamW, lr 1e-3, the
trial's batch size, budget and seed; bf16 autocast on CUDA), and cached on disk under
``$HARNESS_CACHE_DIR`` (default ``~/.cache/gpu-harness/teachers``), keyed by workload, its parameters, seed,
budget, batch size and device type, so later trials and resumed studies reuse it; or it is loaded from
``teacher_checkpoint`` (a ``state_dict`` of the workload's model). The student is ``workload.make_student()``
or a user's ``student: module:function``, and replaces the model before training. The loss is
``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * task loss``, with the teacher run in eval mode
without gradients; ``alpha = 0`` trains the same student on the task loss alone (the baseline to compare).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness import hookimpl
from harness.errors import SpecError, TrialFailed
from harness.space import Categorical, Float, Int, Technique
from harness.step import Engine, Precision, TrainStep
from plugins import _model_stats


@dataclass(frozen=True)
class Text(Categorical):
    """A free-form string parameter (a path, a ``module:function``); never searched, only set."""

    choices: tuple = ("",)
    default: Any = ""

    def validate(self, where: str, value: Any) -> str:
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected a string, got {value!r}")
        return value

    def describe(self) -> str:
        return "text"


TECHNIQUE = Technique(
    axis="compression", name="distill",
    space={
        "temperature": Float(1.0, 20.0, default=4.0, help="softmax temperature of teacher and student logits"),
        "alpha": Float(0.0, 1.0, default=0.7, help="weight of the distillation term (0: task loss only)"),
        "teacher_checkpoint": Text(help="path of a state_dict of the workload's model to use as the teacher "
                                        "(empty: train it, or reuse the cached one)"),
        "teacher_steps": Int(0, 10_000_000, default=0, help="optimizer steps of teacher training "
                                                            "(0: the trial's budget)"),
        "student": Text(help="module:function returning the student model (empty: workload.make_student())"),
        **_model_stats.inference_space(),
    },
    description="knowledge distillation from the workload's model (trained and cached, or a checkpoint) "
                "into a smaller student",
)

TEACHER_KEY = "distill_teacher"
#: teachers trained by this process (tests read it to see that a cached teacher was reused).
TEACHERS_TRAINED = 0


# --------------------------------------------------------------------------------------------- the teacher
def cache_dir() -> Path:
    return Path(os.environ.get("HARNESS_CACHE_DIR") or Path.home() / ".cache" / "gpu-harness" / "teachers")


def teacher_cache_key(spec, device: torch.device) -> dict[str, Any]:
    """What determines a trained teacher: workload and parameters, seed, budget, batch size, device type."""
    steps = spec.compression.params.get("teacher_steps") or 0
    budget = {"steps": steps} if steps else asdict(spec.budget)
    return {"workload": spec.workload, "workload_params": spec.workload_params, "seed": spec.seed,
            "budget": budget, "batch_size": spec.batch_size, "device": device.type, "recipe": "adamw-1e-3/v1"}


def teacher_cache_path(spec, device: torch.device) -> Path:
    key = teacher_cache_key(spec, device)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in spec.workload)
    return cache_dir() / f"{safe}-{digest}.pt"


def teacher_steps(spec, workload) -> int | None:
    """Optimizer steps for the teacher; None means "train for the budget's seconds"."""
    b = spec.budget
    if spec.compression.params.get("teacher_steps"):
        return spec.compression.params["teacher_steps"]
    if b.steps is not None:
        return b.steps
    if b.epochs is not None:
        return max(1, math.ceil(b.epochs * len(workload.train) / spec.batch_size))
    return None


def _autocast(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def train_teacher(model: nn.Module, workload, spec, device: torch.device) -> dict[str, float]:
    """Train ``model`` (in place) with the teacher recipe through the harness's own TrainStep."""
    global TEACHERS_TRAINED
    precision = Precision(compute_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                          autocast=_autocast(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = TrainStep(Engine(model, optimizer, precision), lambda out, y, _inputs: workload.loss_of(out, y), precision)
    batches = workload.train.train_batches(spec.batch_size, spec.seed)
    steps, seconds = teacher_steps(spec, workload), spec.budget.seconds or 0.0
    model.train()
    done, t0 = 0, time.perf_counter()
    while (done < steps) if steps is not None else (time.perf_counter() - t0 < seconds):
        step(*next(batches))
        done += 1
    TEACHERS_TRAINED += 1
    return {**evaluate(model, workload, spec, precision), "teacher_train_steps": done}


@torch.no_grad()
def evaluate(model: nn.Module, workload, spec, precision: Precision | None = None) -> dict[str, float]:
    """Held-out accuracy and loss of ``model`` (the teacher's numbers reported beside the student's)."""
    model.eval()
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    correct = loss = count = 0.0
    for x, y in workload.test.eval_batches(max(spec.batch_size, 1), spec.budget.eval_samples):
        with autocast():
            out = model(x).float()
        loss += float(workload.loss_of(out, y)) * y.numel()
        correct += float(workload.correct(out, y))
        count += y.numel()
    return {"accuracy": correct / count, "val_loss": loss / count}


def _save_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_or_train_teacher(model: nn.Module, workload, spec, device: torch.device) -> dict[str, float]:
    """Fill ``model`` with the teacher's weights: from ``teacher_checkpoint``, the cache, or by training it
    (rank 0 trains and writes the cache while the other ranks wait, then all load it)."""
    ckpt = spec.compression.params.get("teacher_checkpoint")
    if ckpt:
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        return {**evaluate(model, workload, spec), "teacher_cached": 0.0}
    path = teacher_cache_path(spec, device)
    dist = torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None
    rank = dist.get_rank() if dist else 0
    if rank == 0 and not path.exists():
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(spec.seed)
            metrics = train_teacher(model, workload, spec, device)
        _save_atomic(path, {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                            "metrics": metrics, "key": teacher_cache_key(spec, device)})
        if dist:
            dist.barrier()
        return {**metrics, "teacher_cached": 0.0}
    if dist:
        dist.barrier()
    payload = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(payload["state_dict"])
    return {**payload["metrics"], "teacher_cached": 1.0}


# --------------------------------------------------------------------------------------------- the student
def resolve_student(target: str) -> Any:
    module_name, _, func_name = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, func_name)


def build_student(workload, spec) -> nn.Module:
    target = spec.compression.params.get("student")
    if target:
        return resolve_student(target)()
    if workload.make_student is None:
        raise TrialFailed("infeasible", f"compression 'distill': workload {spec.workload!r} has no make_student(); "
                                        f"give the student as student: module:function")
    return workload.make_student()


def distillation_loss(teacher: nn.Module, task_loss, temperature: float, alpha: float):
    """``loss(outputs, targets, inputs)``: soft-target KL at ``temperature`` (scaled by T^2 so its gradients
    keep their size) mixed with the task loss; the teacher runs without gradients."""
    teacher_dtype = next(teacher.parameters()).dtype

    def loss(outputs, targets, inputs):
        hard = task_loss(outputs, targets)
        if alpha == 0.0:
            return hard
        with torch.no_grad():
            x = inputs.to(teacher_dtype) if inputs.is_floating_point() else inputs
            teacher_logits = teacher(x)
        classes = outputs.shape[-1]
        student_log_p = torch.log_softmax(outputs.float().reshape(-1, classes) / temperature, dim=-1)
        teacher_log_p = torch.log_softmax(teacher_logits.float().reshape(-1, classes) / temperature, dim=-1)
        soft = nn.functional.kl_div(student_log_p, teacher_log_p, log_target=True, reduction="batchmean")
        return alpha * temperature ** 2 * soft + (1.0 - alpha) * hard

    return loss


# --------------------------------------------------------------------------------------------- hooks
@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_declare_metrics():
    return list(_model_stats.METRICS)


@hookimpl
def harness_check_combination(spec):
    p = spec.compression.params
    if p.get("teacher_checkpoint") and not Path(p["teacher_checkpoint"]).is_file():
        return f"compression 'distill' teacher_checkpoint: no such file {p['teacher_checkpoint']!r}"
    target = p.get("student")
    if target:
        if ":" not in target:
            return f"compression 'distill' student: {target!r} is not 'module:function'"
        try:
            func = resolve_student(target)
        except Exception as exc:
            return f"compression 'distill' student: cannot load {target!r} ({type(exc).__name__}: {exc})"
        if not callable(func):
            return f"compression 'distill' student: {target!r} is not callable"
    return None


@hookimpl
def harness_compress_before_training(model, workload, spec, device):
    student = build_student(workload, spec).to(device)  # built first: its initialisation is the same with or
    _model_stats.remember_uncompressed_size(model, workload)  # without a teacher
    teacher = model.to(device)
    info: dict[str, float] = {}
    if spec.compression.params["alpha"] > 0.0:
        info = load_or_train_teacher(teacher, workload, spec, device)
        teacher.eval().requires_grad_(False)
    workload.info[TEACHER_KEY] = (teacher, info)
    return student


@hookimpl
def harness_build_loss(workload, spec):
    teacher, _ = workload.info[TEACHER_KEY]
    p = spec.compression.params
    return distillation_loss(teacher, workload.loss_of, p["temperature"], p["alpha"])


@hookimpl
def harness_measure_model(model, workload, spec, device):
    out = _model_stats.measure(model, workload, spec, device)
    teacher, info = workload.info.get(TEACHER_KEY, (None, {}))
    if info:
        out.update(accuracy_teacher=info["accuracy"], val_loss_teacher=info["val_loss"],
                   accuracy_uncompressed=info["accuracy"], teacher_cached=info["teacher_cached"])
    if teacher is not None:
        batch = int(spec.compression.params["inference_batch_size"])
        inputs = _model_stats.example_batch(workload, batch, device)
        latency = _model_stats.inference_latency_s(teacher, inputs)
        params, _ = _model_stats.parameter_counts(teacher)
        out.update(teacher_inference_latency_s=latency, teacher_inference_throughput_samples_per_s=batch / latency,
                   teacher_parameter_count=params)
    return out
