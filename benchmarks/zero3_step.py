"""ZeRO-3 step by step against a plain copy of the same model, in one process: the loss of each step, every
gradient (``deepspeed.utils.safe_get_full_grad``) and every parameter after the step, then a held-out loss, in
float32. It asks whether DeepSpeed's leaf modules (or per-layer gathering) under the harness's per-block compile
compute what the plain model computes, without the rest of a trial (schedule, loss, data).

    python benchmarks/zero3_step.py --mode leaf-compiled                    # CUDA, gpt small
    python benchmarks/zero3_step.py --mode per-layer-compiled --optimizer fused
    python benchmarks/zero3_step.py --device cpu --size tiny --mode leaf-eager

Each step prints one JSON line: ``loss_ds``/``loss_ref``, the largest relative gradient and parameter differences
(the three worst named). The reference compiles its blocks through its own ``torch.compile`` (not the engine's).

``--trial`` checks the harness's own set-up instead: a :class:`harness.trial.Trial` (workload, optimizer, DeepSpeed
engine, compile, train step and batches of the spec of ``zero3_parity.py``, in float32, one process) steps against
a plain copy of its model with torch's AdamW; each line also gives ``block_grad_norm``, the norm of the gradient the
backward pass hands the last block's last parameter (``block_param``). The plugin refuses compiled ZeRO-3 on CUDA;
this check sets that refusal aside on purpose, as it studies what is refused:

    python benchmarks/zero3_step.py --trial --mode leaf-compiled --batch 32 --steps 6
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

MODES = ("leaf-compiled", "leaf-eager", "per-layer-compiled")


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / (b.float().norm() + 1e-12)).item()


def param_diffs(ds_params: dict, ref_params: dict) -> dict[str, float]:
    """The relative difference of each engine parameter (gathered, under ZeRO-3) from the reference's."""
    import deepspeed

    diffs = {}
    for n, ref_param in ref_params.items():
        with deepspeed.zero.GatheredParameters([ds_params[n]]):
            diffs[n] = rel(ds_params[n].data, ref_param.data)
    return diffs


def append_rows(path: str, rows: list[dict]) -> None:
    """Append ``rows`` as JSON lines to ``path`` (nothing when it is empty)."""
    if path:
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def worst(diffs: dict[str, float]) -> list:
    return sorted(diffs.items(), key=lambda kv: -kv[1])[:3]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="leaf-compiled", choices=MODES)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--size", default="small", help="gpt size preset")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--optimizer", default="torch", choices=("torch", "fused"),
                    help="the engine's optimizer: torch's AdamW, or DeepSpeed's FusedAdam (CUDA) as trials use")
    ap.add_argument("--trial", action="store_true", help="step the harness's own trial set-up (see above)")
    ap.add_argument("--out", default="", help="append the JSON lines to this file too")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.trial:
        return trial_check(args)
    import deepspeed
    import torch
    import torch.nn.functional as F

    from plugins._blocks import repeated_blocks, subclass_with_forward
    from plugins.deepspeed_zero import TECHNIQUE, _ensure_process_group, mark_leaf_blocks, zero_config
    from plugins.gpt import GPT, PRESETS
    from plugins.torch_compile import compiled_class

    dev = torch.device(args.device)
    torch.manual_seed(0)
    cfg = dict(PRESETS[args.size])
    model = GPT(**cfg).to(dev)
    ref = copy.deepcopy(model)
    _ensure_process_group(dev)
    if args.mode.startswith("leaf"):
        mark_leaf_blocks(model)
    config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
              "zero_optimization": zero_config({**TECHNIQUE.defaults(), "stage": 3}),  # the plugin's own section
              "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
              "steps_per_print": 10 ** 9, "gradient_clipping": 0.0}
    if args.optimizer == "fused":
        from deepspeed.ops.adam import FusedAdam

        opt = FusedAdam(model.parameters(), lr=1e-3, adam_w_mode=True, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    if args.mode.endswith("compiled"):
        for block in repeated_blocks(engine.module):
            block.__class__ = compiled_class(type(block), None, False, False)
        ref_cls = type(repeated_blocks(ref)[0])
        ref_compiled = subclass_with_forward(ref_cls, "Reference", torch.compile(ref_cls.forward))
        for block in repeated_blocks(ref):
            block.__class__ = ref_compiled
    names = [n for n, _ in ref.named_parameters()]
    ds_params, ref_params = dict(engine.module.named_parameters()), dict(ref.named_parameters())
    gen = torch.Generator().manual_seed(1)

    def batch():
        ids = torch.randint(0, cfg["vocab_size"], (args.batch, cfg["seq_len"] + 1), generator=gen).to(dev)
        return ids[:, :-1], ids[:, 1:]

    def loss_of(m, x, y):
        return F.cross_entropy(m(x).float().flatten(0, 1), y.flatten())

    rows = []
    for step in range(args.steps):
        x, y = batch()
        l_ds, l_ref = loss_of(engine, x, y), loss_of(ref, x, y)
        engine.backward(l_ds)
        l_ref.backward()
        grads = {}
        for n in names:
            g = deepspeed.utils.safe_get_full_grad(ds_params[n])
            grads[n] = float("nan") if g is None else rel(g, ref_params[n].grad)
        engine.step()
        ref_opt.step()
        ref_opt.zero_grad()
        params = param_diffs(ds_params, ref_params)
        rows.append({"mode": args.mode, "optimizer": args.optimizer, "step": step, "loss_ds": l_ds.item(),
                     "loss_ref": l_ref.item(), "worst_grad_rel": max(grads.values()), "worst_grads": worst(grads),
                     "worst_param_rel": max(params.values()), "worst_params": worst(params)})
        print(json.dumps(rows[-1]), flush=True)
    engine.eval()
    ref.eval()
    with torch.no_grad():
        x, y = batch()
        rows.append({"mode": args.mode, "eval_loss_ds": loss_of(engine, x, y).item(),
                     "eval_loss_ref": loss_of(ref, x, y).item()})
    print(json.dumps(rows[-1]), flush=True)
    append_rows(args.out, rows)
    return 0


def trial_check(args) -> int:
    """``--trial``: the harness's trial set-up step by step against a plain copy of its model (see the docstring)."""
    import torch

    from harness.plugins import get_registry
    from harness.testing import make_spec
    from harness.trial import Trial
    from plugins._blocks import repeated_blocks

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from zero3_parity import spec_fields

    fields = spec_fields("single", args.size, args.device)
    fields.update(parallelism={"name": "deepspeed", "stage": 3, "stage3_leaf_blocks": args.mode.startswith("leaf"),
                               "optimizer_impl": "torch" if args.optimizer == "torch" else "auto"},
                  precision="fp32", devices=1, batch_size=args.batch)
    if args.mode.endswith("compiled"):
        fields["compile"] = {"name": "torch-compile", "scope": "blocks"}
    trial = Trial(make_spec(**fields))
    trial.infeasible = lambda: None  # type: ignore[method-assign]  # what CUDA refuses is what is checked here
    trial.setup()
    ref = get_registry().build_workload(trial.spec, trial.device).model.to(trial.device)  # same seed, same init
    group = trial.optimizer.param_groups[0]
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=group["lr"], betas=group["betas"], eps=group["eps"],
                                weight_decay=group["weight_decay"])
    ds_params, ref_params = dict(trial.model.named_parameters()), dict(ref.named_parameters())
    probe_name, probe = list(repeated_blocks(trial.model)[-1].named_parameters())[-1]
    seen: list[float] = []
    probe.register_post_accumulate_grad_hook(lambda t: seen.append(float(t.grad.float().norm())))
    trial.engine.train(True)
    rows = []
    for step in range(args.steps):
        x, y = next(trial.batches)
        seen.clear()
        loss = trial.step_fn(x, y)
        loss_ref = trial.workload.loss_of(ref(x), y)
        loss_ref.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        params = param_diffs(ds_params, ref_params)
        rows.append({"mode": args.mode, "source": "trial", "step": step, "loss_ds": loss.item(),
                     "loss_ref": loss_ref.item(), "worst_param_rel": max(params.values()),
                     "worst_params": worst(params), "block_param": probe_name,
                     "block_grad_norm": seen[-1] if seen else None})
        print(json.dumps(rows[-1]), flush=True)
    trial.engine.close()
    append_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
