"""Does ZeRO-3 train like DDP? One training spec (gpt small, bf16, fused AdamW, 40 steps, batch 32) run through
``harness.launch`` once per case, each case changing one factor; prints and appends one JSON line per case
(held-out loss, last training loss, accuracy).

It isolated why ZeRO-3 with leaf blocks and per-block compilation reached a held-out loss of 2.64 on two H200s
where DDP reached 3.60 (docs/benchmarks.md, "Sharded training": the combination is now refused on CUDA).

    python benchmarks/zero3_parity.py --out results/zero3.jsonl                        # every case, CUDA
    python benchmarks/zero3_parity.py --cases ddp,z3-eager,z3-blocks-per-layer         # a few
    python benchmarks/zero3_parity.py --device cpu --size tiny --cases ddp,z3-eager    # gloo: the code path only

Since that finding the harness refuses ZeRO-3 compiled by ``torch-compile`` on CUDA (only DeepCompile compiles it
there): the ``z3-blocks`` cases report ``ok: false`` and the one-line reason; the figures in docs/benchmarks.md
predate it.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

Z3 = {"name": "deepspeed", "stage": 3}
BLOCKS = {"name": "torch-compile", "scope": "blocks"}
#: case -> the fields it changes in the base spec (see ``base``), in the order in which they tell most
CASES: dict[str, dict] = {
    "ddp": {"parallelism": "ddp", "devices": 2},
    "z3-blocks": {"parallelism": Z3, "compile": BLOCKS, "devices": 2},  # leaf blocks (the default), compiled
    "z3-eager": {"parallelism": Z3, "devices": 2},
    "z3-eager-torchadamw": {"parallelism": {**Z3, "optimizer_impl": "torch"}, "devices": 2},
    "z3-blocks-nooverlap": {"parallelism": {**Z3, "overlap_comm": False}, "compile": BLOCKS, "devices": 2},
    "z3-blocks-per-layer": {"parallelism": {**Z3, "stage3_leaf_blocks": False}, "compile": BLOCKS, "devices": 2},
    "single": {"parallelism": "single", "devices": 1},
    "z3-eager-1gpu": {"parallelism": Z3, "devices": 1},
    "z2-blocks": {"parallelism": {"name": "deepspeed", "stage": 2}, "compile": BLOCKS, "devices": 2},
    "z3-blocks-1gpu": {"parallelism": Z3, "compile": BLOCKS, "devices": 1},
    "single-blocks": {"parallelism": "single", "compile": BLOCKS, "devices": 1},
    "ddp-80steps": {"parallelism": "ddp", "devices": 2, "budget": {"steps": 80}},
    "z3-blocks-math": {"parallelism": Z3, "compile": BLOCKS, "devices": 2, "workload_params": {"attention": "math"}},
    "z3-blocks-fp32": {"parallelism": Z3, "compile": BLOCKS, "devices": 2, "precision": "fp32"},
    "ddp-fp32": {"parallelism": "ddp", "devices": 2, "precision": "fp32"},
    "z3-blocks-20steps": {"parallelism": Z3, "compile": BLOCKS, "devices": 2, "budget": {"steps": 20}},
    # the CPU's bfloat16 two-process gap (docs/benchmarks.md; DeepSpeed now runs float32 under autocast on the CPU)
    "z3-eager-fp32": {"parallelism": Z3, "devices": 2, "precision": "fp32"},
    "z2-eager": {"parallelism": {"name": "deepspeed", "stage": 2}, "devices": 2},
    "z3-eager-comm32": {"parallelism": {**Z3, "communication_dtype": "float32"}, "devices": 2},
}


def base(size: str, device: str) -> dict:
    """The spec every case starts from (what ``tests/test_gpu_sharded.py`` trains)."""
    return {"workload": "gpt", "workload_params": {"size": size}, "device": device, "precision": "amp-bf16",
            "optimizer": {"name": "adamw", "lr": 1e-3, "implementation": "fused" if device == "cuda" else "foreach"},
            "batch_size": 32, "seed": 5, "budget": {"steps": 40, "warmup_steps": 5, "windows": 5, "eval_samples": 512}}


def spec_fields(case: str, size: str, device: str) -> dict:
    fields = base(size, device)
    for key, value in CASES[case].items():
        fields[key] = {**fields[key], **value} if key in ("budget", "workload_params") else value
    return fields


def run_case(case: str, size: str, device: str, timeout_s: float) -> dict:
    from harness.launch import LaunchOptions, launch
    from harness.testing import make_spec

    with tempfile.TemporaryDirectory(prefix="zero3-parity-") as tmp:
        result = launch(make_spec(**spec_fields(case, size, device)), Path(tmp), LaunchOptions(timeout_s=timeout_s))
    return {"case": case, "ok": result.ok, "message": (result.message or "")[-400:],
            **{k: result.metrics.get(k) for k in ("val_loss", "train_loss", "accuracy", "steps")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    ap.add_argument("--size", default="small", help="gpt size preset")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--timeout-s", type=float, default=300, help="limit of one trial")
    ap.add_argument("--out", default="", help="append the JSON lines to this file too")
    args = ap.parse_args(argv)
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"--cases: {', '.join(unknown)} unknown (allowed: {', '.join(CASES)})")
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for case in cases:
        row = run_case(case, args.size, args.device, args.timeout_s)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
