"""A recorded fake of the NVML calls the ``nvml`` plugin makes, so CPU tests can drive it with real readings.

``RECORDED`` holds what the pynvml functions returned on an H100 during a real trial (captured with
``python tests/nvml_fake.py record OUT.json`` on the GPU machine, which runs a short CUDA trial with
recording wrappers around pynvml). :class:`FakeNVML` replays those values in order (cycling when a test calls
more often than the recording did) and remembers what it returned, so a test can compute the expected energy
and aggregates from exactly the values the plugin saw.

Usage in a test::

    fake = FakeNVML(devices=1)
    fake.install(monkeypatch)      # replaces pynvml's functions for the test only
    ...run a trial...
    fake.returned["nvmlDeviceGetTotalEnergyConsumption"]   # [(device, value), ...] in call order
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from types import SimpleNamespace

#: Readings captured on the GPU machine by ``record`` (a seed-cnn trial, batch 256, 400 steps, in-process, sampled
#: every 0.1 s): NVIDIA H100 80GB HBM3, driver 580.159.04, torch 2.11.0+cu130 (CUDA 13.0), 2026-11-25. Power climbs
#: from idle as the trial starts; NVML's energy counter advances in steps (two equal readings at the end).
RECORDED = {
    "conditions": {"device": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "torch": "2.11.0+cu130", "cuda": "13.0",
                   "date": "2026-11-25", "trial": "seed-cnn batch 256, 400 steps, status ok"},
    "name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-8f42cc54-d714-3e59-1d39-e0e3897dba44",
    "driver": "580.159.04",
    "memory_total_bytes": 85520809984,
    "power_mw": [
        115737, 115737, 115806, 117770, 118615, 118661, 121399, 124638, 124638, 133648, 147077, 159425, 164516,
        164516, 174511, 181692, 181692, 192838, 192838, 203174, 213031, 213031, 213031
    ],
    "util_gpu_pct": [
        0, 0, 0, 0, 0, 0, 0, 24, 24, 24, 53, 53, 44, 44, 44, 48, 48, 48, 48, 51, 51, 51, 51
    ],
    "util_memory_pct": [
        0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 10, 10, 9, 9, 9, 9, 9, 9, 9, 10, 10, 10, 10
    ],
    "memory_used_bytes": [
        1192034304, 1332543488, 1512898560, 1485635584, 1586298880, 1825374208, 1544355840, 1645019136,
        1645019136, 1645019136, 1645019136, 1645019136, 1645019136, 1645019136, 1645019136, 1645019136,
        1645019136, 1645019136, 1645019136, 1645019136, 1645019136, 1645019136, 1645019136
    ],
    "sm_clock_mhz": [
        1980, 1980, 1980, 1980, 1980, 1980, 1980, 1980, 1980, 1980, 1980, 1980, 1980, 1980, 1980, 1980, 1980,
        1980, 1980, 1980, 1980, 1980, 1980
    ],
    "temperature_c": [
        34, 34, 34, 34, 34, 34, 34, 35, 35, 35, 36, 37, 36, 36, 36, 37, 37, 36, 36, 37, 37, 37, 37
    ],
    "energy_mj": [
        192953302, 193039352, 193081558, 193104615, 193152140, 193152140
    ],
}

class FakeNVML:
    """Replays ``RECORDED`` for ``devices`` GPUs (each replays the recording from its start);
    ``energy_counter=False`` makes the energy counter unsupported, like a pre-Volta GPU."""

    def __init__(self, devices: int = 1, energy_counter: bool = True, recorded: dict | None = None):
        self.recorded = recorded or RECORDED
        self.devices = devices
        self.energy_counter = energy_counter
        self.returned: dict[str, list] = defaultdict(list)
        self._calls: dict[tuple[str, str, int], int] = defaultdict(int)
        self.initialised = 0

    # ------------------------------------------------------------------------------------------ replay
    def _next(self, fn: str, handle: int, key: str, record: bool = True):
        seq = self.recorded[key]
        i = self._calls[(fn, key, handle)]
        self._calls[(fn, key, handle)] += 1
        value = seq[i % len(seq)]
        if key == "energy_mj":  # the counter only grows: each lap of the recording adds its span
            value += (i // len(seq)) * (seq[-1] - seq[0] + 1)
        if record:
            self.returned[fn].append((handle, value))
        return value

    def install(self, monkeypatch) -> FakeNVML:
        import pynvml

        def check(handle):
            if not isinstance(handle, int) or not 0 <= handle < self.devices:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

        def init():
            self.initialised += 1

        def shutdown():
            self.initialised -= 1

        def handle_by_index(i):
            if not 0 <= i < self.devices:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
            return i

        def uuid(h):
            check(h)
            base = self.recorded["uuid"]
            return base[:-2] + f"{h:02d}"

        def name(h):
            check(h)
            return self.recorded["name"]

        def power(h):
            check(h)
            return self._next("nvmlDeviceGetPowerUsage", h, "power_mw")

        def util(h):
            check(h)
            gpu = self._next("nvmlDeviceGetUtilizationRates", h, "util_gpu_pct")
            return SimpleNamespace(gpu=gpu, memory=self._next("nvmlDeviceGetUtilizationRates", h,
                                                              "util_memory_pct", record=False))

        def memory(h):
            check(h)
            used, total = self._next("nvmlDeviceGetMemoryInfo", h, "memory_used_bytes"), \
                self.recorded["memory_total_bytes"]
            return SimpleNamespace(used=used, total=total, free=total - used)

        def clock(h, kind):
            check(h)
            assert kind == pynvml.NVML_CLOCK_SM, kind
            return self._next("nvmlDeviceGetClockInfo", h, "sm_clock_mhz")

        def temperature(h, sensor):
            check(h)
            assert sensor == pynvml.NVML_TEMPERATURE_GPU, sensor
            return self._next("nvmlDeviceGetTemperature", h, "temperature_c")

        def energy(h):
            check(h)
            if not self.energy_counter:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return self._next("nvmlDeviceGetTotalEnergyConsumption", h, "energy_mj")

        for fn_name, fn in {
            "nvmlInit": init, "nvmlShutdown": shutdown, "nvmlDeviceGetCount": lambda: self.devices,
            "nvmlDeviceGetHandleByIndex": handle_by_index, "nvmlDeviceGetUUID": uuid,
            "nvmlDeviceGetName": name,
            "nvmlSystemGetDriverVersion": lambda: self.recorded["driver"],
            "nvmlDeviceGetPowerUsage": power, "nvmlDeviceGetUtilizationRates": util,
            "nvmlDeviceGetMemoryInfo": memory, "nvmlDeviceGetClockInfo": clock,
            "nvmlDeviceGetTemperature": temperature, "nvmlDeviceGetTotalEnergyConsumption": energy,
        }.items():
            monkeypatch.setattr(pynvml, fn_name, fn)
        return self

    def values(self, fn: str, device: int = 0) -> list:
        """The values returned by ``fn`` for ``device``, in call order."""
        return [v for d, v in self.returned[fn] if d == device]


# ============================================================================================ recording (GPU)
def record(out_path: str, workload: str = "seed-cnn", steps: int = 400) -> dict:
    """Run a short CUDA trial in this process with recording wrappers around pynvml; write RECORDED's data."""
    import pynvml
    import torch

    from harness.config import Budget
    from harness.testing import make_spec
    from harness.trial import run_trial

    seen: dict[str, list] = defaultdict(list)

    def wrap(name, convert):
        real = getattr(pynvml, name)

        def recorder(*args):
            value = real(*args)
            seen[name].append(convert(value))
            return value
        return recorder

    converters = {
        "nvmlDeviceGetPowerUsage": int, "nvmlDeviceGetClockInfo": int, "nvmlDeviceGetTemperature": int,
        "nvmlDeviceGetTotalEnergyConsumption": int,
        "nvmlDeviceGetUtilizationRates": lambda u: [int(u.gpu), int(u.memory)],
        "nvmlDeviceGetMemoryInfo": lambda m: [int(m.used), int(m.total)],
    }
    for name, convert in converters.items():
        setattr(pynvml, name, wrap(name, convert))
    spec = make_spec(workload=workload, batch_size=256, budget=Budget(steps=steps, warmup_steps=10, windows=5),
                     device="cuda")
    result = run_trial(spec)
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    uuid = pynvml.nvmlDeviceGetUUID(h)
    driver = pynvml.nvmlSystemGetDriverVersion()
    name = pynvml.nvmlDeviceGetName(h)
    data = {
        "conditions": {"device": str(name), "driver": str(driver), "torch": torch.__version__,
                       "cuda": str(torch.version.cuda), "date": result.conditions.get("date", ""),
                       "trial": f"{workload} batch 256, {steps} steps, status {result.status}"},
        "name": str(name), "uuid": str(uuid), "driver": str(driver),
        "memory_total_bytes": seen["nvmlDeviceGetMemoryInfo"][0][1] if seen["nvmlDeviceGetMemoryInfo"] else 0,
        "power_mw": seen["nvmlDeviceGetPowerUsage"][:64],
        "util_gpu_pct": [u[0] for u in seen["nvmlDeviceGetUtilizationRates"][:64]],
        "util_memory_pct": [u[1] for u in seen["nvmlDeviceGetUtilizationRates"][:64]],
        "memory_used_bytes": [m[0] for m in seen["nvmlDeviceGetMemoryInfo"][:64]],
        "sm_clock_mhz": seen["nvmlDeviceGetClockInfo"][:64],
        "temperature_c": seen["nvmlDeviceGetTemperature"][:64],
        "energy_mj": seen["nvmlDeviceGetTotalEnergyConsumption"][:64],
        "result_metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }
    with open(out_path, "w") as f:
        json.dump(data, f, indent=1)
    return data


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "record":
        print(json.dumps(record(sys.argv[2], *sys.argv[3:4]), indent=1)[:4000])
    else:
        print("usage: python tests/nvml_fake.py record OUT.json [WORKLOAD]")
