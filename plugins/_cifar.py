"""CIFAR-10 data for the image workloads (not a plugin itself): the reader of the standard python-batch
directory, a synthetic CIFAR-shaped source for throughput-only runs, and a writer of tiny CIFAR-format
directories that tests use instead of downloading the real 170 MB archive.

The python-batch format (``cifar-10-batches-py``): ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``, each
a pickled dict with ``b"data"`` (uint8, N x 3072: 1024 red, then 1024 green, then 1024 blue values of a 32 x 32
image, row-major) and ``b"labels"`` (N ints in 0..9); ``batches.meta`` optionally holds the class names.

The batches are pickles, and a pickle can name any function to call: a data directory from elsewhere could run
code. They are read with :class:`BatchUnpickler`, which admits only what the format holds (dicts, lists, bytes,
ints, numpy arrays) and refuses every other global before anything is called.
"""
from __future__ import annotations

import functools
import pickle
from _compat_pickle import IMPORT_MAPPING
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.errors import SpecError, TrialFailed
from harness.space import Int
from harness.workload import TensorSource, Text, WorkloadInfo

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: per-channel mean and standard deviation of the CIFAR-10 training images (pixel values scaled to [0, 1]).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
INPUT_SHAPE = (3, 32, 32)
#: the kinds of the CIFAR workloads (``channels-last`` and other conv techniques require ``conv``; the data
#: techniques ``image`` or ``classification``).
KINDS = ("conv", "image", "classification")

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
    """Check ``data_dir`` before launch: it must be a directory holding every CIFAR-10 batch file, each a batch
    that the restricted unpickler reads (:func:`check_batches`)."""
    data_dir = params.get("data_dir")
    if data_dir is None:
        return
    _check_directory(data_dir)
    check_batches(data_dir)


def _check_directory(data_dir: str | Path) -> None:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise SpecError(f"workload.data_dir: {_shown_path(data_dir)!r} is not a directory (expected a CIFAR-10 "
                        f"python-batch directory with {', '.join(TRAIN_FILES[:1])}..5 and {TEST_FILE}; "
                        f"leave it unset for synthetic data)")
    missing = missing_files(root)
    if missing:
        raise SpecError(f"workload.data_dir: {_shown_path(data_dir)!r} lacks the CIFAR-10 batch file(s) "
                        f"{', '.join(missing)} (expected data_batch_1..5 and {TEST_FILE})")


REFUSED_HINT = "CIFAR batches hold only dicts, lists, bytes and numpy arrays"


def _short(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis and its length when cut."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _shown_path(path: str | Path) -> str:
    """A path for a message: whole up to 200 characters, else its end (the file's name) after an ellipsis."""
    text = str(path)
    return text if len(text) <= 200 else f"...{text[-120:]} ({len(text)} chars)"


class RefusedGlobal(pickle.UnpicklingError):
    """A batch named a global that CIFAR batches never hold (``module.name``)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 pickles a ``bytes`` object as with protocol 2 (``_codecs.encode(text, 'latin1')``); no other
    codec is admitted."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


@functools.cache
def _admitted() -> dict[tuple[str, str], Callable[..., Any]]:
    """(module, name) -> object for every global a CIFAR batch may name: bytes as Python 3 pickles them with
    protocol 2, and numpy's array, dtype and scalar reconstructors, under numpy 1's (``numpy.core``) and numpy 2's
    (``numpy._core``) module names alike. The objects are taken from numpy's own reductions, so whichever numpy is
    installed, its deprecated ``numpy.core`` alias is never imported."""
    array = np.zeros(1, np.uint8)
    reconstructors = {("multiarray", "_reconstruct"): array.__reduce__()[0],
                      ("multiarray", "scalar"): np.uint8(0).__reduce__()[0],
                      ("numeric", "_frombuffer"): array.__reduce_ex__(5)[0]}
    out: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes, ("builtins", "bytes"): bytes}
    for package in ("numpy.core", "numpy._core"):
        for (module, name), obj in reconstructors.items():
            out[(f"{package}.{module}", name)] = obj
    return out


class BatchUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR python batches: :meth:`find_class` admits only the globals of :func:`_admitted` and
    raises :class:`RefusedGlobal` for any other, so no other code is imported or called."""

    def find_class(self, module: str, name: str) -> Any:
        module = IMPORT_MAPPING.get(module, module)  # Python 2's names (protocol 2 writes __builtin__ for builtins)
        obj = _admitted().get((module, name))
        if obj is None:
            raise RefusedGlobal(f"{module}.{name}")
        return obj


def load_batch(path: str | Path) -> Any:
    """The object pickled in the CIFAR batch file ``path``, read through :class:`BatchUnpickler`; any other
    global, or a file that is not a pickle, is a one-line :class:`SpecError` naming the file."""
    where = f"workload.data_dir: {_shown_path(path)!r}"
    try:
        with open(path, "rb") as fh:
            return BatchUnpickler(fh, encoding="bytes").load()
    except RefusedGlobal as exc:
        raise SpecError(f"{where}: refused to load {_short(exc.name)!r} ({REFUSED_HINT})") from None
    except OSError as exc:
        raise SpecError(f"{where}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    except Exception as exc:  # truncated or not a pickle at all: UnpicklingError, EOFError, ValueError, ...
        first = (str(exc).splitlines() or [""])[0]
        raise SpecError(f"{where}: not a CIFAR python batch ({type(exc).__name__}: {_short(first)})") from None


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = load_batch(path)
    where = f"workload.data_dir: {_shown_path(path)!r}"
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise SpecError(f"{where}: not a CIFAR python batch (expected a dict with b'data' and b'labels')")
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3072)
        labels = np.asarray(batch[b"labels"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: not a CIFAR python batch (b'data' must be N x 3072 bytes and b'labels' N ints: "
                        f"{_short(str(exc))})") from None
    if len(data) != len(labels):
        raise SpecError(f"{where} has {len(data)} images but {len(labels)} labels")
    return data, labels


@functools.lru_cache(maxsize=64)
def _checked_batch(identity: tuple[str, int, int]) -> None:
    """Read the batch ``identity`` = (path, size, modification time) names; only a batch that reads is cached."""
    _read_batch(Path(identity[0]))


def check_batches(data_dir: str | Path) -> None:
    """Read every batch file of ``data_dir`` through the restricted unpickler, so a batch that names a refused
    global or is not a batch at all is a SpecError at validation rather than a failed trial. A file already read
    unchanged (same size and modification time) in this process is not read again."""
    root = Path(data_dir).expanduser()
    for name in TRAIN_FILES + (TEST_FILE,):
        path = (root / name).resolve()
        stat = path.stat()
        _checked_batch((str(path), stat.st_size, stat.st_mtime_ns))


def normalise(data: np.ndarray) -> torch.Tensor:
    """uint8 N x 3072 rows -> float32 N x 3 x 32 x 32, scaled to [0, 1] and standardised per channel."""
    x = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, *INPUT_SHAPE).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def read_raw(data_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The raw arrays: ``{"train": (uint8 N x 3072, int64 N), "test": (...)}``, read through the restricted
    unpickler."""
    _check_directory(data_dir)
    root = Path(data_dir).expanduser()
    parts = [_read_batch(root / name) for name in TRAIN_FILES]
    train = (np.concatenate([d for d, _ in parts]), np.concatenate([lab for _, lab in parts]))
    return {"train": train, "test": _read_batch(root / TEST_FILE)}


def class_names(data_dir: str | Path) -> tuple[str, ...]:
    """The class names from ``batches.meta`` when present, else the standard CIFAR-10 ones."""
    meta = Path(data_dir).expanduser() / "batches.meta"
    if meta.is_file():
        batch = load_batch(meta)
        names = batch.get(b"label_names") if isinstance(batch, dict) else None
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
    """(train, test, description) for a CIFAR workload's data parameters.

    Validation has read the batches already; one that changed since (refused or unreadable now) fails the trial
    as ``crashed`` with the reader's one-line message, not as an error of the workload's plugin.
    """
    if data_dir is None:
        train, test = synthetic_cifar(synthetic_samples, synthetic_test_samples, seed)
        return train, test, "synthetic"
    try:
        train, test = load_cifar(data_dir)
    except SpecError as exc:
        raise TrialFailed("crashed", str(exc)) from None
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
