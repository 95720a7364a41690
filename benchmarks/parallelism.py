"""One-GPU figures of the parallelism plugins: throughput and peak GPU memory of GPT models under plain
single-device training and DeepSpeed ZeRO (stage 2, stage 3, stage 3 with CPU offload), and capacity: the
largest GPT that trains with plain AdamW on one GPU vs with FSDP or ZeRO-3 (+ activation checkpointing) on two,
or ZeRO-3 + CPU offload on one.

Every configuration is a real trial through ``harness.launch`` (its own processes; DeepSpeed runs with a
one-process NCCL group on one GPU), so an out-of-memory trial is classified ``oom`` and the next one starts clean.

    python benchmarks/parallelism.py throughput --out results/      # gpt-124M and gpt-1B x 4 configurations
    python benchmarks/parallelism.py capacity --configs single --out results/              # one GPU
    python benchmarks/parallelism.py capacity --configs fsdp-ac,zero3-ac --out results/    # two GPUs
    python benchmarks/parallelism.py throughput --cpu --out /tmp/r  # smoke run of the same code on the CPU

Capacity grows ``n_layer`` at ``n_embd`` 4096 by bisection: it predicts the largest depth from the memory
formula (16 bytes per parameter for plain AdamW, 16/N with ZeRO-3 or FSDP on N GPUs, plus activations: only each
block's input with activation checkpointing), bisects between ``--lo`` and ``--hi`` (default: 75% and 115% of
that prediction) and prints each probe with its peak memory beside the formula. A probe of a ~15 B model takes
2-3 minutes (building it on the host dominates), so one call fits one or two configurations; ``--deadline-s``
stops starting new probes after that many seconds (the results so far are still written).
DeepSpeed's CUDA ops (FusedAdam, CPUAdam) are compiled on first use; on H100/H200 images they need
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
#: capacity configurations: name -> (parallelism, GPUs, memory technique)
AC = {"name": "activation-checkpointing", "mode": "block"}
CAPACITY = {
    "single": ({"name": "single"}, 1, "none"),
    "single-ac": ({"name": "single"}, 1, AC),
    "fsdp-ac": ({"name": "fsdp", "units": "block"}, 2, AC),
    "zero3-ac": ({"name": "deepspeed", "stage": 3}, 2, AC),
    "fsdp": ({"name": "fsdp", "units": "block"}, 2, "none"),
    "zero3-offload": ({"name": "deepspeed", "stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu",
                       "offload_pin_memory": False}, 1, "none"),  # pinning ~100 GiB of host buffers risks the host
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


def make(workload_params: dict, parallelism: dict, batch: int, steps: int, cpu: bool, devices: int = 1,
         memory: dict | str = "none"):
    from harness.testing import make_spec

    return make_spec(workload="gpt", workload_params=workload_params, batch_size=batch,
                     optimizer={"name": "adamw", "lr": 3e-4, "implementation": "default" if cpu else "fused"},
                     precision="fp32" if cpu else "amp-bf16", compile="eager", parallelism=parallelism,
                     memory=memory, devices=devices, device="cpu" if cpu else "cuda",
                     budget={"steps": steps, "warmup_steps": max(2, steps // 4), "windows": min(3, steps // 2),
                             "eval_samples": max(8, batch)})


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


def predicted_layers(config: str, gpu_bytes: float, width: int, batch_per_gpu: int, seq_len: int = 1024,
                     vocab_size: int = 50304) -> int:
    """The largest ``n_layer`` the memory formula lets into 96% of ``gpu_bytes``: model states of 16 bytes per
    parameter (16/N sharded over N GPUs) and, per block, the bfloat16 input kept for the backward pass; fixed: the
    embeddings' states, the logits (bfloat16, float32 loss and gradient: ~10 bytes per entry) and, sharded, three
    blocks gathered in bfloat16. Activations inside the blocks are left out: the peak is the optimizer step's,
    when they are freed (on the H100, plain AdamW: 16 layers 52.0 GiB, 24 layers 76.0 GiB: 3.0 GiB per layer = 16
    bytes x 201 M parameters)."""
    parallelism, gpus, _ = CAPACITY[config]
    sharded = parallelism["name"] == "fsdp" or parallelism.get("stage") == 3
    per_param = 16 / gpus if sharded else 16
    tokens, block = batch_per_gpu * seq_len, 12 * width * width
    per_layer = block * per_param + 2 * tokens * width
    fixed = (vocab_size + seq_len) * width * per_param + 10 * tokens * vocab_size + (3 * 2 * block if sharded else 0)
    return max(1, int((0.96 * gpu_bytes - fixed) / per_layer))


def state_gib(config: str, params: int) -> float | None:
    """Model-state memory per GPU by the ZeRO formula: 16P, or 16P/N sharded over N GPUs (None when offloaded)."""
    parallelism, gpus, _ = CAPACITY[config]
    if "offload_param" in parallelism:
        return None
    sharded = parallelism["name"] == "fsdp" or parallelism.get("stage") == 3
    return 16 * params / (gpus if sharded else 1) / 2 ** 30


def probe(args, config: str, n_layer: int) -> dict:
    """Two steps of a GPT of ``n_layer`` blocks at the capacity width under ``config``."""
    parallelism, gpus, memory = CAPACITY[config]
    width = 64 if args.cpu else CAPACITY_WIDTH
    params = gpt_params(n_layer, width)
    wparams = {"size": "1B", "n_layer": n_layer, "n_embd": width, "n_head": max(1, width // 128),
               "corpus_bytes": 200_000}
    formula = state_gib(config, params)
    print(f"== capacity {config} n_layer={n_layer} params={params / 1e9:.2f}B model states by the formula: "
          f"{f'{formula:.1f} GiB' if formula is not None else '-'} per GPU", flush=True)
    row = run(make(wparams, parallelism, args.capacity_batch * gpus, 4, args.cpu, gpus, memory), args.timeout_s)
    return {"config": config, "gpus": gpus, "n_layer": n_layer, "n_embd": width, "params": params,
            "formula_gib": formula, **row}


def capacity(args) -> list[dict]:
    """Per configuration, bisect ``n_layer`` for the largest model that trains (``ok``); an ``oom`` means too
    large; any other failure stops that configuration (it says nothing about memory)."""
    import torch

    rows = []
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 2 ** 30
    for config in args.configs.split(","):
        width = 64 if args.cpu else CAPACITY_WIDTH
        guess = predicted_layers(config, gpu_bytes, width, args.capacity_batch, 64 if args.cpu else 1024)
        lo, hi = args.lo or max(1, int(0.75 * guess)), args.hi or int(1.15 * guess) + 1
        print(f"== {config}: formula predicts n_layer <= {guess}; bisecting [{lo}, {hi}]", flush=True)
        best = None
        while lo <= hi:
            if time.monotonic() - args.t0 > args.deadline_s:
                print(f"deadline: {config} stopped with [{lo}, {hi}] still open", flush=True)
                break
            mid = (lo + hi) // 2
            row = probe(args, config, mid)
            rows.append(row)
            if row["status"] == "ok":
                best, lo = mid, mid + 1
            elif row["status"] == "oom":
                hi = mid - 1
            else:
                print(f"{config}: probe failed as {row['status']}, not out of memory: stopping", flush=True)
                break
        print(f"== {config}: largest that trained: n_layer={best} "
              f"({gpt_params(best, width) / 1e9:.2f}B parameters)" if best else f"== {config}: none trained",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("throughput", "capacity"))
    parser.add_argument("--out", default="results")
    parser.add_argument("--cpu", action="store_true", help="smoke run on the CPU (tiny model, fp32)")
    parser.add_argument("--timeout-s", type=float, default=420, help="limit of one trial (a ~15 B probe: 2-3 min)")
    parser.add_argument("--deadline-s", type=float, default=480)
    parser.add_argument("--configs", default="single,fsdp-ac",
                        help=f"capacity configurations, of {', '.join(CAPACITY)}")
    parser.add_argument("--lo", type=int, default=0, help="smallest n_layer to bisect (default: from the formula)")
    parser.add_argument("--hi", type=int, default=0, help="largest n_layer to bisect (default: from the formula)")
    parser.add_argument("--capacity-batch", type=int, default=2, help="sequences per GPU in capacity probes")
    args = parser.parse_args(argv)
    args.t0 = time.monotonic()
    rows = throughput(args) if args.part == "throughput" else capacity(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"parallelism_{args.part}.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
