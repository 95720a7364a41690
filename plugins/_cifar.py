"""CIFAR-10 data for the image workloads (not a plugin itself): the reader of the standard python-batch
directory, a synthetic CIFAR-shaped source for throughput-only runs, and a writer of tiny CIFAR-format
directories that tests use instead of downloading the real 170 MB archive.

The python-batch format (``cifar-10-batches-py``): ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each
a pickled dict with ``b"data"`` (uint8, N x 3072: 1024 red, then 1024 green, then 1024 blue values of a 32 x 32
image, row-major) and ``b"labels"`` (N ints in 0..9); ``batches.meta`` optionally holds the class names.
"""
from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.errors import SpecError
from harness.space import Int
from harness.workload import TensorSource, Text, WorkloadInfo

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: per-channel mean and standard deviation of the CIFAR-10 training images (pixel values scaled to [0, 1]).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
INPUT_SHAPE = (3, 32, 32)
#: the kinds of the CIFAR workloads (``channels-last`` and other conv techniques require ``conv``).
KINDS = ("conv", "image")

#: the data parameters shared by the CIFAR workloads (``seed-cnn``, ``resnet18``).
DATA_PARAMS = {
    "data_dir": Text(help="CIFAR-10 python-batch directory (data_batch_1..5, test_batch); "
                          "unset: synthetic CIFAR-shaped data (throughput only)"),
    "synthetic_samples": Int(64, 1_000_000, default=8192, help="training images of the synthetic source"),
    "synthetic_test_samples": Int(16, 100_000, default=1024, help="held-out images of the synthetic source"),
}


def cifar_workload(name: str, build: Any, params: Mapping[str, Any], description: str) -> WorkloadInfo:
    """The declaration of a CIFAR workload: the shared data parameters (:data:`DATA_PARAMS`) and their
    validation, plus the model's own ``params``."""
    return WorkloadInfo(name=name, build=build, kinds=KINDS, validate=validate_data_params,
                        params={**DATA_PARAMS, **params}, description=description)


def missing_files(data_dir: str | Path) -> list[str]:
    """The batch files ``data_dir`` lacks (every one of them when it is not a directory)."""
    root = Path(data_dir).expanduser()
    names = TRAIN_FILES + (TEST_FILE,)
    if not root.is_dir():
        return list(names)
    return [n for n in names if not (root / n).is_file()]


def validate_data_params(params: Mapping[str, Any]) -> None:
    """Check ``data_dir`` before launch: it must be a directory holding every CIFAR-10 batch file."""
    data_dir = params.get("data_dir")
    if data_dir is None:
        return
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise SpecError(f"workload.data_dir: {str(data_dir)!r} is not a directory (expected a CIFAR-10 "
                        f"python-batch directory with {', '.join(TRAIN_FILES[:1])}..5 and {TEST_FILE}; "
                        f"leave it unset for synthetic data)")
    missing = missing_files(root)
    if missing:
        raise SpecError(f"workload.data_dir: {str(data_dir)!r} lacks the CIFAR-10 batch file(s) "
                        f"{', '.join(missing)} (expected data_batch_1..5 and {TEST_FILE})")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3072)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if len(data) != len(labels):
        raise SpecError(f"workload.data_dir: {str(path)!r} has {len(data)} images but {len(labels)} labels")
    return data, labels


def normalise(data: np.ndarray) -> torch.Tensor:
    """uint8 N x 3072 rows -> float32 N x 3 x 32 x 32, scaled to [0, 1] and standardised per channel."""
    x = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, *INPUT_SHAPE).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def read_raw(data_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The raw arrays: ``{"train": (uint8 N x 3072, int64 N), "test": (...)}``."""
    validate_data_params({"data_dir": str(data_dir)})
    root = Path(data_dir).expanduser()
    parts = [_read_batch(root / name) for name in TRAIN_FILES]
    train = (np.concatenate([d for d, _ in parts]), np.concatenate([lab for _, lab in parts]))
    return {"train": train, "test": _read_batch(root / TEST_FILE)}


def class_names(data_dir: str | Path) -> tuple[str, ...]:
    """The class names from ``batches.meta`` when present, else the standard CIFAR-10 ones."""
    meta = Path(data_dir).expanduser() / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as fh:
            names = pickle.load(fh, encoding="bytes").get(b"label_names")
        if names:
            return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return CLASSES


def load_cifar(data_dir: str | Path) -> tuple[TensorSource, TensorSource]:
    """CIFAR-10 from a python-batch directory as normalised (train, test) sources; test is the held-out
    ``test_batch``, never trained on."""
    raw = read_raw(data_dir)
    (xtr, ytr), (xte, yte) = raw["train"], raw["test"]
    return (TensorSource(normalise(xtr), torch.from_numpy(ytr)),
            TensorSource(normalise(xte), torch.from_numpy(yte)))


def synthetic_cifar(n_train: int, n_test: int, seed: int) -> tuple[TensorSource, TensorSource]:
    """Seeded random CIFAR-shaped images (standard normal, i.e. already "normalised") and random labels.

    There is nothing to learn beyond memorisation: use it for throughput, not accuracy.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, *INPUT_SHAPE, generator=gen)
    y = torch.randint(0, 10, (n_train + n_test,), generator=gen)
    return TensorSource(x[:n_train], y[:n_train]), TensorSource(x[n_train:], y[n_train:])


def data_sources(seed: int, data_dir: str | None = None, synthetic_samples: int = 8192,
                 synthetic_test_samples: int = 1024) -> tuple[TensorSource, TensorSource, str]:
    """(train, test, description) for a CIFAR workload's data parameters."""
    if data_dir is None:
        train, test = synthetic_cifar(synthetic_samples, synthetic_test_samples, seed)
        return train, test, "synthetic"
    train, test = load_cifar(data_dir)
    return train, test, str(data_dir)


def write_tiny_cifar(data_dir: str | Path, n_train: int = 100, n_test: int = 50, seed: int = 0,
                     learnable: bool = True) -> Path:
    """Write a CIFAR-10 python-batch directory with ``n_train`` images spread over the five training batches
    and ``n_test`` in ``test_batch`` (pickle protocol 2, the dicts the real archive holds), plus ``batches.meta``.

    With ``learnable`` each class gets its own mean colour plus noise, so a model's loss can visibly fall in a
    few steps; otherwise pixels are uniform noise.
    """
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def images(n: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.integers(0, 10, n)
        if learnable:
            centres = np.linspace(30, 225, 10)
            base = centres[labels][:, None] + 20.0 * np.sin(np.arange(3072)[None, :] * (labels[:, None] + 1) / 97)
            data = np.clip(base + rng.normal(0, 25, (n, 3072)), 0, 255).astype(np.uint8)
        else:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        return data, [int(v) for v in labels]

    sizes = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    for i, size in enumerate(sizes, start=1):
        data, labels = images(size)
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}_{j}.png".encode() for j in range(size)]}
        with open(root / f"data_batch_{i}", "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    data, labels = images(n_test)
    with open(root / TEST_FILE, "wb") as fh:
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": data,
                     b"filenames": [f"test_{j}.png".encode() for j in range(n_test)]}, fh, protocol=2)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": max(sizes),
                     b"num_vis": 3072}, fh, protocol=2)
    return root
