"""The data axis: soft targets (``harness.workload.SoftTargets``) and the techniques that produce them -- Mixup,
CutMix, label smoothing -- change the training targets exactly as specified, split into micro-batches, go through
torch.compile without recompiling, train real digits, leave evaluation batches alone and are ruled out in one
line on workloads they cannot handle."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from harness import hookimpl
from harness.config import load_yaml
from harness.plugins import get_registry
from harness.space import Environment, Technique
from harness.step import Engine, Precision, TrainStep
from harness.testing import make_spec, run_one_trial, run_small_study
from harness.trial import Trial
from harness.workload import SoftTargets, Workload
from plugins.cutmix import CutMix
from plugins.label_smoothing import LabelSmoothing
from plugins.mixup import Mixup

CPU = torch.device("cpu")
DATA_TECHNIQUES = [name for name in get_registry().names("data") if name != "none"]
STUDY = Path(__file__).parents[1] / "studies" / "digits-data.yaml"


def onehot(index: torch.Tensor, classes: int) -> torch.Tensor:
    return nn.functional.one_hot(index, classes).float()


def dense_cross_entropy(logits: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a materialised target distribution: the definition SoftTargets must match."""
    return -(dense * logits.float().log_softmax(-1)).sum(-1).mean()


def images(n: int = 16, channels: int = 3, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)


# ============================================================================================ soft targets
def test_smoothed_targets_sum_to_one_and_mix_the_onehot_with_the_uniform():
    y = torch.tensor([0, 3, 9, 3])
    dense = SoftTargets(y, smoothing=0.2).dense(10)
    assert torch.allclose(dense.sum(-1), torch.ones(4))
    assert torch.allclose(dense, 0.8 * onehot(y, 10) + 0.2 / 10)


@pytest.mark.parametrize("lam", [torch.tensor(0.3), torch.tensor([0.1, 0.5, 0.9, 1.0])], ids=["batch", "sample"])
def test_mixed_soft_targets_are_the_convex_combination_of_two_smoothed_onehots(lam):
    a, b = torch.tensor([1, 2, 3, 4]), torch.tensor([4, 3, 2, 1])
    dense = SoftTargets(a, b, lam, smoothing=0.1).dense(5)
    w = lam.reshape(-1, 1) if lam.dim() else lam
    smooth = lambda y: 0.9 * onehot(y, 5) + 0.1 / 5  # noqa: E731
    assert torch.allclose(dense, w * smooth(a) + (1 - w) * smooth(b))
    assert torch.allclose(dense.sum(-1), torch.ones(4))


@pytest.mark.parametrize("shape", [(12, 7), (3, 5, 11)], ids=["classification", "language-model"])
@pytest.mark.parametrize("lam", ["none", "batch", "sample"])
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_the_default_loss_of_soft_targets_is_cross_entropy_against_their_dense_distribution(shape, lam, smoothing):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(*shape, generator=gen)
    a, b = (torch.randint(0, shape[-1], shape[:-1], generator=gen) for _ in range(2))
    weight = {"none": None, "batch": torch.tensor(0.35), "sample": torch.rand(shape[0], generator=gen)}[lam]
    soft = SoftTargets(a, None if weight is None else b, weight, smoothing)
    workload = Workload("soft", nn.Identity(), None, None)
    loss = workload.loss_of(logits, soft)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(dense_cross_entropy(logits, soft.dense(shape[-1])).item(), rel=1e-5)


def test_soft_targets_split_into_micro_batches_like_a_tensor():
    a, b, lam = torch.arange(8) % 5, torch.arange(8).flip(0) % 5, torch.linspace(0, 1, 8)
    for soft in (SoftTargets(a, b, lam, 0.1), SoftTargets(a, b, torch.tensor(0.4)), SoftTargets(a, smoothing=0.1)):
        parts = soft.chunk(4)
        assert len(parts) == len(a.chunk(4)) == 4
        assert torch.equal(torch.cat([p.dense(5) for p in parts]), soft.dense(5))


def test_gradient_accumulation_of_soft_targets_takes_the_same_step_as_one_batch():
    x, y = images(n=8, channels=1, size=4)
    soft = SoftTargets(y, y.roll(1), torch.rand(8, generator=torch.Generator().manual_seed(2)), 0.1)
    params = []
    for accumulation in (1, 2, 4):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
        engine = Engine(model, torch.optim.SGD(model.parameters(), lr=0.5), Precision())
        workload = Workload("w", model, None, None)
        step = TrainStep(engine, lambda out, t, _x, w=workload: w.loss_of(out, t), Precision(),
                         accumulation_steps=accumulation)
        step(x, soft)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(params[0], params[1], atol=1e-6) and torch.allclose(params[0], params[2], atol=1e-6)


def test_a_compiled_loss_takes_soft_targets_of_every_batch_without_recompiling():
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    loss = torch.compile(Workload("w", nn.Identity(), None, None).loss_of, backend="eager")
    logits = torch.randn(6, 10)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        soft = SoftTargets(torch.randint(0, 10, (6,), generator=gen), torch.randint(0, 10, (6,), generator=gen),
                           torch.rand((), generator=gen), 0.1)
        assert loss(logits, soft).item() == pytest.approx(dense_cross_entropy(logits, soft.dense(10)).item(), rel=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, "a new lam per batch must not recompile the step"


# ============================================================================================ the techniques
def test_a_mixup_batch_is_the_convex_combination_of_samples_and_of_their_targets():
    x, y = images()
    mixed, soft = Mixup(alpha=0.4, seed=0, device=CPU)(x, y)
    lam = soft.lam
    assert isinstance(lam, torch.Tensor) and lam.dim() == 0 and 0.0 <= lam.item() <= 1.0
    # recover each sample's partner from the mixed batch, then check both combinations against it
    partner_rows = ((mixed - lam * x) / (1 - lam)).flatten(1)
    distances = torch.cdist(partner_rows, x.flatten(1))
    perm = distances.argmin(1)
    assert distances.min(1).values.max() < 1e-3, "every mixed sample is lam * x + (1 - lam) * another sample"
    assert sorted(perm.tolist()) == list(range(len(x))), "the partners are a permutation of the batch"
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm], atol=1e-5)
    assert torch.equal(soft.a, y) and torch.equal(soft.b, y[perm]) and soft.smoothing == 0.0
    assert torch.allclose(soft.dense(10), lam * onehot(y, 10) + (1 - lam) * onehot(y[perm], 10))


def test_mixup_draws_are_reproducible_from_the_seed_and_change_per_batch():
    x, y = images()
    first, second = Mixup(0.4, seed=3, device=CPU), Mixup(0.4, seed=3, device=CPU)
    lams = [first(x, y)[1].lam.item() for _ in range(4)]
    assert lams == [second(x, y)[1].lam.item() for _ in range(4)]
    assert len(set(lams)) == 4
    assert Mixup(0.4, seed=4, device=CPU)(x, y)[1].lam.item() != lams[0]


def test_a_small_mixup_alpha_never_gives_a_nan_weight():
    mixer = Mixup(alpha=0.05, seed=0, device=CPU)
    x, y = images(n=4)
    lams = torch.stack([mixer(x, y)[1].lam for _ in range(2000)])
    assert torch.isfinite(lams).all() and (lams >= 0).all() and (lams <= 1).all()
    assert ((lams < 0.01) | (lams > 0.99)).float().mean() > 0.5, "Beta(0.05, 0.05) puts most mass near 0 and 1"


@pytest.mark.parametrize("seed", range(8))
def test_cutmix_pastes_one_box_whose_area_matches_the_corrected_lam(seed):
    n, size = 12, 16
    x = torch.arange(1, n + 1, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 3, size, size).contiguous()
    y = torch.arange(n) % 10
    mixed, soft = CutMix(alpha=1.0, seed=seed, device=CPU)(x, y)
    pasted = mixed != x  # every pixel of a sample that was replaced (none when a sample is its own partner)
    moved = [i for i in range(n) if pasted[i].any()]
    assert moved, "some sample got a partner other than itself"
    box = pasted[moved[0], 0]
    rows, cols = box.any(1), box.any(0)
    assert torch.equal(box, rows[:, None] & cols[None, :]), "the pasted region is one axis-aligned box"
    for i in moved:
        assert torch.equal(pasted[i], pasted[moved[0]]), "the same box for every sample of the batch"
        partner = int(mixed[i][pasted[i]].unique().item()) - 1  # sample j is filled with j + 1
        assert soft.b[i] == y[partner], "the second target is the partner's, whose box was pasted"
    kept = 1.0 - box.float().mean()
    assert soft.lam.item() == pytest.approx(kept.item()), "lam is the area each image keeps"
    assert torch.equal(soft.a, y)


def test_cutmix_cuts_the_same_box_from_a_channels_last_batch():
    x, y = images(n=8, channels=3, size=12, seed=5)
    plain, soft_plain = CutMix(1.0, seed=1, device=CPU)(x, y)
    nhwc, soft_nhwc = CutMix(1.0, seed=1, device=CPU)(x.contiguous(memory_format=torch.channels_last), y)
    assert torch.equal(plain, nhwc) and soft_plain.lam.item() == soft_nhwc.lam.item()
    assert soft_plain.lam.item() < 1.0 or torch.equal(plain, x)


def test_label_smoothing_leaves_the_inputs_and_smooths_the_targets():
    x, y = images()
    inputs, soft = LabelSmoothing(0.1)(x, y)
    assert inputs is x
    assert torch.allclose(soft.dense(10), 0.9 * onehot(y, 10) + 0.01)


# ============================================================================================ in trials
@pytest.mark.parametrize("name", DATA_TECHNIQUES)
def test_each_data_technique_trains_digits(name):
    result = run_one_trial(data=name, budget={"steps": 80})
    assert result.status == "ok", result.message
    assert result.spec["data"]["name"] == name
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["train_loss"] < math.log(10)
    assert result.metrics["accuracy"] > 0.5, "well above chance (0.1) on the held-out digits"


def test_label_smoothing_trains_a_language_model():
    result = run_one_trial(workload="gpt", data={"name": "label-smoothing", "smoothing": 0.2},
                           workload_params={"corpus_bytes": 200_000}, batch_size=8, budget={"steps": 12})
    assert result.status == "ok", result.message
    assert math.isfinite(result.metrics["train_loss"]) and result.metrics["val_loss"] < math.log(256)


def test_distillation_takes_the_soft_targets_of_a_data_technique(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))
    result = run_one_trial(compression={"name": "distill", "teacher_steps": 40}, data="label-smoothing",
                           budget={"steps": 200})
    assert result.status == "ok", result.message
    assert result.metrics["accuracy"] > 0.5 and math.isfinite(result.metrics["train_loss"])


def step_losses(steps: int, **fields) -> list[float]:
    """Losses of the first ``steps`` calls of a trial's (possibly captured) train step on its training batches."""
    trial = Trial(make_spec(**fields))
    trial.setup()
    trial.engine.train(True)
    return [float(trial.step_fn(*next(trial.batches))) for _ in range(steps)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", DATA_TECHNIQUES)
def test_a_captured_cuda_graph_step_follows_eager_on_soft_targets(name):
    # the transform runs outside the graph, on the same device generator in both runs: the same batches
    eager = step_losses(12, device="cuda", data=name)
    graph = step_losses(12, device="cuda", data=name, compile="cuda-graph")
    assert graph[0] == pytest.approx(eager[0], rel=1e-5)
    progress = eager[0] - min(eager)
    assert max(abs(g - e) for g, e in zip(graph, eager, strict=True)) < 0.05 * progress


@pytest.mark.gpu
@pytest.mark.parametrize("name", DATA_TECHNIQUES)
def test_torch_compile_trains_on_soft_targets_on_gpu(name):
    result = run_one_trial(device="cuda", workload="seed-cnn", data=name, compile="torch-compile",
                           workload_params={"synthetic_samples": 1024, "synthetic_test_samples": 64},
                           budget={"steps": 30})
    assert result.status == "ok", result.message
    assert math.isfinite(result.metrics["train_loss"])


@pytest.mark.parametrize("name, workload, words", [
    ("mixup", "gpt", "data technique 'mixup' applies to classification workloads; workload 'gpt' is lm/transformer"),
    ("cutmix", "gpt", "data technique 'cutmix' applies to image+classification workloads; workload 'gpt' is "
                      "lm/transformer"),
    ("cutmix", "harness.testing:tiny_workload", "data technique 'cutmix' applies to image+classification workloads"),
    ("label-smoothing", "byo_workload:two_moons", "data technique 'label-smoothing' applies to classification/lm "
                                                  "workloads; workload 'byo_workload:two_moons' is mlp"),
])
def test_a_data_technique_is_ruled_out_in_one_line_on_a_workload_it_cannot_handle(name, workload, words):
    result = run_one_trial(workload=workload, data=name, budget={"steps": 8})
    assert result.status == "infeasible" and words in result.message, result.message
    assert "\n" not in result.message


def test_kinds_joined_by_plus_are_needed_together(registry):
    from harness.space import infeasible_reason

    spec = make_spec(registry=registry, data="cutmix")  # cutmix declares ("image+classification",)
    for kinds, ok in ((("image", "classification", "conv"), True), (("image", "conv"), False),
                      (("classification", "mlp"), False)):
        reason = infeasible_reason(spec, registry.techniques, Environment.detect(), kinds)
        assert (reason is None) == ok, (kinds, reason)
        assert ok or "data technique 'cutmix' applies to image+classification workloads" in reason


class ZeroLabels:
    """A test data technique that trains every batch towards class 0 and counts its calls."""

    def __init__(self) -> None:
        self.batches = 0
        self.built = 0

    @hookimpl
    def harness_declare_techniques(self):
        return [Technique(axis="data", name="zero-labels")]

    @hookimpl
    def harness_build_data_transform(self):
        self.built += 1

        def transform(inputs, targets):
            self.batches += 1
            return inputs, torch.zeros_like(targets)

        return transform


def test_training_batches_go_through_the_transform_and_evaluation_batches_do_not(make_registry, run_trial):
    plugin = ZeroLabels()
    result = run_trial.ok(registry=make_registry(plugin), workload="digits", data="zero-labels",
                          budget={"steps": 40, "eval_every_steps": 20})
    assert plugin.built == 1 and plugin.batches == result.metrics["steps"] == 40, "each training step, once"
    assert result.metrics["train_loss"] < 0.05, "it learnt the transformed targets (all class 0)"
    assert result.metrics["accuracy"] < 0.2, "evaluated against the true labels: only the zeros are right"


# ============================================================================================ the study file
def test_the_digits_data_study_searches_the_data_axis_and_reports_time_to_accuracy(tmp_path):
    data = dict(load_yaml(STUDY))
    assert set(data["axes"]["data"]) == {"none", "mixup", "cutmix", "label-smoothing"}
    assert [next(iter(o)) for o in data["objectives"]] == ["time_to_accuracy", "accuracy"]
    data.update(budget={"steps": 30, "warmup_steps": 3, "windows": 2, "eval_every_steps": 10, "noise_threshold": 0},
                target_accuracy=0.3, n_trials=2, storage="sqlite:///data.db")
    data.pop("mlflow")
    records, pareto = run_small_study(data, tmp_path, registry=get_registry(disable=["mlflow"]))
    assert len(records) == 2 and pareto
    for r in records:
        assert r.state == "COMPLETE", r.message
        assert 0 < r.metrics["time_to_accuracy_s"] <= r.metrics["train_time_s"]
        assert r.params["data"] in {"none", "mixup", "cutmix", "label-smoothing"}
