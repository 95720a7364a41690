"""Kernel choices of the ``gpt`` workload: the attention backend of ``scaled_dot_product_attention`` and Liger's
fused kernels (``liger-kernel``): its LayerNorm, and its fused linear cross-entropy, which applies the tied output
layer chunk by chunk inside the loss so that the (tokens x vocabulary) logits are never materialised.

With a fused head the model returns its final hidden states; :class:`FusedHead` is the workload's ``loss`` and
``correct``, which apply the output layer. Evaluation (no gradients) computes the same cross-entropy with torch
in chunks of tokens, so held-out figures mean the same whatever the kernels.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harness.workload import SoftTargets, Targets

#: ``attention`` values -> the SDPA backend they force (``auto``: torch picks per call).
ATTENTION: dict[str, SDPBackend | None] = {
    "auto": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH,
}
#: backends torch has on the CPU (flash has a CPU kernel; efficient and cudnn are CUDA only).
CPU_ATTENTION = ("auto", "math", "flash")
#: ``kernels`` values: ``liger`` fuses LayerNorms and the head + loss, ``liger-flce`` only the head + loss (torch's
#: LayerNorms, which torch.compile fuses with their neighbours; Liger's LayerNorm is a graph break there).
KERNELS = ("native", "liger", "liger-flce")
#: tokens per chunk of the output layer in evaluation (0.8 GB of fp32 logits at GPT-2's vocabulary).
EVAL_CHUNK = 4096
#: chunks of Liger's fused linear cross-entropy per step: fewer, larger matmuls than its default (transient logits
#: of tokens x hidden elements: 256-token matmuls for GPT-2 124M at batch 16), at 1/8 of the full logits' memory.
FLCE_CHUNKS = 8


def fused_head(kernels: str) -> bool:
    """Whether the model returns hidden states and the loss applies the output layer (Liger's FLCE)."""
    return kernels != "native"


# ------------------------------------------------------------------------------------------------ attention
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: SDPBackend | None) -> torch.Tensor:
    """Causal ``scaled_dot_product_attention`` on ``backend`` (None: torch's choice); compiles without a break."""
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _runs(backend: SDPBackend | None, q: torch.Tensor) -> str | None:
    """None when ``backend`` runs forward and backward on ``q``-shaped inputs, else torch's reasons (one line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # torch says why a backend does not fit as warnings, then raises
        try:
            attention(q, q, q, backend).sum().backward()
            return None
        except RuntimeError as exc:
            reasons = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
            return "; ".join(dict.fromkeys(reasons)) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def attention_unavailable(name: str, device: torch.device, dtype: torch.dtype, n_head: int, head_dim: int,
                          seq_len: int) -> str | None:
    """Why attention backend ``name`` cannot run the model's attention (its head size, sequence length and the
    trial's compute dtype) on ``device``, naming the backends that can; None when it can (a probe, run once)."""
    backend = ATTENTION[name]
    if backend is None:
        return None
    q = torch.randn(1, n_head, seq_len, head_dim, device=device, dtype=dtype, requires_grad=True)
    why = _runs(backend, q)
    if why is None:
        return None
    usable = [n for n, b in ATTENTION.items() if b is not None and _runs(b, q) is None]
    where = (f"{torch.cuda.get_device_name(device)} sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
             if device.type == "cuda" else "the CPU")
    return (f"workload.attention: {name!r} cannot run here: {why} (on {where}, {str(dtype).removeprefix('torch.')} "
            f"inputs, head size {head_dim}); this trial could use: {', '.join(['auto', *usable])}")


def probe_dtype(compute_dtype: object) -> torch.dtype:
    """The dtype attention's inputs have under a precision's ``compute_dtype`` (fp8 trials attend in bf16)."""
    if compute_dtype in (torch.bfloat16, torch.float16):
        return compute_dtype  # type: ignore[return-value]
    return torch.bfloat16 if compute_dtype == "fp8" else torch.float32


# ------------------------------------------------------------------------------------------------ Liger
def layer_norm(kernels: str) -> Callable[[int], nn.Module]:
    """The LayerNorm class for ``kernels``: torch's, or Liger's (same parameters, ``weight`` ones, ``bias`` zeros,
    torch's epsilon)."""
    if kernels != "liger":
        return nn.LayerNorm
    from liger_kernel.transformers import LigerLayerNorm

    return lambda width: LigerLayerNorm(width, eps=1e-5)


def _liger_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, smoothing: float,
                               reduction: str) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    budget = max(1, -(-weight.shape[0] // (FLCE_CHUNKS * weight.shape[1])))  # logits of 1/FLCE_CHUNKS of the tokens
    return liger_fused_linear_cross_entropy(hidden, weight, index, label_smoothing=smoothing, reduction=reduction,
                                            chunk_mem_const=budget)


def _chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, smoothing: float,
                           reduction: str) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``index``, EVAL_CHUNK tokens of logits at a time."""
    losses = torch.cat([F.cross_entropy(F.linear(h.to(weight.dtype), weight).float(), y, reduction="none",
                                        label_smoothing=smoothing)
                        for h, y in zip(hidden.split(EVAL_CHUNK), index.split(EVAL_CHUNK), strict=True)])
    return losses.mean() if reduction == "mean" else losses


class FusedHead:
    """The workload's ``loss`` and ``correct`` when the model returns hidden states: the output layer (the
    model's tied ``lm_head.weight``, read at each call) applied inside them. Training (gradients on) uses Liger's
    fused linear cross-entropy; evaluation uses torch, chunk by chunk."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # Liger's kernels are Triton launches around a host sync: they run as they are, outside any compiled graph.
        # Wrapped here, in the trial, not by a decorator: that would import torch._dynamo wherever the plugin loads,
        # and the import sets TORCHINDUCTOR_CACHE_DIR in the driver, which then takes it for the user's setting and
        # drops the study's shared compile cache.
        self._fused_ce = torch.compiler.disable(_liger_cross_entropy)

    def loss(self, hidden: torch.Tensor, targets: Targets) -> torch.Tensor:
        """Mean cross-entropy against class indices or :class:`SoftTargets` (label smoothing goes to the kernel's
        ``label_smoothing``; a mixed target is ``lam * CE(a) + (1 - lam) * CE(b)``, as cross-entropy is linear)."""
        weight, hidden = self.model.lm_head.weight, hidden.reshape(-1, hidden.shape[-1])
        ce = self._fused_ce if torch.is_grad_enabled() and hidden.requires_grad else _chunked_cross_entropy
        if not isinstance(targets, SoftTargets):
            return ce(hidden, weight, targets.flatten(), 0.0, "mean")
        return targets.mix(lambda index, reduction: ce(hidden, weight, index, targets.smoothing, reduction))

    @torch.no_grad()
    def correct(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Number of positions whose arg-max next token is the target, EVAL_CHUNK tokens of logits at a time."""
        weight, hidden, targets = self.model.lm_head.weight, hidden.reshape(-1, hidden.shape[-1]), targets.flatten()
        hits = [(F.linear(h.to(weight.dtype), weight).argmax(-1) == y).sum()
                for h, y in zip(hidden.split(EVAL_CHUNK), targets.split(EVAL_CHUNK), strict=True)]
        return torch.stack(hits).sum()
