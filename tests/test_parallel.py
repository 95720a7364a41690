"""Multi-process trials on the CPU (gloo): real torchrun processes started by ``harness.launch``.

The parallelism plugins must train exactly what one process trains at the same global batch, and a rank that
crashes or hangs must fail the trial within its timeout and leave no process behind.

This module is also a (test-only) plugin: the fault tests load it in the trial processes through
``HARNESS_PLUGINS=test_parallel``, and its ``harness_trial_start`` makes rank 1 crash or hang on request.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from harness import hookimpl
from harness.errors import SpecError
from harness.launch import LaunchOptions, launch, worker_command, worker_env
from harness.testing import make_spec

FAULT_ENV = "HARNESS_TEST_RANK1_FAULT"

#: A short run: SGD without momentum, fp32, global batch 64; evaluation on the first 320 held-out samples, a
#: multiple of the global batch, so that 1 and 2 ranks evaluate exactly the same samples.
BUDGET = {"steps": 8, "warmup_steps": 2, "windows": 2, "eval_samples": 320}
#: Both runs see the same 64 samples per step (the two ranks' shares of the global batch) and average the same
#: gradients; only the order of float32 additions differs (per-rank means, then an all-reduce), a relative error
#: of ~1e-7 per step: the held-out losses agree to ~1e-7 in practice. The mistakes this guards against move it
#: much further after these 8 steps (measured on one process): gradients summed instead of averaged (= lr x2) by
#: 3e-2, each rank training on the same 32 samples instead of its own share (= batch 32) by 3e-4.
LOSS_TOLERANCE = 2e-5


@hookimpl
def harness_trial_start(trial):
    """Test-only fault: rank 1 raises (``crash``) or blocks forever (``hang``) once training is about to start."""
    fault = os.environ.get(FAULT_ENV, "")
    if trial.dist.rank == 1 and fault == "crash":
        raise RuntimeError("injected crash on rank 1")
    if trial.dist.rank == 1 and fault == "hang":
        time.sleep(3600)


#: the gpt workload (tiny: 2 transformer blocks) with its blocks checkpointed: the block-wise paths of the engines
#: (FSDP units, ZeRO-3 leaf modules, prefetching) wrap blocks that recompute their forward in the backward pass.
CHECKPOINTED_GPT = {"workload": "gpt", "workload_params": {"size": "tiny"}, "memory": "activation-checkpointing"}


def spec_for(parallelism, devices: int, **fields):
    return make_spec(parallelism=parallelism, optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0},
                     precision="fp32", devices=devices, batch_size=64, seed=3, budget=BUDGET, **fields)


def processes_of(workdir: Path) -> list[psutil.Process]:
    """Live processes whose command line names ``workdir`` (the worker and torchrun both do)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(workdir) in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture(autouse=True)
def _cpu_trials(monkeypatch, tmp_path):
    # DeepSpeed picks its CPU accelerator (tox sets this too); the trial processes start in a scratch directory.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def single_process_result(tmp_path_factory):
    result = launch(spec_for("single", 1), tmp_path_factory.mktemp("single"), LaunchOptions(timeout_s=120))
    assert result.ok, result.message
    return result


@pytest.fixture(scope="module")
def single_process_checkpointed_gpt(tmp_path_factory):
    result = launch(spec_for("single", 1, **CHECKPOINTED_GPT), tmp_path_factory.mktemp("single-gpt"),
                    LaunchOptions(timeout_s=120))
    assert result.ok, result.message
    return result


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", [
    {"name": "ddp"},
    {"name": "ddp", "accumulation_steps": 2},
    {"name": "deepspeed", "stage": 1},
    {"name": "deepspeed", "stage": 2},
    {"name": "deepspeed", "stage": 3},
    {"name": "fsdp"},
    {"name": "fsdp", "units": "block"},
], ids=["ddp", "ddp-accumulation", "zero1", "zero2", "zero3", "fsdp", "fsdp-blocks"])
def test_two_process_trial_matches_single_process_loss(parallelism, single_process_result, tmp_path):
    result = launch(spec_for(parallelism, 2), tmp_path / "trial", LaunchOptions(timeout_s=180))

    assert result.ok, result.message
    assert result.metrics["rank"] == 0
    assert result.metrics["eval_samples"] == single_process_result.metrics["eval_samples"] == 320
    assert result.metrics["val_loss"] == pytest.approx(single_process_result.metrics["val_loss"],
                                                       abs=LOSS_TOLERANCE)
    assert result.metrics["accuracy"] == pytest.approx(single_process_result.metrics["accuracy"], abs=1e-9)
    assert result.metrics["throughput_samples_per_s"] > 0


@pytest.mark.slow
def test_ddp_with_float16_gradients_matches_single_process_loss_within_their_rounding(single_process_result,
                                                                                      tmp_path):
    # float16 carries ~3 significant digits: the losses agree to ~1e-4, far closer than the 3e-2 of gradients
    # summed instead of averaged (what a compression hook that forgot to divide by the ranks would do)
    result = launch(spec_for({"name": "ddp", "gradient_dtype": "float16"}, 2), tmp_path / "trial",
                    LaunchOptions(timeout_s=180))
    assert result.ok, result.message
    assert result.metrics["val_loss"] == pytest.approx(single_process_result.metrics["val_loss"], abs=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", [
    {"name": "ddp"},
    {"name": "fsdp"},
    {"name": "fsdp", "units": "block"},
    {"name": "fsdp", "units": "block", "reshard_after_forward": False, "prefetch": 2},
    {"name": "deepspeed", "stage": 2},
    {"name": "deepspeed", "stage": 3},
], ids=["ddp", "fsdp", "fsdp-blocks", "fsdp-blocks-keep-prefetch2", "zero2", "zero3"])
def test_two_process_checkpointed_gpt_matches_single_process_loss(parallelism, single_process_checkpointed_gpt,
                                                                   tmp_path):
    # gpt tiny at seq 64: the first 320 held-out windows are 20,480 tokens, the same on 1 and 2 ranks
    result = launch(spec_for(parallelism, 2, **CHECKPOINTED_GPT), tmp_path / "trial", LaunchOptions(timeout_s=180))

    assert result.ok, result.message
    reference = single_process_checkpointed_gpt.metrics
    assert result.metrics["eval_samples"] == reference["eval_samples"] == 320 * 64
    assert result.metrics["val_loss"] == pytest.approx(reference["val_loss"], abs=LOSS_TOLERANCE)
    assert result.metrics["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-9)


@pytest.mark.slow
def test_deepspeed_zero3_trains_in_one_process(single_process_result, tmp_path):
    result = launch(spec_for({"name": "deepspeed", "stage": 3}, 1), tmp_path / "trial", LaunchOptions(timeout_s=120))

    assert result.ok, result.message
    assert result.metrics["val_loss"] == pytest.approx(single_process_result.metrics["val_loss"],
                                                       abs=LOSS_TOLERANCE)


def test_the_engine_comes_from_the_selected_parallelism_plugin_alone(run_trial, hook_recorder):
    """``harness_build_engine`` runs on the plugin of the trial's parallelism technique only (not on ddp, fsdp or
    deepspeed, which are loaded too), and the engine it returns is the one that trains."""
    recorder = hook_recorder()
    result = run_trial.ok(parallelism="single", budget={"steps": 10})
    (call,) = recorder.calls_of("build_engine")
    assert call.plugins == ("single",)
    assert type(call.result).__name__ == "Engine" and result.metrics["steps"] == 10


@pytest.mark.slow
def test_deepspeed_float16_on_the_cpu_is_infeasible(tmp_path):
    spec = make_spec(parallelism={"name": "deepspeed", "stage": 1}, precision="amp-fp16", devices=1,
                     budget={"steps": 4, "warmup_steps": 1, "windows": 1})

    result = launch(spec, tmp_path / "trial", LaunchOptions(timeout_s=120))

    assert result.status == "infeasible", result.message
    assert "no float16 mode" in result.message


@pytest.mark.slow
def test_crashing_rank_fails_the_trial_with_its_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_PLUGINS", "test_parallel")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(FAULT_ENV, "crash")
    workdir = tmp_path / "trial"

    result = launch(spec_for({"name": "ddp"}, 2), workdir, LaunchOptions(timeout_s=120))

    assert result.status == "plugin-error", result.message
    assert result.message.startswith("rank 1: ")
    assert "injected crash on rank 1" in result.message
    assert processes_of(workdir) == []


@pytest.mark.slow
def test_hanging_rank_times_out_and_leaves_no_process(monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_PLUGINS", "test_parallel")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(FAULT_ENV, "hang")
    workdir = tmp_path / "trial"
    started = time.monotonic()

    result = launch(spec_for({"name": "ddp"}, 2), workdir, LaunchOptions(timeout_s=25))

    assert result.status == "timeout", result.message
    assert time.monotonic() - started < 25 + 20  # killed promptly, not left to gloo's 30-minute timeout
    assert processes_of(workdir) == []


def test_multi_node_settings_pass_through_to_torchrun(tmp_path):
    spec = spec_for({"name": "ddp"}, 2)
    options = LaunchOptions(nnodes=2, node_rank=1, rdzv_endpoint="head.example:29400")

    cmd = worker_command(spec, tmp_path / "s.json", tmp_path / "r.json", tmp_path / "e.jsonl", options)

    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    for flag in ("--nproc-per-node=2", "--nnodes=2", "--node-rank=1", "--rdzv-endpoint=head.example:29400",
                 f"--rdzv-id=trial-{spec.spec_hash()}"):
        assert flag in cmd


def test_each_local_trial_gets_its_own_rendezvous_port(tmp_path):
    spec = spec_for({"name": "ddp"}, 2)
    endpoints = {next(a for a in worker_command(spec, tmp_path / "s", tmp_path / "r", tmp_path / "e",
                                                LaunchOptions()) if a.startswith("--rdzv-endpoint="))
                 for _ in range(3)}
    assert len(endpoints) == 3


def test_multi_node_without_rendezvous_endpoint_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="rdzv_endpoint"):
        worker_command(spec_for({"name": "ddp"}, 2), tmp_path / "s", tmp_path / "r", tmp_path / "e",
                       LaunchOptions(nnodes=2))


def test_cpu_ranks_get_one_share_of_the_cores_each(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = worker_env(spec_for({"name": "ddp"}, 2), LaunchOptions())
    assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))


@pytest.mark.parametrize("parallelism, reason", [
    ({"name": "deepspeed", "stage": 2, "offload_param": "cpu"}, "offload_param: 'cpu' needs ZeRO stage 3"),
    ({"name": "deepspeed", "stage": 0, "offload_optimizer": "cpu"}, "offload_optimizer: 'cpu' needs ZeRO stage"),
    ({"name": "ddp", "accumulation_steps": 3}, "accumulation_steps: 3 does not divide the per-rank batch 32"),
])
def test_impossible_parallel_settings_are_infeasible_before_launch(registry, parallelism, reason):
    from harness.space import Environment

    spec = spec_for(parallelism, 2)
    found = registry.hooks.check_combination(spec=spec, env=Environment.detect(), workload_kinds=())
    assert reason in (found or ""), found


def test_ddp_needs_two_processes(registry):
    from harness.space import Environment, infeasible_reason

    reason = infeasible_reason(spec_for({"name": "ddp"}, 1), registry.techniques, Environment.detect())
    assert reason == "parallelism technique 'ddp' requires at least 2 processes (devices: 1)"
