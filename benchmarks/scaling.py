"""Multi-GPU scaling of the parallelism plugins: throughput, scaling efficiency and peak memory per GPU.

Every (workload, technique, process count) runs as a real trial through ``harness.launch`` (torchrun with
N processes, NCCL on GPUs, gloo on CPU). Scaling here is *weak* scaling: the per-GPU batch is fixed and the
global batch grows with N, so efficiency = throughput(N) / (N x throughput(1 process, same technique)).
(Studies keep the global batch fixed instead, so that accuracy compares across process counts; a benchmark
of scaling wants each GPU equally busy.)

For ZeRO the per-GPU memory of model states follows the ZeRO paper's formula with Adam and 16-bit training:
stage 1: 4P + 12P/N bytes, stage 2: 2P + 14P/N, stage 3: 16P/N (P parameters); the table prints it beside
the measured peak (which adds activations and buffers).

    python benchmarks/scaling.py                          # every GPU of this machine: 1, 2, 4, 8 ...
    python benchmarks/scaling.py --devices 1,2 --cpu      # the same code path on CPU with gloo (smoke)

NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0), as the multi-GPU machines' notes require.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

WORKLOADS = {
    # name: (workload, workload params, per-GPU batch, precision, compile)
    "gpt-124M": ("gpt", {"size": "124M"}, 16, "amp-bf16", "torch-compile"),
    "resnet18": ("resnet18", {}, 256, "amp-bf16", "channels-last"),
    "digits": ("digits", {}, 64, "fp32", "eager"),
}
TECHNIQUES = {
    "ddp": {"name": "ddp"},
    "zero1": {"name": "deepspeed", "stage": 1},
    "zero2": {"name": "deepspeed", "stage": 2},
    "zero3": {"name": "deepspeed", "stage": 3},  # eager: compiled around its hooks, refused on CUDA
    "fsdp": {"name": "fsdp"},
}
ZERO_BYTES_PER_PARAM = {  # (replicated, sharded) bytes per parameter of model states
    "zero1": (4, 12), "zero2": (2, 14), "zero3": (0, 16),
}


def build_spec(workload: str, technique: str, devices: int, steps: int, cpu: bool):
    from harness.testing import make_spec

    name, params, per_gpu_batch, precision, compile_ = WORKLOADS[workload]
    if cpu:
        precision, compile_ = "fp32", "eager"
    if technique == "zero3":
        compile_ = "eager"  # ZeRO-3 compiles under DeepCompile only (the plugin says why)
    # DDP and FSDP need two processes at least; their one-process reference is plain single-device training.
    parallel = {"name": "single"} if devices == 1 and not technique.startswith("zero") else TECHNIQUES[technique]
    return make_spec(workload=name, workload_params=params, batch_size=per_gpu_batch * devices,
                     optimizer={"name": "adamw", "implementation": "default" if cpu else "fused"},
                     precision=precision, compile=compile_, parallelism=parallel, devices=devices,
                     device="cpu" if cpu else "cuda",
                     budget={"steps": steps, "warmup_steps": max(3, steps // 5), "windows": 5})


def run(spec, timeout_s: float):
    from harness.launch import LaunchOptions, launch

    with tempfile.TemporaryDirectory(prefix="harness-scaling-") as tmp:
        return launch(spec, Path(tmp), LaunchOptions(timeout_s=timeout_s))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="gpt-124M,resnet18")
    ap.add_argument("--techniques", default="ddp,zero1,zero2,zero3,fsdp")
    ap.add_argument("--devices", default="", help="process counts, e.g. 1,2,4,8 (default: powers of 2 up to "
                                                   "the GPU count)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU (digits): checks the code path, not speed")
    ap.add_argument("--out", default="", help="also write the markdown table here")
    args = ap.parse_args(argv)

    import torch

    if args.devices:
        counts = [int(x) for x in args.devices.split(",")]
    else:
        gpus = torch.cuda.device_count()
        counts = [n for n in (1, 2, 4, 8, 16) if n <= gpus]
    if not counts:
        print("no GPU here: use --cpu --devices 1,2 for the CPU smoke run", file=sys.stderr)
        return 2
    workloads = ["digits"] if args.cpu else args.workloads.split(",")
    device = "cpu (gloo)" if args.cpu else torch.cuda.get_device_name(0)
    lines = [f"device: {device} x {max(counts)}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
             f"date {time.strftime('%Y-%m-%d')}; command: python {' '.join(sys.argv)}", "",
             "| workload | technique | processes | global batch | throughput (samples/s) | scaling efficiency "
             "| peak memory / GPU (GiB) | ZeRO model-state formula (GiB) | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for workload in workloads:
        for technique in args.techniques.split(","):
            base = None
            for n in counts:
                spec = build_spec(workload, technique, n, args.steps, args.cpu)
                result = run(spec, args.timeout)
                m = result.metrics
                tput = m.get("throughput_samples_per_s") if result.ok else None
                if n == counts[0] and tput:
                    base = tput / n
                eff = f"{tput / (n * base):.1%}" if tput and base else "-"
                peak = m.get("peak_memory_bytes")
                formula = "-"
                params = m.get("parameter_count")
                if technique in ZERO_BYTES_PER_PARAM and params:
                    rep, shard = ZERO_BYTES_PER_PARAM[technique]
                    formula = f"{(rep + shard / n) * params / 2**30:.3g}"
                row = (f"| {workload} | {spec.parallelism.name}{spec.parallelism.params.get('stage', '')} | {n} "
                       f"| {spec.batch_size} | {f'{tput:,.0f}' if tput else '-'} | {eff} "
                       f"| {f'{peak / 2**30:.2f}' if peak else '-'} | {formula} "
                       f"| {result.status}{': ' + result.message[:80] if result.message else ''} |")
                lines.append(row)
                print(row, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
