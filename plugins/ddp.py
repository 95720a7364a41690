"""Parallelism ``ddp``: ``torch.nn.parallel.DistributedDataParallel``, one process per device.

Every rank holds the whole model and optimizer; gradients are averaged across ranks by bucketed all-reduces
that overlap the backward pass. ``batch_size`` is the *global* batch: each of the N ranks takes its own disjoint
``batch_size / N`` samples of every step (the runner shards the data), so a DDP trial sees the same samples per
optimizer step as a single-process trial and their results compare. With ``accumulation_steps`` > 1 each
rank's share is split into micro-batches; all but the last run under ``no_sync()`` (no all-reduce), so the
gradient communication happens once per optimizer step.

``gradient_dtype`` picks the dtype gradients travel in: ``float32`` (DDP's own) or half precision through torch's
gradient-compression hooks (``bf16_compress_hook`` / ``fp16_compress_hook``: each bucket cast down, all-reduced,
cast back), half the traffic. On 2 x H200 with gpt-124M, 17 ms per step of DDP's float32 all-reduce were exposed
(docs/benchmarks.md, "Sharded training"); the averaged gradient then carries half precision's rounding (about 3
significant digits). torch's bfloat16 hook needs CUDA and NCCL.
"""
from __future__ import annotations

from harness import hookimpl
from harness.space import Categorical, Int, Requirements, Technique
from harness.step import Engine

TECHNIQUE = Technique(
    axis="parallelism", name="ddp",
    space={"bucket_cap_mb": Int(1, 1024, default=25, log=True, help="gradient bucket size of the all-reduce (MB)"),
           "gradient_as_bucket_view": Categorical((False, True), default=True,
                                                  help="gradients are views into the buckets (saves a copy)"),
           "static_graph": Categorical((False, True), default=False,
                                       help="the graph is the same every step (enables extra optimisations)"),
           "accumulation_steps": Int(1, 64, default=1, log=True,
                                     help="micro-batches per optimizer step (per-rank batch split; no_sync)"),
           "gradient_dtype": Categorical(("float32", "bfloat16", "float16"), default="float32",
                                         help="dtype of the gradient all-reduce (half: torch's compression hooks)",
                                         requires={"bfloat16": Requirements(cuda=True)})},
    # One process has nothing to all-reduce with: the `single` technique is the one-process baseline.
    requires=Requirements(min_devices=2),
    incompatible=("compile:cuda-graph",),
    reason="DDP's all-reduce hooks run on the host between kernels and cannot be captured in one CUDA graph",
    description="DistributedDataParallel: replicated model, bucketed gradient all-reduce",
)


class DDPEngine(Engine):
    """Backward through the DDP wrapper (which all-reduces gradients), optimizer step on the local replica."""

    def __init__(self, model, optimizer, precision, device, params: dict):
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=params["bucket_cap_mb"],
                                          gradient_as_bucket_view=params["gradient_as_bucket_view"],
                                          static_graph=params["static_graph"])
        if params["gradient_dtype"] != "float32":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            wrapped.register_comm_hook(None, {"bfloat16": default_hooks.bf16_compress_hook,
                                              "float16": default_hooks.fp16_compress_hook}[params["gradient_dtype"]])
        super().__init__(wrapped, optimizer, precision)
        self.module = model
        self.accumulation_steps = params["accumulation_steps"]

    def no_sync(self):
        return self.model.no_sync()


@hookimpl
def harness_declare_techniques():
    return [TECHNIQUE]


@hookimpl
def harness_check_combination(spec):
    n = spec.parallelism.params.get("accumulation_steps", 1)
    per_rank = spec.batch_size // max(spec.devices, 1)
    if n > 1 and per_rank % n:
        return (f"parallelism.accumulation_steps: {n} does not divide the per-rank batch {per_rank} "
                f"(batch_size {spec.batch_size} / {spec.devices} processes)")
    return None


@hookimpl
def harness_build_engine(model, optimizer, precision, spec, device):
    return DDPEngine(model, optimizer, precision, device, spec.parallelism.params)
