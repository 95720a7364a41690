"""Does a trial measure the same throughput while another trial runs on the host's other GPU?

For each case, the trial runs alone on GPU 0 (``--repeats`` times), then as often again while a neighbour (the
same trial, with a longer budget so that it covers the whole run) runs on GPU 1. Each run is a real
``harness run`` process pinned with CUDA_VISIBLE_DEVICES, as the study driver's slots pin them. Prints the
throughputs with their 95% intervals and the ratio together / alone (a tie when the interval of the ratio
holds 1).

    python3 benchmarks/concurrency.py --out /tmp/concurrency.json            # on a 2-GPU host
    python3 benchmarks/concurrency.py --device cpu --cases digits --repeats 1   # the mechanics, on a CPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    # launch-bound: a small CNN whose steps are a few hundred microseconds
    "seed-cnn-b64": ["--workload", "seed-cnn", "--batch-size", "64", "--optimizer", "adamw", "--set",
                     "optimizer.implementation=fused", "--precision", "amp-bf16", "--compile", "cuda-graph",
                     "--set", "compile.channels_last=true", "--steps", "3000", "--set", "budget.windows=10"],
    # compute-bound: GPT-2 124M
    "gpt-124M-b16": ["--workload", "gpt", "--set", "workload.size=124M", "--batch-size", "16", "--optimizer",
                     "adamw", "--set", "optimizer.implementation=fused", "--precision", "amp-bf16", "--compile",
                     "torch-compile", "--steps", "150", "--set", "budget.windows=10"],
    "digits": ["--workload", "digits", "--batch-size", "64", "--steps", "300"],
}


def harness_run(args: list[str], gpu: str, device: str, out: Path, steps_factor: float = 1.0) -> subprocess.Popen:
    args = list(args)
    if steps_factor != 1.0:
        i = args.index("--steps")
        args[i + 1] = str(int(int(args[i + 1]) * steps_factor))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, HARNESS_DISABLE_PLUGINS="mlflow")
    cmd = [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main())", "run", *args,
           "--device", device, "--json", str(out)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen, path: Path) -> dict:
    _, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"harness run failed: {err[-1500:]}")
    m = json.loads(path.read_text())["metrics"]
    return {k: m.get(k) for k in ("throughput_samples_per_s", "throughput_samples_per_s_ci_low",
                                  "throughput_samples_per_s_ci_high", "throughput_ci_rel_half_width",
                                  "step_time_cv", "compile_s", "wall_s")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="seed-cnn-b64,gpt-124M-b16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="concurrency-"))
    rows = []
    for case in args.cases.split(","):
        alone, together = [], []
        for r in range(args.repeats):
            path = tmp / f"{case}-alone-{r}.json"
            alone.append(result(harness_run(CASES[case], "0", args.device, path), path))
            path, other = tmp / f"{case}-together-{r}.json", tmp / f"{case}-neighbour-{r}.json"
            neighbour = harness_run(CASES[case], "1", args.device, other, steps_factor=2.0)
            time.sleep(0.5)  # both start importing at about the same moment; the neighbour's budget is longer
            together.append(result(harness_run(CASES[case], "0", args.device, path), path))
            result(neighbour, other)
        a = statistics.median(x["throughput_samples_per_s"] for x in alone)
        t = statistics.median(x["throughput_samples_per_s"] for x in together)
        rel = [x["throughput_ci_rel_half_width"] or 0.0 for x in alone + together]
        half = (max(rel) ** 2 * 2) ** 0.5  # the ratio's relative half-width from the two widest intervals
        row = {"case": case, "alone": alone, "together": together, "alone_median": a, "together_median": t,
               "ratio": t / a, "ratio_ci": [t / a * (1 - half), t / a * (1 + half)],
               "tie": (t / a) * (1 - half) <= 1.0 <= (t / a) * (1 + half)}
        rows.append(row)
        print(f"{case}: alone {a:,.0f} samples/s, with a neighbour {t:,.0f}: ratio {t / a:.3f} "
              f"(95% {row['ratio_ci'][0]:.3f}-{row['ratio_ci'][1]:.3f}, {'a tie' if row['tie'] else 'DIFFERENT'})",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
