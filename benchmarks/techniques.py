"""Throughput of each optimizer / precision / compile technique alone and of the best combinations, on a GPU.

For seed-cnn (batch 64 and 512), resnet18 (batch 512) and gpt-124M (batch 16 x 1024 tokens) it runs one trial
per row in this process (``harness.trial.run_trial``), against the fp32 / eager / adamw baseline, and prints a
markdown table: steady-state throughput (timing windows, compile and warm-up excluded), the speed-up over the
baseline and over the hand-written reference, MFU and compile time. Results are also written as JSON lines as
they come, so a run cut short still leaves its rows.

    python benchmarks/techniques.py --out results.md --jsonl results.jsonl [--groups seed-cnn-b64,gpt-124m]
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

#: hand-written training loops on an H100 SXM (issue 3): (fp32 baseline, best hand-written), samples/s.
REFERENCES = {
    "seed-cnn-b64": {"fp32": 22_500, "best": 153_000, "best_what": "bf16 + channels-last + fused AdamW + CUDA graph"},
    "seed-cnn-b512": {},
    "resnet18-b512": {"fp32": 7_100, "best": 53_000, "best_what": "bf16 + channels-last + fused AdamW + compile"},
    "gpt-124m": {"best": 395_000 / 1024, "best_what": "bf16 + compile + fused AdamW (395k tok/s, 34% MFU)"},
}

FUSED = {"name": "adamw", "implementation": "fused"}
CL_GRAPH = {"name": "cuda-graph", "channels_last": True}
CL_COMPILE = {"name": "torch-compile", "channels_last": True}

#: group -> (workload, workload params, batch size, warm-up steps, timed steps, rows); a row is (label, techniques).
GROUPS = {
    "seed-cnn-b64": ("seed-cnn", {}, 64, 20, 600, [
        ("combo: bf16 + cuda-graph(channels-last) + fused adamw",
         dict(precision="amp-bf16", compile=CL_GRAPH, optimizer=FUSED)),
        ("baseline fp32 / eager / adamw", {}),
        ("tf32", dict(precision="tf32")), ("amp-bf16", dict(precision="amp-bf16")),
        ("amp-fp16", dict(precision="amp-fp16")), ("adamw fused", dict(optimizer=FUSED)),
        ("channels-last", dict(compile="channels-last")), ("cuda-graph", dict(compile="cuda-graph")),
        ("torch-compile (default)", dict(compile="torch-compile")),
        ("combo: bf16 + torch-compile(reduce-overhead, channels-last) + fused adamw",
         dict(precision="amp-bf16", compile={**CL_COMPILE, "mode": "reduce-overhead"}, optimizer=FUSED)),
    ]),
    "resnet18-b512": ("resnet18", {}, 512, 8, 40, [
        ("combo: bf16 + torch-compile(channels-last) + fused adamw",
         dict(precision="amp-bf16", compile=CL_COMPILE, optimizer=FUSED)),
        ("baseline fp32 / eager / adamw", {}),
        ("combo: bf16 + cuda-graph(channels-last) + fused adamw",
         dict(precision="amp-bf16", compile=CL_GRAPH, optimizer=FUSED)),
        ("tf32", dict(precision="tf32")), ("amp-bf16", dict(precision="amp-bf16")),
        ("channels-last", dict(compile="channels-last")), ("adamw fused", dict(optimizer=FUSED)),
        ("cuda-graph", dict(compile="cuda-graph")),
        ("torch-compile (default)", dict(compile="torch-compile")),
        ("combo: bf16 + torch-compile(reduce-overhead, channels-last) + fused adamw",
         dict(precision="amp-bf16", compile={**CL_COMPILE, "mode": "reduce-overhead"}, optimizer=FUSED)),
    ]),
    "gpt-124m": ("gpt", {"size": "124M"}, 16, 5, 20, [
        ("combo: bf16 + torch-compile + fused adamw",
         dict(precision="amp-bf16", compile="torch-compile", optimizer=FUSED)),
        ("baseline fp32 / eager / adamw", {}),
        ("tf32", dict(precision="tf32")), ("amp-bf16", dict(precision="amp-bf16")),
        ("adamw fused", dict(optimizer=FUSED)),
        ("combo: bf16 + cuda-graph + fused adamw", dict(precision="amp-bf16", compile="cuda-graph", optimizer=FUSED)),
        ("combo: fp8 + torch-compile + fused adamw", dict(precision="fp8", compile="torch-compile", optimizer=FUSED)),
    ]),
    "seed-cnn-b512": ("seed-cnn", {}, 512, 10, 200, [
        ("combo: bf16 + cuda-graph(channels-last) + fused adamw",
         dict(precision="amp-bf16", compile=CL_GRAPH, optimizer=FUSED)),
        ("baseline fp32 / eager / adamw", {}),
        ("amp-bf16", dict(precision="amp-bf16")), ("adamw fused", dict(optimizer=FUSED)),
        ("channels-last", dict(compile="channels-last")), ("cuda-graph", dict(compile="cuda-graph")),
        ("combo: bf16 + torch-compile(channels-last) + fused adamw",
         dict(precision="amp-bf16", compile=CL_COMPILE, optimizer=FUSED)),
    ]),
}


def run_row(workload: str, workload_params: dict, batch: int, warmup: int, timed: int, techniques: dict,
            device: str = "cuda") -> dict:
    import torch

    from harness.config import Budget
    from harness.testing import make_spec
    from harness.trial import run_trial

    spec = make_spec(workload=workload, workload_params=workload_params, batch_size=batch, device=device,
                     budget=Budget(steps=warmup + timed, warmup_steps=warmup, windows=4, eval_samples=256),
                     **techniques)
    try:
        result = run_trial(spec)
    finally:
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result.to_dict()


def table(rows: list[dict]) -> str:
    """Markdown: one line per row, then per group the best combination against the hand-written reference."""
    lines = ["| workload, batch | techniques | samples/s | tokens/s | x baseline | x reference | MFU | compile_s |"
             " status |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    baselines = {r["group"]: r["metrics"].get("throughput_samples_per_s") for r in rows
                 if r["label"].startswith("baseline") and r["status"] == "ok"}

    def fmt(value, pattern):
        return pattern.format(value) if value is not None else ""

    def reference(r):
        ref = REFERENCES.get(r["group"], {})
        return ref.get("best") if r["label"].startswith("combo") else ref.get("fp32") if \
            r["label"].startswith("baseline") else None

    for r in rows:
        m = r["metrics"]
        sps, base, ref = m.get("throughput_samples_per_s"), baselines.get(r["group"]), reference(r)
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["group"], r["label"], fmt(sps, "{:,.0f}"), fmt(m.get("throughput_tokens_per_s"), "{:,.0f}"),
            fmt(sps / base if sps and base else None, "{:.2f}"), fmt(sps / ref if sps and ref else None, "{:.2f}"),
            fmt(m["mfu"] * 100 if m.get("mfu") else None, "{:.1f}%"), fmt(m.get("compile_s"), "{:.1f}"),
            r["status"] if r["status"] == "ok" else f"{r['status']}: {r['message'][:80]}"))
    lines += ["", "| workload, batch | best combination | samples/s | x baseline | hand-written reference "
                  "| x reference |", "|---|---|---:|---:|---|---:|"]
    for group in dict.fromkeys(r["group"] for r in rows):
        combos = [r for r in rows if r["group"] == group and r["label"].startswith("combo") and r["status"] == "ok"]
        if not combos:
            continue
        best = max(combos, key=lambda r: r["metrics"]["throughput_samples_per_s"])
        sps, base, ref = best["metrics"]["throughput_samples_per_s"], baselines.get(group), reference(best)
        what = REFERENCES.get(group, {}).get("best_what", "")
        lines.append(f"| {group} | {best['label'][len('combo: '):]} | {sps:,.0f} | "
                     f"{fmt(sps / base if base else None, '{:.2f}')} | {what}{fmt(ref, ' ({:,.0f}/s)')} | "
                     f"{fmt(sps / ref if ref else None, '{:.2f}')} |")
    return "\n".join(lines)


def render(rows: list[dict], conditions: dict) -> str:
    keep = ("device_name", "driver", "torch", "cuda", "date")
    return "conditions: " + ", ".join(f"{k}={conditions[k]}" for k in keep if k in conditions) + "\n\n" + table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default=",".join(GROUPS), help="comma-separated: " + ", ".join(GROUPS))
    parser.add_argument("--rows", default="", help="only rows whose label contains one of these comma-separated "
                                                   "fragments (the baseline always runs)")
    parser.add_argument("--out", type=Path, default=None, help="markdown table file")
    parser.add_argument("--jsonl", type=Path, default=None, help="one JSON line per row, written as rows finish")
    parser.add_argument("--from-jsonl", type=Path, nargs="*", default=None,
                        help="render the table from earlier --jsonl files instead of running")
    parser.add_argument("--time-limit-s", type=float, default=1e9, help="start no row after this many seconds")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply warm-up and timed steps")
    parser.add_argument("--quick", action="store_true", help="only the baseline and combination rows")
    args = parser.parse_args()
    if args.from_jsonl:
        rows = [json.loads(line) for path in args.from_jsonl for line in path.read_text().splitlines() if line]
        text = render(rows, rows[-1].get("conditions", {}) if rows else {})
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return
    t0, rows, conditions = time.perf_counter(), [], {}
    wanted = [f for f in args.rows.split(",") if f]
    for group in args.groups.split(","):
        workload, params, batch, warmup, timed, specs = GROUPS[group]
        for label, techniques in specs:
            if args.quick and not label.startswith(("combo", "baseline")):
                continue
            if wanted and not label.startswith("baseline") and not any(f in label for f in wanted):
                continue
            if time.perf_counter() - t0 > args.time_limit_s:
                print(f"skipped (time limit): {group}: {label}", flush=True)
                continue
            start = time.perf_counter()
            result = run_row(workload, params, batch, max(2, int(warmup * args.steps_scale)),
                             max(4, int(timed * args.steps_scale)), techniques, args.device)
            conditions = result["conditions"] or conditions
            row = {"group": group, "label": label, "status": result["status"], "message": result["message"],
                   "metrics": result["metrics"], "wall_s": time.perf_counter() - start}
            rows.append(row)
            m = row["metrics"]
            print(f"{group:14s} {label:70s} {row['status']:8s} "
                  f"{m.get('throughput_samples_per_s', float('nan')):12,.0f}/s compile {m.get('compile_s', 0):6.1f}s "
                  f"mfu {m.get('mfu', 0) or 0:.3f} wall {row['wall_s']:.0f}s {row['message'][:200]}", flush=True)
            if args.jsonl:
                with args.jsonl.open("a") as f:
                    f.write(json.dumps({**row, "conditions": conditions}, default=str) + "\n")
    text = render(rows, conditions)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
