"""GPU-only checks of the CUDA techniques (skipped without CUDA by tests/conftest.py): the whole-step CUDA graph
follows eager training step for step, torch's fused optimizers train, fp8 trains where torchao and an
H100-class GPU exist."""
from __future__ import annotations

import math

import pytest
import torch

from harness.space import package_available
from harness.testing import make_spec, run_one_trial
from harness.trial import Trial

pytestmark = pytest.mark.gpu


def step_losses(steps: int, **techniques) -> list[float]:
    """Losses of the first ``steps`` calls of a trial's (possibly captured) train step, on the trial's batches."""
    trial = Trial(make_spec(device="cuda", **techniques))
    trial.setup()
    trial.engine.train(True)
    return [float(trial.step_fn(*next(trial.batches))) for _ in range(steps)]


@pytest.mark.parametrize("optimizer", [
    {"name": "adamw"},
    {"name": "adamw", "implementation": "fused", "schedule": "cosine", "warmup_fraction": 0.2},
    {"name": "sgd", "implementation": "foreach"},
    {"name": "rmsprop", "schedule": "cosine"},
])
def test_cuda_graph_step_matches_eager_losses(optimizer):
    # The first loss is computed before any update, so it is equal only if the warm-up iterations before
    # capture were undone. Later losses follow the same trajectory up to float32 rounding: the capturable
    # optimizers order a few scalar ops differently (a device-side step count and learning rate), and RMSprop's
    # division by a small running average amplifies that to ~0.3% after 12 steps; skipping or repeating one
    # update moves the loss by several percent of what 12 updates move it (a warm-up schedule or plain SGD moves
    # it little in 12 steps, so the bound is relative to the eager run's own progress).
    eager = step_losses(12, optimizer=optimizer)
    graph = step_losses(12, optimizer=optimizer, compile="cuda-graph")
    progress = eager[0] - min(eager)
    assert progress > 0
    assert graph[0] == pytest.approx(eager[0], rel=1e-6)
    drift = max(abs(g - e) for g, e in zip(graph, eager, strict=True))
    assert drift < 0.05 * progress, (drift, progress)


def test_cuda_graph_with_channels_last_and_bf16_matches_eager():
    # bf16 autocast: same kernels in both runs, so agreement is limited only by cuDNN algorithm choice (1e-2).
    kw = dict(workload="seed-cnn", workload_params={"synthetic_samples": 1024, "synthetic_test_samples": 64},
              precision="amp-bf16", optimizer={"name": "adamw", "implementation": "fused"})
    eager = step_losses(8, compile="channels-last", **kw)
    graph = step_losses(8, compile={"name": "cuda-graph", "channels_last": True}, **kw)
    assert graph == pytest.approx(eager, rel=1e-2)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_optimizer_trains_on_gpu(name):
    result = run_one_trial(device="cuda", optimizer={"name": name, "implementation": "fused"})
    assert result.status == "ok", result.message
    assert result.metrics["train_loss"] < 0.5 * math.log(10)  # well below chance level (ln 10)


def test_fused_rmsprop_is_infeasible_on_gpu():
    result = run_one_trial(device="cuda", optimizer={"name": "rmsprop", "implementation": "fused"})
    assert result.status == "infeasible"
    assert "'fused' does not exist" in result.message


@pytest.mark.skipif(not package_available("torchao"), reason="torchao is not installed")
def test_fp8_trains_where_supported():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    result = run_one_trial(device="cuda", workload="gpt", workload_params={"n_embd": 128, "n_head": 4},
                           precision="fp8", budget={"steps": 40, "eval_samples": 64})
    assert result.status == "ok", result.message
    assert result.metrics["fp8_linear_layers"] > 0
    assert result.metrics["train_loss"] < math.log(256)  # below the uniform byte-level loss


def test_amp_fp16_reports_skipped_steps_on_gpu():
    # An initial scale of 2**24 overflows float16 gradients, so the scaler must skip (and count) early steps.
    result = run_one_trial(device="cuda", precision={"name": "amp-fp16", "init_scale": 2.0 ** 24})
    assert result.status == "ok", result.message
    assert result.metrics["amp_skipped_steps"] >= 1
    assert result.metrics["amp_final_loss_scale"] < 2.0 ** 24
