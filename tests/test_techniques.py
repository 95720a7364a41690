"""The optimizer, precision and compile techniques on the CPU: every optimizer and implementation trains, mixed
precision and torch.compile agree with float32 eager within stated tolerances, the learning-rate schedule has
its shape, and the CUDA-only techniques are declared infeasible with their reasons before anything runs."""
from __future__ import annotations

import math

import pytest
import torch

from harness.space import Environment, infeasible_reason, package_available
from harness.testing import make_spec, run_one_trial
from plugins._optim import cosine_schedule

CHANCE_LOSS = math.log(10)  # cross-entropy of a uniform guess over the 10 digit classes
H100 = Environment(cuda=True, device_count=1, compute_capability=(9, 0), device_name="NVIDIA H100 80GB HBM3")
A100 = Environment(cuda=True, device_count=1, compute_capability=(8, 0), device_name="NVIDIA A100-SXM4-80GB")


@pytest.fixture(scope="module")
def fp32_eager():
    """The reference trial: float32, eager, AdamW, 60 steps of digits."""
    result = run_one_trial()
    assert result.status == "ok", result.message
    return result


@pytest.mark.parametrize("implementation", ["default", "foreach", "fused"])
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_optimizer_implementation_trains_on_cpu(name, implementation):
    result = run_one_trial(optimizer={"name": name, "implementation": implementation}, budget={"steps": 40})
    if name == "rmsprop" and implementation == "fused":  # torch has no fused RMSprop: declared, not crashed
        assert result.status == "infeasible"
        assert "implementation 'fused' does not exist for torch.optim.RMSprop" in result.message
        return
    assert result.status == "ok", result.message
    assert result.metrics["train_loss"] < 0.6 * CHANCE_LOSS


def test_cosine_schedule_warms_up_then_decays_to_zero():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    schedule = cosine_schedule(optimizer, total_steps=100, warmup_fraction=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.05)  # 1/10 of the rate at the first of 10 warm-up steps
    assert lrs[:10] == pytest.approx([0.05 * (i + 1) for i in range(10)])
    assert lrs[10] == pytest.approx(0.5)  # peak right after warm-up
    assert lrs[55] == pytest.approx(0.25)  # half-way through the decay: cos(pi/2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] < 0.001


def test_cosine_schedule_in_a_trial_ends_below_its_peak():
    result = run_one_trial(optimizer={"name": "adamw", "schedule": "cosine", "lr": 0.01})
    assert result.status == "ok", result.message
    assert result.metrics["train_loss"] < 0.6 * CHANCE_LOSS


# Mixed precision on the CPU: both runs start from the same weights and see the same batches, so they differ only
# by rounding: bfloat16 keeps 8 mantissa bits (relative error 2**-9 per operation) and float16 keeps 11, with float32
# accumulation and float32 master weights. Over 60 steps this moves the final loss by well under 5% of its value
# and test accuracy by at most a few of the 360 held-out digits; a wrong dtype, a missing unscale or a skipped step
# would move it by far more (the loss halves every ~15 steps here).
@pytest.mark.parametrize("precision", ["amp-bf16", "amp-fp16"])
def test_mixed_precision_matches_fp32_on_cpu(precision, fp32_eager):
    result = run_one_trial(precision=precision)
    assert result.status == "ok", result.message
    assert result.metrics["train_loss"] == pytest.approx(fp32_eager.metrics["train_loss"], rel=0.05)
    assert result.metrics["accuracy"] == pytest.approx(fp32_eager.metrics["accuracy"], abs=0.02)


def test_amp_fp16_counts_the_steps_its_scaler_skipped():
    # 2**24 times a loss near ln(10) overflows float16 gradients (max 65504): the first steps must be skipped.
    result = run_one_trial(precision={"name": "amp-fp16", "init_scale": 2.0 ** 24})
    assert result.status == "ok", result.message
    skipped = result.metrics["amp_skipped_steps"]
    assert 1 <= skipped < 60
    assert result.metrics["amp_final_loss_scale"] == 2.0 ** 24 / 2 ** skipped  # halved once per skipped step


def test_precision_objects_declare_their_compute_dtype(registry):
    model = torch.nn.Linear(4, 4)
    expected = {"fp32": torch.float32, "tf32": torch.float32, "amp-bf16": torch.bfloat16,
                "amp-fp16": torch.float16}  # tf32 is float32 math on a CPU
    for name, dtype in expected.items():
        precision = registry.hooks.setup_precision(model=model, spec=make_spec(precision=name, registry=registry),
                                                   device=torch.device("cpu"))
        assert precision.compute_dtype == dtype, name
        with precision.autocast():
            assert torch.nn.functional.linear(torch.ones(1, 4), model.weight).dtype == dtype, name


def test_torch_compile_matches_eager_and_reports_compile_time(fp32_eager):
    # Inductor may fuse and reorder float32 operations, so losses agree to float32 rounding over 60 steps (1e-3).
    result = run_one_trial(compile="torch-compile")
    assert result.status == "ok", result.message
    m = result.metrics
    assert m["train_loss"] == pytest.approx(fp32_eager.metrics["train_loss"], rel=1e-3)
    warmup_per_step_s = m["warmup_s"] / 2  # 3 warm-up steps: the first (compiling) one is timed apart
    assert m["compile_s"] > 10 * warmup_per_step_s


def test_channels_last_trains_a_conv_workload_like_eager():
    kw = dict(workload="seed-cnn", budget={"steps": 12, "eval_samples": 64}, batch_size=32,
              workload_params={"width": 8, "hidden": 32, "synthetic_samples": 256, "synthetic_test_samples": 32})
    eager = run_one_trial(**kw)
    channels_last = run_one_trial(compile="channels-last", **kw)
    assert channels_last.status == "ok", channels_last.message
    # Same math in another memory layout: convolution kernels sum in another order (float32 rounding).
    assert channels_last.metrics["train_loss"] == pytest.approx(eager.metrics["train_loss"], rel=1e-3)


@pytest.mark.parametrize("compile_, precision, reason", [
    ("cuda-graph", "fp32", "compile technique 'cuda-graph' requires CUDA, which this trial does not have"),
    ("eager", "fp8", "precision technique 'fp8' requires CUDA, which this trial does not have"),
])
def test_cuda_only_techniques_are_infeasible_on_cpu(compile_, precision, reason):
    result = run_one_trial(compile=compile_, precision=precision)
    assert result.status == "infeasible"
    assert result.message == reason


def test_cuda_graph_declares_what_it_cannot_capture(registry):
    spec = make_spec(compile="cuda-graph", precision="amp-fp16", device="cuda")
    reason = infeasible_reason(spec, registry.techniques, H100, ("mlp", "image"))
    assert reason.startswith("compile technique 'cuda-graph' cannot be combined with precision 'amp-fp16': ")
    assert "GradScaler" in reason
    spec = make_spec(compile="cuda-graph", compression="prune", device="cuda")
    assert "cannot be combined with compression 'prune'" in infeasible_reason(spec, registry.techniques, H100)
    assert infeasible_reason(make_spec(compile="cuda-graph", device="cuda"), registry.techniques, H100) is None


def test_fp8_needs_compute_capability_8_9_and_torchao(registry):
    spec = make_spec(precision="fp8", device="cuda")
    assert infeasible_reason(spec, registry.techniques, A100) == (
        "precision technique 'fp8' requires compute capability >= 8.9; this machine has NVIDIA A100-SXM4-80GB "
        "(compute capability 8.0)")
    on_h100 = infeasible_reason(spec, registry.techniques, H100)
    if package_available("torchao"):
        assert on_h100 is None
    else:
        assert on_h100 == "precision technique 'fp8' requires the package 'torchao', which is not installed"


def test_channels_last_is_infeasible_for_a_workload_without_convolutions():
    result = run_one_trial(compile="channels-last")
    assert result.status == "infeasible"
    assert "applies to conv workloads; workload 'digits' is classification/image/mlp" in result.message
