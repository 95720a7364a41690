"""Block-wise techniques on the CPU: the repeated-blocks contract, activation checkpointing (exact in float32, fewer
saved activations, parameter names and identity kept), ``torch-compile`` with ``scope: blocks``, FSDP's fused
AdamW on the sharded parameters' local shards, DeepSpeed's defaults and DeepSpeed trained like the other engines.
The 1- vs 2-process agreement of every parallelism technique with activation checkpointing is in
``test_parallel.py``."""
from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

from harness.space import Environment, infeasible_reason
from harness.step import DistInfo
from harness.testing import make_spec, run_one_trial
from harness.trial import Trial
from plugins._blocks import repeated_blocks

CPU = torch.device("cpu")
GPT_TINY = {"workload": "gpt", "workload_params": {"size": "tiny", "n_layer": 4}}
H100 = Environment(cuda=True, device_count=1, compute_capability=(9, 0), device_name="NVIDIA H100 80GB HBM3")


def gpt_model(registry, memory="none", **workload_params):
    """The gpt workload's model (tiny, 4 blocks) after the trial's memory technique changed it."""
    spec = make_spec(registry=registry, workload="gpt", memory=memory,
                     workload_params={"size": "tiny", "n_layer": 4, **workload_params})
    workload = registry.build_workload(spec, CPU)
    model = registry.hooks.reduce_memory(model=workload.model, workload=workload, spec=spec, device=CPU)
    return model or workload.model, workload


# ---------------------------------------------------------------------------------------------- repeated blocks
class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.parts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))


def test_repeated_blocks_are_the_children_of_the_outermost_module_lists():
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList(Inner() for _ in range(3)), nn.ModuleList([nn.ReLU()]))
    blocks = repeated_blocks(model)
    assert blocks == [*model[1], model[2][0]]  # the Linear layers inside each Inner block are part of it


def test_a_model_without_a_module_list_has_no_repeated_blocks():
    assert repeated_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) == []


# ------------------------------------------------------------------------------------- activation checkpointing
def activation_bytes_kept(model: nn.Module, inputs: torch.Tensor) -> int:
    """Bytes of the tensors a forward pass computed that are still alive when it returns: what it keeps for the
    backward pass (the CPU's stand-in for peak device memory). Storages are followed by weak reference, so a tensor
    kept only inside autograd's graph or a checkpoint's cache counts."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    outputs = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    outputs[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
            return out

    with Record():
        loss = model(inputs).sum()
    gc.collect()
    kept = sum(size for ref, size in outputs.values() if not ref.expired())
    del loss
    return kept


def test_checkpointing_keeps_fewer_activations_for_the_backward_pass(registry):
    plain, workload = gpt_model(registry)
    ids = next(workload.train.train_batches(8, 0))[0]
    kept = {name: activation_bytes_kept(gpt_model(registry, {"name": "activation-checkpointing", **p})[0], ids)
            for name, p in (("block", {}), ("selective", {"mode": "selective"}), ("every 2nd", {"every": 2}))}
    none = activation_bytes_kept(plain, ids)
    # block keeps each block's input only; selective also its matmul and attention outputs; every 2nd block: half
    assert kept["block"] < kept["selective"] < none
    assert kept["block"] < kept["every 2nd"] < none
    assert kept["block"] < 0.3 * none


def test_checkpointed_blocks_keep_their_identity_parameter_names_and_class(registry):
    torch.manual_seed(0)
    plain, _ = gpt_model(registry)
    names = [n for n, _ in plain.named_parameters()]
    blocks = list(plain.blocks)
    spec = make_spec(registry=registry, memory={"name": "activation-checkpointing", "every": 3}, **GPT_TINY)
    model = registry.hooks.reduce_memory(model=plain, workload=None, spec=spec, device=CPU)
    assert model is plain and [n for n, _ in model.named_parameters()] == names
    assert list(model.blocks) == blocks and all(isinstance(b, type(blocks[1])) for b in blocks)
    assert [type(b).__name__ for b in blocks] == ["CheckpointedBlock", "Block", "Block", "CheckpointedBlock"]


def test_a_deep_copy_of_a_checkpointed_model_computes_with_its_own_parameters(registry):
    # post-training quantisation copies the trained model: the copy must not run the original's blocks
    model, workload = gpt_model(registry, "activation-checkpointing")
    ids = next(workload.train.train_batches(2, 0))[0]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.blocks.parameters():
            p.zero_()
        assert not torch.allclose(twin(ids), model(ids))


@pytest.mark.parametrize("mode", ["block", "selective"])
def test_a_checkpointed_trial_trains_exactly_like_one_without(mode):
    # Recomputation runs the same float32 operations on the same inputs: the losses are identical.
    kw = dict(budget={"steps": 12, "eval_samples": 64}, batch_size=16, **GPT_TINY)
    plain = run_one_trial(**kw)
    checkpointed = run_one_trial(memory={"name": "activation-checkpointing", "mode": mode}, **kw)
    assert checkpointed.status == "ok", checkpointed.message
    assert checkpointed.metrics["train_loss"] == pytest.approx(plain.metrics["train_loss"], rel=1e-6)
    assert checkpointed.metrics["val_loss"] == pytest.approx(plain.metrics["val_loss"], rel=1e-6)


def test_activation_checkpointing_needs_repeated_blocks():
    result = run_one_trial(memory="activation-checkpointing")  # digits: an MLP without an nn.ModuleList
    assert result.status == "infeasible"
    assert "has no repeated blocks to checkpoint" in result.message


def test_activation_checkpointing_declares_cuda_graph_capture_incompatible(registry):
    spec = make_spec(registry=registry, memory="activation-checkpointing", compile="cuda-graph", device="cuda",
                     **GPT_TINY)
    reason = infeasible_reason(spec, registry.techniques, H100, ("lm", "transformer"))
    assert "cannot be combined with compile 'cuda-graph'" in reason and "random-number state" in reason


# ---------------------------------------------------------------------------------------------- torch-compile blocks
def step_losses(steps: int, **fields) -> tuple[list[float], Trial]:
    trial = Trial(make_spec(batch_size=8, **{**GPT_TINY, **fields}))
    trial.setup()
    trial.engine.train(True)
    return [float(trial.step_fn(*next(trial.batches))) for _ in range(steps)], trial


# Dynamo checks a compiled block's (non-leaf) input for a .grad and hides the warning that raises from the user's
# view (warnings.showwarning), which does not stop this suite's filterwarnings=error (torch 2.13)
DYNAMO_GRAD_PROBE = "ignore:The .grad attribute of a Tensor that is not a leaf Tensor is being accessed:UserWarning"


@pytest.mark.filterwarnings(DYNAMO_GRAD_PROBE)
def test_blocks_scope_compiles_each_block_in_place_and_follows_eager():
    eager, _ = step_losses(4)
    compiled, trial = step_losses(4, compile={"name": "torch-compile", "scope": "blocks"},
                                  memory={"name": "activation-checkpointing", "mode": "selective"})
    # Inductor reorders float32 sums: the losses agree to rounding over 4 steps
    assert compiled == pytest.approx(eager, rel=1e-4)
    blocks = trial.engine.module.blocks
    assert all(type(b).__name__ == "CompiledCheckpointedBlock" for b in blocks)
    assert blocks[0].qkv.weight is dict(trial.engine.module.named_parameters())["blocks.0.qkv.weight"]
    # a copy is not compiled (as with module.compile()); it stays checkpointed
    assert type(copy.deepcopy(trial.engine.module).blocks[0]).__name__ == "CheckpointedBlock"


@pytest.mark.filterwarnings(DYNAMO_GRAD_PROBE)
def test_a_compiled_checkpointed_model_is_quantised_after_training():
    # post-training quantisation copies the trained model and swaps its Linear layers for int8 ones
    result = run_one_trial(compression="quantize", memory="activation-checkpointing", batch_size=16,
                           compile={"name": "torch-compile", "scope": "blocks"},
                           budget={"steps": 8, "eval_samples": 64}, **GPT_TINY)
    assert result.status == "ok", result.message
    assert result.metrics["compression_ratio"] > 2
    assert result.metrics["val_loss"] == pytest.approx(result.metrics["val_loss_uncompressed"], rel=0.01)


@pytest.mark.filterwarnings(DYNAMO_GRAD_PROBE)
def test_blocks_scope_compiles_one_graph_for_all_blocks():
    from torch._dynamo.utils import counters

    graphs = []
    for n_layer in (2, 6):
        torch._dynamo.reset()
        counters.clear()
        step_losses(2, compile={"name": "torch-compile", "scope": "blocks"},
                    workload_params={"size": "tiny", "n_layer": n_layer})
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] > 0  # a recompilation per block would grow with the number of blocks


@pytest.mark.parametrize("mode", ["block", "selective"])
def test_a_checkpointed_block_traces_into_one_graph_without_a_break(registry, mode):
    # the checkpointed forward must stay traceable as one graph (torch 2.11's Dynamo could not trace the bound
    # ``cls.forward.__get__(self)`` the wrapper once used: a warning, then a graph break in every block)
    model, _ = gpt_model(registry, memory={"name": "activation-checkpointing", "mode": mode})
    block = model.blocks[0]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(torch.randn(2, 16, block.qkv.in_features, requires_grad=True))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# ---------------------------------------------------------------------------------------------- fsdp, deepspeed
@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.usefixtures("one_process_group")
@pytest.mark.parametrize("units", ["block", "model"])
def test_fsdp_steps_a_fused_adamw_on_the_local_shards_and_updates_the_sharded_parameters(registry, units):
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    spec = make_spec(registry=registry, parallelism={"name": "fsdp", "units": units},
                     optimizer={"name": "adamw", "implementation": "fused"}, **GPT_TINY)
    model, workload = gpt_model(registry)
    names = [n for n, _ in model.named_parameters()]
    optimizer = registry.hooks.build_optimizer(params=list(model.parameters()), spec=spec, device=CPU)
    precision = registry.hooks.setup_precision(model=model, spec=spec, device=CPU)
    engine = registry.hooks.build_engine(model=model, optimizer=optimizer, precision=precision, spec=spec,
                                         device=CPU, dist=DistInfo())
    assert [n for n, _ in model.named_parameters()] == names
    sharded = list(model.parameters())
    assert all(isinstance(p, DTensor) for p in sharded)
    blocks_sharded = [type(b).__name__.startswith("FSDP") for b in repeated_blocks(model)]
    assert blocks_sharded == [units == "block"] * 4
    local = engine.optimizer.param_groups[0]["params"]
    assert not any(isinstance(p, DTensor) for p in local) and len(local) == len(sharded)
    batches = workload.train.train_batches(4, 0)
    for _ in range(2):
        before = [p.to_local().clone() for p in sharded]
        engine.backward(model(next(batches)[0]).float().logsumexp(-1).mean())
        with Ops() as seen:
            engine.step()
        assert "aten._fused_adamw_.default" in seen.ops  # not a silent fall-back to the for-each or loop kernels
        # the optimizer's steps land in the parameters FSDP all-gathers, and no gradient is left to accumulate into
        assert all(not torch.equal(b, p.to_local()) for b, p in zip(before, sharded, strict=True) if b.numel())
        assert all(p.grad is None for p in sharded) and all(p.grad is None for p in local)
    assert all(int(engine.optimizer.state[p]["step"]) == 2 for p in engine.optimizer.param_groups[0]["params"])


def test_deepspeed_trains_a_gpt_exactly_like_single_device_training(monkeypatch):
    # DeepSpeed clips gradients to norm 1.0 unless told not to: the plugin turns that off, as no other engine
    # clips. SGD (whose steps scale with the gradient) shows it; the first steps' gradient norm here is ~1.6.
    kw = dict(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0}, budget={"steps": 6, "eval_samples": 64},
              batch_size=16, **GPT_TINY)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    single = run_one_trial(**kw)
    zero = run_one_trial(parallelism={"name": "deepspeed", "stage": 1}, isolated=True, timeout_s=300, **kw)
    assert zero.status == "ok", zero.message
    assert zero.metrics["val_loss"] == pytest.approx(single.metrics["val_loss"], rel=1e-6)


def test_deepspeed_in_bfloat16_on_the_cpu_trains_like_single_under_autocast(monkeypatch):
    # DeepSpeed's bf16 mode holds the model in bfloat16, which the CPU's bfloat16 LayerNorm backward made train
    # measurably worse than DDP (gpt small, two processes: 4.56 against 4.22); on the CPU the plugin runs DeepSpeed
    # in float32 under the trial's autocast, the numerics of single and DDP
    kw = dict(precision="amp-bf16", budget={"steps": 6, "eval_samples": 64}, batch_size=16, **GPT_TINY)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    single = run_one_trial(**kw)
    zero = run_one_trial(parallelism={"name": "deepspeed", "stage": 2}, isolated=True, timeout_s=300, **kw)
    assert zero.status == "ok", zero.message
    assert zero.metrics["val_loss"] == pytest.approx(single.metrics["val_loss"], rel=1e-4)


def test_zero3_makes_each_repeated_block_a_leaf_module(registry, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.utils import z3_leaf_module

    from plugins.deepspeed_zero import mark_leaf_blocks

    model, _ = gpt_model(registry)
    assert mark_leaf_blocks(model) == 4
    assert [m for m in model.modules() if z3_leaf_module(m)] == list(model.blocks)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_defaults_are_deepspeeds_own_for_overlap_and_buckets_and_explicit_values_pass(registry, stage):
    # measured on 2 x H200 (docs/benchmarks.md): overlap + 5e7-element buckets made ZeRO-2 slower than DeepSpeed's
    # own defaults, so the plugin leaves overlap_comm to DeepSpeed (off for stages 1-2, on for 3) and keeps 5e8
    pytest.importorskip("deepspeed")
    from plugins.deepspeed_zero import zero_config

    params = make_spec(registry=registry, parallelism={"name": "deepspeed", "stage": stage}).parallelism.params
    zero = zero_config(params)
    assert "overlap_comm" not in zero and zero["reduce_bucket_size"] == 5 * 10 ** 8
    for overlap in (True, False):
        assert zero_config({**params, "overlap_comm": overlap})["overlap_comm"] is overlap


def test_deepspeed_bfloat16_does_not_check_every_step_for_overflow(monkeypatch):
    # DeepSpeed 0.19 scans bfloat16 gradients for inf/NaN before each stage 1-2 step, all-reduces the verdict and
    # waits for the device; no other engine skips a bfloat16 step, so the plugin turns it off, and DeepSpeed must
    # read the setting (a field it did not know would be rejected, one it ignored would leave the check on)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    from harness.step import Precision
    from plugins.deepspeed_zero import precision_config

    half, dtype = precision_config(Precision(compute_dtype=torch.bfloat16), torch.device("cuda"))
    assert dtype == torch.bfloat16 and half["bf16"]["enabled"]
    assert precision_config(Precision(compute_dtype=torch.bfloat16), CPU) == ({}, None)  # float32 + autocast
    parsed = DeepSpeedConfig({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}, **half})
    assert parsed.bfloat16_config.enabled and parsed.bfloat16_config.check_grad_overflow is False
    assert precision_config(Precision(compute_dtype=torch.float32), CPU) == ({}, None)


@pytest.mark.usefixtures("one_process_group")
def test_ddp_all_reduces_float16_gradients_through_torchs_hook_and_keeps_float32_gradients(registry, monkeypatch):
    import torch.distributed as dist

    reduced = []
    all_reduce = dist.all_reduce

    def recording(tensor, *args, **kwargs):
        reduced.append(tensor.dtype)
        return all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", recording)
    spec = make_spec(registry=registry, parallelism={"name": "ddp", "gradient_dtype": "float16"}, **GPT_TINY)
    model, workload = gpt_model(registry)
    optimizer = registry.hooks.build_optimizer(params=list(model.parameters()), spec=spec, device=CPU)
    precision = registry.hooks.setup_precision(model=model, spec=spec, device=CPU)
    engine = registry.hooks.build_engine(model=model, optimizer=optimizer, precision=precision, spec=spec,
                                         device=CPU, dist=DistInfo())
    engine.backward(engine.model(next(workload.train.train_batches(4, 0))[0]).float().logsumexp(-1).mean())
    assert reduced and set(reduced) == {torch.float16}, reduced  # every bucket travelled in float16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_bfloat16_gradients_need_cuda_and_a_cpu_trial_says_so_before_launch():
    result = run_one_trial(parallelism={"name": "ddp", "gradient_dtype": "bfloat16"}, devices=2, device="cpu",
                           budget={"steps": 4})
    assert result.status == "infeasible", result.message
    assert result.message == "parallelism.gradient_dtype 'bfloat16' requires CUDA, which this trial does not have"


# ---------------------------------------------------------------------------------------------- scope: engine
@pytest.mark.filterwarnings(DYNAMO_GRAD_PROBE)
def test_engine_scope_compiles_the_model_the_engines_way_and_follows_eager():
    eager, _ = step_losses(3)
    compiled, trial = step_losses(3, compile={"name": "torch-compile", "scope": "engine"})
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert isinstance(trial.engine.model, torch._dynamo.eval_frame.OptimizedModule)  # the plain engine: the model


@pytest.mark.filterwarnings(DYNAMO_GRAD_PROBE)
def test_engine_scope_under_deepspeed_is_deepspeeds_own_engine_compile(monkeypatch):
    from harness.launch import free_port

    # the engine creates (and closes) a one-process group from these, as a trial without torchrun does
    for key, value in (("DS_ACCELERATOR", "cpu"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())),
                       ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)
    kw = dict(parallelism={"name": "deepspeed", "stage": 2}, batch_size=8, budget={"steps": 3, "eval_samples": 32},
              **GPT_TINY)
    # DeepSpeed keeps its groups per process: the eager trial runs in its own process, the compiled one here
    eager = run_one_trial(isolated=True, timeout_s=300, **kw)
    trial = Trial(make_spec(compile={"name": "torch-compile", "scope": "engine"}, **kw))
    result = trial.run()
    ds = trial.engine.ds
    # DeepSpeed compiled its module in place (module.compile()), without DeepCompile (not asked for, and CPU)
    assert ds.is_compiled and ds.module._compiled_call_impl is not None and not ds.is_deepcompile_enabled()
    assert result.metrics["val_loss"] == pytest.approx(eager.metrics["val_loss"], rel=1e-4)


@pytest.mark.parametrize(("changes", "expected"), [
    ({"compile": {"name": "torch-compile", "scope": "blocks"}},
     "parallelism.deepcompile: True needs compile 'torch-compile' with scope 'engine' (DeepSpeed's engine.compile() "
     "applies it), not scope 'blocks'"),
    ({"compile": "eager"}, "parallelism.deepcompile: True needs compile 'torch-compile' with scope 'engine' "
                           "(DeepSpeed's engine.compile() applies it), not compile 'eager'"),
    ({"compile": {"name": "torch-compile", "scope": "engine", "mode": "max-autotune"}},
     "parallelism.deepcompile: True compiles with DeepCompile's backend, which takes no mode (torch-compile mode: "
     "max-autotune; allowed: default)"),
    ({"stage": 0}, "parallelism.deepcompile: True needs ZeRO stage 1, 2 or 3 (stage: 0)"),
])
def test_deepcompile_combinations_that_cannot_run_say_why(registry, changes, expected):
    parallelism = {"name": "deepspeed", "stage": changes.get("stage", 3), "deepcompile": True}
    spec = make_spec(registry=registry, parallelism=parallelism, device="cuda",
                     compile=changes.get("compile", {"name": "torch-compile", "scope": "engine"}))
    reason = registry.hooks.check_combination(spec, Environment.detect(), ("lm",))
    assert reason is not None and reason.startswith(expected), reason


def test_deepcompile_with_the_engine_scope_is_a_valid_combination_and_needs_cuda(registry):
    spec = make_spec(registry=registry, parallelism={"name": "deepspeed", "stage": 3, "deepcompile": True},
                     compile={"name": "torch-compile", "scope": "engine"}, device="cuda")
    assert registry.hooks.check_combination(spec, Environment.detect(), ("lm",)) is None
    result = run_one_trial(parallelism={"name": "deepspeed", "stage": 3, "deepcompile": True},
                           compile={"name": "torch-compile", "scope": "engine"}, budget={"steps": 2})
    assert result.status == "infeasible", result.message
    assert result.message == "parallelism.deepcompile True requires CUDA, which this trial does not have"


@pytest.mark.parametrize("scope", ["blocks", "forward-loss", "engine"])
def test_zero3_compiled_around_its_hooks_is_refused_on_cuda_and_the_alternatives_are_not(registry, scope):
    # measured on 2 x H200: compiled leaf blocks trained to a held-out loss of 2.64 where DDP reached 3.60
    cpu_env = Environment(cuda=False, device_count=0, compute_capability=None, device_name="cpu")

    def reason(env, device="auto", compile_=None, **params):
        spec = make_spec(registry=registry, parallelism={"name": "deepspeed", "stage": 3, **params}, device=device,
                         compile=compile_ or {"name": "torch-compile", "scope": scope})
        return registry.hooks.check_combination(spec, env, ("lm",))

    refused = reason(H100)
    assert refused is not None and refused.startswith("parallelism.deepcompile: ZeRO-3 (stage 3) with compile "
                                                      "'torch-compile' needs deepcompile: true on CUDA"), refused
    assert "use deepcompile: true with torch-compile scope 'engine', or compile 'eager'" in refused
    assert reason(H100, stage3_leaf_blocks=False) == refused  # per-layer gathering under compile departed too
    assert reason(cpu_env, device="cuda") == refused  # the trial's device decides, not the driver's machine
    assert reason(H100, device="cpu") is None  # gloo on the CPU trained like one process (tests/test_parallel.py)
    assert reason(H100, compile_="eager") is None
    assert reason(H100, stage=2) is None
    dc = reason(H100, deepcompile=True)
    assert (dc is None) == (scope == "engine"), dc  # DeepCompile's own condition: scope 'engine'


def test_evaluation_under_deepcompile_runs_the_model_without_its_compiled_graph():
    from plugins.deepspeed_zero import EagerForward

    graphs = []

    def backend(gm, _example_inputs):  # a torch.compile backend that records each graph it is given
        graphs.append(gm)
        return gm.forward

    class Model(nn.Module):  # Dynamo leaves torch's own modules (nn.Linear) alone as the outermost frame
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x):
            return self.linear(x).relu()

    model = Model()
    model.compile(backend=backend)
    x = torch.randn(3, 4)
    with torch.no_grad():
        eager = EagerForward(model)(x)
    assert not graphs and torch.equal(eager, model.linear(x).relu())
    with torch.no_grad():
        model(x)
    assert len(graphs) == 1  # the same module outside the wrapper runs its compiled graph
