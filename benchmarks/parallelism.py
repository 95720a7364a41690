"""One-GPU figures of the parallelism plugins: throughput and peak GPU memory of GPT models under plain
single-device training and DeepSpeed ZeRO (stage 2, stage 3, stage 3 with CPU offload), and capacity: the
largest GPT that trains with plain AdamW vs with ZeRO-3 + CPU offload of optimizer and parameters.

Every configuration is a real trial through ``harness.launch`` (its own process; DeepSpeed runs with a
one-process NCCL group), so an out-of-memory trial is classified ``oom`` and the next one starts clean.

    python benchmarks/parallelism.py throughput --out results/      # gpt-124M and gpt-1B x 4 configurations
    python benchmarks/parallelism.py capacity --out results/        # grow n_layer at n_embd 4096 until OOM
    python benchmarks/parallelism.py throughput --cpu --out /tmp/r  # smoke run of the same code on the CPU

``--deadline-s`` stops starting new trials after that many seconds (the results so far are still written).
DeepSpeed's CUDA ops (FusedAdam, CPUAdam) are compiled on first use; on H100 images they need
``TORCH_CUDA_ARCH_LIST=9.0`` (set here when unset).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

CONFIGS = {
    "single": {"name": "single"},
    "zero2": {"name": "deepspeed", "stage": 2},
    "zero3": {"name": "deepspeed", "stage": 3},
    "zero3-offload": {"name": "deepspeed", "stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"},
}
MODELS = {  # name: (workload params, global batch, steps)
    "gpt-124M": ({"size": "124M"}, 16, 20),
    "gpt-1B": ({"size": "1B"}, 8, 10),
}
#: capacity runs widen nothing but depth: n_embd 4096 (32 heads), sequence 1024, GPT-2 vocabulary.
CAPACITY_WIDTH = 4096


def gpt_params(n_layer: int, n_embd: int, seq_len: int = 1024, vocab_size: int = 50304) -> int:
    """Parameter count of the ``gpt`` workload's model (tied output layer)."""
    block = 12 * n_embd * n_embd + 13 * n_embd
    return n_layer * block + 2 * n_embd + (vocab_size + seq_len) * n_embd


def make(workload_params: dict, parallelism: dict, batch: int, steps: int, cpu: bool):
    from harness.testing import make_spec

    return make_spec(workload="gpt", workload_params=workload_params, batch_size=batch,
                     optimizer={"name": "adamw", "lr": 3e-4, "implementation": "default" if cpu else "fused"},
                     precision="fp32" if cpu else "amp-bf16", compile="eager", parallelism=parallelism,
                     devices=1, device="cpu" if cpu else "cuda",
                     budget={"steps": steps, "warmup_steps": max(2, steps // 4), "windows": min(3, steps // 2),
                             "eval_samples": 8})


def run(spec, timeout_s: float) -> dict:
    from harness.launch import LaunchOptions, launch

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-par-") as tmp:
        result = launch(spec, Path(tmp), LaunchOptions(timeout_s=timeout_s))
    m = result.metrics
    row = {"status": result.status, "message": result.message[:300], "wall_s": round(time.monotonic() - t0, 1),
           "throughput_tokens_per_s": m.get("throughput_tokens_per_s"), "step_time_cv": m.get("step_time_cv"),
           "peak_memory_gib": m["peak_memory_bytes"] / 2 ** 30 if m.get("peak_memory_bytes") else None,
           "mfu": m.get("mfu"), "train_loss": m.get("train_loss"), "conditions": result.conditions}
    print(json.dumps(row), flush=True)
    return row


def throughput(args) -> list[dict]:
    rows = []
    for model, (wparams, batch, steps) in MODELS.items():
        if args.cpu:
            wparams, batch, steps = {"size": "tiny"}, 8, 6
        for config, parallelism in CONFIGS.items():
            if time.monotonic() - args.t0 > args.deadline_s:
                print(f"deadline: skipping {model} {config}", flush=True)
                continue
            print(f"== {model} {config}", flush=True)
            rows.append({"model": model, "config": config, "batch": batch,
                         **run(make(wparams, parallelism, batch, steps, args.cpu), args.timeout_s)})
    return rows


def capacity(args) -> list[dict]:
    """Grow depth until the configuration fails; record the largest that trained."""
    rows = []
    ladders = {"single": [int(x) for x in args.plain_layers.split(",")],
               "zero3-offload": [int(x) for x in args.offload_layers.split(",")]}
    for config, layers in ladders.items():
        for n_layer in layers:
            if time.monotonic() - args.t0 > args.deadline_s:
                print(f"deadline: skipping {config} n_layer={n_layer}", flush=True)
                break
            width = 64 if args.cpu else CAPACITY_WIDTH
            wparams = {"size": "1B", "n_layer": n_layer, "n_embd": width, "n_head": max(1, width // 128)}
            print(f"== capacity {config} n_layer={n_layer} params={gpt_params(n_layer, width) / 1e9:.2f}B",
                  flush=True)
            parallelism = dict(CONFIGS[config])
            if "offload_param" in parallelism:  # pinning ~100 GiB of host buffers risks the host's memory
                parallelism["offload_pin_memory"] = False
            row = run(make(wparams, parallelism, args.capacity_batch, 4, args.cpu), args.timeout_s)
            rows.append({"config": config, "n_layer": n_layer, "n_embd": width,
                         "params": gpt_params(n_layer, width), **row})
            # an ascending ladder stops at the first failure, a descending one at the first size that trains
            ascending = layers == sorted(layers)
            if (row["status"] != "ok") == ascending:
                break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("throughput", "capacity"))
    parser.add_argument("--out", default="results")
    parser.add_argument("--cpu", action="store_true", help="smoke run on the CPU (tiny model, fp32)")
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument("--deadline-s", type=float, default=480)
    parser.add_argument("--plain-layers", default="16,20,24", help="capacity ladder (n_layer) for plain AdamW")
    parser.add_argument("--offload-layers", default="28,24", help="capacity ladder for ZeRO-3 + CPU offload")
    parser.add_argument("--capacity-batch", type=int, default=2)
    args = parser.parse_args()
    args.t0 = time.monotonic()
    rows = throughput(args) if args.part == "throughput" else capacity(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"parallelism_{args.part}.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
