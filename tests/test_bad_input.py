"""Malformed study and trial files, flags and destinations: each is one ``harness: error:`` line naming the field,
exit status 2, no traceback, and an existing storage left byte-for-byte unchanged (issue 17)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import optuna
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.config import MAX_ALIASES, MAX_FILE_BYTES, load_yaml
from harness.errors import SpecError, shown
from harness.studyfile import STUDY_NAME_TEXT

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = (REPO / "studies" / "quickstart.yaml").read_text()
ROOT = os.geteuid() == 0  # root ignores file permissions: the permission cases need another user


def quickstart(tmp: Path, **fields: object) -> dict:
    """The quickstart study as a mapping, writing to ``tmp`` (storage ``tmp/harness.db``, output ``tmp/out``)."""
    data = yaml.safe_load(QUICKSTART)
    data.update({"storage": f"sqlite:///{tmp / 'harness.db'}", "output_dir": str(tmp / "out"), **fields})
    return data


def write(tmp: Path, data: object, name: str = "study.yaml") -> Path:
    path = tmp / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data)
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """An existing Optuna database holding another study, at the storage every study file here names."""
    path = tmp_path / "harness.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="other", storage=f"sqlite:///{path}")
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line(code: int, out: str, err: str, *expected: str) -> str:
    """Exit 2, one short stderr line with every ``expected`` text, no traceback; returns the line."""
    __tracebackhide__ = True
    assert code == 2, out + err
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[:2000]
    assert lines[0].startswith("harness: error: ") and len(lines[0]) < 600, lines[0][:2000]
    assert len(out) < 4000
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def study_fails(harness_cli, db: Path, path: Path, *expected: str, args: tuple[str, ...] = ()) -> str:
    """``harness study PATH`` gives one line with ``expected`` and leaves ``db`` untouched and nothing written."""
    __tracebackhide__ = True
    before = digest(db)
    line = assert_one_line(*harness_cli("study", path.name if path.parent == db.parent else str(path), *args),
                           *expected)
    assert digest(db) == before, "the storage changed"
    assert not (db.parent / "out").exists(), "the output directory was created"
    assert not (db.parent / "mlflow.db").exists(), "an MLflow store was created"
    return line


# ============================================================================================ 1. unreadable files
def test_binary_garbage_study_file_is_not_utf8(tmp_path, db, harness_cli):
    path = write(tmp_path, bytes(range(256)) * 20)
    study_fails(harness_cli, db, path, "study.yaml: not a UTF-8 text file")


def test_binary_garbage_trial_file_is_not_utf8(tmp_path, harness_cli):
    path = write(tmp_path, b"\xff\xfe\x00garbage\x9c" * 50, "trial.yaml")
    assert_one_line(*harness_cli("run", str(path)), "trial.yaml: not a UTF-8 text file")


def test_missing_study_file(tmp_path, db, harness_cli):
    study_fails(harness_cli, db, tmp_path / "nope.yaml", "nope.yaml: no such file")


def test_directory_given_as_study_file(tmp_path, db, harness_cli):
    (tmp_path / "dir.yaml").mkdir()
    study_fails(harness_cli, db, tmp_path / "dir.yaml", "dir.yaml: is a directory")


@pytest.mark.skipif(ROOT, reason="root reads any file")
def test_unreadable_study_file(tmp_path, db, harness_cli):
    path = write(tmp_path, quickstart(tmp_path))
    path.chmod(0)
    study_fails(harness_cli, db, path, "study.yaml: cannot read")


def test_study_file_over_the_size_cap(tmp_path, db, harness_cli):
    path = write(tmp_path, "# padding\n" * (MAX_FILE_BYTES // 10 + 10) + yaml.safe_dump(quickstart(tmp_path)))
    study_fails(harness_cli, db, path, "larger than 1024 KiB")


# ============================================================================================ 2. duplicate keys
def test_duplicate_top_level_key_names_the_key_and_both_lines(tmp_path, db, harness_cli):
    text = yaml.safe_dump(quickstart(tmp_path), sort_keys=False) + "n_trials: 40\n"
    first = 1 + next(i for i, line in enumerate(text.splitlines()) if line.startswith("n_trials:"))
    last = len(text.splitlines())
    study_fails(harness_cli, db, write(tmp_path, text), "duplicate key 'n_trials'", f"lines {first} and {last}")


def test_duplicate_nested_key_is_rejected(tmp_path, db, harness_cli):
    text = QUICKSTART.replace("budget: {steps: 200,", "budget: {steps: 200, steps: 20,").replace(
        "sqlite:///harness.db", f"sqlite:///{db}")
    study_fails(harness_cli, db, write(tmp_path, text), "duplicate key 'steps'")


def test_load_yaml_keeps_merge_keys(tmp_path):
    path = write(tmp_path, "base: &b {steps: 10, windows: 2}\nbudget: {<<: *b, steps: 20}\n")
    assert load_yaml(path)["budget"] == {"steps": 20, "windows": 2}


# ============================================================================================ 3. alias bombs
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "n_trials: *i\n"


def test_alias_bomb_is_refused_before_expansion_fast_and_small(tmp_path, db, harness_cli):
    path = write(tmp_path, BOMB)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match="aliases expand to more than") as info:
        load_yaml(path)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 1.0 and peak < 20 * 2**20, (elapsed, peak)
    assert len(str(info.value)) < 200
    study_fails(harness_cli, db, path, "study.yaml: its aliases expand to more than")


def test_too_many_aliases_are_refused(tmp_path, db, harness_cli):
    text = "x: &x 1\nl: [" + ", ".join(["*x"] * (MAX_ALIASES + 1)) + "]\n"
    study_fails(harness_cli, db, write(tmp_path, text), f"more than {MAX_ALIASES} YAML aliases")


def test_recursive_alias_and_deep_nesting_are_refused(tmp_path, db, harness_cli):
    study_fails(harness_cli, db, write(tmp_path, "a: &a [1, *a]\n"), "recursive YAML alias")
    study_fails(harness_cli, db, write(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n"), "nested more than")


# ============================================================================================ 4. echoed values
def test_shown_caps_a_value_with_an_ellipsis_and_its_length():
    assert shown("adamw") == "'adamw'"
    text = shown("x" * 1_000_000)
    assert text.startswith("'xxx") and text.endswith("... (1000002 chars)") and len(text) < 110


def test_a_megabyte_technique_name_gives_a_short_line(tmp_path, db, harness_cli):
    data = quickstart(tmp_path)
    data["axes"]["precision"] = ["fp32", "p" * 1_000_000]
    line = study_fails(harness_cli, db, write(tmp_path, data), "axes.precision", "(1000002 chars)")
    assert len(line) < 300


def test_a_megabyte_value_and_key_give_short_lines(tmp_path, db, harness_cli):
    study_fails(harness_cli, db, write(tmp_path, quickstart(tmp_path, n_trials="9" * 900_000)), "n_trials",
                "chars)")
    study_fails(harness_cli, db, write(tmp_path, quickstart(tmp_path, **{"k" * 900_000: 1})), "unknown key",
                "chars)")


# ============================================================================================ 5. study names
@pytest.mark.parametrize("name", ["a/b", "..", "../escape", "x..y", "-dash", ".hidden", "with space", "x" * 101,
                                  "ünï", "", "a\nb"])
def test_a_study_name_outside_the_pattern_is_rejected(tmp_path, db, harness_cli, name):
    study_fails(harness_cli, db, write(tmp_path, quickstart(tmp_path, name=name)), "name:", STUDY_NAME_TEXT)


def test_a_study_name_in_the_pattern_is_accepted(tmp_path, harness_registry):
    from harness.studyfile import StudyConfig

    path = write(tmp_path, quickstart(tmp_path, name="Quick-start_2.v1"))
    assert StudyConfig.from_yaml(path, harness_registry).name == "Quick-start_2.v1"


# ============================================================================================ 6. output_dir
def test_output_dir_naming_a_file_is_rejected_before_the_study_is_created(tmp_path, db, harness_cli):
    (tmp_path / "taken").write_text("not a directory")
    data = quickstart(tmp_path, output_dir=str(tmp_path / "taken"))
    study_fails(harness_cli, db, write(tmp_path, data), "output_dir:", "exists and is not a directory")
    assert optuna.study.get_all_study_names(f"sqlite:///{db}") == ["other"]


def test_output_dir_flag_naming_a_file_is_rejected(tmp_path, db, harness_cli):
    (tmp_path / "taken").write_text("x")
    study_fails(harness_cli, db, write(tmp_path, quickstart(tmp_path)), "output_dir:", "not a directory",
                args=("--output-dir", str(tmp_path / "taken")))


def test_output_dir_under_a_file_is_rejected(tmp_path, db, harness_cli):
    (tmp_path / "taken").write_text("x")
    data = quickstart(tmp_path, output_dir=str(tmp_path / "taken" / "out"))
    study_fails(harness_cli, db, write(tmp_path, data), "output_dir:", "is not a directory")


@pytest.mark.skipif(ROOT, reason="root writes into read-only directories")
def test_output_dir_in_a_read_only_directory_is_rejected(tmp_path, db, harness_cli):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    data = quickstart(tmp_path, output_dir=str(ro / "out"))
    study_fails(harness_cli, db, write(tmp_path, data), "output_dir:", "is not writable")


def test_output_dir_on_a_read_only_mount_is_rejected(tmp_path, db, harness_cli):
    ro = Path("/proc/sys")  # mounted read-only in containers; writable only to a privileged root elsewhere
    if not os.statvfs(ro).f_flag & os.ST_RDONLY:
        pytest.skip("/proc/sys is writable here")
    data = quickstart(tmp_path, output_dir=str(ro / "harness-out"))
    study_fails(harness_cli, db, write(tmp_path, data), "output_dir:", "is not writable")


# ============================================================================================ 7. file kinds
TRIAL = "workload: {name: digits, hidden: 32}\noptimizer: {name: sgd, lr: 0.1}\nprecision: fp32\nbudget: {steps: 20}\n"


def test_a_trial_file_given_to_study_says_so(tmp_path, db, harness_cli):
    study_fails(harness_cli, db, write(tmp_path, TRIAL, "trial.yaml"), "looks like a trial file",
                "harness run FILE")


def test_a_study_file_given_to_run_says_so(tmp_path, harness_cli):
    path = write(tmp_path, quickstart(tmp_path))
    assert_one_line(*harness_cli("run", str(path)), "looks like a study file", "harness study FILE")
    assert not (tmp_path / "harness.db").exists()


# ============================================================================================ 8. storage files
def test_a_storage_file_that_is_not_a_database(tmp_path, harness_cli):
    fake = tmp_path / "harness.db"
    fake.write_text("these are my notes, not a database\n" * 10)
    before = digest(fake)
    study_fails(harness_cli, fake, write(tmp_path, quickstart(tmp_path)), "storage:", "not an SQLite database")
    assert_one_line(*harness_cli("report", "quickstart", "--storage", f"sqlite:///{fake}"), "--storage:",
                    "not an SQLite database")
    assert digest(fake) == before


def test_a_storage_flag_naming_a_directory(tmp_path, db, harness_cli):
    study_fails(harness_cli, db, write(tmp_path, quickstart(tmp_path)), "storage:", "not a database file",
                args=("--storage", f"sqlite:///{tmp_path}"))


# ============================================================================================ 9. any file at all
KNOWN = ["adamw", "sgd", "fp32", "amp-bf16", "eager", "none", "prune", "digits", "throughput", "accuracy", "max",
         "min", "tpe", "grid", "random", "median", "search", "default", "cpu", ">= 0.98 * baseline", "<= 1e9",
         "low", "high", "log", "name", "steps", "windows", "lr", "n_trials", "axes", "optimizer", "precision"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(KNOWN))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.one_of(st.sampled_from(KNOWN), st.text(max_size=10), st.integers()),
                                        inner, max_size=4), max_leaves=8)


@st.composite
def mutated_quickstart(draw: st.DrawFn) -> bytes:
    """The quickstart study with a few keys set, removed or added anywhere, or its text cut, spliced with
    random bytes or a line repeated; or random bytes."""
    kind = draw(st.sampled_from(["tree", "tree", "tree", "text", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "text":
        raw = QUICKSTART.encode()
        at = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["cut", "splice", "repeat-line"]))
        if op == "cut":
            return raw[:at]
        if op == "splice":
            return raw[:at] + draw(st.binary(min_size=1, max_size=20)) + raw[at + draw(st.integers(0, 20)):]
        lines = raw.splitlines(keepends=True)
        i = draw(st.integers(0, len(lines) - 1))
        return b"".join(lines[:i + 1] + [lines[i]] + lines[i + 1:])
    data = yaml.safe_load(QUICKSTART)
    for _ in range(draw(st.integers(1, 3))):
        node: object = data
        while True:  # walk down to a random mapping or list
            children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
            inner = [(k, v) for k, v in children if isinstance(v, (dict, list)) and v]
            if not inner or not draw(st.booleans()):
                break
            node = draw(st.sampled_from(inner))[1]
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        op = draw(st.sampled_from(["set", "set", "drop", "add"]))
        if op == "add" or not keys:
            if isinstance(node, dict):
                node[draw(st.one_of(st.sampled_from(KNOWN), st.text(max_size=10)))] = draw(VALUES)
            else:
                node.append(draw(VALUES))
        elif op == "drop":
            del node[draw(st.sampled_from(keys))]
        else:
            node[draw(st.sampled_from(keys))] = draw(VALUES)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(raw=mutated_quickstart())
def test_any_study_file_is_a_valid_config_or_one_line_with_the_storage_untouched(tmp_path, db, harness_cli, raw):
    """Hypothesis: whatever the file holds, the parser returns a config or one short SpecError line, never
    another exception; and when it refuses, ``harness study`` exits 2 with that line and the storage unchanged."""
    from harness.plugins import get_registry
    from harness.studyfile import StudyConfig, check_destinations

    text = raw.replace(b"sqlite:///harness.db", f"sqlite:///{db}".encode())
    path = tmp_path / "study.yaml"
    path.write_bytes(text)
    try:
        config = StudyConfig.from_yaml("study.yaml", get_registry())
        check_destinations(config)
    except SpecError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 400, message[:1000]
    else:
        assert config.name and config.objectives and config.axes
        return
    before = digest(db)
    line = study_fails(harness_cli, db, path)
    assert line == f"harness: error: {message}"
    assert digest(db) == before


# ============================================================================================ 10. a full disk
def test_a_file_size_limit_while_writing_outputs_is_one_line(tmp_path):
    """A full disk, simulated with RLIMIT_FSIZE in the driver's process: the study's own results fit in the
    storage, then trials.csv cannot be written."""
    study = {"name": "fsz", "workload": {"name": "digits", "hidden": 32, "depth": 1}, "omitted_params": "default",
             "axes": {"optimizer": ["sgd"]}, "budget": {"steps": 12, "warmup_steps": 2, "windows": 2},
             "objectives": ["throughput"], "sampler": "random", "n_trials": 1, "device": "cpu",
             "storage": "sqlite:///h.db", "output_dir": "out"}
    write(tmp_path, study, "fsz.yaml")
    run = [sys.executable, "-c", textwrap.dedent("""
        import resource, sys
        limit = int(sys.argv[1])
        if limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        from harness.cli import main
        sys.exit(main(["--disable", "mlflow", "study", "fsz.yaml"]))
        """)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MPLBACKEND": "Agg"}
    first = subprocess.run([*run, "0"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    db = tmp_path / "h.db"
    before = digest(db)
    for path in (tmp_path / "out").iterdir():
        if path.is_file():
            path.unlink()
    # the study is complete: the second driver only reads the storage and rewrites the outputs
    second = subprocess.run([*run, "400"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    lines = second.stderr.strip().splitlines()
    assert lines[-1].startswith("harness: error: cannot write output_dir out: File too large"), second.stderr
    assert digest(db) == before


@pytest.mark.skipif(not ROOT or not Path("/usr/bin/setpriv").exists(), reason="for root: run as nobody instead")
def test_permission_cases_as_an_unprivileged_user():
    """The unreadable file and read-only directory cases, run as user nobody (root ignores permissions)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="harness-perm-") as tmp:
        base = Path(tmp)
        base.chmod(0o777)
        (base / "ro").mkdir(mode=0o555)
        db = base / "harness.db"
        optuna.create_study(study_name="other", storage=f"sqlite:///{db}")
        db.chmod(0o666)
        before = digest(db)
        write(base, quickstart(base, output_dir="ro/out", storage="sqlite:///harness.db")).chmod(0o644)
        write(base, quickstart(base), "unreadable.yaml").chmod(0)
        cases = [(["study", "study.yaml"], ("output_dir: 'ro/out': the directory", "is not writable")),
                 (["study", "study.yaml", "--output-dir", "out", "--storage", "sqlite:///ro/x.db"],
                  ("storage: 'sqlite:///ro/x.db': the directory", "is not writable"))]
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        environment = {**os.environ, "PYTHONPATH": str(REPO), "HOME": tmp}
        if subprocess.run([*nobody, sys.executable, "-c", "import harness.cli"], env=environment,
                          capture_output=True).returncode == 0:
            cases.append((["study", "unreadable.yaml"], ("unreadable.yaml: cannot read: Permission denied",)))
        else:
            # the test's interpreter lives where user nobody cannot read it (tox's .tox is private): lend nobody
            # the right to read and search any file. Write permissions stay enforced, so the read-only directory
            # cases keep their meaning; the unreadable-file case cannot be shown this way and is left out.
            nobody += ["--inh-caps", "+dac_read_search", "--ambient-caps", "+dac_read_search"]
        for argv, expected in cases:
            proc = subprocess.run([*nobody, sys.executable, "-m", "harness.cli", "--disable", "mlflow", *argv],
                                  cwd=base, capture_output=True, text=True, timeout=120, env=environment)
            assert_one_line(proc.returncode, proc.stdout, proc.stderr, *expected)
        assert digest(db) == before and not (base / "out").exists() and not (base / "ro" / "out").exists()


def test_an_unknown_key_in_a_plugin_section_leaves_the_storage_untouched(tmp_path, db, harness_cli):
    study_fails(harness_cli, db, write(tmp_path, quickstart(tmp_path, mlflow={"experimnt": "x"})), "mlflow",
                "experimnt")
