"""Does tracking slow training? The same trial with the observer plugins (default: ``mlflow``) enabled and
disabled, alternating on/off so drift of the machine (clocks, other load) hits both alike; prints the median
steady-state throughput of each and the median of the per-pair ratios. Target: on/off >= 0.99.

"On" trials log exactly as in a study: each runs in its own process (``harness.launch``), a child run is created
beforehand, as the driver does at launch, and its id travels in ``spec.tags``; the trial process buffers per-step
metrics and leaves them in a file at its end, which the driver's part (this script, after each trial) logs to
MLflow. ``--in-process`` runs the trials in this process instead (less noise from process start-up, but the
driver's MLflow work then shares the trials' interpreter, which real trials never do).

    python benchmarks/logging_overhead.py                                   # digits on the CPU, 6 pairs
    python benchmarks/logging_overhead.py --workload seed-cnn --device cuda --batch-size 256 --steps 1500
    python benchmarks/logging_overhead.py --plugins mlflow,nvml --device cuda    # telemetry as well
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path


def hook_cost_us(registry, calls: int = 20000) -> float:
    """Microseconds the hooks of one window boundary (``harness_measure_window``, then ``harness_trial_window``,
    as the timed loop calls them) cost through ``registry``, measured on a stand-in trial whose spec carries a
    run id: the deterministic part of the overhead."""
    import time
    from types import SimpleNamespace

    from harness.step import DistInfo
    from harness.testing import make_spec
    from plugins.mlflow_tracking import TAG_RUN_ID, TAG_URI

    spec = make_spec(registry=registry)
    spec.tags.update({TAG_RUN_ID: "0" * 32, TAG_URI: "sqlite:///unused.db"})
    trial = SimpleNamespace(spec=spec, dist=DistInfo(), phase="timed", device=None, metrics={})
    tracker = registry.plugin("mlflow")
    if tracker is not None:  # only the tracking plugin's worker side: no telemetry session on a stand-in trial
        tracker.harness_trial_start(trial=trial)
    hooks = registry.hooks
    metrics = {"train_loss": 0.5, "throughput_samples_per_s": 1e5, "lr": 1e-3, "phase": "timed"}
    t0 = time.perf_counter()
    for step in range(calls):
        window = {**hooks.measure_window(trial=trial, step=step, phase="timed"), **metrics}
        hooks.trial_window(trial=trial, step=step, metrics=window)
    seconds = time.perf_counter() - t0
    # the stand-in's buffered metrics are never flushed (its run id is a stand-in); the registry is not reused
    return seconds / calls * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/logging_overhead.py")
    p.add_argument("--workload", default="digits")
    p.add_argument("--workload-params", default="{}", help="JSON, e.g. '{\"hidden\": 1024}'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--plugins", default="mlflow", help="observer plugins to switch on and off (comma-separated)")
    p.add_argument("--tracking-uri", help="default: a fresh SQLite database in a temporary directory")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cpu-threads", type=int, default=1,
                   help="CPU threads of the trial processes (1: on a shared machine more make throughput swing 2x)")
    p.add_argument("--in-process", action="store_true",
                   help="run the trials in this process (where the driver's MLflow work shares their interpreter) "
                        "instead of their own processes, as studies do")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.cpu_threads)  # read by torch when a trial process starts

    import torch

    torch.set_num_threads(args.cpu_threads)

    from mlflow import MlflowClient

    from harness.config import Budget
    from harness.launch import launch
    from harness.plugins import get_registry
    from harness.testing import make_spec
    from harness.trial import run_trial
    from plugins.mlflow_tracking import TAG_RUN_ID, TAG_SPEC_HASH, TAG_STEPS_FILE, TAG_URI, log_batch, read_step_metrics

    observers = [n.strip() for n in args.plugins.split(",") if n.strip()]
    tmp = tempfile.TemporaryDirectory(prefix="logging-overhead-")
    uri = args.tracking_uri or f"sqlite:///{Path(tmp.name) / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(f"logging-overhead-{Path(tmp.name).name}",
                                          artifact_location=(Path(tmp.name) / "artifacts").as_uri())
    registries = {"on": get_registry(), "off": get_registry(disable=observers)}

    def spec(mode: str):
        s = make_spec(registry=registries[mode], workload=args.workload,
                      workload_params=json.loads(args.workload_params), batch_size=args.batch_size, device=args.device,
                      budget=Budget(steps=args.steps, warmup_steps=max(5, args.steps // 20), windows=args.windows))
        if mode == "on" and "mlflow" in observers:
            run = client.create_run(experiment, run_name=f"on-{len(results['on'])}")
            s.tags.update({TAG_RUN_ID: run.info.run_id, TAG_URI: uri, TAG_SPEC_HASH: s.spec_hash(),
                           TAG_STEPS_FILE: str(Path(tmp.name) / f"{run.info.run_id}.jsonl")})
        return s

    def run(mode: str, s):
        """One trial, in its own process unless --in-process; "off" disables the observers by name there."""
        if args.in_process:
            return run_trial(s, registries[mode])
        previous = os.environ.pop("HARNESS_DISABLE_PLUGINS", None)
        if mode == "off":
            os.environ["HARNESS_DISABLE_PLUGINS"] = ",".join(observers)
        try:
            return launch(s, Path(tmp.name) / f"trial-{len(results['on']) + len(results['off'])}-{mode}")
        finally:
            os.environ.pop("HARNESS_DISABLE_PLUGINS", None)
            if previous is not None:
                os.environ["HARNESS_DISABLE_PLUGINS"] = previous

    def finish(s) -> None:
        """What the driver does when the trial has finished: log the step metrics the trial left."""
        if TAG_RUN_ID in s.tags:
            log_batch(client, s.tags[TAG_RUN_ID], metrics=read_step_metrics(s.tags[TAG_STEPS_FILE]))

    results: dict[str, list[float]] = {"on": [], "off": []}
    # one untimed trial of each first: imports, allocator and caches settle before anything counts
    for mode in ("on", "off"):
        warm_spec = spec(mode)
        warm = run(mode, warm_spec)
        finish(warm_spec)
        if not warm.ok:
            print(f"warm-up trial ({mode}) failed: {warm.status}: {warm.message}", file=sys.stderr)
            return 1
    results = {"on": [], "off": []}
    for i in range(args.pairs):
        for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
            s = spec(mode)
            r = run(mode, s)
            finish(s)
            if not r.ok:
                print(f"trial ({mode}) failed: {r.status}: {r.message}", file=sys.stderr)
                return 1
            results[mode].append(r.metrics["throughput_samples_per_s"])
            print(f"pair {i + 1}/{args.pairs} {mode:>3}: {r.metrics['throughput_samples_per_s']:,.0f} samples/s",
                  flush=True)
    ratios = [a / b for a, b in zip(results["on"], results["off"], strict=True)]
    cost_on_us, cost_off_us = hook_cost_us(registries["on"]), hook_cost_us(registries["off"])
    logged = sum(len(client.get_metric_history(run.info.run_id, "train_loss"))
                 for run in client.search_runs([experiment]))
    summary = {
        "workload": args.workload, "device": args.device, "batch_size": args.batch_size, "steps": args.steps,
        "plugins": observers, "pairs": args.pairs,
        "throughput_on_median": statistics.median(results["on"]),
        "throughput_off_median": statistics.median(results["off"]),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "train_loss_points_logged": logged, "conditions": r.conditions,
        "window_hook_on_us": cost_on_us, "window_hook_off_us": cost_off_us,
        "window_hook_share": (cost_on_us - cost_off_us) * 1e-6 * r.metrics["timing_windows"]
        / r.metrics["train_time_s"],
    }
    print(f"{'+'.join(observers)} on/off throughput: median ratio {summary['ratio_median']:.4f} "
          f"(pairs {min(ratios):.4f}..{max(ratios):.4f}); on {summary['throughput_on_median']:,.0f}, "
          f"off {summary['throughput_off_median']:,.0f} samples/s; {logged} train_loss points logged")
    print(f"between windows: {cost_on_us:.1f} us of hooks per window with, {cost_off_us:.1f} us without "
          f"= {summary['window_hook_share']:.2e} of the timed time at {r.metrics['timing_windows']} windows")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
