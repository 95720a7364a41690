"""Sharded training against DDP: gpt-124M and gpt-1B on 1 and 2 GPUs under every parallelism technique with its
tuned settings, in one call: throughput, ratio to DDP in the same run, scaling against 2 x one GPU, peak memory
per GPU beside the ZeRO model-state formula, MFU. Prints a markdown table for docs/benchmarks.md.

Every row is one real trial through ``harness.launch`` (torchrun with 2 processes and NCCL for 2 GPUs), weak
scaling: the batch per GPU is fixed (16 x 1024 tokens for gpt-124M, 8 x 1024 for gpt-1B) and the global batch
grows with the GPU count. One GPU runs ``single`` and DeepSpeed ZeRO-2/3 (ddp and fsdp need two processes).

    python benchmarks/sharded.py --out results/ --deadline-s 540       # both models, estimate printed first
    python benchmarks/sharded.py --models gpt-124M --variants ddp,fsdp,fsdp-blocks,fsdp-blocks-keep
    python benchmarks/sharded.py --cpu --models tiny --variants single,fsdp --devices 1,2   # code path on CPU

``--deadline-s`` stops starting trials after that many seconds (rows so far are printed and written). The trials
share one compile cache and DeepSpeed's JIT-built ops under ``--cache`` (default ``harness-out/bench-cache``, kept
between calls on a warm machine). NCCL's NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # DeepSpeed builds its CUDA ops for the H100/H200 only

#: model name -> (gpt workload params, sequences per GPU, timed steps)
MODELS = {
    "gpt-124M": ({"size": "124M"}, 16, 40),
    "gpt-1B": ({"size": "1B"}, 8, 24),
    "tiny": ({"size": "tiny"}, 8, 6),  # the CPU smoke run
}
FORWARD_LOSS = {"name": "torch-compile"}
BLOCKS = {"name": "torch-compile", "scope": "blocks"}
ENGINE = {"name": "torch-compile", "scope": "engine"}  # the engine's own compile (DeepSpeed: engine.compile())
EAGER = {"name": "eager"}
#: variant -> (parallelism, compile). DDP, single and ZeRO-2 compile forward + loss (Dynamo splits DDP's graph at
#: its buckets); FSDP compiles each block in place. ZeRO-3 runs eager (leaf blocks) or under DeepCompile: compiled by
#: torch.compile around DeepSpeed's hooks it trained wrongly on the H200s, and the plugin refuses that on CUDA.
VARIANTS = {
    "single": ({"name": "single"}, FORWARD_LOSS),
    "ddp": ({"name": "ddp"}, FORWARD_LOSS),
    "ddp-bf16": ({"name": "ddp", "gradient_dtype": "bfloat16"}, FORWARD_LOSS),  # half the all-reduce traffic
    # fewer, larger buckets: Dynamo splits the compiled graph at each one (25 MB: ~20 graphs for gpt-124M)
    "ddp-bucket100": ({"name": "ddp", "bucket_cap_mb": 100}, FORWARD_LOSS),
    "ddp-static": ({"name": "ddp", "static_graph": True}, FORWARD_LOSS),
    "fsdp": ({"name": "fsdp"}, BLOCKS),  # units: model (the default)
    "fsdp-forward-loss": ({"name": "fsdp"}, FORWARD_LOSS),
    "fsdp-blocks": ({"name": "fsdp", "units": "block"}, BLOCKS),
    "fsdp-blocks-keep": ({"name": "fsdp", "units": "block", "reshard_after_forward": False}, BLOCKS),
    "zero2": ({"name": "deepspeed", "stage": 2}, FORWARD_LOSS),
    "zero3": ({"name": "deepspeed", "stage": 3}, EAGER),  # leaf blocks: one gather per block
    "zero2-blocks": ({"name": "deepspeed", "stage": 2}, BLOCKS),
    # what the plugin's defaults were before the 2 x H200 measurement: overlap, 5e7-element buckets
    "zero2-overlap": ({"name": "deepspeed", "stage": 2, "overlap_comm": True, "reduce_bucket_size": 5 * 10 ** 7},
                      FORWARD_LOSS),
    # DeepSpeed's engine.compile(): plain (module.compile() with its hooks) and with DeepCompile's graph passes
    "zero3-engine": ({"name": "deepspeed", "stage": 3}, ENGINE),  # refused on CUDA since the 4th run (docs)
    "zero2-dc": ({"name": "deepspeed", "stage": 2, "deepcompile": True}, ENGINE),
    "zero3-dc": ({"name": "deepspeed", "stage": 3, "deepcompile": True}, ENGINE),
}
DEFAULT_VARIANTS = "single,ddp,fsdp,fsdp-blocks,zero2,zero3"
#: variants that run as one process (the others need two)
ONE_PROCESS = {"single", "zero2", "zero3", "zero2-blocks", "zero2-overlap", "zero3-engine", "zero2-dc", "zero3-dc"}
#: bytes per parameter of model states with Adam and 16-bit training, (replicated, divided by N) (ZeRO paper):
#: float32 weights, gradients and two moments (16) on every GPU without sharding; ZeRO keeps bfloat16 weights and
#: gradients besides float32 master weights and moments; FSDP shards float32 weights, gradients and moments.
MODEL_STATE_BYTES = {"single": (16, 0), "ddp": (16, 0), "deepspeed1": (4, 12), "deepspeed2": (2, 14),
                     "deepspeed3": (0, 16), "fsdp": (0, 16)}
#: rough seconds per trial on an H200 for the estimate: fixed (processes, model, compile, evaluation) and per step
COST_S = {"fixed": 45.0, "deepspeed_jit": 60.0, "gpt-124M": 0.05, "gpt-1B": 0.25, "tiny": 0.5}


def spec_for(model: str, variant: str, devices: int, cpu: bool = False, memory: dict | str = "none",
             per_gpu_batch: int | None = None, steps: int | None = None):
    """The trial of ``variant`` on ``devices`` GPUs: amp-bf16, fused AdamW (on CPU: fp32, eager, gloo)."""
    from harness.testing import make_spec

    wparams, batch, timed = MODELS[model]
    parallelism, compile_ = VARIANTS[variant]
    steps = steps or timed
    return make_spec(workload="gpt", workload_params=wparams, batch_size=(per_gpu_batch or batch) * devices,
                     optimizer={"name": "adamw", "lr": 3e-4, "implementation": "default" if cpu else "fused"},
                     precision="fp32" if cpu else "amp-bf16", compile="eager" if cpu else compile_,
                     parallelism=parallelism, memory=memory, devices=devices, device="cpu" if cpu else "cuda",
                     budget={"steps": steps + max(4, steps // 4), "warmup_steps": max(4, steps // 4),
                             "windows": 4, "eval_samples": 4 * devices * (per_gpu_batch or batch)})


def plan(models: list[str], variants: list[str], counts: list[int],
         one_gpu: set[str] = ONE_PROCESS) -> list[tuple[str, str, int]]:
    """(model, variant, GPUs) in run order: per model, the one-GPU rows first (the baselines); ``one_gpu`` limits
    the variants run on one GPU (those that can: ``ONE_PROCESS``)."""
    return [(m, v, n) for m in models for n in sorted(counts) for v in variants
            if (v in ONE_PROCESS & one_gpu if n == 1 else v != "single")]


def estimate_s(rows: list[tuple[str, str, int]]) -> float:
    """A rough wall time of the plan (the first DeepSpeed trial builds DeepSpeed's fused Adam once)."""
    total = sum(COST_S["fixed"] + COST_S[m] * (MODELS[m][2] * 1.5) for m, _, _ in rows)
    if any(VARIANTS[v][0]["name"] == "deepspeed" for _, v, _ in rows):
        total += COST_S["deepspeed_jit"]
    return total


def use_cache(root: Path) -> None:
    """Share torch.compile's caches and DeepSpeed's JIT-built ops between the trials (and calls) through ``root``."""
    from harness.slots import cache_env

    os.environ.update(cache_env(root))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(root.resolve() / "torch_extensions"))


def run(spec, timeout_s: float) -> dict:
    """One trial in fresh processes; the figures the table needs."""
    from harness.launch import LaunchOptions, launch

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-sharded-") as tmp:
        result = launch(spec, Path(tmp), LaunchOptions(timeout_s=timeout_s))
    m = result.metrics
    return {"status": result.status, "message": result.message[:300], "wall_s": round(time.monotonic() - t0, 1),
            "throughput": m.get("throughput_samples_per_s") if result.ok else None,
            "step_time_cv": m.get("step_time_cv"), "peak_memory_bytes": m.get("peak_memory_bytes"),
            "parameters": m.get("parameter_count"), "mfu": m.get("mfu"), "compile_s": m.get("compile_s"),
            "train_loss": m.get("train_loss"), "conditions": result.conditions}


def state_gib(variant: str, parameters: int | None, devices: int) -> float | None:
    """Model-state memory per GPU by the ZeRO formula (None without a parameter count)."""
    parallelism = VARIANTS[variant][0]
    replicated, divided = MODEL_STATE_BYTES[parallelism["name"] + str(parallelism.get("stage", ""))]
    return (replicated + divided / devices) * parameters / 2 ** 30 if parameters else None


def table(rows: list[dict]) -> list[str]:
    """Markdown rows: ratios against DDP (2 GPUs) and 2 x single (1 GPU) of the same model in the same run."""
    lines = ["| model | technique (compile) | GPUs | global batch | samples/s | vs DDP | vs 2 x single "
             "| peak GiB / GPU | ZeRO formula GiB | MFU | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        same = [x for x in rows if x["model"] == r["model"] and x["throughput"]]
        ddp = next((x["throughput"] for x in same if x["variant"] == "ddp" and x["gpus"] > 1), None)
        single = next((x["throughput"] for x in same if x["variant"] == "single" and x["gpus"] == 1), None)
        t = r["throughput"]
        vs_ddp = f"{t / ddp:.2f}" if t and ddp and r["gpus"] > 1 else "-"
        scaling = f"{t / (r['gpus'] * single):.1%}" if t and single and r["gpus"] > 1 else "-"
        peak = f"{r['peak_memory_bytes'] / 2 ** 30:.2f}" if r.get("peak_memory_bytes") else "-"
        formula = state_gib(r["variant"], r.get("parameters"), r["gpus"])
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        status = r["status"] + (f": {r['message'][:80]}" if r["status"] != "ok" else "")
        lines.append(f"| {r['model']} | {r['variant']} ({r['compile']}) | {r['gpus']} | {r['batch']} "
                     f"| {f'{t:,.0f}' if t else '-'} | {vs_ddp} | {scaling} | {peak} "
                     f"| {f'{formula:.2f}' if formula else '-'} | {mfu} | {status} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt-124M,gpt-1B", help=f"of {', '.join(MODELS)}")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--devices", default="1,2", help="GPU counts")
    ap.add_argument("--one-gpu", default=",".join(sorted(ONE_PROCESS)),
                    help="variants also run on one GPU (of those that can), e.g. single")
    ap.add_argument("--memory", default="none", help="memory technique of every trial, e.g. activation-checkpointing")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default: the model's)")
    ap.add_argument("--deadline-s", type=float, default=540, help="start no trial after this many seconds")
    ap.add_argument("--timeout-s", type=float, default=420, help="limit of one trial")
    ap.add_argument("--cache", default="harness-out/bench-cache", help="compile and JIT-build cache directory")
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU, fp32, eager: checks the code path only")
    ap.add_argument("--out", default="", help="write sharded.md and sharded.json here")
    args = ap.parse_args(argv)
    models, variants = args.models.split(","), args.variants.split(",")
    unknown = [x for x in models if x not in MODELS] + [x for x in variants if x not in VARIANTS]
    if unknown:
        print(f"--models / --variants: unknown {', '.join(unknown)} (models: {', '.join(MODELS)}; variants: "
              f"{', '.join(VARIANTS)})", file=sys.stderr)
        return 2
    import torch

    counts = [int(x) for x in args.devices.split(",")]
    if not args.cpu and torch.cuda.device_count() < max(counts):
        print(f"--devices: {max(counts)} GPUs asked, {torch.cuda.device_count()} here (use --cpu for the smoke "
              "run)", file=sys.stderr)
        return 2
    if args.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_cache(Path(args.cache))
    todo = plan(models, variants, counts, set(args.one_gpu.split(",")))
    print(f"{len(todo)} trials, estimated {estimate_s(todo) / 60:.1f} min (deadline {args.deadline_s:.0f} s)",
          flush=True)
    t0, rows = time.monotonic(), []
    for model, variant, n in todo:
        if time.monotonic() - t0 > args.deadline_s:
            print(f"deadline: {model} {variant} on {n} not started", flush=True)
            continue
        spec = spec_for(model, variant, n, args.cpu, args.memory, steps=args.steps or None)
        row = {"model": model, "variant": variant, "gpus": n, "batch": spec.batch_size,
               "compile": spec.compile.params.get("scope", spec.compile.name), **run(spec, args.timeout_s)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "conditions"}, default=str), flush=True)
    device = "cpu (gloo)" if args.cpu else torch.cuda.get_device_name(0)
    head = [f"{device} x {max(counts)}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
            f"{time.strftime('%Y-%m-%d')}; memory: {args.memory}; command: python {' '.join(sys.argv)}", ""]
    text = "\n".join(head + table(rows))
    print(text, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sharded.md").write_text(text + "\n")
        (out / "sharded.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
