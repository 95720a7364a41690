"""The built-in workloads (seed-cnn, resnet18, gpt), the CIFAR-10 reader and bring-your-own workloads."""
from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.errors import SpecError
from harness.testing import make_spec
from harness.trial import run_trial
from plugins import _cifar, gpt

TESTS_DIR = Path(__file__).parent


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory) -> Path:
    return _cifar.write_tiny_cifar(tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py", n_train=320,
                                   n_test=96, seed=3)


def initial_val_loss(registry, spec) -> float:
    """Held-out loss of the workload's freshly initialised model (the trial builds the same one: same seed)."""
    wl = registry.workloads[spec.workload].build(device=torch.device("cpu"), seed=spec.seed, **spec.workload_params)
    wl.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in wl.test.eval_batches(64, spec.budget.eval_samples):
            total += float(wl.loss_of(wl.model(x), y)) * y.numel()
            count += y.numel()
    return total / count


# ------------------------------------------------------------------------------------------------ CIFAR reader
def test_cifar_reader_matches_the_raw_batches(tiny_cifar):
    def raw(name):
        with open(tiny_cifar / name, "rb") as f:
            return pickle.load(f, encoding="bytes")

    raw_train = [raw(f"data_batch_{i}") for i in range(1, 6)]
    raw_test = raw("test_batch")
    train, test = _cifar.load_cifar(tiny_cifar)

    assert train.inputs.shape == (320, 3, 32, 32) and train.inputs.dtype == torch.float32
    assert test.inputs.shape == (96, 3, 32, 32)
    assert train.targets.tolist() == [lab for b in raw_train for lab in b[b"labels"]]
    assert test.targets.tolist() == raw_test[b"labels"]
    # pixel (c, h, w) of image i is byte c*1024 + h*32 + w of its row, scaled to [0, 1] and standardised
    data = np.concatenate([b[b"data"] for b in raw_train])
    for i, c, h, w in [(0, 0, 0, 0), (5, 1, 7, 30), (319, 2, 31, 31), (100, 2, 16, 3)]:
        expected = (data[i, c * 1024 + h * 32 + w] / 255.0 - _cifar.MEAN[c]) / _cifar.STD[c]
        assert train.inputs[i, c, h, w].item() == pytest.approx(expected, abs=1e-5)
    assert _cifar.class_names(tiny_cifar)[0] == "airplane"


@pytest.mark.parametrize("remove", ["data_batch_3", "test_batch"])
def test_cifar_directory_missing_a_batch_file_is_a_spec_error(tiny_cifar, tmp_path, remove):
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in tiny_cifar.iterdir():
        if f.name != remove:
            (partial / f.name).write_bytes(f.read_bytes())
    with pytest.raises(SpecError, match=f"workload.data_dir: .* lacks the CIFAR-10 batch file\\(s\\) {remove}"):
        _cifar.load_cifar(partial)


@pytest.mark.parametrize("workload", ["seed-cnn", "resnet18"])
def test_harness_run_with_a_missing_data_dir_exits_2_with_one_line(harness_cli, tmp_path, workload):
    code, out, err = harness_cli("run", "--workload", workload, "--device", "cpu", "--steps", "20",
                                 "--set", f"workload.data_dir={tmp_path / 'no-such-dir'}")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "workload.data_dir" in lines[0] and "no-such-dir" in lines[0], err
    assert "Traceback" not in err + out


def test_synthetic_cifar_is_seeded_and_cifar_shaped():
    a_train, a_test = _cifar.synthetic_cifar(64, 16, seed=1)
    b_train, _ = _cifar.synthetic_cifar(64, 16, seed=1)
    assert a_train.inputs.shape == (64, 3, 32, 32) and a_test.inputs.shape == (16, 3, 32, 32)
    assert torch.equal(a_train.inputs, b_train.inputs) and torch.equal(a_train.targets, b_train.targets)
    assert int(a_train.targets.max()) <= 9


# ------------------------------------------------------------------------------------------------ CNN workloads
# ResNet's batch-norm running statistics lag behind its weights after a dozen steps, so for it the (training
# mode) loss of the last step is compared instead of the held-out loss.
@pytest.mark.parametrize("workload,params,batch_size,lr,metric", [("seed-cnn", {}, 32, 1e-3, "val_loss"),
                                                                  ("resnet18", {"width": 4}, 16, 1e-2, "train_loss")])
def test_cnn_workload_trains_on_tiny_cifar(registry, tiny_cifar, workload, params, batch_size, lr, metric):
    spec = make_spec(registry=registry, workload=workload, batch_size=batch_size,
                     workload_params={"data_dir": str(tiny_cifar), **params},
                     optimizer={"name": "adamw", "lr": lr},
                     budget={"steps": 14, "warmup_steps": 2, "windows": 2})
    before = initial_val_loss(registry, spec)
    result = run_trial(spec, registry)
    assert result.ok, result.message
    assert result.metrics[metric] < 0.8 * before, (before, result.metrics)
    assert result.metrics["eval_samples"] == 96
    wl = registry.workloads[workload].build(device="cpu", seed=0, data_dir=str(tiny_cifar), **params)
    student = wl.make_student()
    assert student(torch.zeros(2, *wl.input_shape)).shape == (2, 10)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in wl.model.parameters())


def test_resnet18_has_the_cifar_stem_and_resnet18_size():
    from plugins.resnet18 import resnet18

    model = resnet18()
    stem = model.stem[0]
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    # torchvision's CIFAR-stem ResNet-18 with 10 classes has 11,173,962 parameters
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


# ------------------------------------------------------------------------------------------------ gpt
def test_gpt_held_out_split_is_the_last_5_percent_and_disjoint():
    data = gpt.read_corpus(None, 200_000)
    assert len(data) == 200_000 and b"def " in data  # real Python source
    assert gpt.read_corpus(None, 200_000) == data  # deterministic
    train, test = gpt.split_tokens(data)
    assert len(test) == 200_000 - int(200_000 * 0.95)
    assert torch.equal(torch.cat([train, test]), torch.tensor(list(data)))
    wl = gpt.build(device="cpu", seed=0, corpus_bytes=200_000)
    assert torch.equal(wl.train.tokens, train) and torch.equal(wl.test.tokens, test)
    x, y = next(wl.train.train_batches(8, seed=0))
    assert x.shape == (8, 64) and torch.equal(x[:, 1:], y[:, :-1])


def test_gpt_tiny_trains_on_the_stdlib_corpus(registry):
    spec = make_spec(registry=registry, workload="gpt", batch_size=16,
                     workload_params={"size": "tiny", "corpus_bytes": 300_000},
                     optimizer={"name": "adamw", "lr": 3e-3},
                     budget={"steps": 30, "warmup_steps": 2, "windows": 2, "eval_samples": 128})
    before = initial_val_loss(registry, spec)
    assert before == pytest.approx(math.log(256), rel=0.05)  # an untrained model is uniform over bytes
    result = run_trial(spec, registry)
    assert result.ok, result.message
    assert result.metrics["val_loss"] < before - 1.0, result.metrics
    assert result.metrics["throughput_tokens_per_s"] == pytest.approx(
        64 * result.metrics["throughput_samples_per_s"])


def test_gpt_corpus_param_and_missing_corpus(registry, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 400)
    params = registry.validate_workload("workload", "gpt", {"corpus": str(text), "n_layer": 1})
    wl = gpt.build(device="cpu", seed=0, **params)
    assert wl.info["corpus_bytes"] == text.stat().st_size and len(wl.model.blocks) == 1
    with pytest.raises(SpecError, match="workload.corpus: .*missing.txt' does not exist"):
        registry.validate_workload("workload", "gpt", {"corpus": str(tmp_path / "missing.txt")})
    with pytest.raises(SpecError, match="workload.n_head"):
        registry.validate_workload("workload", "gpt", {"n_embd": 64, "n_head": 3})


def test_gpt_presets():
    assert gpt.resolve_size({"size": "124M"}) == dict(n_layer=12, n_embd=768, n_head=12, seq_len=1024,
                                                      vocab_size=50304)
    assert gpt.resolve_size({"size": "124M", "seq_len": 256})["seq_len"] == 256
    # GPT-2-124M: 85M non-embedding parameters (12 layers of 12 d^2 + 13 d, final LayerNorm)
    assert gpt.non_embedding_params(12, 768) == 85_056_000
    model = gpt.GPT(**gpt.PRESETS["tiny"])
    assert model.lm_head.weight is model.wte.weight


def test_gpt_flops_formula_matches_torch_flop_counter():
    """The counter sees every matmul (SDPA's math backend on the CPU decomposes into bmm); the formula also
    counts 6 x the bias and LayerNorm parameters, so it may exceed the counted matmuls by up to 2%."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    shape = dict(n_layer=2, n_embd=64, n_head=2, seq_len=64, vocab_size=256)
    model, batch = gpt.GPT(**shape), 2
    ids = torch.randint(0, 256, (batch, shape["seq_len"]))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    counted = counter.get_total_flops() / batch
    formula = gpt.training_flops_per_sample(**shape)
    assert counted <= formula <= 1.02 * counted, (counted, formula)


# ------------------------------------------------------------------------------------------------ bring your own
@pytest.mark.slow
def test_bring_your_own_workload_runs_through_harness_run(harness_cli, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))  # the isolated worker imports the module too
    code, out, err = harness_cli("run", "--workload", "byo_workload:two_moons", "--device", "cpu",
                                 "--optimizer", "adamw", "--set", "optimizer.lr=0.01", "--set", "workload.hidden=16",
                                 "--steps", "150", "--batch-size", "64", "--json", tmp_path / "result.json")
    assert code == 0, err + out
    import json

    result = json.loads((tmp_path / "result.json").read_text())
    assert result["spec"]["workload"] == "byo_workload:two_moons"
    assert result["spec"]["workload_params"] == {"hidden": 16}
    assert result["metrics"]["accuracy"] >= 0.85, result["metrics"]


def test_bring_your_own_workload_unknown_function_exits_2(harness_cli, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    code, _, err = harness_cli("run", "--workload", "byo_workload:no_such_function", "--device", "cpu")
    assert code == 2 and "no function 'no_such_function'" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ parity script
def test_parity_benchmark_quick_run_prints_a_ratio_table(capsys, monkeypatch, tmp_path):
    import importlib.util
    import json

    path = TESTS_DIR.parent / "benchmarks" / "parity.py"
    spec = importlib.util.spec_from_file_location("parity_benchmark", path)
    parity = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "parity_benchmark", parity)  # dataclasses look their module up there
    spec.loader.exec_module(parity)
    assert parity.main(["--quick", "--only", "gpt-tiny-b8", "--rounds", "1", "--json", str(tmp_path / "p.json")]) == 0
    table = capsys.readouterr().out
    assert "| gpt-tiny-b8 | 8 | fp32 | 12 |" in table
    result = json.loads((tmp_path / "p.json").read_text())["results"][0]
    assert result["rounds"][0]["harness_samples_per_s"] > 0 and result["rounds"][0]["hand_samples_per_s"] > 0
    assert result["ratio_median"] == pytest.approx(result["rounds"][0]["harness_samples_per_s"]
                                                   / result["rounds"][0]["hand_samples_per_s"])
