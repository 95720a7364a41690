"""Shared measurements of a (compressed) model for the compression plugins (not a plugin itself): serialised
size, parameter and non-zero counts, inference latency and throughput, compression ratio.

Sizes are those of ``torch.save(model.state_dict())`` into memory, so quantised weights count as the int8
(or packed) tensors they are stored as; for sparse models a second size stores every >= 2-D tensor as CSR
where that is smaller, which is what a sparse export would honestly take. Latency is measured on the
device the model's parameters live on, synchronised, as the median of several timed forward passes.
"""
from __future__ import annotations

import io
import statistics
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from harness.measure import Metric
from harness.space import Int

#: the metrics of :func:`measure` a study file can name as objectives or constraints; every compression plugin
#: that reports them declares them (``harness_declare_metrics``), identically.
METRICS = (
    Metric("model_size", "model_size_bytes", "bytes", "minimize", "serialised size of the trained (compressed) model"),
    Metric("latency", "inference_latency_s", "s", "minimize", "median seconds of one inference batch"),
)

#: the key under which the uncompressed model's serialised size is kept in ``workload.info``.
UNCOMPRESSED_SIZE_KEY = "uncompressed_model_size_bytes"


def inference_space(default_batch: int = 64) -> dict:
    """The search-space entry every compression technique shares: the batch size inference is timed at."""
    return {"inference_batch_size": Int(1, 65536, default=default_batch,
                                        help="batch size at which inference latency and throughput are measured")}


def serialized_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the model as it would be exported.

    A tensor subclass that cannot be pickled (2:4 semi-structured weights) is saved as the plain tensors it
    is made of (``__tensor_flatten__``: packed values and metadata).
    """
    state = model.state_dict()
    buffer = io.BytesIO()
    try:
        torch.save(state, buffer)
    except Exception:
        buffer = io.BytesIO()
        torch.save({k: _flatten(v) for k, v in state.items()}, buffer)
    return buffer.getbuffer().nbytes


def _flatten(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and type(value) not in (torch.Tensor, nn.Parameter) \
            and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return {n: _flatten(getattr(value, n)) for n in names}
    return value


def sparse_serialized_size_bytes(model: nn.Module) -> int:
    """Bytes of the state dict with every plain >= 2-D tensor stored as CSR where that is smaller than dense."""
    packed = {}
    for key, value in model.state_dict().items():
        if _plain(value) and value.dim() >= 2 and value.is_floating_point():
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                csr = value.detach().cpu().reshape(value.shape[0], -1).to_sparse_csr()
            dense_bytes = value.numel() * value.element_size()
            csr_bytes = sum(t.numel() * t.element_size()
                            for t in (csr.values(), csr.col_indices(), csr.crow_indices()))
            packed[key] = csr if csr_bytes < dense_bytes else value
        else:
            packed[key] = _flatten(value)
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    return buffer.getbuffer().nbytes


def _plain(t: Any) -> bool:
    return type(t) in (torch.Tensor, nn.Parameter) and not t.is_quantized and t.layout == torch.strided


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    """Tensors inside a state-dict value (quantised Linear layers store tuples of packed parameters)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _count(t: torch.Tensor) -> tuple[int, int]:
    """(elements, non-zero elements) of a tensor, whatever its storage (quantised, tensor subclass, sparse)."""
    total = t.numel()
    try:
        if t.is_quantized:
            return total, int(torch.count_nonzero(t.int_repr()))
        if t.layout != torch.strided:
            return total, int(torch.count_nonzero(t.to_dense()))
        if type(t) not in (torch.Tensor, nn.Parameter):  # tensor subclasses (torchao): compare dequantised
            dense = t.dequantize() if hasattr(t, "dequantize") else t
            return total, int(torch.count_nonzero(dense.detach()))
        return total, int(torch.count_nonzero(t.detach()))
    except Exception:  # a format that cannot be densified here: count every element as non-zero
        return total, total


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(weights and biases, non-zero ones) over the model's state dict, observers and quantisation scales
    excluded (only floating-point and integer weight tensors of more than one element count)."""
    total = nonzero = 0
    for key, value in model.state_dict().items():
        if key.endswith(("scale", "zero_point")) or "activation_post_process" in key or "fake_quant" in key:
            continue
        for t in _tensors(value):
            if t.numel() <= 1 and not key.endswith("bias"):
                continue
            n, nz = _count(t)
            total, nonzero = total + n, nonzero + nz
    return total, nonzero


def model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def example_batch(workload, batch_size: int, device: torch.device) -> torch.Tensor:
    """``batch_size`` held-out inputs (repeated when the test set is smaller), on ``device``."""
    inputs = next(iter(workload.test.eval_batches(batch_size)))[0]
    if len(inputs) < batch_size:
        inputs = inputs.repeat((batch_size + len(inputs) - 1) // len(inputs), *([1] * (inputs.dim() - 1)))
    return inputs[:batch_size].to(device)


@torch.no_grad()
def inference_latency_s(model: nn.Module, inputs: torch.Tensor, repeats: int = 10, warmup: int = 3) -> float:
    """Median seconds of one forward pass on ``inputs`` (synchronised on CUDA, eval mode, no grad)."""
    was_training = model.training
    model.eval()
    cuda = inputs.device.type == "cuda"
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize(inputs.device)
        t0 = time.perf_counter()
        model(inputs)
        if cuda:
            torch.cuda.synchronize(inputs.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    model.train(was_training)
    return statistics.median(times)


def remember_uncompressed_size(model: nn.Module, workload) -> None:
    """Record the uncompressed model's serialised size once (the reference of ``compression_ratio``)."""
    workload.info.setdefault(UNCOMPRESSED_SIZE_KEY, serialized_size_bytes(model))


def measure(model: nn.Module, workload, spec, device: torch.device, sparse: bool = False) -> dict[str, float]:
    """The metrics every compression trial reports (names carry their units)."""
    size = serialized_size_bytes(model)
    params, nonzero = parameter_counts(model)
    out: dict[str, float] = {"model_size_bytes": size, "parameter_count": params, "nonzero_parameter_count": nonzero,
                             "sparsity": 1.0 - nonzero / params if params else 0.0}
    if sparse:
        out["model_size_sparse_bytes"] = sparse_serialized_size_bytes(model)
    reference = workload.info.get(UNCOMPRESSED_SIZE_KEY)
    if reference:
        out["uncompressed_model_size_bytes"] = reference
        out["compression_ratio"] = reference / min(size, out.get("model_size_sparse_bytes", size))
    batch = int(spec.compression.params.get("inference_batch_size", 64))
    run_on = model_device(model)
    inputs = example_batch(workload, batch, run_on if run_on.type != "meta" else device)
    latency = inference_latency_s(model, inputs)
    out.update(inference_batch_size=batch, inference_latency_s=latency,
               inference_throughput_samples_per_s=batch / latency,
               inference_on_cpu=float(inputs.device.type == "cpu"))
    return out


class OnDevice(nn.Module):
    """Runs ``module`` where it lives (CPU for int8 kernels) and returns outputs on the caller's device, so a
    CPU-only quantised model can still be evaluated by a trial whose data sit on a GPU."""

    def __init__(self, module: nn.Module, device: torch.device):
        super().__init__()
        self.module, self.run_device = module, torch.device(device)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.module(inputs.to(self.run_device))
        return out.to(inputs.device)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)
