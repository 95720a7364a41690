"""Compression on a GPU: what 2:4 sparsity, int8 weight-only quantisation and distillation buy and cost.

1. 2:4 semi-structured sparse vs dense Linear layers at GPT-2-small MLP shapes (768x3072, 3072x768) on a batch
   of 16*1024 tokens, fp16 and bf16, cuSPARSELt and CUTLASS kernels: throughput (TFLOP/s of the dense
   equivalent) and the speed-up, timed with CUDA events, median of alternating repeats.
2. A byte-level GPT (teacher: 6 layers, d=768) trained on real text (this Python's standard library
   sources), then: int8 weight-only (torchao) vs bf16 inference speed and validation loss; 2:4 pruning of its
   MLP weights (no fine-tuning) with the plugin's own functions; a 2-layer d=384 student trained alone vs
   distilled from the teacher with the same budget (validation loss, next-byte accuracy, throughput).

Usage: ``python benchmarks/compression.py [--out results.json] [--steps 600] [--quick]``. Needs CUDA.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log(*args) -> None:
    print(*args, flush=True)


def cuda_time_s(fn, repeats: int = 30, warmup: int = 5) -> float:
    """Median seconds of ``fn()`` timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------- 1. 2:4 Linear
def bench_semi_structured(tokens: int = 16 * 1024) -> list[dict]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    from plugins.prune import semi_structured_masks

    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for d_in, d_out in ((768, 3072), (3072, 768)):
            linear = nn.Linear(d_in, d_out, bias=False).cuda().to(dtype)
            with torch.no_grad():
                linear.weight.mul_(semi_structured_masks([linear])[0])
            x = torch.randn(tokens, d_in, device="cuda", dtype=dtype)
            dense_w = linear.weight.detach()
            flops = 2.0 * tokens * d_in * d_out
            for backend in ("cusparselt", "cutlass"):
                SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
                try:
                    sparse_w = to_sparse_semi_structured(dense_w)
                    err = (F.linear(x, sparse_w) - F.linear(x, dense_w)).abs().max().item()
                    dense_s, sparse_s = [], []
                    for _ in range(3):  # alternate, so drift affects both alike
                        dense_s.append(cuda_time_s(lambda x=x, w=dense_w: F.linear(x, w)))
                        sparse_s.append(cuda_time_s(lambda x=x, w=sparse_w: F.linear(x, w)))
                    d, s = statistics.median(dense_s), statistics.median(sparse_s)
                    row = {"dtype": str(dtype).replace("torch.", ""), "shape": f"{d_in}x{d_out}", "tokens": tokens,
                           "backend": backend, "dense_tflops": flops / d / 1e12, "sparse_tflops": flops / s / 1e12,
                           "speedup": d / s, "max_abs_err": err}
                    if backend == "cusparselt":  # the raw kernel with its best algorithm, output transposed
                        try:
                            compressed, xt = torch._cslt_compress(dense_w), x.t()
                            alg = torch._cslt_sparse_mm_search(compressed, xt)
                            raw_s = cuda_time_s(lambda c=compressed, t=xt, a=alg: torch._cslt_sparse_mm(c, t, alg_id=a))
                            row.update(raw_cslt_alg_id=alg, raw_cslt_tflops=flops / raw_s / 1e12,
                                       raw_cslt_speedup=d / raw_s)
                        except Exception as exc:
                            row["raw_cslt_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                except Exception as exc:  # a backend this build lacks
                    row = {"dtype": str(dtype), "shape": f"{d_in}x{d_out}", "backend": backend,
                           "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
                rows.append(row)
                log("2:4", row)
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    return rows


# --------------------------------------------------------------------------------------------- 2. GPT
class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, seq: int, vocab: int = 256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def corpus():
    """Bytes of this Python's standard-library sources: real text on any machine, offline; 95% / 5% split."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    data = b"".join(open(f, "rb").read() for f in files)[:12_000_000]
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    cut = int(len(tokens) * 0.95)
    return tokens[:cut].cuda(), tokens[cut:].cuda()


def batches(tokens, batch: int, seq: int, gen):
    while True:
        starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=gen).cuda()
        idx = starts[:, None] + torch.arange(seq + 1, device="cuda")
        chunk = tokens[idx]
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def evaluate(model, val, seq: int, n_windows: int = 256, batch: int = 32) -> dict:
    model.eval()
    starts = torch.arange(0, n_windows * seq, seq, device="cuda")
    loss = correct = count = 0.0
    for i in range(0, n_windows, batch):
        idx = starts[i:i + batch, None] + torch.arange(seq + 1, device="cuda")
        x, y = val[idx][:, :-1], val[idx][:, 1:]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x).float()
        loss += F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum").item()
        correct += (out.argmax(-1) == y).sum().item()
        count += y.numel()
    return {"val_loss": loss / count, "accuracy": correct / count}


def train(model, train_tokens, steps: int, seq: int, batch: int = 32, teacher=None, temperature=2.0, alpha=0.5,
          lr=1e-3):
    """AdamW with warm-up + cosine, bf16 autocast; with a teacher, the distill plugin's own loss."""
    from plugins.distill import distillation_loss

    def task(out, y):
        return F.cross_entropy(out.flatten(0, 1).float(), y.flatten())

    loss_fn = distillation_loss(teacher, task, temperature, alpha) if teacher is not None else \
        (lambda out, y, _x: task(out, y))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 50) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(0)
    data = batches(train_tokens, batch, seq, gen)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        x, y = next(data)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    torch.cuda.synchronize()
    return {"train_s": time.perf_counter() - t0, "final_train_loss": float(loss.detach())}


def throughput(model, seq: int, batch: int, autocast: bool = True) -> float:
    """Inference tokens/s (forward only, no grad)."""
    x = torch.randint(0, 256, (batch, seq), device="cuda")

    def fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            model(x)

    return batch * seq / cuda_time_s(fwd, repeats=20, warmup=5)


def bench_gpt(steps: int, seq: int = 256, compile_int8: bool = False) -> dict:
    import copy

    torch.manual_seed(0)
    train_tokens, val = corpus()
    out: dict = {"seq": seq, "steps": steps, "corpus_tokens": len(train_tokens) + len(val)}
    teacher = GPT(6, 768, 12, seq).cuda()
    out["teacher_params"] = sum(p.numel() for p in teacher.parameters())
    out["teacher_train"] = train(teacher, train_tokens, steps, seq)
    out["teacher"] = evaluate(teacher, val, seq)
    log("teacher", out["teacher"], out["teacher_train"])
    for batch in (1, 32):
        out[f"teacher_bf16_tokens_per_s_b{batch}"] = throughput(teacher, seq, batch)

    # int8 weight-only (torchao) on a bf16 copy, eager and compiled, against bf16 eager and compiled.
    try:
        from plugins.quantize import int8_weight_only

        bf16 = copy.deepcopy(teacher).to(torch.bfloat16).eval()
        q = int8_weight_only(teacher, torch.bfloat16).module.eval()
        from plugins._model_stats import serialized_size_bytes

        out["int8wo"] = {"val": evaluate(q, val, seq), "bf16_val": evaluate(bf16, val, seq),
                         "size_bytes": serialized_size_bytes(q), "bf16_size_bytes": serialized_size_bytes(bf16)}
        for batch in (1, 32):
            out["int8wo"][f"eager_b{batch}"] = throughput(q, seq, batch, autocast=False)
            out["int8wo"][f"bf16_eager_b{batch}"] = throughput(bf16, seq, batch, autocast=False)
        if compile_int8:  # torchao's int8 kernels come from inductor; compiling takes minutes (autotuning)
            qc, bc = torch.compile(q), torch.compile(bf16)
            for batch in (1, 32):
                out["int8wo"][f"compiled_b{batch}"] = throughput(qc, seq, batch, autocast=False)
                out["int8wo"][f"bf16_compiled_b{batch}"] = throughput(bc, seq, batch, autocast=False)
    except Exception as exc:
        out["int8wo"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    log("int8wo", out["int8wo"])

    # 2:4 pruning of the MLP weights (one shot, no fine-tuning), run on sparse kernels.
    try:
        from plugins.prune import apply_pruning, make_permanent, to_semi_structured

        pruned = copy.deepcopy(teacher)
        mlp = nn.ModuleList([m for b in pruned.blocks for m in (b.fc, b.out)])
        modules = apply_pruning(mlp, "2:4", 0.5)
        make_permanent(modules)
        dense_val = evaluate(pruned, val, seq)
        converted = to_semi_structured(pruned, modules, torch.bfloat16)
        out["prune24"] = {"val_masked_dense": dense_val, "val_sparse_kernels": evaluate(pruned, val, seq),
                          "converted_layers": converted}
        for batch in (1, 32):
            out["prune24"][f"tokens_per_s_b{batch}"] = throughput(pruned, seq, batch)
    except Exception as exc:
        out["prune24"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    log("prune24", out["prune24"])

    # Distillation: the same 2-layer student alone and distilled, same steps and data order.
    teacher.eval().requires_grad_(False)
    for name, kd in (("student_alone", None), ("student_distilled", teacher)):
        torch.manual_seed(1)
        student = GPT(2, 384, 6, seq).cuda()
        info = train(student, train_tokens, steps, seq, teacher=kd)
        out[name] = {**evaluate(student, val, seq), **info, "params": sum(p.numel() for p in student.parameters())}
        for batch in (1, 32):
            out[name][f"tokens_per_s_b{batch}"] = throughput(student, seq, batch)
        log(name, out[name])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="compression_results.json")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    ap.add_argument("--compile-int8", action="store_true", help="also time torch.compile'd int8 weight-only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/compression.py needs CUDA", file=sys.stderr)
        return 2
    from harness import measure

    results = {"conditions": measure.conditions(torch.device("cuda")), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                             time.gmtime())}
    try:
        import torchao

        results["conditions"]["torchao"] = torchao.__version__
    except Exception as exc:
        results["conditions"]["torchao"] = f"absent ({type(exc).__name__})"
    log(results["conditions"])
    results["semi_structured"] = bench_semi_structured(2048 if args.quick else 16 * 1024)
    with open(args.out, "w") as f:  # written after each part, so a timeout keeps what finished
        json.dump(results, f, indent=1, default=str)
    results["gpt"] = bench_gpt(20 if args.quick else args.steps, compile_int8=args.compile_int8)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1, default=str)
    log("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
