"""Compression plugins (prune, quantize, distill) on real models and the digits workload, on the CPU; the 2:4
and torchao paths run on a GPU (``gpu`` marker)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.space import Environment, package_available
from harness.testing import make_spec, run_one_trial
from harness.trial import Trial
from plugins import _model_stats, distill, prune, quantize

#: the accuracy dynamic int8 quantisation may cost on digits (absolute, out of 1.0).
INT8_ACCURACY_TOLERANCE = 0.02


@pytest.fixture(autouse=True)
def teacher_cache(tmp_path, monkeypatch):
    """Every test gets its own teacher cache."""
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path / "teachers"))
    return tmp_path / "teachers"


def linear_heavy_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


# --------------------------------------------------------------------------------------------- quantize
def test_dynamic_int8_shrinks_a_linear_model_at_least_3x():
    model = linear_heavy_mlp()
    quantized = quantize.dynamic_int8(model)
    dense, small = _model_stats.serialized_size_bytes(model), _model_stats.serialized_size_bytes(quantized)
    assert dense / small >= 3.0, (dense, small)
    x = torch.randn(8, 1, 8, 8)
    assert torch.allclose(quantized(x), model(x), atol=0.1)  # same function, int8 weights


def test_dynamic_int8_trial_keeps_digits_accuracy_and_reports_size():
    result = run_one_trial(make_spec(compression={"name": "quantize", "method": "dynamic-int8",
                                                  "inference_batch_size": 32}, budget={"steps": 120}))
    assert result.ok, result.message
    m = result.metrics
    assert m["accuracy_uncompressed"] > 0.9
    assert m["accuracy"] >= m["accuracy_uncompressed"] - INT8_ACCURACY_TOLERANCE
    assert m["compression_ratio"] >= 3.0
    assert m["model_size_bytes"] * m["compression_ratio"] == pytest.approx(m["uncompressed_model_size_bytes"])
    assert m["parameter_count"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10  # digits' MLP, int8 or not
    assert m["inference_batch_size"] == 32 and m["inference_latency_s"] > 0
    assert m["inference_throughput_samples_per_s"] == pytest.approx(32 / m["inference_latency_s"])


def test_qat_trains_with_fake_quantisation_and_converts_to_int8():
    spec = make_spec(compression={"name": "quantize", "method": "qat"}, budget={"steps": 80})
    trial = Trial(spec)
    result = trial.run()
    assert result.ok, result.message
    fake_quant = [m for m in trial.model.modules() if type(m).__name__ == "FusedMovingAvgObsFakeQuantize"]
    assert fake_quant, "training ran without fake quantisation"
    assert result.metrics["accuracy"] > 0.85
    assert result.metrics["compression_ratio"] >= 3.0
    quantized = quantize.convert_qat(trial.model)
    kinds = {type(m).__module__ for m in quantized.modules()}
    assert "torch.ao.nn.quantized.modules.linear" in kinds


def test_qat_with_mixed_precision_is_infeasible(registry):
    if ("precision", "amp-bf16") not in registry.techniques:
        pytest.skip("no amp-bf16 precision plugin installed")
    result = run_one_trial(make_spec(compression={"name": "quantize", "method": "qat"}, precision="amp-bf16"))
    assert result.status == "infeasible" and "qat" in result.message


@pytest.mark.skipif(package_available("torchao"), reason="torchao is installed here")
def test_int8_weight_only_without_torchao_is_infeasible():
    result = run_one_trial(make_spec(compression={"name": "quantize", "method": "int8-weight-only"}))
    assert result.status == "infeasible"
    assert "torchao" in result.message


# --------------------------------------------------------------------------------------------- prune
def test_magnitude_pruning_zeroes_exactly_half_and_the_zeros_survive_finetuning():
    model = linear_heavy_mlp()
    modules = prune.apply_pruning(model, "magnitude", 0.5)
    weights = [m.weight for m in modules]
    total = sum(w.numel() for w in weights)
    zeros_before = [(w == 0).clone() for w in weights]
    assert sum(int(z.sum()) for z in zeros_before) == total // 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = [w.detach().clone() for w in weights]
    for _ in range(20):
        x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    prune.make_permanent(modules)
    for m, zeros, old in zip(modules, zeros_before, before, strict=True):
        assert not hasattr(m, "weight_mask") and isinstance(m.weight, nn.Parameter)  # masks folded in
        assert torch.equal(m.weight == 0, zeros)  # the same entries, still exactly zero
        assert not torch.equal(m.weight.detach(), old)  # and the others did train


def test_pruning_after_training_with_finetuning_reports_half_sparse_weights():
    spec = make_spec(compression={"name": "prune", "method": "magnitude", "sparsity": 0.5, "when": "after",
                                  "finetune_steps": 20}, budget={"steps": 80})
    trial = Trial(spec)
    result = trial.run()
    assert result.ok, result.message
    weights = [m.weight for m in trial.model.modules() if isinstance(m, nn.Linear)]
    assert sum(int((w == 0).sum()) for w in weights) == sum(w.numel() for w in weights) // 2
    m = result.metrics
    assert m["nonzero_parameter_count"] == m["parameter_count"] - sum(w.numel() for w in weights) // 2
    assert m["steps"] == 80 and "accuracy_uncompressed" in m
    assert m["accuracy"] >= m["accuracy_uncompressed"] - 0.05


def test_gradual_pruning_reaches_its_sparsity_on_a_cubic_schedule():
    assert prune.cubic_sparsity(0.8, 0.0) == 0.0 and prune.cubic_sparsity(0.8, 1.0) == pytest.approx(0.8)
    assert prune.cubic_sparsity(0.8, 0.5) == pytest.approx(0.8 * (1 - 0.125))
    from harness import hookimpl
    from harness.plugins import get_registry

    class Watch:
        """An observer (declares nothing): the sparsity of the pruned model at every window."""

        def __init__(self):
            self.seen = []

        @hookimpl
        def harness_trial_window(self, trial):
            self.seen.append(trial.workload.info["prune_state"].sparsity_now)

    registry = get_registry(extra=[Watch])
    seen = registry.plugin("Watch").seen
    spec = make_spec(registry=registry, compression={"name": "prune", "when": "gradual", "sparsity": 0.75,
                                                     "update_every_steps": 5}, budget={"steps": 100, "windows": 4})
    trial = Trial(spec, registry)
    result = trial.run()
    assert result.ok, result.message
    assert seen == sorted(seen) and 0.0 < seen[1] < 0.75  # rising during training
    weights = [m.weight for m in trial.model.modules() if isinstance(m, nn.Linear)]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.75 * sum(w.numel() for w in weights))


def test_structured_pruning_removes_whole_neurons_and_keeps_the_output_layer():
    model = linear_heavy_mlp()
    modules = prune.apply_pruning(model, "structured", 0.25)
    prune.make_permanent(modules)
    assert model[5] not in modules  # the classifier keeps all its classes
    for m in modules:
        dead_rows = (m.weight == 0).all(dim=1)
        assert int(dead_rows.sum()) == round(0.25 * m.out_features)


def test_semi_structured_masks_keep_two_of_every_four():
    model = linear_heavy_mlp()
    modules = prune.apply_pruning(model, "2:4", 0.5)
    for m in modules:
        groups = (m.weight != 0).reshape(-1, 4).sum(dim=1)
        assert torch.all(groups <= 2) and (m.weight == 0).float().mean() >= 0.5


@pytest.mark.skipif(Environment.detect().cuda and Environment.detect().compute_capability >= (8, 0),
                    reason="this GPU supports 2:4")
def test_semi_structured_pruning_without_an_ampere_gpu_is_infeasible():
    result = run_one_trial(make_spec(compression={"name": "prune", "method": "2:4"}))
    assert result.status == "infeasible" and "compute capability >= 8.0" in result.message


# --------------------------------------------------------------------------------------------- distill
def distill_spec(alpha: float, steps: int = 300, seed: int = 0, teacher_steps: int = 600, **params):
    return make_spec(compression={"name": "distill", "alpha": alpha, "temperature": 2.0,
                                  "teacher_steps": teacher_steps, **params},
                     optimizer={"name": "adamw", "lr": 1e-2}, budget={"steps": steps}, seed=seed,
                     workload_params={"student_hidden": 8})


@pytest.fixture(scope="module")
def shared_teachers(tmp_path_factory):
    """One teacher cache for the tests that distil from the same 600-step teacher (it is trained once)."""
    return tmp_path_factory.mktemp("shared-teachers")


def test_distilled_student_learns_digits_from_the_teacher_alone(shared_teachers, monkeypatch):
    """alpha = 1: the student never sees a label, only the teacher's soft outputs, and still learns the task."""
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(shared_teachers))
    result = run_one_trial(distill_spec(alpha=1.0))
    assert result.ok, result.message
    m = result.metrics
    assert m["accuracy_teacher"] > 0.95 and m["accuracy"] > 0.9
    assert m["parameter_count"] < m["teacher_parameter_count"] / 10
    assert m["compression_ratio"] > 10


def test_distillation_against_the_student_trained_alone_on_digits(shared_teachers, monkeypatch):
    """On digits a 1x8 student trained alone already comes within ~2 points of the 2x256 teacher; distilling does
    not beat it there (measured: alone 0.947/0.950, distilled T=2 alpha=0.5 0.939/0.947 over seeds 0/1; see
    docs/benchmarks.md for the GPT case). What holds, and is checked: the teacher is stronger, and the
    distilled student stays within 2 points of the student trained alone with the same budget."""
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(shared_teachers))
    alone = run_one_trial(distill_spec(alpha=0.0)).metrics
    distilled = run_one_trial(distill_spec(alpha=0.5)).metrics
    assert distilled["accuracy_teacher"] > alone["accuracy"]
    assert distilled["accuracy"] >= alone["accuracy"] - 0.02
    assert "accuracy_teacher" not in alone  # alpha = 0 trains no teacher


def test_teacher_is_trained_once_and_reused_from_the_cache(teacher_cache):
    trained = distill.TEACHERS_TRAINED
    first = run_one_trial(distill_spec(alpha=0.5, steps=20, teacher_steps=30))
    files = list(teacher_cache.glob("*.pt"))
    assert first.ok and len(files) == 1 and distill.TEACHERS_TRAINED == trained + 1
    mtime = files[0].stat().st_mtime_ns
    second = run_one_trial(distill_spec(alpha=0.9, steps=30, teacher_steps=30))  # another trial, same teacher key
    assert second.ok and distill.TEACHERS_TRAINED == trained + 1
    assert files[0].stat().st_mtime_ns == mtime and second.metrics["teacher_cached"] == 1.0
    assert second.metrics["accuracy_teacher"] == first.metrics["accuracy_teacher"]
    run_one_trial(distill_spec(alpha=0.5, steps=20, teacher_steps=30, seed=1))  # another seed is another teacher
    assert len(list(teacher_cache.glob("*.pt"))) == 2 and distill.TEACHERS_TRAINED == trained + 2


def test_teacher_from_a_checkpoint_is_used_as_given(tmp_path):
    trial = Trial(make_spec())
    assert trial.run().ok
    path = tmp_path / "teacher.pt"
    torch.save(trial.model.state_dict(), path)
    trained = distill.TEACHERS_TRAINED
    result = run_one_trial(make_spec(compression={"name": "distill", "teacher_checkpoint": str(path)},
                                     budget={"steps": 20}))
    assert result.ok, result.message
    assert distill.TEACHERS_TRAINED == trained
    assert result.metrics["accuracy_teacher"] == pytest.approx(trial.metrics["accuracy"])


def test_user_given_student_replaces_the_model(tmp_path, monkeypatch):
    (tmp_path / "my_students.py").write_text("from torch import nn\n\n\ndef small():\n"
                                             "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run_one_trial(make_spec(compression={"name": "distill", "alpha": 0.0, "student": "my_students:small"},
                                     budget={"steps": 20}))
    assert result.ok, result.message
    assert result.metrics["parameter_count"] == 64 * 10 + 10


def test_bad_student_and_missing_checkpoint_are_infeasible(tmp_path):
    bad = run_one_trial(make_spec(compression={"name": "distill", "student": "no_such_module:f"}))
    assert bad.status == "infeasible" and "no_such_module" in bad.message
    missing = run_one_trial(make_spec(compression={"name": "distill",
                                                   "teacher_checkpoint": str(tmp_path / "none.pt")}))
    assert missing.status == "infeasible" and "teacher_checkpoint" in missing.message


def test_distillation_loss_is_the_task_loss_at_alpha_zero_and_zero_when_matching_the_teacher():
    teacher = linear_heavy_mlp().eval()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    task = nn.functional.cross_entropy
    with torch.no_grad():
        out = teacher(x)
    assert float(distill.distillation_loss(teacher, task, 3.0, 0.0)(out, y, x)) == pytest.approx(float(task(out, y)))
    assert float(distill.distillation_loss(teacher, task, 3.0, 1.0)(out, y, x)) == pytest.approx(0.0, abs=1e-5)
    student_out = out + torch.randn_like(out)
    assert float(distill.distillation_loss(teacher, task, 3.0, 1.0)(student_out, y, x)) > 0.01


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_semi_structured_pruning_runs_on_sparse_kernels_on_the_gpu():
    result = run_one_trial(make_spec(device="cuda", compression={"name": "prune", "method": "2:4", "when": "after",
                                                                 "finetune_steps": 10}, budget={"steps": 60}))
    assert result.ok, result.message
    m = result.metrics
    assert m["semi_structured_layers"] >= 1 and m["inference_on_cpu"] == 0.0
    assert m["accuracy"] >= m["accuracy_uncompressed"] - 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not package_available("torchao"), reason="needs torchao")
def test_int8_weight_only_on_the_gpu_keeps_accuracy_and_shrinks_the_model():
    result = run_one_trial(make_spec(device="cuda", compression={"name": "quantize", "method": "int8-weight-only"},
                                     budget={"steps": 100}))
    assert result.ok, result.message
    m = result.metrics
    assert m["accuracy"] >= m["accuracy_uncompressed"] - INT8_ACCURACY_TOLERANCE
    assert m["compression_ratio"] >= 3.0 and m["inference_on_cpu"] == 0.0


@pytest.mark.gpu
def test_dynamic_int8_on_a_gpu_trial_runs_on_the_cpu_and_says_so():
    result = run_one_trial(make_spec(device="cuda", compression={"name": "quantize"}, budget={"steps": 60}))
    assert result.ok, result.message
    assert result.metrics["inference_on_cpu"] == 1.0


# --------------------------------------------------------------------------------------------- dispatch
def test_compression_hooks_reach_only_the_selected_compression_plugin(run_trial, hook_recorder, tmp_path,
                                                                      monkeypatch):
    """The compression axis's hooks run on its technique's plugin alone, and what they return is used: the loss
    of ``harness_build_loss`` trains the student, the model of ``harness_compress_after_training`` is evaluated."""
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    recorder = hook_recorder()
    distilled = run_trial.ok(compression={"name": "distill", "alpha": 1.0, "teacher_steps": 60},
                             budget={"steps": 30})
    assert recorder.plugins_called("build_loss") == {"distill"}
    (call,) = recorder.calls_of("build_loss")
    assert callable(call.result)  # the distillation loss, which the student trained on (alpha 1: no labels)
    assert "accuracy_teacher" in distilled.metrics
    recorder.clear()
    pruned = run_trial.ok(compression={"name": "prune", "sparsity": 0.5, "when": "after", "finetune_steps": 5},
                          budget={"steps": 30})
    assert recorder.plugins_called("compress_after_training") == {"prune"}
    assert "accuracy_uncompressed" in pruned.metrics  # the returned model was evaluated again
    assert pruned.metrics["nonzero_parameter_count"] < pruned.metrics["parameter_count"]
