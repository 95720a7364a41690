"""Compression ``quantize``: store (and compute with) 8-bit integer weights.

Methods:

- ``dynamic-int8``: post-training dynamic quantisation of every Linear layer (int8 weights, activations
  quantised on the fly) with ``torch.ao.quantization.quantize_dynamic``. Its kernels are CPU kernels (fbgemm /
  x86 / qnnpack), so on a GPU trial the quantised model is evaluated and timed on the CPU, and says so
  (``inference_on_cpu``).
- ``int8-weight-only``: post-training int8 weight-only quantisation with torchao
  (``quantize_(model, Int8WeightOnlyConfig())``) on the trial's device, activations in ``inference_dtype``;
  infeasible unless torchao is installed.
- ``qat``: quantisation-aware training: every Linear layer is wrapped with fake quantisation of its inputs,
  weights and outputs (``torch.ao.quantization.prepare_qat``) before training, and converted to a real int8
  (static, CPU) model after it.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import torch
from torch import nn

from harness import hookimpl
from harness.space import Categorical, Technique, package_available
from plugins import _model_stats

TECHNIQUE = Technique(
    axis="compression", name="quantize",
    space={
        "method": Categorical(("dynamic-int8", "int8-weight-only", "qat"), default="dynamic-int8",
                              help="dynamic-int8 (post-training, CPU kernels), int8-weight-only (torchao), "
                                   "qat (fake-quant during training, int8 after)"),
        "inference_dtype": Categorical(("auto", "float32", "bfloat16", "float16"), default="auto",
                                       help="int8-weight-only: activation dtype (auto: bfloat16 on CUDA, "
                                            "float32 on the CPU)"),
        **_model_stats.inference_space(),
    },
    incompatible={"parallelism:deepspeed": "quantisation rewrites whole unsharded torch Linear modules; DeepSpeed "
                                           "shards them",
                  "parallelism:fsdp": "quantisation rewrites whole unsharded torch Linear modules; FSDP shards them",
                  "precision:fp8": "quantisation rewrites torch Linear modules; fp8 replaces them with float8 ones"},
    description="int8 quantisation: post-training dynamic (CPU), weight-only (torchao), quantisation-aware training",
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def _quiet():
    """torch.ao.quantization warns on every call that it is deprecated in favour of torchao; once is enough."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(quantize_per_tensor|reduce_range|quant_min).*")
        yield


def _engine_qconfig_backend() -> str:
    engine = torch.backends.quantized.engine
    return engine if engine in ("x86", "fbgemm", "qnnpack", "onednn") else "x86"


class NoFastPath(nn.Module):
    """Runs ``module`` with torch's fused Transformer inference path (``torch.backends.mha``) switched off.

    That path reads the float ``weight`` tensors of an ``nn.TransformerEncoderLayer``'s Linear layers, which
    quantised layers replace (``weight`` becomes a method), so a quantised Transformer crashes in it; the
    layer-by-layer path computes the same outputs.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.module(*args, **kwargs)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)


def without_fast_path(model: nn.Module) -> nn.Module:
    """``model``, wrapped in :class:`NoFastPath` when it holds a layer with torch's fused Transformer path."""
    fused = (nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.MultiheadAttention)
    return NoFastPath(model) if any(isinstance(m, fused) for m in model.modules()) else model


# --------------------------------------------------------------------------------------------- methods
def dynamic_int8(model: nn.Module) -> nn.Module:
    """An int8 copy of ``model`` (on the CPU) with dynamically quantised Linear layers."""
    from torch.ao.quantization import quantize_dynamic

    with _quiet():
        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


class CastInputs(nn.Module):
    """Runs ``module`` in ``dtype``: floating-point inputs are cast to it and outputs back to float32."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.is_floating_point():
            inputs = inputs.to(self.dtype)
        return self.module(inputs).float()

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)


def int8_weight_only(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` whose Linear weights are torchao int8 weight-only tensors, computing in ``dtype``."""
    from torchao.quantization import quantize_

    try:
        from torchao.quantization import Int8WeightOnlyConfig as config
    except ImportError:  # torchao < 0.9
        from torchao.quantization import int8_weight_only as config
    quantized = copy.deepcopy(model).to(dtype).eval()
    quantize_(quantized, config())
    return CastInputs(quantized, dtype) if dtype != torch.float32 else quantized


def prepare_qat(model: nn.Module) -> nn.Module:
    """Wrap every Linear layer with quantise/dequantise stubs and insert fake quantisation (in place)."""
    from torch.ao.quantization import QuantWrapper, get_default_qat_qconfig
    from torch.ao.quantization import prepare_qat as torch_prepare_qat

    with _quiet():
        qconfig = get_default_qat_qconfig(_engine_qconfig_backend())
        for parent in list(model.modules()):
            if isinstance(parent, QuantWrapper):
                continue
            for name, child in list(parent.named_children()):
                # exactly nn.Linear: attention's output projection (a Linear subclass) is used by its weight,
                # never called, so it cannot be wrapped
                if type(child) is nn.Linear:
                    wrapper = QuantWrapper(child)
                    wrapper.qconfig = qconfig
                    setattr(parent, name, wrapper)
        model.train()
        return torch_prepare_qat(model, inplace=True)


def convert_qat(model: nn.Module) -> nn.Module:
    """The int8 (CPU) model of a QAT-trained one; the trained model is left as it is."""
    from torch.ao.quantization import convert

    with _quiet():
        return convert(copy.deepcopy(model).cpu().eval(), inplace=False)


def inference_dtype(params: dict, device: torch.device) -> torch.dtype:
    name = params.get("inference_dtype", "auto")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# --------------------------------------------------------------------------------------------- hooks
@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_declare_metrics():
    return list(_model_stats.METRICS)


@hookimpl
def harness_check_combination(spec):
    method = spec.compression.params.get("method")
    if method == "int8-weight-only" and not package_available("torchao"):
        return "compression 'quantize' method 'int8-weight-only' requires the package 'torchao', which is " \
               "not installed"
    if method == "qat" and spec.precision.name not in ("fp32", "tf32"):
        return f"compression 'quantize' method 'qat' runs its fake-quantisation observers in float32; " \
               f"precision {spec.precision.name!r} is not supported (use fp32 or tf32)"
    return None


@hookimpl
def harness_compress_before_training(model, workload, spec):
    _model_stats.remember_uncompressed_size(model, workload)
    if spec.compression.params["method"] == "qat":
        return prepare_qat(model)
    return model


@hookimpl
def harness_compress_after_training(model, spec, device):
    method = spec.compression.params["method"]
    if method == "int8-weight-only":
        return without_fast_path(int8_weight_only(model, inference_dtype(spec.compression.params, device)))
    quantized = without_fast_path(dynamic_int8(model) if method == "dynamic-int8" else convert_qat(model))
    return _model_stats.OnDevice(quantized, torch.device("cpu")) if device.type != "cpu" else quantized


@hookimpl
def harness_measure_model(model, workload, spec, device):
    with _quiet():
        return _model_stats.measure(model, workload, spec, device)
