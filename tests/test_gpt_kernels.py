"""The gpt workload's kernel choices: the attention backend (``attention``), Liger's fused kernels (``kernels``),
how a machine that lacks one says so, and the GPU MFU benchmark's smoke run. GPU-only tests are marked ``gpu``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F

from harness.plugins import get_registry
from harness.space import package_available
from harness.testing import make_spec, run_one_trial, run_small_study
from harness.workload import SoftTargets
from plugins import _gpt_kernels, gpt

ROOT = Path(__file__).resolve().parents[1]
TINY = gpt.PRESETS["tiny"]
CUDA = torch.cuda.is_available()
LIGER_HERE = CUDA and package_available("liger_kernel") and package_available("triton")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_liger = pytest.mark.skipif(not LIGER_HERE, reason="needs a CUDA GPU and liger-kernel")
cpu_only_machine = pytest.mark.skipif(CUDA, reason="what a machine without CUDA says")


def loss_of(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(ids).flatten(0, 1).float(), targets.flatten())


def twin(model: torch.nn.Module, **choices: str) -> torch.nn.Module:
    """A GPT of the same shape built with other kernel choices, holding ``model``'s weights."""
    other = gpt.GPT(**TINY, **choices).to(next(model.parameters()).device)
    other.load_state_dict(model.state_dict())
    return other


# ============================================================================================ attention (CPU)
@pytest.mark.parametrize("backend", ["math", "flash"])
def test_each_cpu_attention_backend_gives_the_loss_and_gradients_of_auto(backend):
    torch.manual_seed(0)
    auto = gpt.GPT(**TINY)
    forced = twin(auto, attention=backend)
    ids, targets = torch.randint(0, 256, (4, 64)), torch.randint(0, 256, (4, 64))
    loss_auto, loss_forced = loss_of(auto, ids, targets), loss_of(forced, ids, targets)
    loss_auto.backward()
    loss_forced.backward()
    assert loss_forced.item() == pytest.approx(loss_auto.item(), rel=1e-5)
    assert torch.allclose(forced.blocks[0].qkv.weight.grad, auto.blocks[0].qkv.weight.grad, atol=1e-6)


def test_a_forced_backend_compiles_without_a_graph_break():
    torch.manual_seed(0)
    model = gpt.GPT(**{**TINY, "n_layer": 1}, attention="math")
    ids = torch.randint(0, 256, (2, 64))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(ids), model(ids), atol=1e-5)


def test_a_backend_that_cannot_run_is_named_with_those_that_can():
    reason = _gpt_kernels.attention_unavailable("efficient", torch.device("cpu"), torch.float32, n_head=2,
                                                head_dim=32, seq_len=64)
    assert reason.startswith("workload.attention: 'efficient' cannot run here: ") and "\n" not in reason
    assert reason.endswith("this trial could use: auto, flash, math"), reason
    assert _gpt_kernels.attention_unavailable("flash", torch.device("cpu"), torch.float32, 2, 32, 64) is None


@cpu_only_machine
def test_a_cuda_only_backend_is_refused_before_launch_on_a_cpu_machine(harness_cli, tmp_path):
    trial = tmp_path / "trial.yaml"
    trial.write_text(yaml.safe_dump({"workload": {"name": "gpt", "attention": "efficient"}, "device": "cpu"}))
    code, out, err = harness_cli("run", str(trial))
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "workload.attention 'efficient' requires CUDA, which this machine does not have" in err
    # the declaration says so, and a spec that gets past the file (made in code) is ruled out before launch
    result = run_one_trial(workload="gpt", workload_params={"size": "tiny", "attention": "cudnn"}, device="cpu")
    assert result.status == "infeasible" and "workload.attention 'cudnn' requires CUDA" in result.message


def test_a_study_searching_math_and_flash_attention_runs_both(tmp_path):
    study = {"workload": {"name": "gpt", "size": "tiny", "corpus_bytes": 200_000, "attention": ["math", "flash"]},
             "sampler": {"name": "grid"}, "budget": {"steps": 12, "warmup_steps": 2, "windows": 2, "eval_samples": 64},
             "objectives": [{"tokens_per_s": "max"}]}
    records, _ = run_small_study(study, tmp_path, n_trials=2, registry=get_registry(disable=["mlflow"]))
    assert sorted(r.spec["workload_params"]["attention"] for r in records) == ["flash", "math"]
    assert all(r.state == "COMPLETE" for r in records), [(r.state, r.message) for r in records]


# ============================================================================================ liger on a CPU machine
@cpu_only_machine
def test_liger_on_a_machine_without_cuda_is_one_line_exit_2(harness_cli, tmp_path):
    trial = tmp_path / "trial.yaml"
    trial.write_text(yaml.safe_dump({"workload": {"name": "gpt", "kernels": "liger"}}))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "workload": {"name": "gpt", "kernels": "liger-flce"},
                                     "axes": {"optimizer": "adamw"}, "n_trials": 1, "device": "cpu"}))
    for argv, what in ((("run", trial), "liger"), (("--disable", "mlflow", "study", study), "liger-flce")):
        code, out, err = harness_cli(*argv)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert f"workload.kernels '{what}' requires CUDA, which this machine does not have" in err, err


@cpu_only_machine
def test_a_study_searching_liger_on_a_cpu_machine_leaves_it_out_and_runs_the_rest(harness_cli, tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({
        "name": "s", "workload": {"name": "gpt", "size": "tiny", "corpus_bytes": 200_000,
                                  "kernels": ["native", "liger", "liger-flce"], "attention": ["math", "cudnn"]},
        "axes": {"optimizer": "adamw"}, "n_trials": 1, "device": "cpu", "storage": f"sqlite:///{tmp_path}/s.db",
        "budget": {"steps": 8, "warmup_steps": 2, "windows": 2, "eval_samples": 32},
        "objectives": [{"tokens_per_s": "max"}]}))
    code, out, err = harness_cli("--disable", "mlflow", "study", study, "--output-dir", str(tmp_path / "out"))
    assert code == 0, err[-2000:] + out[-2000:]
    for line in ("left out of the search space: workload.kernels 'liger' requires CUDA",
                 "left out of the search space: workload.kernels 'liger-flce' requires CUDA",
                 "left out of the search space: workload.attention 'cudnn' requires CUDA"):
        assert line in " ".join(out.split()), out[-3000:]
    import optuna

    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db").get_trials()
    ran = [t.user_attrs["record"]["spec"]["workload_params"] for t in trials if t.user_attrs.get("launched")]
    assert ran and all(p["kernels"] == "native" and p["attention"] == "math" for p in ran), ran


# ============================================================================================ the fused head (CPU part)
def test_the_fused_head_keeps_the_weights_tied_and_evaluates_like_the_logits():
    """With a fused head the model returns hidden states; evaluation (no gradients: torch in chunks, no Liger)
    gives the native head's loss, smoothed loss and correct count."""
    torch.manual_seed(0)
    native = gpt.GPT(**TINY)
    fused = twin(native, kernels="liger-flce")
    assert fused.lm_head.weight is fused.wte.weight and isinstance(fused.ln_f, torch.nn.LayerNorm)
    head = _gpt_kernels.FusedHead(fused)
    ids, targets = torch.randint(0, 256, (3, 64)), torch.randint(0, 256, (3, 64))
    with torch.no_grad():
        hidden, logits = fused(ids), native(ids)
        assert hidden.shape == (3, 64, TINY["n_embd"])
        assert head.loss(hidden, targets).item() == pytest.approx(loss_of(native, ids, targets).item(), rel=1e-5)
        smooth = SoftTargets(targets, smoothing=0.1)
        assert head.loss(hidden, smooth).item() == pytest.approx(smooth.cross_entropy(logits).item(), rel=1e-5)
        assert int(head.correct(hidden, targets)) == int((logits.argmax(-1) == targets).sum())


def test_the_workload_routes_loss_and_accuracy_through_the_fused_head():
    wl = gpt.build(device="cpu", seed=0, corpus_bytes=200_000, kernels="liger-flce")
    native = gpt.build(device="cpu", seed=0, corpus_bytes=200_000)
    native.model.load_state_dict(wl.model.state_dict())
    x, y = next(wl.test.eval_batches(4))
    with torch.no_grad():
        assert wl.loss_of(wl.model(x), y).item() == pytest.approx(native.loss_of(native.model(x), y).item(), rel=1e-5)
        assert int(wl.correct(wl.model(x), y)) == int(native.correct(native.model(x), y))
    assert wl.info["kernels"] == "liger-flce" and wl.make_student().fused_head


# ============================================================================================ the benchmark
def test_the_gpt_mfu_benchmark_smoke_run_completes(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpt_mfu.py"), "--cpu", "--jsonl", str(jsonl),
                           "--out", str(tmp_path / "out"), "--deadline-s", "55"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "out" / "gpt_mfu.md").read_text()
    assert "| tiny | reference | 16 |" in table and "| tiny | attention flash | 16 |" in table, table
    rows = [yaml.safe_load(line) for line in jsonl.read_text().splitlines()]
    assert {r["label"] for r in rows} >= {"reference", "attention math", "attention flash"}
    assert all(r["status"] == "ok" and r["metrics"]["throughput_tokens_per_s"] > 0 for r in rows), rows
    assert any(r["label"].startswith("best combination: ") for r in rows), [r["label"] for r in rows]


# ============================================================================================ GPU
GPU_GPT = dict(workload="gpt", device="cuda", precision="amp-bf16",
               budget={"steps": 30, "warmup_steps": 5, "windows": 2, "eval_samples": 64})
GPU_SHAPE = {"n_layer": 2, "n_embd": 256, "n_head": 4, "seq_len": 256, "vocab_size": 50304}


@pytest.mark.gpu
@needs_liger
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_liger_loss_and_gradients_equal_the_native_ones_in_bf16(smoothing):
    torch.manual_seed(0)
    native = gpt.GPT(**GPU_SHAPE).cuda()
    liger = gpt.GPT(**GPU_SHAPE, kernels="liger").cuda()
    liger.load_state_dict(native.state_dict())
    head = _gpt_kernels.FusedHead(liger)
    ids, targets = torch.randint(0, 256, (4, 256), device="cuda"), torch.randint(0, 256, (4, 256), device="cuda")
    t = SoftTargets(targets, smoothing=smoothing)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_native = t.cross_entropy(native(ids).float())
        loss_liger = head.loss(liger(ids), t)
    loss_native.backward()
    loss_liger.backward()
    assert loss_liger.item() == pytest.approx(loss_native.item(), rel=1e-2)
    for name in ("wte.weight", "blocks.0.qkv.weight", "blocks.1.ln_2.weight"):
        a, b = dict(native.named_parameters())[name].grad, dict(liger.named_parameters())[name].grad
        assert F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0) > 0.99, name


@pytest.mark.gpu
@needs_liger
def test_liger_val_loss_and_accuracy_equal_the_native_ones():
    native = gpt.build(device="cuda", seed=0, corpus_bytes=400_000, **GPU_SHAPE)
    liger = gpt.build(device="cuda", seed=0, corpus_bytes=400_000, kernels="liger", **GPU_SHAPE)
    native.model.cuda()
    liger.model.cuda().load_state_dict(native.model.state_dict())
    figures = []
    for wl in (native, liger):
        loss = correct = count = 0.0
        with torch.no_grad():
            for x, y in wl.test.to("cuda").eval_batches(8, 64):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = wl.model(x)
                loss += float(wl.loss_of(out.float(), y)) * y.numel()
                correct += float(wl.correct(out.float(), y))
                count += y.numel()
        figures.append((loss / count, correct / count))
    (loss_n, acc_n), (loss_l, acc_l) = figures
    assert loss_l == pytest.approx(loss_n, rel=5e-3) and acc_l == pytest.approx(acc_n, abs=2e-2)


@pytest.mark.gpu
@needs_liger
@pytest.mark.parametrize("kernels", ["liger", "liger-flce"])
def test_liger_trains_under_torch_compile(kernels):
    result = run_one_trial(**GPU_GPT, workload_params={**GPU_SHAPE, "kernels": kernels}, compile="torch-compile",
                           optimizer={"name": "adamw", "lr": 2e-3})
    assert result.ok, result.message
    assert result.metrics["val_loss"] < 6.0 and result.metrics["mfu"] > 0  # untrained: log(50304) = 10.8


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("attention", ["flash", "cudnn", "efficient", "math"])
def test_each_attention_backend_trains_on_cuda(attention):
    result = run_one_trial(**GPU_GPT, workload_params={**GPU_SHAPE, "attention": attention},
                           compile="torch-compile")
    if result.status == "infeasible":  # a GPU older than the backend: said in one line
        assert result.message.startswith(f"workload.attention: '{attention}' cannot run here")
        pytest.skip(result.message)
    assert result.ok, result.message
    assert result.metrics["val_loss"] < 6.0  # untrained: log(50304) = 10.8


@pytest.mark.gpu
@needs_cuda
def test_flash_attention_in_fp32_fails_the_trial_in_one_line():
    result = run_one_trial(**{**GPU_GPT, "precision": "fp32"}, workload_params={**GPU_SHAPE, "attention": "flash"})
    assert result.status == "infeasible" and "\n" not in result.message, result.message
    assert result.message.startswith("workload.attention: 'flash' cannot run here: ") and "float32" in result.message


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_recipes_build_and_train_on_gpt(recipe):
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9")
    result = run_one_trial(**{**GPU_GPT, "precision": {"name": "fp8", "recipe": recipe}}, workload_params=GPU_SHAPE,
                           compile="torch-compile")
    assert result.ok, result.message
    assert result.metrics["fp8_linear_layers"] >= 4 * GPU_SHAPE["n_layer"]


@pytest.mark.gpu
@needs_liger
def test_liger_with_distillation_or_a_cuda_graph_is_infeasible_in_one_line():
    for extra, fragment in ((dict(compression="distill"), "compression 'distill'"),
                            (dict(compile="cuda-graph"), "CUDA graph capture"),
                            (dict(parallelism={"name": "deepspeed", "stage": 3}), "ZeRO-3")):
        spec = make_spec(**{**GPU_GPT, **extra}, workload_params={**GPU_SHAPE, "kernels": "liger"})
        result = run_one_trial(spec)
        assert result.status == "infeasible" and fragment in result.message, result.message
