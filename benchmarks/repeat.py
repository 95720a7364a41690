"""Does one configuration measure the same twice? Runs one configuration of the CPU quickstart N times, each in a
fresh ``harness run`` process as a study runs its trials, and prints every run's throughput with its 95 %
interval, then the mean, the spread across runs (CV) and how many runs' intervals hold the mean. Target: CV <= 5 %
on an idle 2-core CPU.

The workload, its size, the budget and the device come from the study file (default ``studies/quickstart.yaml``),
so the figure is about the quickstart as shipped; the techniques default to the issue's repeated configuration
(adam / fp32 / eager / single / none at batch 32). The machine's load (``os.getloadavg``) is printed before and
after: on a shared machine the figure says as much about the neighbours as about the harness.

    python benchmarks/repeat.py                                 # 5 runs of the quickstart's adam / fp32 / b32
    python benchmarks/repeat.py --runs 10 --batch-size 128 --precision amp-bf16
    HARNESS_CPU_THREADS=1 python benchmarks/repeat.py           # one intra-op thread per trial
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_once(args: argparse.Namespace, study: dict, out: Path) -> dict:
    """One ``harness run`` of the configuration in its own process; its result (status, metrics, conditions)."""
    budget = study.get("budget") or {}
    cmd = [sys.executable, "-m", "harness.cli", "run", "--workload", str(study.get("workload", {}).get("name")),
           "--optimizer", args.optimizer, "--precision", args.precision, "--compile", args.compile,
           "--parallelism", "single", "--compression", "none", "--batch-size", str(args.batch_size),
           "--device", str(study.get("device", "cpu")), "--seed", str(args.seed), "--json", str(out)]
    cmd += [f"--set=workload.{k}={v}" for k, v in (study.get("workload") or {}).items() if k != "name"]
    cmd += [f"--set=budget.{k}={v}" for k, v in budget.items()]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.exists():
        raise SystemExit(f"harness run failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}\n$ {' '.join(cmd)}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/repeat.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default=str(ROOT / "studies" / "quickstart.yaml"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--compile", default="eager")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every run's metrics and the summary here")
    args = p.parse_args(argv)
    study = yaml.safe_load(Path(args.study).read_text())
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="harness-repeat-") as tmp:
        for i in range(args.runs):
            result = run_once(args, study, Path(tmp) / f"run{i}.json")
            if result["status"] != "ok":
                raise SystemExit(f"run {i + 1}: {result['status']}: {result['message']}")
            m, cond = result["metrics"], result["conditions"]
            runs.append(m)
            print(f"run {i + 1}: {m['throughput_samples_per_s']:>10,.0f} samples/s  95% CI "
                  f"{m.get('throughput_samples_per_s_ci_low', float('nan')):,.0f}-"
                  f"{m.get('throughput_samples_per_s_ci_high', float('nan')):,.0f} "
                  f"(±{m.get('throughput_ci_rel_half_width', float('nan')):.1%})  windows {m['timing_windows']}"
                  f"  noisy {m.get('throughput_noisy', '-')}  step {m['step_time_median_s'] * 1e3:.2f} ms"
                  f"  threads {cond.get('cpu_threads', '?')}", flush=True)
    load_after = os.getloadavg()
    values = [m["throughput_samples_per_s"] for m in runs]
    mean = statistics.mean(values)
    cv = statistics.stdev(values) / mean if len(values) > 1 else 0.0
    held = sum(1 for m in runs if m.get("throughput_samples_per_s_ci_low", mean) <= mean
               <= m.get("throughput_samples_per_s_ci_high", mean))
    config = (f"{study.get('workload')} / {args.optimizer} / {args.precision} / {args.compile} / b{args.batch_size}, "
              f"budget {study.get('budget')}")
    print(f"\n{config}\n{len(values)} runs: mean {mean:,.0f} samples/s, CV {cv:.1%} (target <= 5%), range "
          f"{min(values):,.0f}-{max(values):,.0f}; {held} of {len(values)} intervals hold the mean")
    print(f"load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, after "
          f"{tuple(round(x, 2) for x in load_after)}; {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config, "runs": runs, "mean": mean, "cv": cv,
                                               "load_before": load_before, "load_after": load_after}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
