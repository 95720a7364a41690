"""The sharded-training benchmark scripts on the CPU: the profile's interval arithmetic on a known trace, and each
script's code path end to end with gloo (benchmarks/sharded.py, sharded_profile.py, parallelism.py capacity), so
that a GPU call runs them unattended. The GPU figures themselves are in docs/benchmarks.md."""
from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmarks(monkeypatch, tmp_path):
    """The benchmarks folder importable (as when a script runs), DeepSpeed on its CPU accelerator, runs in tmp."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.chdir(tmp_path)
    for name in ("sharded", "sharded_profile", "parallelism", "zero3_parity"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def kernel(name: str, start: float, end: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": start, "dur": end - start, "args": {"device": 0}}


@pytest.mark.usefixtures("benchmarks")
def test_profile_summary_separates_compute_communication_and_idle_time():
    from sharded_profile import summarize

    # two steps over 0..1000 us: compute 0-300 and 500-800, an all-gather 200-400 (100 us hidden under compute),
    # a reduce-scatter 800-900 (all exposed), a copy 950-1000; idle: 400-500 and 900-950; other device ignored
    trace = {"traceEvents": [
        kernel("ampere_bf16_gemm", 0, 300), kernel("ncclDevKernel_AllGather_RING", 200, 400),
        kernel("triton_fused_gelu", 500, 800), kernel("ncclDevKernel_ReduceScatter_Sum", 800, 900),
        kernel("Memcpy DtoD", 950, 1000, cat="gpu_memcpy"), {**kernel("other_gpu", 0, 5000), "args": {"device": 1}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9000}]}
    s = summarize(trace, steps=2, device=0)
    assert s["step_ms"] == pytest.approx(0.5)  # 1000 us over 2 steps
    assert s["compute_ms"] == pytest.approx(0.3)
    assert s["nccl_ms"] == pytest.approx(0.15)
    assert s["exposed_comm_ms"] == pytest.approx(0.1)  # 300 of NCCL, 100 hidden: 200 us / 2 steps
    assert s["idle_ms"] == pytest.approx(0.075)
    assert s["copy_ms"] == pytest.approx(0.025)
    assert next(iter(s["top_kernels_ms"])) == "ampere_bf16_gemm"


@pytest.mark.usefixtures("benchmarks")
def test_capacity_formula_predicts_the_measured_plain_adamw_depth():
    from parallelism import gpt_params, predicted_layers

    # measured on an H100 80GB (docs/benchmarks.md): 24 layers at n_embd 4096 trained at 76.0 GiB of its 79.2 GiB
    assert 22 <= predicted_layers("single", 79.2 * 2 ** 30, 4096, 2) <= 25
    # two GPUs with ZeRO-3/FSDP hold 16 bytes per parameter / 2: about twice the depth, past the 1.8x target
    h200 = 139.8 * 2 ** 30
    plain, sharded = predicted_layers("single", h200, 4096, 2), predicted_layers("fsdp-ac", h200, 4096, 2)
    assert gpt_params(sharded, 4096) > 1.8 * gpt_params(plain, 4096)


@pytest.mark.slow
@pytest.mark.usefixtures("benchmarks")
def test_scaling_table_runs_every_row_on_the_cpu(capsys, tmp_path):
    import sharded

    assert sharded.main(["--cpu", "--models", "tiny", "--variants", "single,ddp,fsdp", "--devices", "1,2",
                         "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 0
    rows = json.loads((tmp_path / "out" / "sharded.json").read_text())
    assert [(r["variant"], r["gpus"], r["status"]) for r in rows] == [("single", 1, "ok"), ("ddp", 2, "ok"),
                                                                      ("fsdp", 2, "ok")]
    table = capsys.readouterr().out
    assert "| tiny | ddp (eager) | 2 | 16 |" in table and "| 1.00 |" in table


@pytest.mark.slow
@pytest.mark.usefixtures("benchmarks")
def test_profile_script_writes_a_summary_and_a_trace_per_technique(tmp_path):
    import sharded_profile

    out = tmp_path / "profile"
    assert sharded_profile.main(["--cpu", "--model", "tiny", "--variants", "fsdp", "--out", str(out),
                                 "--cache", str(tmp_path / "cache")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["rows"]
    assert row["status"] == "ok" and row["steps"] > 0  # one timing window of steps was profiled
    with gzip.open(out / "fsdp" / "trace.rank0.json.gz") as f:
        assert json.load(f)["traceEvents"]
    assert (out / "fsdp" / "summary.rank1.json").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("benchmarks")
def test_capacity_bisection_finds_the_largest_depth_that_trains(tmp_path):
    import parallelism

    parallelism.main(["capacity", "--cpu", "--configs", "fsdp-ac", "--lo", "1", "--hi", "2",
                      "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "parallelism_capacity.json").read_text())
    # bisection over [1, 2]: the middle (1) trains, then 2 trains: the largest is 2
    assert [(r["n_layer"], r["status"], r["gpus"]) for r in rows] == [(1, "ok", 2), (2, "ok", 2)]


@pytest.mark.usefixtures("benchmarks")
def test_zero3_parity_cases_change_one_factor_and_report_each_trial(tmp_path, capsys):
    import zero3_parity

    base = zero3_parity.spec_fields("ddp", "tiny", "cpu")
    fp32 = zero3_parity.spec_fields("z3-blocks-fp32", "tiny", "cpu")
    changed = {k for k in fp32.keys() | base.keys() if fp32.get(k) != base.get(k)}
    assert changed == {"parallelism", "compile", "precision"}  # ZeRO-3 compiled in float32, against DDP
    math = zero3_parity.spec_fields("z3-blocks-math", "tiny", "cpu")
    assert math["workload_params"] == {"size": "tiny", "attention": "math"}  # merged, not replaced
    assert zero3_parity.spec_fields("ddp-80steps", "tiny", "cpu")["budget"]["warmup_steps"] == 5
    out = tmp_path / "rows.jsonl"
    assert zero3_parity.main(["--device", "cpu", "--size", "tiny", "--cases", "z3-eager-1gpu,single",
                              "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["case"] for r in rows] == ["z3-eager-1gpu", "single"] and all(r["ok"] for r in rows)
    # one process: ZeRO-3 in bfloat16 trains like plain training (rounding apart)
    assert rows[0]["val_loss"] == pytest.approx(rows[1]["val_loss"], rel=0.02)
    assert capsys.readouterr().out.count('"case"') == 2
    with pytest.raises(SystemExit) as exc:
        zero3_parity.main(["--cases", "z3-nothing"])
    assert exc.value.code == 2


@pytest.mark.parametrize("mode", ["leaf-compiled", "per-layer-compiled"])
def test_zero3_step_check_finds_the_cpu_engine_equal_to_a_plain_copy(tmp_path, mode):
    import subprocess

    # its own process: DeepSpeed keeps one engine's groups per process
    out = tmp_path / "step.jsonl"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "zero3_step.py"), "--device", "cpu", "--size", "tiny",
                           "--mode", mode, "--steps", "2", "--out", str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    *steps, final = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1]
    for s in steps:  # float32 on the CPU: the same kernels on the same numbers
        assert s["loss_ds"] == pytest.approx(s["loss_ref"], rel=1e-6)
        assert s["worst_grad_rel"] < 1e-5 and s["worst_param_rel"] < 1e-5, s
    assert final["eval_loss_ds"] == pytest.approx(final["eval_loss_ref"], rel=1e-6)


@pytest.mark.parametrize("mode", ["leaf-compiled", "leaf-eager"])
def test_zero3_step_trial_check_steps_the_trials_own_engine_like_a_plain_copy_on_the_cpu(tmp_path, mode):
    import subprocess

    out = tmp_path / "trial.jsonl"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "zero3_step.py"), "--trial", "--device", "cpu", "--size",
                           "tiny", "--mode", mode, "--steps", "2", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(s["source"], s["step"]) for s in steps] == [("trial", 0), ("trial", 1)]
    for s in steps:  # the backward pass reaches the blocks' parameters, and the trial trains like the copy
        assert s["block_grad_norm"] is not None and s["block_grad_norm"] > 0, s
        assert s["loss_ds"] == pytest.approx(s["loss_ref"], rel=1e-5)
        # eager: the same kernels; compiled blocks: Inductor's fused kernels round differently (measured 3e-4)
        assert s["worst_param_rel"] < (1e-6 if mode == "leaf-eager" else 1e-2), s
