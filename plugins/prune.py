"""Compression ``prune``: zero out weights of Linear and Conv layers.

Methods: ``magnitude`` (global unstructured L1: the smallest weights of all layers together), ``structured``
(whole output channels / neurons with the smallest L2 norm, per layer; the output layer is kept) and ``2:4``
(semi-structured: 2 of every 4 consecutive input weights of each Linear row, which Ampere+ GPUs run with
sparse tensor cores through ``torch.sparse.to_sparse_semi_structured``).

When: ``before`` training (at initialisation), ``gradual`` (sparsity rises on a cubic schedule during training,
Zhu & Gupta 2017, updated every ``update_every_steps`` optimizer steps), or ``after`` training followed by
``finetune_steps`` optimizer steps. Pruning uses torch's reparametrisation (``weight = weight_orig * mask``),
so pruned weights stay zero through training and fine-tuning; masks are made permanent (``prune.remove``)
before the model is measured or exported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from harness import hookimpl
from harness.space import Categorical, Float, Int, Technique
from plugins import _model_stats

TECHNIQUE = Technique(
    axis="compression", name="prune",
    space={
        "method": Categorical(("magnitude", "structured", "2:4"), default="magnitude",
                              help="magnitude (global unstructured L1), structured (channels / neurons, L2), "
                                   "2:4 (semi-structured Linear weights, CUDA compute capability >= 8.0)"),
        "sparsity": Float(0.0, 0.99, default=0.5, help="fraction of weights pruned (2:4 is always 0.5)"),
        "when": Categorical(("before", "gradual", "after"), default="after",
                            help="prune at initialisation, gradually during training, or after training"),
        "finetune_steps": Int(0, 1_000_000, default=50, help="optimizer steps of fine-tuning after pruning "
                                                             "(when: after)"),
        "gradual_end_fraction": Float(0.05, 1.0, default=0.75,
                                      help="fraction of training at which gradual pruning reaches its sparsity"),
        "update_every_steps": Int(0, 1_000_000, default=0,
                                  help="gradual: optimizer steps between mask updates (0: 1/20 of training)"),
        **_model_stats.inference_space(),
    },
    incompatible={"parallelism:deepspeed": "pruning masks whole unsharded weight tensors; DeepSpeed shards them",
                  "parallelism:fsdp": "pruning masks whole unsharded weight tensors; FSDP shards them",
                  "precision:fp8": "pruning masks the weights of torch Linear modules; fp8 replaces those modules"},
    description="pruning: global magnitude, structured channels, 2:4 semi-structured; before, gradual, after",
)

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
STATE_KEY = "prune_state"


@dataclass
class PruneState:
    """What a trial's pruning needs between hooks (kept in ``workload.info``)."""

    modules: list[nn.Module]
    method: str
    target_sparsity: float
    sparsity_now: float = 0.0
    steps: int = 0
    started_s: float = field(default_factory=time.perf_counter)
    hook_handle: object = None


# --------------------------------------------------------------------------------------------- masks
def prunable_modules(model: nn.Module, method: str) -> list[nn.Module]:
    """Linear/Conv layers whose weight is not shared with another module (tied embeddings are left alone).

    ``structured`` keeps the last such layer (it produces the outputs: removing its rows removes classes);
    ``2:4`` takes Linear layers whose input width is a multiple of 4.
    """
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    found = [m for m in model.modules() if isinstance(m, PRUNABLE) and owners.get(id(m.weight), 0) == 1]
    if method == "structured":
        found = found[:-1]
    elif method == "2:4":
        found = [m for m in found if isinstance(m, nn.Linear) and m.in_features % 4 == 0]
    return found


def _effective_weight(module: nn.Module) -> torch.Tensor:
    if hasattr(module, "weight_mask"):
        return module.weight_orig.detach() * module.weight_mask
    return module.weight.detach()


def magnitude_masks(modules: list[nn.Module], sparsity: float) -> list[torch.Tensor]:
    """Global unstructured masks zeroing exactly ``round(sparsity * n)`` of all weights (smallest |w|)."""
    weights = [_effective_weight(m) for m in modules]
    scores = torch.cat([w.abs().flatten() for w in weights])
    keep = torch.ones_like(scores)
    n_zero = int(round(sparsity * scores.numel()))
    if n_zero:
        keep[torch.topk(scores, n_zero, largest=False).indices] = 0
    return [k.view_as(w) for k, w in zip(keep.split([w.numel() for w in weights]), weights, strict=True)]


def structured_masks(modules: list[nn.Module], sparsity: float) -> list[torch.Tensor]:
    """Per-layer masks zeroing the ``round(sparsity * out)`` output channels / neurons of smallest L2 norm."""
    masks = []
    for m in modules:
        w = _effective_weight(m)
        norms = w.flatten(1).norm(dim=1)
        keep = torch.ones_like(norms)
        n_zero = int(round(sparsity * len(norms)))
        if n_zero:
            keep[torch.topk(norms, n_zero, largest=False).indices] = 0
        masks.append(keep.view(-1, *([1] * (w.dim() - 1))).expand_as(w).clone())
    return masks


def semi_structured_masks(modules: list[nn.Module]) -> list[torch.Tensor]:
    """2:4 masks: in every group of 4 consecutive input weights of a row, the 2 largest |w| are kept."""
    masks = []
    for m in modules:
        w = _effective_weight(m)
        groups = w.abs().reshape(-1, 4)
        keep = torch.zeros_like(groups)
        keep.scatter_(1, torch.topk(groups, 2, dim=1).indices, 1.0)
        masks.append(keep.view_as(w))
    return masks


def compute_masks(modules: list[nn.Module], method: str, sparsity: float) -> list[torch.Tensor]:
    if method == "magnitude":
        return magnitude_masks(modules, sparsity)
    if method == "structured":
        return structured_masks(modules, sparsity)
    return semi_structured_masks(modules)


def apply_pruning(model: nn.Module, method: str, sparsity: float) -> list[nn.Module]:
    """Prune ``model`` in place (reparametrised: ``weight = weight_orig * weight_mask``); returns the layers.

    One-shot magnitude and structured pruning use torch's own ``global_unstructured`` (L1) and
    ``ln_structured`` (L2 over output channels); 2:4 masks are installed with ``custom_from_mask``.
    """
    modules = prunable_modules(model, method)
    if not modules:
        return modules
    if method == "magnitude":
        torch_prune.global_unstructured([(m, "weight") for m in modules], pruning_method=torch_prune.L1Unstructured,
                                        amount=sparsity)
    elif method == "structured":
        for m in modules:
            torch_prune.ln_structured(m, "weight", amount=sparsity, n=2, dim=0)
    else:
        for m, mask in zip(modules, semi_structured_masks(modules), strict=True):
            torch_prune.custom_from_mask(m, "weight", mask)
    return modules


def update_masks(modules: list[nn.Module], method: str, sparsity: float) -> None:
    """Recompute masks in place (so captured or compiled graphs that read them see the change)."""
    with torch.no_grad():
        for m, mask in zip(modules, compute_masks(modules, method, sparsity), strict=True):
            m.weight_mask.copy_(mask)
            m.weight = m.weight_orig * m.weight_mask  # what the next forward's pre-hook would compute


def make_permanent(modules: list[nn.Module]) -> None:
    """Fold masks into the weights (``prune.remove``): the exported model has plain, zero-filled tensors."""
    for m in modules:
        if torch_prune.is_pruned(m) and hasattr(m, "weight_mask"):
            torch_prune.remove(m, "weight")


def cubic_sparsity(final: float, progress: float) -> float:
    """Zhu & Gupta's schedule: sparsity rises fast early and levels off at ``final`` (progress in [0, 1])."""
    progress = min(max(progress, 0.0), 1.0)
    return final * (1.0 - (1.0 - progress) ** 3)


# --------------------------------------------------------------------------------------------- 2:4 kernels
class SemiStructuredLinear(nn.Module):
    """A Linear layer whose 2:4-sparse weight is stored compressed and multiplied by sparse tensor cores
    (fp16/bf16); inputs are cast to that dtype and outputs back to the caller's."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.dtype = dtype
        self.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach().to(dtype)), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(inputs.to(self.dtype), self.weight, self.bias).to(inputs.dtype)


def to_semi_structured(model: nn.Module, modules: list[nn.Module], dtype: torch.dtype = torch.float16) -> int:
    """Replace the 2:4-pruned Linear layers by :class:`SemiStructuredLinear` where the kernels accept their
    shape; returns how many were converted (the rest stay dense, zeros included)."""
    targets = {id(m) for m in modules}
    converted = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if id(child) in targets:
                try:
                    setattr(parent, child_name, SemiStructuredLinear(child, dtype))
                    converted += 1
                except (RuntimeError, ValueError):  # a shape or dtype the sparse kernels do not take
                    pass
    return converted


# --------------------------------------------------------------------------------------------- hooks
@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_declare_metrics():
    return list(_model_stats.METRICS)


@hookimpl
def harness_check_combination(spec, env):
    p = spec.compression.params
    if p.get("method") == "2:4":
        if spec.device == "cpu" or not env.cuda or (env.compute_capability or (0, 0)) < (8, 0):
            return "compression 'prune' method '2:4' requires a CUDA GPU with compute capability >= 8.0"
        if p.get("when") == "gradual":
            return "compression 'prune' method '2:4' is applied at once (when: before or after), not gradually"
    if p.get("when") == "gradual" and spec.compile.name == "cuda-graph":
        return "compression 'prune' when 'gradual' updates masks between optimizer steps, which a captured " \
               "CUDA graph (compile 'cuda-graph') never returns to"
    return None


@hookimpl
def harness_compress_before_training(model, workload, spec):
    _model_stats.remember_uncompressed_size(model, workload)
    p = spec.compression.params
    if p["when"] == "before":
        modules = apply_pruning(model, p["method"], p["sparsity"])
        workload.info[STATE_KEY] = PruneState(modules, p["method"], p["sparsity"], p["sparsity"])
    elif p["when"] == "gradual":
        modules = prunable_modules(model, p["method"])
        for m in modules:
            torch_prune.identity(m, "weight")  # the reparametrisation, with a mask of ones for now
        workload.info[STATE_KEY] = PruneState(modules, p["method"], p["sparsity"])
    return model


@hookimpl
def harness_trial_start(trial):
    state = trial.workload.info.get(STATE_KEY) if trial.workload is not None else None
    if trial.spec.compression.params["when"] != "gradual" or state is None:
        return
    p, budget = trial.spec.compression.params, trial.spec.budget
    total = trial.total_steps
    every = p["update_every_steps"] or max(1, total // 20 if total else 10)
    end_fraction = p["gradual_end_fraction"]
    state.started_s = time.perf_counter()

    def progress() -> float:
        if total:
            return state.steps / (end_fraction * total)
        return (time.perf_counter() - state.started_s) / (end_fraction * (budget.seconds or 1.0))

    def after_optimizer_step(*_: object) -> None:  # torch passes (optimizer, args, kwargs)
        state.steps += 1
        if state.steps % every == 0 and state.sparsity_now < state.target_sparsity:
            state.sparsity_now = cubic_sparsity(state.target_sparsity, progress())
            update_masks(state.modules, state.method, state.sparsity_now)

    state.hook_handle = trial.optimizer.register_step_post_hook(after_optimizer_step)


@hookimpl
def harness_compress_after_training(model, trainer, workload, spec, device):
    p = spec.compression.params
    state = workload.info.get(STATE_KEY)
    if p["when"] == "after":
        modules = apply_pruning(model, p["method"], p["sparsity"])
        state = workload.info[STATE_KEY] = PruneState(modules, p["method"], p["sparsity"], p["sparsity"])
        if p["finetune_steps"]:
            trainer.train(p["finetune_steps"])
    elif p["when"] == "gradual" and state is not None:
        if state.hook_handle is not None:
            state.hook_handle.remove()
        if state.sparsity_now < state.target_sparsity:  # a short run ends before the schedule does
            update_masks(state.modules, state.method, state.target_sparsity)
            state.sparsity_now = state.target_sparsity
    modules = state.modules if state is not None else []
    make_permanent(modules)
    if p["method"] == "2:4" and device.type == "cuda" and modules:
        workload.info["semi_structured_layers"] = to_semi_structured(model, modules)
        return model
    return model if p["when"] == "after" else None


@hookimpl
def harness_measure_model(model, workload, spec, device):
    out = _model_stats.measure(model, workload, spec, device, sparse=True)
    if "semi_structured_layers" in workload.info:
        out["semi_structured_layers"] = workload.info["semi_structured_layers"]
    return out
