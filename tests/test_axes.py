"""The seven axes: the data and memory axes (added after studies were first stored) are listed, chosen, defaulted
and dispatched like the others; the memory technique's hook runs in its place in the lifecycle on the declared
plugin only; and studies, records and spec hashes written before the two axes existed still load and match."""
from __future__ import annotations

import copy
import hashlib
import json
import re
import sqlite3

import torch

from harness import hookimpl
from harness.config import TrialSpec
from harness.feasibility import vetoes
from harness.outcomes import TrialRecord
from harness.plugins import get_registry
from harness.space import AXES, LATER_AXES, Technique, techniques_label
from harness.studyfile import StudyConfig
from harness.testing import TINY_WORKLOAD, make_spec, run_small_study


def test_the_axes_are_the_five_first_ones_then_data_and_memory():
    assert AXES == ("optimizer", "precision", "compile", "parallelism", "compression", "data", "memory")
    assert LATER_AXES == ("data", "memory")


def test_harness_plugins_lists_every_axis_in_order_with_its_default_first(harness_cli):
    code, out, err = harness_cli("plugins")
    assert code == 0, err
    lines = re.findall(r"^  (\w+): (.*)$", out, re.M)
    assert [axis for axis, _ in lines] == list(AXES)
    techniques = {axis: names.split(", ") for axis, names in lines}
    assert techniques["data"][0] == "none" and {"mixup", "cutmix", "label-smoothing"} <= set(techniques["data"])
    assert techniques["memory"][0] == "none"
    assert "data: mixup" in out and "data: cutmix" in out and "data: label-smoothing" in out


def test_harness_run_takes_data_and_memory_like_every_axis(harness_cli, monkeypatch):
    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", "mlflow,nvml")
    code, out, err = harness_cli("run", "--workload", TINY_WORKLOAD, "--data", "label-smoothing", "--memory", "none",
                                 "--set", "data.smoothing=0.2", "--steps", "8", "--set", "budget.warmup_steps=2",
                                 "--set", "budget.windows=2", "--device", "cpu")
    assert code == 0, err + out
    assert re.search(r"data\s*│\s*label-smoothing \(smoothing=0.2\)", out), out
    assert re.search(r"memory\s*│\s*none", out), out


def test_an_unknown_data_technique_is_one_line_naming_the_known_ones(harness_cli):
    code, out, err = harness_cli("run", "--data", "mixpu", "--steps", "8", "--device", "cpu")
    assert code == 2 and "Traceback" not in err
    assert "data" in err and "mixpu" in err and "mixup" in err and len(err.strip().splitlines()) == 1, err


def test_a_study_file_that_leaves_out_data_and_memory_runs_their_defaults():
    cfg = StudyConfig.from_mapping("study", {"name": "s", "axes": {"optimizer": "adamw"}, "n_trials": 1,
                                             "objectives": ["throughput"]}, get_registry())
    assert cfg.axes["data"] == {"none": {}} and cfg.axes["memory"] == {"none": {}}
    assert list(cfg.axes) == list(AXES)


# ============================================================================================ the memory hook
class MemoryProbe:
    """Two test memory techniques: ``probe-copy`` returns a replacement (a deep copy whose forward passes are
    counted); ``probe-refuses`` must never be called in a ``probe-copy`` trial."""

    def __init__(self) -> None:
        self.replacement: torch.nn.Module | None = None
        self.forwards = 0

    @hookimpl
    def harness_declare_techniques(self):
        return [Technique(axis="memory", name="probe-copy"), Technique(axis="memory", name="probe-refuses")]

    @hookimpl
    def harness_reduce_memory(self, model, spec):
        assert spec.memory.name == "probe-copy", "called for a technique of another plugin"
        self.replacement = copy.deepcopy(model)
        self.replacement.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))
        return self.replacement


class OtherMemoryTechnique:
    @hookimpl
    def harness_declare_techniques(self):
        return [Technique(axis="memory", name="other-memory")]

    @hookimpl
    def harness_reduce_memory(self):
        raise AssertionError("the memory hook of a technique the trial did not select ran")


def test_the_memory_hook_runs_after_compression_and_before_precision_on_its_plugin_only(make_registry, run_trial,
                                                                                        hook_recorder):
    probe = MemoryProbe()
    registry = make_registry(probe, OtherMemoryTechnique())
    recorder = hook_recorder(registry)
    result = run_trial.ok(registry=registry, memory="probe-copy", budget={"steps": 10})
    names = recorder.names()
    order = [names.index(f"harness_{h}") for h in ("compress_before_training", "reduce_memory", "setup_precision",
                                                    "build_optimizer", "build_engine", "compile_step")]
    assert order == sorted(order), names
    assert recorder.plugins_called("reduce_memory") == {"MemoryProbe-0"}  # extra plugins are named by class
    assert probe.forwards >= result.metrics["steps"], "the model the memory technique returned is the one trained"
    assert result.metrics["parameter_count"] == sum(p.numel() for p in probe.replacement.parameters())


def test_the_default_memory_technique_keeps_the_model(make_registry, run_trial, hook_recorder):
    registry = make_registry(MemoryProbe(), OtherMemoryTechnique())
    recorder = hook_recorder(registry)
    run_trial.ok(registry=registry, budget={"steps": 6})
    (call,) = recorder.calls_of("reduce_memory")
    assert call.plugins == () and call.result is None, "memory 'none' implements nothing"


# ============================================================================================ older studies
OLD_SPEC_KEYS = ("workload", "workload_params", "optimizer", "precision", "compile", "parallelism", "compression",
                 "batch_size", "budget", "seed", "devices", "device")


def hash_before_the_new_axes(spec: dict) -> str:
    """TrialSpec.spec_hash as the harness computed it with five axes."""
    old = {k: v for k, v in spec.items() if k in OLD_SPEC_KEYS}
    return hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_a_spec_without_data_and_memory_techniques_hashes_as_before_the_axes_existed():
    spec = make_spec(optimizer={"name": "sgd", "lr": 0.05})
    assert spec.data.name == "none" and spec.memory.name == "none"
    assert spec.spec_hash() == hash_before_the_new_axes(spec.to_dict())
    mixed = make_spec(optimizer={"name": "sgd", "lr": 0.05}, data="mixup")
    assert mixed.spec_hash() != spec.spec_hash()


def test_an_old_record_reads_as_having_run_no_data_or_memory_technique():
    spec = make_spec().to_dict()
    old_spec = {k: v for k, v in spec.items() if k not in LATER_AXES}
    params = {k: v for k, v in TrialSpec.from_dict(spec).flat_params().items() if k not in LATER_AXES}
    old = {"number": 3, "state": "FAIL", "failure_class": "crashed", "message": "boom", "params": params,
           "spec": old_spec, "spec_hash": hash_before_the_new_axes(spec)}
    record = TrialRecord.from_dict(old)
    assert record.params["data"] == "none" and record.params["memory"] == "none"
    assert record.label.endswith(" + single + none")  # compression none; data and memory none: not shown
    assert TrialSpec.from_dict(record.spec).spec_hash() == record.spec_hash
    assert "data" not in old["params"], "the stored record itself is not changed"
    assert not any(("data", "None") in combo for combo in vetoes([record, TrialRecord.from_dict(
        {**old, "number": 4})], get_registry()))


def _strip_new_axes(db: str) -> int:
    """Rewrite the study's stored records and baseline as a harness with five axes wrote them."""
    con = sqlite3.connect(db)
    changed = 0
    for table, key in (("trial_user_attributes", "trial_user_attribute_id"),
                       ("study_user_attributes", "study_user_attribute_id")):
        for row_id, value in con.execute(f"SELECT {key}, value_json FROM {table} WHERE key IN ('record', 'baseline')"):
            record = json.loads(value)
            for axis in LATER_AXES:
                record["params"].pop(axis, None)
                record["spec"].pop(axis, None)
            con.execute(f"UPDATE {table} SET value_json = ? WHERE {key} = ?", (json.dumps(record), row_id))
            changed += 1
    con.commit()
    con.close()
    return changed


def test_a_study_stored_before_the_new_axes_reports_and_resumes_without_rerunning(tmp_path, harness_cli):
    study = {"name": "five-axes", "axes": {"optimizer": {"adamw": {"lr": 0.003}}}, "n_trials": 1,
             "objectives": ["accuracy"], "budget": {"steps": 12, "warmup_steps": 2, "windows": 2}}
    registry = get_registry(disable=["mlflow", "nvml"])
    (first,), _ = run_small_study(study, tmp_path, registry=registry)
    assert first.state == "COMPLETE", first.message
    assert _strip_new_axes(str(tmp_path / "harness.db")) >= 1
    assert first.spec_hash == hash_before_the_new_axes(first.spec)

    code, out, err = harness_cli("report", "five-axes", "--storage", f"sqlite:///{tmp_path / 'harness.db'}")
    assert code == 0, err
    assert "adamw + fp32 + eager + single + none" in out

    records, _ = run_small_study({**study, "n_trials": 2}, tmp_path, registry=registry)
    again = max(records, key=lambda r: r.number)
    assert again.number == 1 and again.duplicate_of == 0, "the same combination, recognised across the change"


def test_labels_show_the_later_axes_only_when_they_hold_a_technique():
    first = {"optimizer": "sgd", "precision": "fp32", "compile": "eager", "parallelism": "single",
             "compression": "none"}
    assert techniques_label({**first, "data": "none", "memory": "none"}) == "sgd + fp32 + eager + single + none"
    assert techniques_label(first) == "sgd + fp32 + eager + single + none", "an old record reads the same"
    assert techniques_label({**first, "data": "mixup", "memory": "none"}).endswith("single + none + mixup")
    assert techniques_label({**first, "data": "none", "memory": "activation-checkpointing"}).endswith(
        "none + activation-checkpointing")
    assert make_spec(data={"name": "label-smoothing"}).label().endswith(" + label-smoothing")
