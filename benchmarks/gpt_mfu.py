"""GPT MFU on one GPU: each kernel, batch, precision and compile technique alone on top of the reference recipe,
then the best combination of those that helped, each as a real trial in its own processes (``harness.launch``).

The reference recipe is the one the gpt-gpu study found best so far: amp-bf16 + torch-compile (default mode) +
fused AdamW at batch 16 x 1024 tokens. Every other row changes one thing: the attention backend (flash, cudnn,
efficient), Liger's kernels (liger, liger-flce), batch 32 / 64 with and without activation checkpointing, fp8
(tensorwise, rowwise) or torch.compile's max-autotune-no-cudagraphs. The table gives tokens/s, MFU (the trial's
``mfu`` metric: against the peak of the dtype in use, fp8's for fp8 rows) and MFU against the bf16 peak (the same
FLOPs over 989.4 TFLOP/s for every row, so rows compare), held-out loss, peak memory and the ratio to the
reference measured in the same run.

    python benchmarks/gpt_mfu.py --jsonl gpt_mfu.jsonl --deadline-s 560            # gpt-124M, one H200
    python benchmarks/gpt_mfu.py --jsonl gpt_mfu.jsonl --deadline-s 560            # again: continues the run
    python benchmarks/gpt_mfu.py --models 1B --rows reference,fp8,liger --jsonl gpt_mfu.jsonl
    python benchmarks/gpt_mfu.py --jsonl gpt_mfu.jsonl --profile --deadline-s 300  # where the best one's time goes
    python benchmarks/gpt_mfu.py --cpu                                             # smoke run (gpt tiny, CPU)

Rows already in ``--jsonl`` are kept, not run again, so a run split over several calls (``--deadline-s`` starts no
row that would end past it, by an estimate printed first) ends with one table. ``--profile`` traces one timing
window of the best row (``benchmarks/sharded_profile.py`` as the trial's observer) and prints the GPU time per
step by kernel class and the top kernels. Needs the ``liger-kernel`` and ``torchao`` packages for their rows
(they fail as infeasible without them).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BF16_PEAK = 989.4e12
FUSED = {"name": "adamw", "implementation": "fused"}
REFERENCE = {"precision": "amp-bf16", "compile": "torch-compile", "optimizer": FUSED}
CPU_REFERENCE = {"precision": "fp32", "compile": "eager", "optimizer": {"name": "adamw", "implementation": "foreach"}}
AC = {"memory": "activation-checkpointing"}
#: model -> (workload parameters, seconds a row takes with a cold compile cache: the deadline's estimate).
MODELS: dict[str, tuple[dict[str, Any], float]] = {
    "124M": ({"size": "124M"}, 60.0), "1B": ({"size": "1B"}, 120.0),
    "tiny": ({"size": "tiny", "corpus_bytes": 300_000}, 7.0),
}
#: label -> (group, techniques over the reference's, workload parameters, batch size); one group per axis of
#: change, the best of each group goes into the combination.
ROWS: dict[str, tuple[str, dict[str, Any], dict[str, Any], int]] = {
    "reference": ("reference", {}, {}, 16),
    "attention flash": ("attention", {}, {"attention": "flash"}, 16),
    "attention cudnn": ("attention", {}, {"attention": "cudnn"}, 16),
    "attention efficient": ("attention", {}, {"attention": "efficient"}, 16),
    "attention math": ("attention", {}, {"attention": "math"}, 16),
    "kernels liger": ("kernels", {}, {"kernels": "liger"}, 16),
    "kernels liger-flce": ("kernels", {}, {"kernels": "liger-flce"}, 16),
    "batch 32": ("batch", {}, {}, 32),
    "batch 32 + activation checkpointing": ("batch", AC, {}, 32),
    "batch 64": ("batch", {}, {}, 64),
    "batch 64 + activation checkpointing": ("batch", AC, {}, 64),
    "batch 128": ("batch", {}, {}, 128),
    "fp8 tensorwise": ("precision", {"precision": {"name": "fp8", "recipe": "tensorwise"}}, {}, 16),
    "fp8 rowwise": ("precision", {"precision": {"name": "fp8", "recipe": "rowwise"}}, {}, 16),
    "compile max-autotune-no-cudagraphs":
        ("compile", {"compile": {"name": "torch-compile", "mode": "max-autotune-no-cudagraphs"}}, {}, 16),
}
GPU_ROWS = [label for label in ROWS if label != "attention math"]
CPU_ROWS = ["reference", "attention math", "attention flash", "batch 32 + activation checkpointing"]
#: rows whose first compile is much slower than the others' (autotuning), for the estimate.
SLOW_ROWS = {"compile max-autotune-no-cudagraphs": 4.0, "batch 128": 1.5}
COMBINATION = "best combination"
#: kernel name patterns -> class, for the profile (first match wins).
KERNEL_CLASSES = (("attention", r"flash|fmha|attention|sdpa|cudnn"), ("matmul", r"gemm|cutlass|nvjet|xmma|wgmma|"
                  r"sm\d+_|cublas|matmul|_mm_"), ("liger", r"liger|_layer_norm_|element_mul"),
                  ("optimizer", r"multi_tensor|adam"), ("fused elementwise (inductor)", r"^triton_"),
                  ("nccl", r"nccl"))


def spec_for(model: str, label: str, cpu: bool, steps: tuple[int, int], changes: dict[str, Any] | None = None):
    """The TrialSpec of row ``label`` (or of ``changes`` merged onto the reference: the combination)."""
    from harness.testing import make_spec

    params, _ = MODELS[model]
    techniques, wparams, batch = dict(CPU_REFERENCE if cpu else REFERENCE), dict(params), 16
    for group_label in ([label] if changes is None else changes["rows"]):
        _, extra, extra_params, extra_batch = ROWS[group_label]
        techniques.update(extra)
        wparams.update(extra_params)
        batch = extra_batch if extra_batch != 16 else batch
    warmup, timed = steps
    return make_spec(workload="gpt", workload_params=wparams, batch_size=batch, device="cpu" if cpu else "cuda",
                     budget={"steps": warmup + timed, "warmup_steps": warmup, "windows": 4 if timed >= 8 else 2,
                             "eval_samples": 128 if not cpu else 32}, **techniques)


def run_row(spec, timeout_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One trial in fresh processes; its status, message, metrics and conditions."""
    from harness.launch import LaunchOptions, launch

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-gpt-mfu-") as tmp:
        result = launch(spec, Path(tmp), LaunchOptions(timeout_s=timeout_s, env=env or {}))
    return {"status": result.status, "message": result.message.splitlines()[0][:300] if result.message else "",
            "metrics": result.metrics, "conditions": result.conditions, "wall_s": time.monotonic() - t0}


def bf16_mfu(row: dict[str, Any]) -> float | None:
    """Achieved FLOP/s over the bf16 peak, whatever the row's precision (the ``mfu`` metric uses fp8's for fp8)."""
    from plugins.gpt import resolve_size, training_flops_per_sample

    sps = row["metrics"].get("throughput_samples_per_s")
    if not sps or row.get("cpu"):
        return None
    return sps * training_flops_per_sample(**resolve_size(MODELS[row["model"]][0])) / BF16_PEAK


def best_combination(rows: list[dict[str, Any]], model: str, min_gain: float) -> dict[str, Any] | None:
    """The best row of each group that beat the reference by more than ``min_gain`` (a fraction), combined; None
    when fewer than two groups did (the combination would be a row already measured)."""
    ok = {r["label"]: r for r in rows if r["model"] == model and r["status"] == "ok"}
    reference = ok.get("reference")
    if reference is None:
        return None
    base = reference["metrics"]["throughput_tokens_per_s"]
    best: dict[str, tuple[float, str]] = {}
    for label, r in ok.items():
        group = ROWS[label][0] if label in ROWS else ""
        tps = r["metrics"]["throughput_tokens_per_s"]
        if group not in ("", "reference") and tps > (1 + min_gain) * base and tps > best.get(group, (0.0, ""))[0]:
            best[group] = (tps, label)
    return {"rows": [label for _, label in best.values()]} if len(best) > 1 else None


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, pattern: str) -> str:
        return pattern.format(value) if isinstance(value, (int, float)) else ""

    lines = ["| model | row | batch | tokens/s | x reference | MFU | MFU (bf16 peak) | val_loss | peak memory GB "
             "| compile_s | status |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    refs = {r["model"]: r["metrics"].get("throughput_tokens_per_s") for r in rows
            if r["label"] == "reference" and r["status"] == "ok"}
    for r in rows:
        m, ref = r["metrics"], refs.get(r["model"])
        tps = m.get("throughput_tokens_per_s")
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["model"], r["label"], r.get("batch", ""), fmt(tps, "{:,.0f}"),
            fmt(tps / ref if tps and ref else None, "{:.3f}"), fmt(m["mfu"] * 100 if m.get("mfu") else None, "{:.1f}%"),
            fmt(bf16_mfu(r) * 100 if bf16_mfu(r) else None, "{:.1f}%"), fmt(m.get("val_loss"), "{:.4f}"),
            fmt(m["peak_memory_bytes"] / 1e9 if m.get("peak_memory_bytes") else None, "{:.1f}"),
            fmt(m.get("compile_s"), "{:.0f}"),
            r["status"] if r["status"] == "ok" else f"{r['status']}: {r['message'][:120]}"))
    return "\n".join(lines)


def kernel_profile(trace_gz: Path, steps: int) -> str:
    """GPU time per step by kernel class and the top kernels, from a chrome trace of ``steps`` steps."""
    trace = json.loads(gzip.open(trace_gz).read())
    times: dict[str, float] = {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            name = e["name"] if e["cat"] == "kernel" else e["cat"]
            times[name] = times.get(name, 0.0) + float(e.get("dur", 0)) / 1e3 / max(steps, 1)
    classes: dict[str, float] = {}
    for name, ms in times.items():
        kind = next((k for k, pattern in KERNEL_CLASSES if re.search(pattern, name, re.I)), "other")
        classes[kind] = classes.get(kind, 0.0) + ms
    total = sum(classes.values()) or 1.0
    out = ["| kernel class | ms per step | share |", "|---|---:|---:|"]
    out += [f"| {k} | {ms:.2f} | {100 * ms / total:.1f}% |" for k, ms in sorted(classes.items(), key=lambda kv: -kv[1])]
    out += ["", "| top kernels | ms per step |", "|---|---:|"]
    out += [f"| `{name[:110]}` | {ms:.2f} |" for name, ms in sorted(times.items(), key=lambda kv: -kv[1])[:15]]
    return "\n".join(out)


def profile(spec, out: Path, timeout_s: float) -> str:
    """Trace one timed window of ``spec`` with the sharded_profile observer; its summary and kernel classes."""
    folder = out / "profile"
    env = {"HARNESS_PLUGINS": ",".join(filter(None, [os.environ.get("HARNESS_PLUGINS", ""), "sharded_profile"])),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH", "")])),
           "HARNESS_PROFILE_DIR": str(folder)}
    row = run_row(spec, timeout_s, env)
    summary_path = folder / "summary.rank0.json"
    if not summary_path.exists():
        return f"profile: no trace ({row['status']}: {row['message']})"
    s = json.loads(summary_path.read_text())
    if not s.get("gpu_events"):
        return "profile: the trace holds no GPU activity (a CPU run)"
    median_ms = 1e3 * row["metrics"].get("step_time_median_s", 0)
    head = (f"profiled step {s['step_ms']:.1f} ms (harness median {median_ms:.1f} ms): kernels "
            f"{s['compute_ms']:.1f} ms, copies {s['copy_ms']:.1f} ms, GPU idle {s['idle_ms']:.1f} ms, "
            f"{s['kernels_per_step']:.0f} kernels per step")
    trace = folder / "trace.rank0.json.gz"
    return head + ("\n\n" + kernel_profile(trace, s["steps"]) if trace.exists() else "")


def load(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="124M", help="comma-separated: 124M, 1B (tiny with --cpu)")
    ap.add_argument("--rows", default="", help="only rows whose label contains one of these comma-separated "
                                               "fragments (the reference always runs); 'none' for none")
    ap.add_argument("--no-combination", action="store_true", help="do not run the best combination")
    ap.add_argument("--deadline-s", type=float, default=560, help="start no row expected to end after this")
    ap.add_argument("--steps", default="10,40", help="warm-up and timed steps per trial")
    ap.add_argument("--jsonl", type=Path, default=None, help="rows as JSON lines; rows already there are kept")
    ap.add_argument("--out", type=Path, default=Path("harness-out/gpt-mfu"), help="table, profile and caches")
    ap.add_argument("--profile", action="store_true", help="trace one timing window of the best row")
    ap.add_argument("--cpu", action="store_true", help="smoke run on the CPU: gpt tiny, fp32 eager reference")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    sys.path.insert(0, str(HERE))
    from sharded import use_cache

    from harness.errors import SpecError

    models = ["tiny"] if args.cpu else args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"--models: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})", file=sys.stderr)
        return 2
    steps = (2, 8) if args.cpu else tuple(int(s) for s in args.steps.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    use_cache(args.out / "cache")
    wanted = [f for f in args.rows.split(",") if f]
    labels = [label for label in (CPU_ROWS if args.cpu else GPU_ROWS)
              if label == "reference" or not wanted or any(f in label for f in wanted)]
    rows = load(args.jsonl)
    done = {(r["model"], r["label"]) for r in rows}
    todo = [(m, label) for m in models for label in labels if (m, label) not in done]
    per_row = {m: MODELS[m][1] for m in models}
    estimate = sum(per_row[m] * SLOW_ROWS.get(label, 1.0) for m, label in todo)
    print(f"{len(todo)} rows to run ({len(done)} kept from {args.jsonl}), about {estimate:.0f} s with a cold compile "
          f"cache (+{sum(per_row.values()):.0f} s per combination); deadline {args.deadline_s:.0f} s", flush=True)

    def record(model: str, label: str, changes: dict[str, Any] | None = None) -> None:
        expected = per_row[model] * SLOW_ROWS.get(label, 1.0)
        left = args.deadline_s - (time.monotonic() - t0)
        if expected > left:
            print(f"skipped (deadline: {left:.0f} s left, about {expected:.0f} s needed): {model} {label}", flush=True)
            return
        row: dict[str, Any] = {"model": model, "label": label, "cpu": args.cpu}
        try:
            spec = spec_for(model, label, args.cpu, steps, changes)
        except SpecError as exc:  # e.g. kernels: liger where liger-kernel is not installed
            row.update(status="infeasible", message=str(exc), metrics={}, conditions={}, wall_s=0.0)
        else:
            row.update(batch=spec.batch_size, spec=spec.to_dict(), **run_row(spec, timeout_s=min(left, 6 * expected)))
        rows.append(row)
        m = row["metrics"]
        print(f"{model:5s} {label:40s} {row['status']:12s} {m.get('throughput_tokens_per_s', 0):12,.0f} tok/s "
              f"mfu {m.get('mfu') or 0:.3f} compile {m.get('compile_s', 0):5.0f}s wall {row['wall_s']:4.0f}s "
              f"{row['message'][:150]}", flush=True)
        if args.jsonl:
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")

    for model, label in todo:
        record(model, label)
    for model in models:
        # the smoke run combines the best of each group whatever their gain, to run the combination's code path
        combo = None if args.no_combination else best_combination(rows, model, -1.0 if args.cpu else 0.01)
        label = f"{COMBINATION}: {' + '.join(combo['rows'])}" if combo else ""
        if combo and (model, label) not in {(r["model"], r["label"]) for r in rows}:
            record(model, label, combo)
    text = table(rows)
    if args.profile:
        ok = [r for r in rows if r["status"] == "ok" and r["model"] == models[0]]
        if ok:
            best = max(ok, key=lambda r: r["metrics"]["throughput_tokens_per_s"])
            from harness.config import TrialSpec

            left = max(60.0, args.deadline_s - (time.monotonic() - t0))
            text += f"\n\nprofile of {best['model']} {best['label']}:\n\n" + profile(
                TrialSpec.from_dict(best["spec"]), args.out, timeout_s=left)
    conditions = next((r["conditions"] for r in reversed(rows) if r.get("conditions")), {})
    keep = ("device_name", "driver", "torch", "cuda", "date")
    text = "conditions: " + ", ".join(f"{k}={conditions[k]}" for k in keep if k in conditions) + "\n\n" + text
    print("\n" + text)
    (args.out / "gpt_mfu.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
