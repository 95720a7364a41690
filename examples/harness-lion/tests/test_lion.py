"""harness-lion's own tests, written with the kit gpu-harness gives plugin authors: the ``harness.testing``
helpers and the fixtures of its pytest plugin (``run_trial``, ``hook_recorder``...), which installing the
harness provides: no conftest needed. The conformance check, Lion's update rule, one trial on the tiny
built-in workload, and a small study that picks ``lion``."""
from __future__ import annotations

import math

import torch
from harness.testing import check_plugin, run_small_study

import harness_lion.plugin
from harness_lion import Lion


def test_the_plugin_conforms_to_the_harness_contract():
    assert check_plugin(harness_lion.plugin) == []


def test_lion_steps_by_the_sign_of_the_interpolated_momentum():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    grads = [torch.tensor([0.5, -1.0, 0.0]), torch.tensor([-2.0, -0.1, 4.0])]
    expected, m = p.detach().clone(), torch.zeros(3)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * torch.sign(0.9 * m + 0.1 * g)
        m = 0.99 * m + 0.01 * g
    torch.testing.assert_close(p.detach(), expected)
    torch.testing.assert_close(opt.state[p]["exp_avg"], m)


def test_lion_trains_the_tiny_workload(run_trial, hook_recorder):
    recorder = hook_recorder()
    result = run_trial.ok(optimizer={"name": "lion", "lr": 3e-3}, budget={"steps": 80})
    assert recorder.plugins_called("build_optimizer") == {"lion"}
    assert result.metrics["accuracy"] > 0.9
    assert result.metrics["val_loss"] < 0.5 * math.log(4)  # 4 classes: an untrained model scores ~log(4)


def test_a_small_study_picks_lion(tmp_path):
    study = {"name": "lion-only",
             "axes": {"optimizer": {"lion": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}}},
             "omitted_params": "default",  # search lr only; beta1, beta2, weight_decay keep their defaults
             "budget": {"steps": 30, "warmup_steps": 3, "windows": 3},
             "objectives": ["throughput", "accuracy"], "n_trials": 2}
    records, pareto = run_small_study(study, tmp_path)
    assert len(records) == 2 and pareto
    for record in records:
        assert record.state == "COMPLETE", record.message
        assert record.spec["optimizer"]["name"] == "lion"
        assert record.metrics["accuracy"] > 0.8
