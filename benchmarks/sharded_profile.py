"""Where a sharded step's time goes: one real trial per parallelism technique (its tuned settings, from
``benchmarks/sharded.py``) with a ``torch.profiler`` trace of one timing window after warm-up, and per technique
the step time, time in NCCL kernels, compute kernel time, idle gaps on the GPU and exposed (non-overlapped)
communication, per step, on rank 0's GPU.

    python benchmarks/sharded_profile.py --out results/profile                 # gpt-124M: single, ddp, fsdp, zero2/3
    python benchmarks/sharded_profile.py --model gpt-1B --variants ddp,fsdp,zero3 --out results/profile-1b
    python benchmarks/sharded_profile.py --cpu --model tiny --variants single,fsdp --out /tmp/p   # code path only

Writes ``summary.json`` and one gzip'd chrome trace per technique (rank 0; open it in https://ui.perfetto.dev)
under ``--out``; traces that would take the folder past ``--max-mb`` are dropped, their summaries kept.

The profiling is this module used as an observer plugin in the trial's processes (``HARNESS_PLUGINS=
sharded_profile`` with this folder on ``PYTHONPATH``, ``HARNESS_PROFILE_DIR`` naming where to write): at the first
timed window boundary it waits for the device and starts the profiler, at the next one it stops it, so the trace
holds exactly the one window of steps queued in between. That window's time in the trial's own throughput is
disturbed; the harness's median step time (printed beside the profiled one) is not.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import hookimpl

PROFILE_DIR_ENV = "HARNESS_PROFILE_DIR"
DEFAULT_VARIANTS = "single,ddp,fsdp,fsdp-blocks,zero2,zero3"


# ------------------------------------------------------------------------------------------------ the trace's figures
def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge overlapping (start, end) intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the overlap of two merged interval lists."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def summarize(trace: dict[str, Any], steps: int, device: int | None = None) -> dict[str, Any]:
    """Per-step figures (milliseconds) of the GPU activity in a chrome trace (``ts``/``dur`` in microseconds).

    ``step_ms`` is the span from the first to the last GPU activity over ``steps``; ``compute_ms`` and
    ``nccl_ms`` the time covered by non-NCCL and NCCL kernels; ``exposed_comm_ms`` the NCCL time with no compute
    kernel running; ``idle_ms`` the span with nothing at all on the GPU (launch latency, host waits).
    """
    kernels, copies = [], []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        if device is not None and e.get("args", {}).get("device", device) != device:
            continue
        span = (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        (kernels if e["cat"] == "kernel" else copies).append((e.get("name", ""), span))
    if not kernels and not copies:
        return {"steps": steps, "gpu_events": 0}
    nccl = union([s for name, s in kernels if "nccl" in name.lower()])
    compute = union([s for name, s in kernels if "nccl" not in name.lower()])
    busy = union([s for _, s in kernels + copies])
    span_us = busy[-1][1] - busy[0][0]
    per_step = 1e-3 / max(steps, 1)  # microseconds in total -> milliseconds per step
    by_name: dict[str, float] = {}
    for name, (start, end) in kernels:
        by_name[name] = by_name.get(name, 0.0) + end - start
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    exposed = length(nccl) - intersection(nccl, compute)
    return {"steps": steps, "gpu_events": len(kernels) + len(copies), "kernels_per_step": len(kernels) / max(steps, 1),
            "step_ms": span_us * per_step, "compute_ms": length(compute) * per_step,
            "nccl_ms": length(nccl) * per_step, "exposed_comm_ms": exposed * per_step,
            "copy_ms": length(union([s for _, s in copies])) * per_step, "idle_ms": (span_us - length(busy)) * per_step,
            "top_kernels_ms": {name[:120]: us * per_step for name, us in top}}


# ------------------------------------------------------------------------------------------------ the observer plugin
class _Window:
    """This process's profiling state: started at one timed window boundary, stopped and written at the next."""

    def __init__(self) -> None:
        self.profiler: Any = None
        self.start_steps = 0
        self.done = False


_window = _Window()


@hookimpl
def harness_trial_start():
    global _window
    _window = _Window()


@hookimpl
def harness_trial_window(trial, metrics):
    out = os.environ.get(PROFILE_DIR_ENV)
    if not out or metrics.get("phase") != "timed" or _window.done:
        return
    import torch

    cuda = trial.device.type == "cuda"
    if _window.profiler is None:
        if cuda:
            torch.cuda.synchronize(trial.device)  # the profiled window starts on an idle device
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        _window.profiler = torch.profiler.profile(activities=activities)
        _window.profiler.start()
        _window.start_steps = trial.steps_done
        return
    _window.profiler.stop()  # waits for the device
    _window.done = True
    steps, rank = trial.steps_done - _window.start_steps, trial.dist.rank
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / f"trace.rank{rank}.json"
    _window.profiler.export_chrome_trace(str(raw))
    summary = summarize(json.loads(raw.read_text()), steps, trial.device.index if cuda else None)
    (folder / f"summary.rank{rank}.json").write_text(json.dumps(summary, indent=1))
    if rank == 0:
        with open(raw, "rb") as src, gzip.open(folder / "trace.rank0.json.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    raw.unlink()


# ------------------------------------------------------------------------------------------------ the script
def profile_variant(variant: str, model: str, cpu: bool, out: Path, timeout_s: float) -> dict[str, Any]:
    """Run one profiled trial of ``variant`` (1 process for single, else 2) and return its figures."""
    from sharded import spec_for

    from harness.launch import LaunchOptions, launch

    devices = 1 if variant == "single" else 2
    spec = spec_for(model, variant, devices, cpu, steps=16)
    folder = out / variant
    shutil.rmtree(folder, ignore_errors=True)
    here = str(Path(__file__).resolve().parent)
    env = {"HARNESS_PLUGINS": ",".join(filter(None, [os.environ.get("HARNESS_PLUGINS", ""), "sharded_profile"])),
           "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH", "")])),
           PROFILE_DIR_ENV: str(folder)}
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        result = launch(spec, Path(tmp), LaunchOptions(timeout_s=timeout_s, env=env))
    summary_path = folder / "summary.rank0.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {"variant": variant, "gpus": devices, "compile": spec.compile.params.get("scope", spec.compile.name),
            "status": result.status, "message": result.message[:200],
            "harness_step_ms": 1e3 * result.metrics["step_time_median_s"] if result.ok else None,
            "throughput": result.metrics.get("throughput_samples_per_s"), **summary}


def row(r: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        return f"{r[key]:.1f}" if isinstance(r.get(key), (int, float)) else "-"

    top = next(iter(r.get("top_kernels_ms", {})), "-")[:60]
    return (f"| {r['variant']} ({r['compile']}) | {r['gpus']} | {ms('harness_step_ms')} | {ms('step_ms')} "
            f"| {ms('compute_ms')} | {ms('nccl_ms')} | {ms('exposed_comm_ms')} | {ms('idle_ms')} "
            f"| {r.get('kernels_per_step', 0):.0f} | {top} | {r['status']} |")


def keep_under(out: Path, max_bytes: int) -> list[str]:
    """Drop the largest traces until the folder holds less than ``max_bytes``; returns what was dropped."""
    traces = sorted(out.glob("*/trace.rank0.json.gz"), key=lambda p: p.stat().st_size)
    dropped = []
    while traces and sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) >= max_bytes:
        victim = traces.pop()
        victim.unlink()
        dropped.append(str(victim))
    return dropped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt-124M")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="variants of benchmarks/sharded.py")
    ap.add_argument("--out", default="harness-out/profile")
    ap.add_argument("--timeout-s", type=float, default=300)
    ap.add_argument("--max-mb", type=float, default=20)
    ap.add_argument("--cache", default="harness-out/bench-cache", help="compile and JIT-build cache directory")
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU (no GPU figures): checks the code path")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sharded import MODELS, VARIANTS, use_cache

    wrong = [v for v in args.variants.split(",") if v not in VARIANTS] + ([args.model] if args.model not in MODELS
                                                                           else [])
    if wrong:
        print(f"--variants / --model: unknown {', '.join(wrong)} (variants: {', '.join(VARIANTS)}; models: "
              f"{', '.join(MODELS)})", file=sys.stderr)
        return 2
    if args.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_cache(Path(args.cache))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in args.variants.split(","):
        t0 = time.monotonic()
        rows.append(profile_variant(variant, args.model, args.cpu, out, args.timeout_s))
        print(f"{variant}: {rows[-1]['status']} in {time.monotonic() - t0:.0f} s", flush=True)
    dropped = keep_under(out, int(args.max_mb * 2 ** 20))
    (out / "summary.json").write_text(json.dumps({"model": args.model, "rows": rows, "dropped_traces": dropped},
                                                 indent=1, default=str))
    print(f"\n{args.model}, per step on rank 0's device (ms); harness = the trial's median step time unprofiled\n")
    print("| technique (compile) | GPUs | harness step | profiled step | compute | NCCL | exposed comm | idle "
          "| kernels | top kernel | status |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows:
        print(row(r))
    if dropped:
        print(f"traces dropped to stay under {args.max_mb} MB: {', '.join(dropped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
