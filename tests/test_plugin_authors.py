"""What a plugin author meets: ``harness plugins --check`` failing on a plugin that cannot load, name clashes
with installed plugins found by ``check_plugin``, a reason per incompatibility, which techniques this machine
can run, parameters in ``harness plugins --json``, the settings ``harness run`` prints, an optimizer that wraps
another (as docs/plugins.md describes it), and the page's table of the metrics a trial returns."""
from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import torch
from test_plugin_kit import _plugin

from harness import hookimpl
from harness.listing import plugin_listing, trial_settings
from harness.space import Environment, Float, Requirements, Technique, infeasible_reason, unavailable_reason
from harness.testing import check_plugin, make_spec
from harness.workload import WorkloadInfo

ROOT = Path(__file__).resolve().parents[1]
BROKEN = "plugin_kit_broken"  # tests/plugin_kit_broken.py: fails to import
H100 = Environment(cuda=True, device_count=1, compute_capability=(9, 0), device_name="NVIDIA H100 80GB HBM3")
CPU = Environment(cuda=False, device_count=0, compute_capability=None, device_name="cpu")




def _optimizer_plugin(name: str, technique: Technique) -> types.ModuleType:
    return _plugin(name, harness_declare_techniques=lambda: [technique],
                   harness_build_optimizer=lambda params, spec: torch.optim.SGD(params, lr=spec.optimizer.params["lr"]))


# ---------------------------------------------------------------------------------------------- --check
def test_plugins_check_exits_1_when_a_plugin_fails_to_load(harness_cli, monkeypatch):
    monkeypatch.setenv("HARNESS_PLUGINS", BROKEN)
    code, out, err = harness_cli("plugins", "--check")
    assert code == 1 and "Traceback" not in err
    assert "failed to load and are left out: plugin_kit_broken" in out
    assert re.search(r"conformance: \d+ plugin\(s\) conform, 1 failed to load", out), out
    code, out, _ = harness_cli("plugins", "--check", "--json")
    assert code == 1 and {e["name"]: e for e in json.loads(out)}[BROKEN]["error"].startswith("failed to import")


def test_plugins_check_exits_0_when_every_plugin_loads_and_conforms(harness_cli):
    code, out, _ = harness_cli("plugins", "--check")
    assert code == 0 and re.search(r"conformance: \d+ plugin\(s\) conform\n", out), out


# ---------------------------------------------------------------------------------------------- name clashes
def test_check_plugin_reports_a_technique_named_like_a_built_in(make_registry):
    clash = _optimizer_plugin("my_sgd", Technique(axis="optimizer", name="sgd",
                                                  space={"lr": Float(1e-3, 1.0, default=0.1)}))
    assert check_plugin(clash, raises=False) == [
        "my_sgd: technique optimizer:sgd: the name is already declared by the installed plugin 'sgd' "
        "(gpu-harness 0.1.0); installed together, the harness disables one of the two plugins: rename it"]
    # what the check warns of: installed together, the second one is disabled
    registry = make_registry(clash)
    assert registry.records["my_sgd"].error == "declares optimizer technique 'sgd', already declared by plugin 'sgd'"


def test_check_plugin_reports_a_workload_named_like_a_built_in():
    def build(device, seed):  # noqa: ARG001
        return None

    clash = _plugin("my_digits", harness_declare_workloads=lambda: [WorkloadInfo(name="digits", build=build)])
    assert check_plugin(clash, raises=False) == [
        "my_digits: workload 'digits': the name is already declared by the installed plugin 'digits' "
        "(gpu-harness 0.1.0); installed together, the harness disables one of the two plugins: rename it"]


def test_check_plugin_does_not_report_an_installed_plugin_clashing_with_itself():
    import harness_lion.plugin

    import plugins.sgd

    assert check_plugin(plugins.sgd, raises=False) == []
    assert check_plugin(harness_lion.plugin, raises=False) == []


# ---------------------------------------------------------------------------------------------- reasons
def test_each_incompatibility_of_cuda_graph_gives_its_own_reason(registry):
    ddp = infeasible_reason(make_spec(compile="cuda-graph", parallelism="ddp", device="cuda"),
                            registry.techniques, H100)
    assert ddp.startswith("compile technique 'cuda-graph' cannot be combined with parallelism 'ddp': ")
    assert "DDP" in ddp and "DeepSpeed" not in ddp and "GradScaler" not in ddp and "pruning" not in ddp
    deepspeed = infeasible_reason(make_spec(compile="cuda-graph", parallelism="deepspeed", device="cuda"),
                                  registry.techniques, H100)
    assert "DeepSpeed" in deepspeed and "DDP" not in deepspeed and "FSDP" not in deepspeed
    fp16 = infeasible_reason(make_spec(compile="cuda-graph", precision="amp-fp16", device="cuda"),
                             registry.techniques, H100)
    assert "GradScaler" in fp16 and "DDP" not in fp16 and "DeepSpeed" not in fp16


def test_a_shared_reason_still_serves_a_tuple_of_incompatibilities():
    tech = Technique(axis="optimizer", name="old-style", incompatible=("precision:amp-fp16", "compile:cuda-graph"),
                     reason="both break it")
    assert tech.incompatibilities() == {"precision:amp-fp16": "both break it", "compile:cuda-graph": "both break it"}
    mixed = Technique(axis="optimizer", name="mixed", incompatible={"precision:amp-fp16": "", "compile:eager": "no"},
                      reason="the shared one")
    assert mixed.incompatibilities() == {"precision:amp-fp16": "the shared one", "compile:eager": "no"}
    techniques = {(t.axis, t.name): t for t in [
        mixed, Technique(axis="precision", name="amp-fp16"), Technique(axis="compile", name="eager"),
        *(Technique(axis=a, name="x") for a in ("parallelism", "compression"))]}
    spec = make_spec()
    spec.optimizer.name, spec.precision.name, spec.compile.name = "mixed", "amp-fp16", "eager"
    spec.parallelism.name = spec.compression.name = "x"
    assert infeasible_reason(spec, techniques, CPU) == (
        "optimizer technique 'mixed' cannot be combined with precision 'amp-fp16': the shared one")


def test_check_plugin_wants_a_reason_for_every_incompatibility():
    silent = _optimizer_plugin("silent", Technique(axis="optimizer", name="silent", incompatible=(
        "precision:amp-fp16",), space={"lr": Float(1e-3, 1.0, default=0.1)}))
    assert check_plugin(silent, raises=False) == [
        "silent: technique optimizer:silent: incompatible entry 'precision:amp-fp16' has no reason (users see it "
        "with the infeasible verdict: give each entry its reason, or set reason)"]
    bad = _optimizer_plugin("bad_reason", Technique(axis="optimizer", name="bad-reason", incompatible={
        "precision:amp-fp16": 3}, space={"lr": Float(1e-3, 1.0, default=0.1)}))
    assert ("bad_reason: technique optimizer:bad-reason: the reason of incompatible entry 'precision:amp-fp16' "
            "must be a string, got 3") in check_plugin(bad, raises=False)


# ---------------------------------------------------------------------------------------------- runs here?
def test_harness_plugins_says_which_techniques_this_machine_cannot_run(harness_cli):
    code, out, _ = harness_cli("plugins", "--json")
    techniques = {t["name"]: t for e in json.loads(out) for t in e["techniques"]}
    assert techniques["sgd"]["runs_here"] and techniques["sgd"]["why_not"] == ""
    code, text, _ = harness_cli("plugins")
    if torch.cuda.is_available():
        assert techniques["cuda-graph"]["runs_here"] and "cuda-graph (not on this machine" not in text
    else:
        assert not techniques["cuda-graph"]["runs_here"]
        assert techniques["cuda-graph"]["why_not"] == ("compile technique 'cuda-graph' requires CUDA, which this "
                                                       "machine does not have")
        assert "compile: cuda-graph (not on this machine: requires CUDA" in text


def test_a_missing_package_or_gpu_generation_is_named_as_why_a_technique_cannot_run(make_registry):
    needs = Technique(axis="optimizer", name="needs-pkg", space={"lr": Float(1e-3, 1.0, default=0.1)},
                      requires=Requirements(packages=("harness_no_such_package_xyz",)))
    listing = plugin_listing(make_registry(_optimizer_plugin("needs_pkg", needs)))
    (entry,) = [t for e in listing for t in e["techniques"] if t["name"] == "needs-pkg"]
    assert not entry["runs_here"]
    assert entry["why_not"] == ("optimizer technique 'needs-pkg' requires the package 'harness_no_such_package_xyz', "
                                "which is not installed")
    fp8 = Technique(axis="precision", name="fp8-like", requires=Requirements(cuda=True, min_compute_capability=(8, 9)))
    a100 = Environment(cuda=True, device_count=1, compute_capability=(8, 0), device_name="NVIDIA A100")
    assert unavailable_reason(fp8, a100, where="this machine") == (
        "precision technique 'fp8-like' requires compute capability >= 8.9; this machine has NVIDIA A100 "
        "(compute capability 8.0)")
    assert unavailable_reason(fp8, H100, where="this machine") is None
    assert unavailable_reason(fp8, H100, device="cpu") == "precision technique 'fp8-like' requires CUDA, which " \
                                                          "this trial does not have"


# ---------------------------------------------------------------------------------------------- parameters, settings
def test_harness_plugins_json_carries_each_parameters_range_choices_and_default(harness_cli):
    code, out, _ = harness_cli("plugins", "--json")
    listing = {e["name"]: e for e in json.loads(out)}
    assert code == 0
    (lion,) = listing["lion"]["techniques"]
    assert lion["params"]["lr"] == {"type": "float", "low": 1e-5, "high": 1e-2, "log": True, "default": 3e-4,
                                    "help": "learning rate (3-10x smaller than AdamW's)"}
    (adamw,) = listing["adamw"]["techniques"]
    assert adamw["default"] is True
    assert adamw["params"]["implementation"]["type"] == "categorical"
    assert adamw["params"]["implementation"]["choices"] == ["default", "foreach", "fused"]
    assert adamw["params"]["implementation"]["default"] == "default"
    (digits,) = listing["digits"]["workloads"]
    assert digits["default"] is True and digits["params"]["hidden"]["type"] == "int"
    assert {"low", "high", "default"} <= set(digits["params"]["hidden"])
    assert "choices_not_here" not in adamw["params"]["implementation"]  # nothing there needs more of the machine
    if not torch.cuda.is_available():  # the choices this machine can never run, and why
        (gpt,) = listing["gpt"]["workloads"]
        assert gpt["params"]["kernels"]["choices_not_here"] == {
            k: f"workload.kernels {k!r} requires CUDA, which this machine does not have"
            for k in ("liger", "liger-flce")}
        (ddp,) = listing["ddp"]["techniques"]
        assert list(ddp["params"]["gradient_dtype"]["choices_not_here"]) == ["bfloat16"]


def test_trial_settings_name_batch_size_budget_device_and_every_technique():
    spec = make_spec(batch_size=32, optimizer={"name": "sgd", "lr": 0.05}, budget={"steps": 40})
    rows = dict(trial_settings(spec))
    assert rows["batch_size"] == "32 (global)"
    assert rows["budget"] == "40 steps (3 warm-up steps, 3 timing windows)"
    assert rows["device"] == "cpu, 1 process"
    assert rows["optimizer"].startswith("sgd (lr=0.05, ")
    assert rows["precision"] == "fp32" and rows["compression"] == "none"
    assert rows["workload"].startswith("digits (hidden=")


def test_harness_run_prints_its_settings_before_the_result(harness_cli, monkeypatch):
    monkeypatch.setenv("HARNESS_DISABLE_PLUGINS", "mlflow,nvml")
    code, out, err = harness_cli("run", "--workload", "harness.testing:tiny_workload", "--batch-size", "32",
                                 "--steps", "8", "--set", "budget.warmup_steps=2", "--set", "budget.windows=2",
                                 "--device", "cpu")
    assert code == 0, err + out
    assert out.index("settings") < out.index("batch_size") < out.index("trial: ") < out.index("throughput")
    assert re.search(r"batch_size\s*│\s*32 \(global\)", out) and re.search(r"budget\s*│\s*8 steps", out), out


# ---------------------------------------------------------------------------------------------- wrapper optimizers
class Lookahead(torch.optim.Optimizer):
    """A wrapper optimizer written the way docs/plugins.md says: it shares ``param_groups`` with the inner
    optimizer, so a learning-rate schedule set on it reaches the inner one."""

    def __init__(self, inner: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        self.inner, self.k, self.alpha, self.steps = inner, k, alpha, 0
        self.param_groups = inner.param_groups  # the same list: schedules write group["lr"] here
        self.defaults, self.state = inner.defaults, inner.state
        self._slow = [p.detach().clone() for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.inner.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            for slow, p in zip(self._slow, (p for g in self.param_groups for p in g["params"]), strict=True):
                slow.add_(p - slow, alpha=self.alpha)
                p.copy_(slow)
        return loss


class LookaheadPlugin:
    def __init__(self):
        self.built: list[Lookahead] = []

    @hookimpl
    def harness_declare_techniques(self):
        return [Technique(axis="optimizer", name="lookahead-sgd", space={"lr": Float(1e-3, 1.0, default=0.2)})]

    @hookimpl
    def harness_build_optimizer(self, params, spec):
        self.built.append(Lookahead(torch.optim.SGD(params, lr=spec.optimizer.params["lr"])))
        return self.built[-1]

    @hookimpl
    def harness_build_lr_scheduler(self, optimizer, total_steps):
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** (step / total_steps))
        return self.scheduler


def test_a_wrapper_optimizer_sharing_param_groups_gets_the_schedule_on_its_inner_optimizer(make_registry, run_trial):
    plugin = LookaheadPlugin()
    assert check_plugin(plugin) == []
    result = run_trial.ok(registry=make_registry(plugin), optimizer="lookahead-sgd", budget={"steps": 30})
    (opt,) = plugin.built
    assert opt.steps >= 30 and plugin.scheduler.last_epoch == opt.steps  # stepped once per optimizer step
    lr = opt.inner.param_groups[0]["lr"]
    assert lr == pytest.approx(0.2 * 0.5 ** (opt.steps / 30)) and lr < 0.11  # the schedule reached the inner one
    assert result.metrics["accuracy"] > 0.5


# ---------------------------------------------------------------------------------------------- docs
def _documented_metrics() -> list[str]:
    page = (ROOT / "docs" / "plugins.md").read_text()
    table = page[page.index("<!-- metrics: every trial -->"):page.index("<!-- end metrics -->")]
    return re.findall(r"`([a-z0-9_]+)`", table)


def test_the_metrics_every_trial_returns_are_the_ones_docs_plugins_md_lists(run_trial):
    metrics = run_trial.ok(budget={"steps": 20}).metrics
    documented = _documented_metrics()
    assert set(documented) <= set(metrics), set(documented) - set(metrics)
    page = (ROOT / "docs" / "plugins.md").read_text()
    undocumented = [key for key in metrics if f"`{key}`" not in page]
    assert not undocumented, f"docs/plugins.md does not say what these result keys are: {undocumented}"
