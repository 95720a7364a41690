"""Does a trial's held-out evaluation depend on its compile technique? Trains one workload per compile variant
and compares the val_loss the trial reported with the val_loss of the same trained weights evaluated again by
the trial and by a fresh eager copy of the model (issue: reduce-overhead reported 3.254 where default gave 3.020).

    python3 benchmarks/eval_consistency.py --workload gpt --size 124M --steps 100 --batch 16 --out /tmp/ev.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch


def fresh_eval(trial, model: torch.nn.Module) -> dict[str, float]:
    """val_loss / accuracy of ``model`` on the trial's held-out batches, in plain eager code."""
    wl, spec = trial.workload, trial.spec
    model.eval()
    losses, correct, count = 0.0, 0.0, 0
    with torch.no_grad():
        for x, y in wl.test.eval_batches(spec.batch_size, spec.budget.eval_samples):
            with trial.precision.autocast():
                out = model(x)
            out = out.float()
            losses += float(wl.loss_of(out, y)) * y.numel()
            correct += float(wl.correct(out, y))
            count += y.numel()
    return {"val_loss": losses / count, "accuracy": correct / count}


def main() -> int:
    from harness.testing import make_spec
    from harness.trial import Trial

    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", default="gpt")
    ap.add_argument("--size", default="124M")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precision", default="amp-bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default="eager,torch-compile:default,torch-compile:reduce-overhead,"
                                          "torch-compile:reduce-overhead:model,cuda-graph")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for variant in args.variants.split(","):
        name, *rest = variant.split(":")
        compile_ = {"name": name}
        if rest:
            compile_["mode"] = rest[0]
        if len(rest) > 1:
            compile_["scope"] = rest[1]
        spec = make_spec(workload=args.workload, workload_params={"size": args.size} if args.size else {},
                         optimizer={"name": "adamw", "implementation": "fused" if args.device == "cuda"
                                    else "foreach"},
                         precision=args.precision, compile=compile_, batch_size=args.batch, device=args.device,
                         budget={"steps": args.steps, "warmup_steps": 10, "windows": 5, "eval_samples": 256})
        t0 = time.time()
        trial = Trial(spec)
        result = trial.run()
        row = {"variant": variant, "status": result.status, "message": result.message[:300],
               "train_loss": result.metrics.get("train_loss"), "val_loss": result.metrics.get("val_loss"),
               "accuracy": result.metrics.get("accuracy"),
               "throughput": result.metrics.get("throughput_samples_per_s"), "wall_s": time.time() - t0}
        if result.ok:
            model = trial.engine.module
            row["val_loss_again"] = trial.evaluate()["val_loss"]
            twin = copy.deepcopy(model)
            row["val_loss_fresh_copy"] = fresh_eval(trial, twin)["val_loss"]
            row["param_abs_sum"] = float(sum(p.detach().float().abs().sum() for p in model.parameters()))
            tied = getattr(model, "lm_head", None)
            if tied is not None:
                row["tied"] = model.lm_head.weight is model.wte.weight
        rows.append(row)
        print(json.dumps(row), flush=True)
        del trial
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
