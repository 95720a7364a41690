"""Workload ``gpt``: a decoder-only transformer (GPT-2 style: pre-LayerNorm, GELU MLP of 4x width, tied input
and output embeddings, causal ``scaled_dot_product_attention``) trained on bytes of a local text corpus.

The default corpus is the Python standard library's own ``.py`` files: real text that is present wherever
Python is, read in sorted path order (deterministic) up to ``corpus_bytes``. ``corpus`` names a file or a
directory (every file under it, sorted) to use instead. The last 5% of the token stream is the held-out split
and is never trained on.

Tokens are bytes (ids < 256). ``vocab_size`` may be larger: the ``124M`` preset uses GPT-2's 50,304 so that its
embedding and output-layer compute match GPT-2-124M, with the ids above 255 simply never occurring.

Kernel choices (:mod:`plugins._gpt_kernels`): ``attention`` forces one backend of ``scaled_dot_product_attention``
(flash, cudnn, efficient, math; ``auto`` lets torch pick), and ``kernels: liger`` swaps in Liger's LayerNorm and
fused linear cross-entropy (``liger-flce``: the latter only), with which the model returns hidden states and the
workload's loss applies the tied output layer, never materialising the logits. A backend or kernel this machine
cannot run is refused before launch where the machine decides it, and otherwise fails the trial as infeasible in
one line when the trial starts (the head size and compute dtype decide it).
"""
from __future__ import annotations

import functools
import math
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from harness import hookimpl
from harness.errors import SpecError, TrialFailed
from harness.space import Categorical, Int, Requirements
from harness.workload import Text, TokenSource, Workload, WorkloadInfo, accuracy_count, cross_entropy
from plugins import _gpt_kernels

NAME = "gpt"
#: a language model (its loss, the default cross-entropy, takes the soft targets of label smoothing).
KINDS = ("lm", "transformer")
HELD_OUT_FRACTION = 0.05

#: size presets: layers, model width, heads, sequence length, vocabulary.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=2, seq_len=64, vocab_size=256),
    "small": dict(n_layer=6, n_embd=384, n_head=6, seq_len=256, vocab_size=256),
    "124M": dict(n_layer=12, n_embd=768, n_head=12, seq_len=1024, vocab_size=50304),
    "350M": dict(n_layer=24, n_embd=1024, n_head=16, seq_len=1024, vocab_size=50304),
    "1B": dict(n_layer=24, n_embd=2048, n_head=16, seq_len=1024, vocab_size=50304),
}
SIZE_KEYS = ("n_layer", "n_embd", "n_head", "seq_len", "vocab_size")


# ------------------------------------------------------------------------------------------------ model
class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, attention: str = "auto", kernels: str = "native"):
        super().__init__()
        self.n_head = n_head
        self.backend = _gpt_kernels.ATTENTION[attention]
        norm = _gpt_kernels.layer_norm(kernels)
        self.ln_1 = norm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = norm(n_embd)
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.fc_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = _gpt_kernels.attention(q, k, v, self.backend)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """Token + learned position embeddings, ``n_layer`` blocks, final LayerNorm, output layer tied to the token
    embedding. ``forward(ids)`` returns logits of shape (batch, seq, vocab), or with a fused head (``kernels``
    other than ``native``) the final hidden states (batch, seq, n_embd), to which the loss applies ``lm_head``."""

    def __init__(self, n_layer: int, n_embd: int, n_head: int, seq_len: int, vocab_size: int,
                 attention: str = "auto", kernels: str = "native"):
        super().__init__()
        if n_embd % n_head:
            raise SpecError(f"workload.n_embd: {n_embd} is not divisible by n_head {n_head}")
        self.seq_len = seq_len
        self.fused_head = _gpt_kernels.fused_head(kernels)
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(seq_len, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, attention, kernels) for _ in range(n_layer))
        self.ln_f = _gpt_kernels.layer_norm(kernels)(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("proj.weight", "fc_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return x if self.fused_head else self.lm_head(x)


def non_embedding_params(n_layer: int, n_embd: int) -> int:
    """Parameters of the blocks and the final LayerNorm (what the 6*N*T rule counts)."""
    per_block = (3 * n_embd * n_embd + 3 * n_embd) + (n_embd * n_embd + n_embd) + 2 * (4 * n_embd * n_embd) \
        + 4 * n_embd + n_embd + 2 * 2 * n_embd
    return n_layer * per_block + 2 * n_embd


def training_flops_per_sample(n_layer: int, n_embd: int, seq_len: int, vocab_size: int, **_: Any) -> float:
    """Forward + backward FLOPs of one window of ``seq_len`` tokens (the PaLM appendix-B count):

    ``6 N T`` for the non-embedding parameters N, ``12 L d T^2`` for the attention scores and weighted sums
    (full, not causally halved, as PaLM counts them) and ``6 d V T`` for the tied output layer's matmul.
    """
    t = seq_len
    return (6.0 * non_embedding_params(n_layer, n_embd) * t + 12.0 * n_layer * n_embd * t * t
            + 6.0 * n_embd * vocab_size * t)


# ------------------------------------------------------------------------------------------------ corpus
def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files (not site-packages), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def corpus_files(corpus: str | None) -> list[Path]:
    if corpus is None:
        return stdlib_files()
    path = Path(corpus).expanduser()
    if path.is_file():
        return [path]
    return sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())


@functools.lru_cache(maxsize=2)
def read_corpus(corpus: str | None, max_bytes: int) -> bytes:
    """The corpus's bytes: its files concatenated in sorted order, cut at ``max_bytes`` (cached per process:
    benchmarks and tests build the same workload many times)."""
    chunks, total = [], 0
    for path in corpus_files(corpus):
        try:
            data = path.read_bytes()
        except OSError:  # an unreadable file is skipped, not fatal
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def split_tokens(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte ids (int64) split into train and held-out: the held-out part is the stream's last 5%."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(tokens) * (1 - HELD_OUT_FRACTION))
    return tokens[:cut], tokens[cut:]


def validate_params(params: Mapping[str, Any]) -> None:
    """Check the corpus path and the model shape before launch (what the attention backends and kernels need from
    the machine is declared with their parameters)."""
    corpus = params.get("corpus")
    if corpus is not None:
        path = Path(corpus).expanduser()
        if not path.exists():
            raise SpecError(f"workload.corpus: {corpus!r} does not exist (give a text file or a directory; "
                            f"leave it unset for the Python standard library's sources)")
        if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
            raise SpecError(f"workload.corpus: directory {corpus!r} holds no files")
    size = resolve_size(params)
    if size["n_embd"] % size["n_head"]:
        raise SpecError(f"workload.n_head: {size['n_head']} does not divide n_embd {size['n_embd']} "
                        f"(size {params.get('size', 'tiny')!r})")
    if size["vocab_size"] < 256:
        raise SpecError(f"workload.vocab_size: {size['vocab_size']} is below 256 (tokens are bytes)")


def resolve_size(params: Mapping[str, Any]) -> dict[str, int]:
    """The preset named by ``size`` with any individually given ``n_layer`` .. ``vocab_size`` overriding it."""
    size = dict(PRESETS[params.get("size") or "tiny"])
    size.update({k: params[k] for k in SIZE_KEYS if params.get(k) is not None})
    return size


def build(device, seed, size="tiny", corpus=None, corpus_bytes=4_000_000, n_layer=None, n_embd=None, n_head=None,  # noqa: ARG001 (device: the builder protocol's; the trial moves the data)
          seq_len=None, vocab_size=None, attention="auto", kernels="native"):
    shape = resolve_size({"size": size, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head,
                          "seq_len": seq_len, "vocab_size": vocab_size})
    data = read_corpus(corpus, corpus_bytes)
    train_tokens, test_tokens = split_tokens(data)
    t = shape["seq_len"]
    if len(test_tokens) < t + 2:
        raise SpecError(f"workload.corpus: {len(data)} bytes is too little text for seq_len {t} "
                        f"(the held-out 5% needs at least {t + 2} bytes)")
    torch.manual_seed(seed)
    student = {**shape, "n_layer": max(1, shape["n_layer"] // 2), "n_embd": shape["n_embd"] // 2,
               "n_head": max(1, shape["n_head"] // 2)}
    model = GPT(**shape, attention=attention, kernels=kernels)
    head = _gpt_kernels.FusedHead(model) if model.fused_head else None
    return Workload(name=NAME, model=model, train=TokenSource(train_tokens, t),
                    test=TokenSource(test_tokens, t), kinds=KINDS, tokens_per_sample=t,
                    loss=head.loss if head else cross_entropy, correct=head.correct if head else accuracy_count,
                    flops_per_sample=training_flops_per_sample(**shape), input_shape=(t,),
                    make_student=lambda: GPT(**student, attention=attention, kernels=kernels),
                    info={"corpus": corpus or "python-stdlib", "corpus_bytes": len(data), **shape,
                          "attention": attention, "kernels": kernels})


@hookimpl
def harness_declare_workloads():
    return [WorkloadInfo(
        name=NAME, build=build, kinds=KINDS, validate=validate_params,
        params={"size": Categorical(tuple(PRESETS), default="tiny", help="size preset"),
                "corpus": Text(help="text file or directory to train on (unset: the Python standard library)"),
                "corpus_bytes": Int(10_000, 2_000_000_000, default=4_000_000, help="bytes of corpus read"),
                "n_layer": Int(1, 256, help="transformer blocks (overrides the preset)"),
                "n_embd": Int(8, 16384, help="model width (overrides the preset)"),
                "n_head": Int(1, 256, help="attention heads (overrides the preset)"),
                "seq_len": Int(8, 32768, help="tokens per sample (overrides the preset)"),
                "vocab_size": Int(256, 262144, help="embedding rows; ids are bytes < 256 (overrides the preset)"),
                "attention": Categorical(tuple(_gpt_kernels.ATTENTION), default="auto",
                                         help="scaled_dot_product_attention backend (auto: torch picks per call)",
                                         requires={a: Requirements(cuda=True) for a in _gpt_kernels.ATTENTION
                                                   if a not in _gpt_kernels.CPU_ATTENTION}),
                "kernels": Categorical(_gpt_kernels.KERNELS, default="native",
                                       help="liger: Liger's LayerNorm + fused linear cross-entropy (no logits "
                                            "tensor), liger-flce: the latter only; CUDA + liger-kernel",
                                       requires={k: Requirements(cuda=True, packages=("liger_kernel", "triton"))
                                                 for k in _gpt_kernels.KERNELS if _gpt_kernels.fused_head(k)})},
        description="decoder-only transformer on bytes of a local corpus (default: Python stdlib sources)",
    )]


@hookimpl
def harness_check_combination(spec):
    """What the kernels cannot be combined with, before launch (the driver and the worker's first check)."""
    p = spec.workload_params
    kernels = p.get("kernels") or "native"
    if _gpt_kernels.fused_head(kernels):
        if spec.compression.name == "distill":
            return (f"workload.kernels: {kernels!r} makes the model return hidden states for its fused loss, and "
                    f"compression 'distill' compares teacher and student logits (use kernels: native)")
        if spec.compile.name == "cuda-graph":
            return (f"workload.kernels: {kernels!r}: Liger's fused cross-entropy reads a count back to the host "
                    f"every step, which CUDA graph capture forbids (use torch-compile)")
        if spec.parallelism.name == "deepspeed" and spec.parallelism.params.get("stage") == 3:
            return (f"workload.kernels: {kernels!r}: the fused loss reads the output layer's weight after the "
                    f"forward pass, where ZeRO-3 has partitioned it again (use stage 0-2, fsdp or kernels: native)")
    return None


@hookimpl
def harness_trial_start(trial):
    """Probe the forced attention backend once with the model's head size and the trial's compute dtype: one that
    cannot run them fails the trial as infeasible in one line, naming those that can, before its first step."""
    info = trial.workload.info
    dtype = _gpt_kernels.probe_dtype(trial.precision.compute_dtype)
    reason = _gpt_kernels.attention_unavailable(info["attention"], trial.device, dtype, info["n_head"],
                                                info["n_embd"] // info["n_head"], info["seq_len"])
    if reason:
        raise TrialFailed("infeasible", reason)

