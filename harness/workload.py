"""What a workload plugin hands the trial runner: a model, its data, a loss and a metric.

Data sources keep the whole (small) data set as tensors on the trial's device and draw batches by index, so
the training loop never waits on a host-side loader and never forces a device synchronisation.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from harness.errors import SpecError
from harness.space import Param


@dataclass(frozen=True)
class SoftTargets:
    """Training targets that are a distribution over the classes instead of one class, as data techniques
    (Mixup, CutMix, label smoothing) hand them to the loss::

        lam * smooth(onehot(a)) + (1 - lam) * smooth(onehot(b)),   smooth(p) = (1 - smoothing) * p + smoothing / classes

    and ``smooth(onehot(a))`` alone when ``b`` is None. ``a`` and ``b`` are class indices shaped like the batch's
    targets (``(batch,)``; ``(batch, seq)`` for a language model); ``lam`` is a 0-d or per-sample ``(batch,)``
    float tensor on their device, never a Python float, so that a compiled step does not recompile per batch.
    It is a pytree node (children ``a``, ``b``, ``lam``; ``smoothing`` is static), which torch.compile and
    CUDA-graph static copies handle, and it splits into micro-batches with :meth:`chunk` like a tensor.
    """

    a: torch.Tensor
    b: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    smoothing: float = 0.0

    def _lam_like(self, like: torch.Tensor) -> torch.Tensor:
        """``lam`` shaped to broadcast against ``like``, whose leading dimension is the batch's."""
        assert self.lam is not None
        return self.lam.reshape(self.lam.shape + (1,) * (like.dim() - self.lam.dim()))

    def dense(self, classes: int) -> torch.Tensor:
        """The target distribution as a float tensor of shape ``a.shape + (classes,)``; each row sums to 1."""
        def smooth(index: torch.Tensor) -> torch.Tensor:
            return nn.functional.one_hot(index, classes).float() * (1.0 - self.smoothing) + self.smoothing / classes

        dense = smooth(self.a)
        if self.b is None:
            return dense
        lam = self._lam_like(dense)
        return lam * dense + (1.0 - lam) * smooth(self.b)

    def chunk(self, chunks: int) -> tuple[SoftTargets, ...]:
        """Split along the batch dimension as ``Tensor.chunk`` does (gradient accumulation's micro-batches)."""
        a_parts = self.a.chunk(chunks)
        b_parts = self.b.chunk(chunks) if self.b is not None else (None,) * len(a_parts)
        lam_parts = self.lam.chunk(chunks) if self.lam is not None and self.lam.dim() else (self.lam,) * len(a_parts)
        return tuple(SoftTargets(a, b, lam, self.smoothing)
                     for a, b, lam in zip(a_parts, b_parts, lam_parts, strict=True))

    def flatten(self) -> SoftTargets:
        """Every position's target as one batch: ``(batch, seq)`` -> ``(batch * seq,)`` (a per-sample ``lam``
        repeated over the sequence)."""
        lam = self.lam
        if lam is not None and lam.dim():
            lam = self._lam_like(self.a).expand_as(self.a).flatten()
        return SoftTargets(self.a.flatten(), None if self.b is None else self.b.flatten(), lam, self.smoothing)

    def cross_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``logits`` (``a.shape + (classes,)``) against the distribution, without building
        it (no ``tokens x vocabulary`` matrix for a language model): see :meth:`mix`."""
        logits = logits.reshape(-1, logits.shape[-1])
        return self.mix(lambda index, reduction: nn.functional.cross_entropy(
            logits, index, reduction=reduction, label_smoothing=self.smoothing))

    def mix(self, ce: Callable[[torch.Tensor, str], torch.Tensor]) -> torch.Tensor:
        """The mean loss against the distribution from ``ce(index, reduction)``, a cross-entropy against class
        indices (flattened, see :meth:`flatten`) that applies ``smoothing`` itself: cross-entropy is linear in the
        target, so it is ``lam * ce(a) + (1 - lam) * ce(b)`` (``ce(a)`` without ``b``). A fused kernel computing
        the loss another way (e.g. from hidden states) uses this too."""
        t = self.flatten()
        if t.b is None:
            return ce(t.a, "mean")
        assert t.lam is not None, "SoftTargets: b without lam"
        if t.lam.dim() == 0:
            return t.lam * ce(t.a, "mean") + (1.0 - t.lam) * ce(t.b, "mean")
        return (t.lam * ce(t.a, "none") + (1.0 - t.lam) * ce(t.b, "none")).mean()


def _soft_targets_children(t: SoftTargets) -> tuple[list[Any], float]:
    return [t.a, t.b, t.lam], t.smoothing


def _soft_targets_with_keys(t: SoftTargets) -> tuple[list[tuple[Any, Any]], float]:
    return [(pytree.GetAttrKey(k), getattr(t, k)) for k in ("a", "b", "lam")], t.smoothing


def _soft_targets(children: Iterable[Any], smoothing: float) -> SoftTargets:
    a, b, lam = children
    return SoftTargets(a, b, lam, smoothing)


pytree.register_pytree_node(SoftTargets, _soft_targets_children, _soft_targets,
                            serialized_type_name="harness.workload.SoftTargets",
                            flatten_with_keys_fn=_soft_targets_with_keys)

#: what a training batch's targets are: class indices (a tensor), or soft targets after a data technique.
Targets = torch.Tensor | SoftTargets
Batch = tuple[torch.Tensor, torch.Tensor]
#: a training batch as the train step receives it (after the trial's data technique).
TrainBatch = tuple[torch.Tensor, Targets]


def cross_entropy(outputs: torch.Tensor, targets: Targets) -> torch.Tensor:
    """The default loss of a workload: mean cross-entropy against class indices or :class:`SoftTargets`."""
    if isinstance(targets, SoftTargets):
        return targets.cross_entropy(outputs)
    return nn.functional.cross_entropy(outputs, targets)


@dataclass(frozen=True)
class Text:
    """A free-form string workload parameter (a path, a file name); ``None`` is its "not given" value.

    Workload parameters are never searched by Optuna as strings, so this has no distribution of its own; a
    study file may still list several values (a categorical choice).
    """

    default: str | None = None
    help: str = ""

    def validate(self, where: str, value: Any) -> str | None:
        if value is not None and not isinstance(value, str):
            raise SpecError(f"{where}: expected a string, got {value!r}")
        return value

    def describe(self) -> str:
        return "string"


@dataclass(frozen=True)
class WorkloadInfo:
    """A workload's declaration: its name, parameters, kinds and its builder.

    Kinds are what techniques' requirements name: ``mlp``, ``conv``, ``transformer`` (the model); ``image``
    (inputs are ``(batch, channels, height, width)`` float images); ``classification`` (float inputs, class-index
    targets, a loss that takes :class:`SoftTargets`); ``lm`` (token inputs, next-token targets, a loss that
    takes :class:`SoftTargets`).

    ``build(device=..., seed=..., **params)`` returns a :class:`Workload`.

    ``validate(params)``, when given, is called with the complete, type-checked parameters wherever a trial is
    validated (``harness run``, study files), before anything is launched; it raises
    :class:`harness.errors.SpecError` for values that only the workload can judge (a data directory that does
    not exist), so such mistakes are reported in one line with exit status 2 rather than as a crashed trial.
    """

    name: str
    build: Callable[..., Workload]
    params: Mapping[str, Param | Text] = field(default_factory=dict)
    kinds: tuple[str, ...] = ()
    description: str = ""
    plugin: str = ""
    validate: Callable[[Mapping[str, Any]], None] | None = None
    #: the default workload (what a trial or study that names none runs); its plugin cannot be disabled.
    default: bool = False


class TensorSource:
    """Supervised examples held as two tensors; batches are drawn by a shuffled permutation per epoch.

    ``rank`` / ``world`` give each process its own disjoint share of every global batch.
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        assert len(inputs) == len(targets)
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def to(self, device: torch.device | str) -> TensorSource:
        return type(self)(self.inputs.to(device), self.targets.to(device))

    def train_batches(self, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        n, device = len(self.inputs), self.inputs.device
        per_rank = batch_size // world
        gen = torch.Generator(device="cpu").manual_seed(seed)
        steps_per_epoch = max(1, n // batch_size)
        while True:
            # The permutation is made on the CPU (same for every rank) and moved once per epoch, from pinned
            # memory so that the copy does not wait for the device to drain its queue.
            perm = torch.randperm(n, generator=gen)
            perm = (perm.pin_memory() if device.type == "cuda" else perm).to(device, non_blocking=True)
            for i in range(steps_per_epoch):
                start = i * batch_size + rank * per_rank
                if start + per_rank > n:  # a data set smaller than one batch: wrap around
                    idx = perm[torch.arange(start, start + per_rank, device=device) % n]
                else:
                    idx = perm[start:start + per_rank]
                yield self.inputs[idx], self.targets[idx]

    def eval_batches(self, batch_size: int, limit: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        n = len(self.inputs) if not limit else min(limit, len(self.inputs))
        for start in range(rank * batch_size, n, batch_size * world):
            stop = min(start + batch_size, n)
            yield self.inputs[start:stop], self.targets[start:stop]


class TokenSource:
    """A language-model corpus as one long token tensor; a sample is a window of ``seq_len`` tokens and its
    targets are the same window shifted by one."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self._offsets = torch.arange(seq_len + 1, device=tokens.device)

    def __len__(self) -> int:
        return max(1, (len(self.tokens) - 1) // self.seq_len)

    def to(self, device: torch.device | str) -> TokenSource:
        return type(self)(self.tokens.to(device), self.seq_len)

    def _windows(self, starts: torch.Tensor) -> Batch:
        chunk = self.tokens[starts[:, None] + self._offsets]
        return chunk[:, :-1], chunk[:, 1:]

    def train_batches(self, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        per_rank = batch_size // world
        high = len(self.tokens) - self.seq_len - 1
        gen = torch.Generator(device="cpu").manual_seed(seed)
        device = self.tokens.device
        while True:
            # One block of random start offsets per 256 steps, generated on the CPU and moved in one copy.
            block = torch.randint(0, high, (256, batch_size), generator=gen)
            block = (block.pin_memory() if device.type == "cuda" else block).to(device, non_blocking=True)
            for row in block:
                yield self._windows(row[rank * per_rank:(rank + 1) * per_rank])

    def eval_batches(self, batch_size: int, limit: int = 0, rank: int = 0, world: int = 1) -> Iterator[Batch]:
        n = len(self) if not limit else min(limit, len(self))
        starts = torch.arange(0, n * self.seq_len, self.seq_len, device=self.tokens.device)
        for i in range(rank * batch_size, n, batch_size * world):
            yield self._windows(starts[i:i + batch_size])


def accuracy_count(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of correct arg-max predictions (flattening a sequence dimension when present)."""
    return (outputs.argmax(-1) == targets).sum()


@dataclass
class Workload:
    """A built workload: everything the trial runner needs besides the techniques.

    ``loss(outputs, targets)`` returns the mean training loss; a workload of kind ``classification`` or ``lm``
    promises that its loss also takes :class:`SoftTargets` (the default, :func:`cross_entropy`, does), which the
    data techniques require. ``correct(outputs, targets)`` returns the number of correct predictions (accuracy =
    correct / ``targets.numel()``). ``flops_per_sample`` is the training FLOPs (forward + backward) of one
    sample, when known analytically; otherwise the runner counts them.
    ``make_student()`` returns the smaller model that distillation trains in place of ``model``.
    """

    name: str
    model: nn.Module
    train: Any
    test: Any
    loss: Callable[[torch.Tensor, Targets], torch.Tensor] = cross_entropy
    correct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = accuracy_count
    kinds: tuple[str, ...] = ()
    #: samples are images (1 sample) or token windows (``tokens_per_sample`` tokens each).
    tokens_per_sample: int = 0
    flops_per_sample: float | None = None
    make_student: Callable[[], nn.Module] | None = None
    #: the shape of one input sample, for conformance checks and example inputs.
    input_shape: tuple[int, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    def loss_of(self, outputs: torch.Tensor, targets: Targets) -> torch.Tensor:
        """The workload's loss of ``outputs`` against class indices or :class:`SoftTargets`."""
        if outputs.dim() == 3:  # (batch, seq, vocab) language-model logits
            return self.loss(outputs.flatten(0, 1), targets.flatten())
        return self.loss(outputs, targets)
