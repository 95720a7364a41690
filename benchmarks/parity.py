"""Parity benchmark: is training through the harness as fast as a minimal hand-written PyTorch loop?

For each configuration the same model class, the same on-device data source and batching, the same optimizer
(AdamW with the harness's defaults) and the same precision run two ways in this one process, alternately
(the order flips every round, so clock or thermal drift favours neither):

- **harness**: :func:`harness.trial.run_trial` with eager / single / no compression, its steady-state
  ``throughput_samples_per_s`` (warm-up excluded, device-event timing windows);
- **hand-written**: a plain ``for`` loop (forward under the same autocast, loss, ``backward()``,
  ``opt.step()``, ``opt.zero_grad(set_to_none=True)``) timed with one pair of CUDA events over the same
  number of steps after the same number of warm-up steps.

It prints every round and the median ratio harness / hand-written as markdown tables (target >= 0.99).

    python benchmarks/parity.py                  # the H100 set: seed-cnn b64/b512, resnet18 b512, gpt-124M b16
    python benchmarks/parity.py --quick          # CPU smoke run with tiny sizes
    python benchmarks/parity.py --only seed-cnn-b64 --rounds 7 --json parity.json
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from harness import measure
from harness.config import Budget, Choice, TrialSpec
from harness.plugins import Registry, get_registry
from harness.trial import run_trial


@dataclass
class Config:
    """One parity configuration: a workload, its parameters, the global batch, the precision technique and
    how many steps to warm up and to time."""

    label: str
    workload: str
    params: dict[str, Any]
    batch_size: int
    precision: str
    warmup_steps: int
    timed_steps: int
    note: str = ""
    windows: int = 5
    extra: dict[str, Any] = field(default_factory=dict)


def gpu_configs(registry: Registry) -> list[Config]:
    gpt_precision, note = "amp-bf16", "autocast bf16"
    if ("precision", "amp-bf16") not in registry.techniques:
        gpt_precision, note = "tf32", "amp-bf16 plugin absent: fp32 storage with TF32 math"
    return [
        Config("seed-cnn-b64", "seed-cnn", {"synthetic_samples": 16384}, 64, "fp32", 50, 2000),
        Config("seed-cnn-b512", "seed-cnn", {"synthetic_samples": 16384}, 512, "fp32", 30, 1500),
        Config("resnet18-b512", "resnet18", {"synthetic_samples": 16384}, 512, "fp32", 10, 40),
        Config("gpt-124M-b16", "gpt", {"size": "124M"}, 16, gpt_precision, 10, 60, note=note),
    ]


def quick_configs() -> list[Config]:
    """Tiny sizes that run in seconds on a CPU (a smoke test of the script, not a measurement)."""
    return [
        Config("seed-cnn-b16", "seed-cnn", {"synthetic_samples": 256, "synthetic_test_samples": 64}, 16, "fp32",
               3, 12, windows=3),
        Config("resnet18-w4-b8", "resnet18", {"synthetic_samples": 128, "synthetic_test_samples": 32, "width": 4},
               8, "fp32", 2, 6, windows=2),
        Config("gpt-tiny-b8", "gpt", {"size": "tiny", "corpus_bytes": 100_000}, 8, "fp32", 3, 12, windows=3),
    ]


# ------------------------------------------------------------------------------------------------ harness
def harness_spec(cfg: Config, registry: Registry, device: str, seed: int) -> TrialSpec:
    spec = TrialSpec(workload=cfg.workload, batch_size=cfg.batch_size, seed=seed, device=device,
                     budget=Budget(steps=cfg.warmup_steps + cfg.timed_steps, warmup_steps=cfg.warmup_steps,
                                   windows=cfg.windows, eval_samples=cfg.batch_size))
    spec.workload_params = registry.validate_workload("workload", cfg.workload, cfg.params)
    for axis, name in (("optimizer", "adamw"), ("precision", cfg.precision), ("compile", "eager"),
                       ("parallelism", "single"), ("compression", "none")):
        setattr(spec, axis, Choice(name, registry.technique(axis, axis, name).defaults()))
    return spec


def run_harness(cfg: Config, registry: Registry, device: str, seed: int) -> float:
    result = run_trial(harness_spec(cfg, registry, device, seed), registry)
    if not result.ok:
        raise RuntimeError(f"{cfg.label}: harness trial {result.status}: {result.message}")
    return result.metrics["throughput_samples_per_s"]


# ------------------------------------------------------------------------------------------------ by hand
def run_hand_written(cfg: Config, registry: Registry, device: str, seed: int) -> float:
    """The minimal loop a PyTorch user would write for the same model, data and optimizer."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    wl = registry.build_workload(harness_spec(cfg, registry, device, seed), dev)  # as the harness builds it
    model = wl.model.to(dev)
    train = wl.train.to(dev)
    adamw = registry.technique("optimizer", "optimizer", "adamw").defaults()
    opt = torch.optim.AdamW(model.parameters(), lr=adamw["lr"], betas=(adamw["beta1"], adamw["beta2"]),
                            eps=adamw["eps"], weight_decay=adamw["weight_decay"])
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        tf32 = cfg.precision != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    if cfg.precision == "amp-bf16":
        def autocast():
            return torch.autocast(dev.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    lm = bool(wl.tokens_per_sample)
    cross_entropy = torch.nn.functional.cross_entropy
    batches = train.train_batches(cfg.batch_size, seed)
    model.train()

    for _ in range(cfg.warmup_steps):
        x, y = next(batches)
        with autocast():
            out = model(x)
            loss = cross_entropy(out.flatten(0, 1), y.flatten()) if lm else cross_entropy(out, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    clock = measure.Clock(dev)
    clock.sync()
    start = clock.mark()
    for _ in range(cfg.timed_steps):
        x, y = next(batches)
        with autocast():
            out = model(x)
            loss = cross_entropy(out.flatten(0, 1), y.flatten()) if lm else cross_entropy(out, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    end = clock.mark()
    seconds = clock.elapsed(start, end)
    if not torch.isfinite(loss):
        raise RuntimeError(f"{cfg.label}: hand-written loop diverged")
    return cfg.timed_steps * cfg.batch_size / seconds


# ------------------------------------------------------------------------------------------------ driver
def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure_config(cfg: Config, registry: Registry, device: str, rounds: int, seed: int, log) -> dict:
    rows = []
    for r in range(rounds):
        order = ("harness", "hand") if r % 2 == 0 else ("hand", "harness")
        got = {}
        for who in order:
            t0 = time.perf_counter()
            runner = run_harness if who == "harness" else run_hand_written
            got[who] = runner(cfg, registry, device, seed)
            release(device)
            log(f"  {cfg.label} round {r + 1}/{rounds} {who:8s} {got[who]:12,.1f} samples/s "
                f"({time.perf_counter() - t0:.1f} s)")
        rows.append({"round": r + 1, "first": order[0], "harness_samples_per_s": got["harness"],
                     "hand_samples_per_s": got["hand"], "ratio": got["harness"] / got["hand"]})
    ratios = [row["ratio"] for row in rows]
    return {"label": cfg.label, "workload": cfg.workload, "params": cfg.params, "batch_size": cfg.batch_size,
            "precision": cfg.precision, "note": cfg.note, "warmup_steps": cfg.warmup_steps,
            "timed_steps": cfg.timed_steps, "rounds": rows, "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "harness_median_samples_per_s": statistics.median(r["harness_samples_per_s"] for r in rows),
            "hand_median_samples_per_s": statistics.median(r["hand_samples_per_s"] for r in rows)}


def markdown(results: list[dict], conditions: dict[str, str]) -> str:
    lines = [f"device: {conditions.get('device_name')}, driver {conditions.get('driver', 'n/a')}, "
             f"torch {conditions.get('torch')}, CUDA {conditions.get('cuda')}, {conditions.get('date')}", "",
             "| config | batch | precision | timed steps | harness samples/s | hand-written samples/s "
             "| ratio median | ratio min..max |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for res in results:
        lines.append(f"| {res['label']} | {res['batch_size']} | {res['precision']} | {res['timed_steps']} "
                     f"| {res['harness_median_samples_per_s']:,.1f} | {res['hand_median_samples_per_s']:,.1f} "
                     f"| **{res['ratio_median']:.3f}** | {res['ratio_min']:.3f}..{res['ratio_max']:.3f} |")
    lines += ["", "| config | round | first | harness samples/s | hand-written samples/s | ratio |",
              "|---|---:|---|---:|---:|---:|"]
    for res in results:
        for row in res["rounds"]:
            lines.append(f"| {res['label']} | {row['round']} | {row['first']} | {row['harness_samples_per_s']:,.1f} "
                         f"| {row['hand_samples_per_s']:,.1f} | {row['ratio']:.3f} |")
    notes = [f"- {res['label']}: {res['note']}" for res in results if res["note"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5; 2 with --quick)")
    parser.add_argument("--only", action="append", default=[], metavar="LABEL", help="run only these configs")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    registry = get_registry()
    configs = quick_configs() if args.quick else gpu_configs(registry)
    if args.only:
        unknown = sorted(set(args.only) - {c.label for c in configs})
        if unknown:
            parser.error(f"--only: unknown config {unknown[0]!r} (known: {', '.join(c.label for c in configs)})")
        configs = [c for c in configs if c.label in args.only]
    rounds = args.rounds or (2 if args.quick else 5)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    conditions = measure.conditions(torch.device(device))
    log(f"parity: {len(configs)} config(s), {rounds} round(s) each, on {conditions['device_name']}")
    results = [measure_config(cfg, registry, device, rounds, args.seed, log) for cfg in configs]
    print(markdown(results, conditions))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"conditions": conditions, "results": results, "argv": sys.argv}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
