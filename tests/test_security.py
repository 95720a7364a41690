"""Nobody gets in or reads what is not theirs: CIFAR batches are read through a restricted unpickler (a data
directory from elsewhere cannot run code), and credentials are masked in messages, reports and CSV."""
from __future__ import annotations

import csv
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from harness.errors import SpecError
from harness.outcomes import TrialRecord
from harness.redact import mask_credentials
from plugins import _cifar

REFUSED = "(CIFAR batches hold only dicts, lists, bytes and numpy arrays)"


class _RunsAShellCommand:
    """Unpickling it with ``pickle.load`` runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _ExecsPython:
    """Unpickling it with ``pickle.load`` writes MARKER through ``exec``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _batch(data: np.ndarray, labels: list[int]) -> dict:
    return {b"batch_label": b"a batch", b"labels": labels, b"data": data,
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}


@pytest.fixture
def cifar_dir(tmp_path) -> Path:
    return _cifar.write_tiny_cifar(tmp_path / "cifar-10-batches-py", n_train=20, n_test=10, seed=1)


# (what the attacker pickles, the global the refusal names)
ATTACKS = {
    "os.system": (lambda m: _RunsAShellCommand(m), f"{os.system.__module__}.system"),
    "builtins.exec": (lambda m: _ExecsPython(m), "builtins.exec"),
    "inside the batch dict": (lambda m: _batch(np.zeros((1, 3072), np.uint8), [_RunsAShellCommand(m)]),
                              f"{os.system.__module__}.system"),
    "inside an object array": (lambda m: _batch(np.array([_ExecsPython(m)], dtype=object), [0]), "builtins.exec"),
}


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_malicious_cifar_batch_is_refused_before_it_runs(cifar_dir, tmp_path, attack, protocol):
    marker = tmp_path / "PWNED"
    make, refused = ATTACKS[attack]
    (cifar_dir / "data_batch_1").write_bytes(pickle.dumps(make(marker), protocol=protocol))
    with pytest.raises(SpecError) as validating:
        _cifar.validate_data_params({"data_dir": str(cifar_dir)})
    with pytest.raises(SpecError) as loading:
        _cifar.load_cifar(cifar_dir)
    assert not marker.exists(), "the pickle's code ran"
    for exc in (validating.value, loading.value):
        message = str(exc)
        assert "\n" not in message
        assert message == f"workload.data_dir: {str(cifar_dir / 'data_batch_1')!r}: refused to load {refused!r} " \
                          f"{REFUSED}", message


def test_a_malicious_batches_meta_is_refused(cifar_dir, tmp_path):
    marker = tmp_path / "PWNED"
    (cifar_dir / "batches.meta").write_bytes(pickle.dumps(_RunsAShellCommand(marker), protocol=2))
    with pytest.raises(SpecError, match=r"batches.meta': refused to load '\w+\.system'"):
        _cifar.class_names(cifar_dir)
    assert not marker.exists()


def test_harness_run_on_a_malicious_data_dir_exits_2_in_one_line_without_running_it(harness_cli, cifar_dir,
                                                                                    tmp_path):
    marker = tmp_path / "PWNED"
    (cifar_dir / "test_batch").write_bytes(pickle.dumps(_RunsAShellCommand(marker), protocol=2))
    code, out, err = harness_cli("run", "--workload", "seed-cnn", "--device", "cpu", "--steps", "12",
                                 "--set", f"workload.data_dir={cifar_dir}")
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "test_batch" in lines[0] and "refused to load" in lines[0], err
    assert "Traceback" not in out + err
    assert not marker.exists()


def test_harness_study_on_a_malicious_data_dir_exits_2_before_the_storage_is_created(harness_cli, cifar_dir,
                                                                                      tmp_path):
    import yaml

    marker = tmp_path / "PWNED"
    (cifar_dir / "data_batch_3").write_bytes(pickle.dumps(_ExecsPython(marker), protocol=4))
    study = tmp_path / "cifar.yaml"
    study.write_text(yaml.safe_dump({
        "name": "cifar", "workload": {"name": "seed-cnn", "data_dir": str(cifar_dir)},
        "axes": {"optimizer": ["sgd", "adamw"]}, "budget": {"steps": 12}, "n_trials": 2, "device": "cpu",
        "storage": f"sqlite:///{tmp_path / 'study.db'}", "output_dir": str(tmp_path / "out")}))
    code, out, err = harness_cli("study", study)
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "data_batch_3" in lines[0] and "refused to load 'builtins.exec'" in lines[0], err
    assert not marker.exists()
    assert not (tmp_path / "study.db").exists() and not (tmp_path / "out").exists()


def test_a_batch_turned_malicious_after_validation_fails_the_trial_in_one_line(registry, cifar_dir, tmp_path):
    from harness.testing import make_spec
    from harness.trial import run_trial

    spec = make_spec(registry=registry, workload="seed-cnn", batch_size=8, workload_params={"data_dir": str(cifar_dir)},
                     budget={"steps": 6, "warmup_steps": 1, "windows": 1})
    marker = tmp_path / "PWNED"
    (cifar_dir / "data_batch_1").write_bytes(pickle.dumps(_RunsAShellCommand(marker), protocol=2))
    result = run_trial(spec, registry)
    assert not marker.exists()
    assert (result.status, result.message) == (
        "crashed", f"workload.data_dir: {str(cifar_dir / 'data_batch_1')!r}: refused to load "
                   f"'{os.system.__module__}.system' {REFUSED}")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_batches_of_numpy_arrays_load_with_every_pickle_protocol(cifar_dir, protocol):
    rng = np.random.default_rng(protocol)
    expected = {}
    for name in (*_cifar.TRAIN_FILES, _cifar.TEST_FILE):
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4)  # numpy int64 scalars in the list, as numpy-made batches hold
        (cifar_dir / name).write_bytes(pickle.dumps(_batch(data, list(labels)), protocol=protocol))
        expected[name] = (data, labels)
    raw = _cifar.read_raw(cifar_dir)
    train_data = np.concatenate([expected[n][0] for n in _cifar.TRAIN_FILES])
    train_labels = np.concatenate([expected[n][1] for n in _cifar.TRAIN_FILES])
    assert np.array_equal(raw["train"][0], train_data) and np.array_equal(raw["train"][1], train_labels)
    assert np.array_equal(raw["test"][0], expected[_cifar.TEST_FILE][0])
    _cifar.validate_data_params({"data_dir": str(cifar_dir)})


def test_cifar_batches_pickled_under_numpy_1_module_names_load(cifar_dir):
    """The real archive was pickled by numpy 1 (``numpy.core.multiarray``); numpy 2 calls it ``numpy._core``."""
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    blob = pickle.dumps(_batch(data, [3, 7]), protocol=2)
    old = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert old != blob and b"numpy.core.multiarray" in old
    (cifar_dir / "test_batch").write_bytes(old)
    test = _cifar.read_raw(cifar_dir)["test"]
    assert np.array_equal(test[0], data) and test[1].tolist() == [3, 7]


@pytest.mark.parametrize("content,expected", [
    (b"\x00\x01 not a pickle at all", "not a CIFAR python batch (UnpicklingError"),
    (pickle.dumps(_batch(np.zeros((2, 3072), np.uint8), [1, 2]), protocol=2)[:-40], "not a CIFAR python batch"),
    (pickle.dumps([1, 2, 3], protocol=2), "expected a dict with b'data' and b'labels'"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, protocol=2), "N x 3072 bytes"),
], ids=["garbage", "truncated", "a list", "wrong shape"])
def test_a_file_that_is_not_a_cifar_batch_is_one_line(cifar_dir, content, expected):
    (cifar_dir / "data_batch_2").write_bytes(content)
    with pytest.raises(SpecError) as info:
        _cifar.validate_data_params({"data_dir": str(cifar_dir)})
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert message.startswith(f"workload.data_dir: {str(cifar_dir / 'data_batch_2')!r}: ") and expected in message


def test_validation_reads_a_batch_again_once_it_changed(cifar_dir, tmp_path):
    _cifar.validate_data_params({"data_dir": str(cifar_dir)})  # good, and remembered as such
    (cifar_dir / "data_batch_5").write_bytes(pickle.dumps(_RunsAShellCommand(tmp_path / "PWNED"), protocol=2))
    with pytest.raises(SpecError, match="data_batch_5': refused to load"):
        _cifar.validate_data_params({"data_dir": str(cifar_dir)})
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------------------------ credentials
@pytest.mark.parametrize("text,expected", [
    ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
    ("cannot open 'mysql+pymysql://admin:hunter2@db.example:3306/optuna': timeout",
     "cannot open 'mysql+pymysql://admin:***@db.example:3306/optuna': timeout"),
    ("https://ghp_TOKEN123@github.com/org/repo", "https://***@github.com/org/repo"),
    ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
    ("postgresql://u:p@ss/w:rd@h/db", "postgresql://u:***@h/db"),  # unencoded @ / : in the password: all of it
    ("https://h/api?user=u&password=hunter2&x=1", "https://h/api?user=u&password=***&x=1"),
    ("https://h/api?access_token=abc123", "https://h/api?access_token=***"),
    ("host=db port=5432 password=hunter2 dbname=optuna", "host=db port=5432 password=*** dbname=optuna"),
    ("host=db password='hunter 2' dbname=optuna", "host=db password='***' dbname=optuna"),
    ("MLFLOW_TRACKING_PASSWORD=hunter2", "MLFLOW_TRACKING_PASSWORD=***"),
    ("connect_args {'password': 'hunter2', 'user': 'u'}", "connect_args {'password': '***', 'user': 'u'}"),
    ("Authorization: Bearer eyJhbGciOi.x.y", "Authorization: Bearer ***"),
], ids=["user:password", "in a message", "token-only userinfo", "empty user", "unencoded specials",
        "password= query", "token query", "libpq", "libpq quoted", "environment", "dict item", "bearer"])
def test_mask_credentials_masks_passwords_and_tokens(text, expected):
    assert mask_credentials(text) == expected
    assert mask_credentials(expected) == expected  # masking twice changes nothing


@pytest.mark.parametrize("text", [
    "sqlite:///harness.db", "sqlite:////tmp/runs@home/harness.db", "sqlite:///:memory:",
    "http://127.0.0.1:5000", "http://127.0.0.1:5000/#/experiments/1", "file:///tmp/mlruns",
    "postgresql://db.example/optuna", "postgresql://db.example:5432/optuna?sslmode=require",
    "workload.data_dir: '/data/cifar-10-batches-py' lacks data_batch_3", "max_tokens=64 tokenizer=gpt2",
    "Token validation failed for user@example.com",
])
def test_mask_credentials_leaves_text_without_credentials_unchanged(text):
    assert mask_credentials(text) == text


URL = "postgresql://u:secret@h/db"


@pytest.fixture
def study_with_credentials(tmp_path) -> str:
    """A study whose records echo a storage URL with a password: in a failed trial's message, in a Pareto trial's
    message and in a searched (categorical) parameter that the table shows."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="leaky", storage=storage, directions=["maximize"])
    study.set_user_attr("objectives", [["throughput", "throughput_samples_per_s", "maximize"]])
    dist = optuna.distributions.CategoricalDistribution([URL, "sqlite:///x.db"])
    for number, value in enumerate([100.0, 200.0]):
        record = TrialRecord(number, "COMPLETE", message=f"reused the storage {URL}", values=[value],
                             metrics={"throughput_samples_per_s": value, "storage": URL},
                             params={"optimizer": "sgd", "workload.source": URL}, spec={"storage": URL})
        study.add_trial(optuna.trial.create_trial(params={"workload.source": URL}, values=[value],
                                                  distributions={"workload.source": dist},
                                                  user_attrs={"record": record.to_dict()}))
    failed = TrialRecord(2, "FAIL", "crashed", f"OperationalError: could not connect to {URL}: password "
                         "authentication failed", params={"optimizer": "adamw"})
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                              user_attrs={"record": failed.to_dict()}))
    return storage


def test_report_table_csv_and_json_mask_credentials(harness_cli, study_with_credentials, tmp_path):
    code, out, err = harness_cli("report", "leaky", "--storage", study_with_credentials, "--output-dir",
                                 tmp_path / "out")
    assert code == 0, out + err
    assert "u:***@h/db" in out, "the table shows the searched parameter, masked"
    csv_text = (tmp_path / "out" / "trials.csv").read_text()
    pareto_text = (tmp_path / "out" / "pareto.json").read_text()
    for text in (out, err, csv_text, pareto_text):
        assert "secret" not in text
    rows = list(csv.DictReader(csv_text.splitlines()))
    assert {r["message"] for r in rows} >= {f"reused the storage {mask_credentials(URL)}",
                                            "OperationalError: could not connect to postgresql://u:***@h/db: "
                                            "password authentication failed"}
    pareto = json.loads(pareto_text)
    assert [r["message"] for r in pareto["pareto"]] == ["reused the storage postgresql://u:***@h/db"]
    assert pareto["pareto"][0]["spec"] == {"storage": "postgresql://u:***@h/db"}


# --------------------------------------------------------------------------------------------- files are code
@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    """A ``module:function`` workload whose import leaves a marker file: it shows whether the module was run."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / "marker_workload.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from harness.testing import tiny_workload as build\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "marker_workload", raising=False)
    return marker


def test_a_study_file_imports_its_workload_module_only_after_every_other_field_passed(marker_module, registry):
    from harness.errors import SpecError
    from harness.studyfile import StudyConfig

    bad = {"workload": "marker_workload:build", "n_trials": 1, "sampler": "tpee"}
    with pytest.raises(SpecError, match="sampler"):
        StudyConfig.from_mapping("study.yaml", bad, registry)
    assert not marker_module.exists()
    cfg = StudyConfig.from_mapping("study.yaml", {**bad, "sampler": "tpe"}, registry)
    assert cfg.workload == "marker_workload:build" and marker_module.exists()


def test_a_trial_file_imports_its_workload_module_only_after_every_other_field_passed(marker_module, registry):
    from harness.config import trial_from_mapping
    from harness.errors import SpecError

    bad = {"workload": "marker_workload:build", "optimizer": "adamx"}
    with pytest.raises(SpecError, match="optimizer"):
        trial_from_mapping("trial.yaml", bad, registry)
    assert not marker_module.exists()
    assert trial_from_mapping("trial.yaml", {**bad, "optimizer": "adam"}, registry).workload == "marker_workload:build"
    assert marker_module.exists()
