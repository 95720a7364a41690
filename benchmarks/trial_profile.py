"""Where a short GPU trial's fixed cost goes: import and CUDA start-up times, then a cProfile of the same seed-cnn
trial run twice in one process (the first pays the lazy imports and the capture, the second shows what is left).

    python3 benchmarks/trial_profile.py > profile.txt      # on a GPU machine (docs/benchmarks.md)
"""
from __future__ import annotations

import cProfile
import io
import pstats
import time

t0 = time.perf_counter()
import torch  # noqa: E402 (timed)

t_torch = time.perf_counter()
torch.cuda.init()
torch.zeros(1, device="cuda")
t_cuda = time.perf_counter()
from harness.testing import make_spec  # noqa: E402
from harness.trial import run_trial  # noqa: E402
from plugins._cifar import write_tiny_cifar  # noqa: E402

t_harness = time.perf_counter()


def main() -> None:
    data = write_tiny_cifar("/tmp/cifar/cifar-10-batches-py", n_train=20000, n_test=2000)
    print(f"import torch {t_torch - t0:.2f}s, cuda init {t_cuda - t_torch:.2f}s, "
          f"harness+plugins {t_harness - t_cuda:.2f}s", flush=True)
    spec = make_spec(workload="seed-cnn", workload_params={"data_dir": str(data)}, device="cuda",
                     precision="amp-bf16", optimizer={"name": "adamw", "implementation": "fused"},
                     compile={"name": "cuda-graph", "channels_last": True}, batch_size=64,
                     budget={"epochs": 2, "warmup_steps": 20, "windows": 5})
    for i in range(2):
        profile = cProfile.Profile()
        t = time.perf_counter()
        profile.enable()
        result = run_trial(spec)
        profile.disable()
        m = result.metrics
        print(f"run {i}: {time.perf_counter() - t:.2f}s status {result.status} wall_s {m.get('wall_s'):.2f} "
              f"compile_s {m.get('compile_s'):.2f} train {m.get('train_time_s'):.2f} eval {m.get('eval_s')}",
              flush=True)
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(35)
        print(out.getvalue()[:6000])


if __name__ == "__main__":
    main()
