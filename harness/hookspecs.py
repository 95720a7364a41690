"""The plugin authors' contract: every hook the harness calls, when, with what, and what a return value means.

Implement hooks with ``@harness.hookimpl`` in a module (or a class, made once per process) registered under
``harness.plugins`` entry points; an implementation may take any subset of a hook's arguments (passed by name).

Which plugins are called (dispatch by declaration; no implementation checks ``spec.<axis>.name`` itself):

- **declarations** (``harness_declare_*``): every plugin, once, when plugins load.
- **technique hooks** (marked ``axis``, *firstresult*): only the plugin that declared the trial's technique there.
- **trial hooks**: the plugins *taking part* in the trial: those that declared one of its techniques or its
  workload, and the observer plugins that declare neither (trackers, telemetry), which see every trial.
- **study hooks**: every plugin.

The lifecycle, written once (``docs/architecture.md`` quotes this block; a test holds the two equal)::

    driver (harness study)                      # one process per host; many may share one storage
      harness_study_start(study, config)
      for each trial Optuna asks for:
        spec = the sampled TrialSpec
        infeasible or vetoed? requirements + harness_check_combination(spec, env, workload_kinds)
        already run (same spec hash)? reuse that outcome
        otherwise:
          tags = harness_trial_launch(spec, trial_number, study)   # merged into spec.tags
          launch the worker (its own process group) and wait for its result
        tell Optuna the outcome
        harness_trial_finished(spec, record, study)                # infeasible and reused trials too
      print and write the report
      harness_study_end(study, config, records, pareto, output_dir)
      on Ctrl-C: the running trial is killed and finished as interrupted, then
      harness_study_interrupted(study, config)                   # instead of harness_study_end

    worker (python -m harness.worker, one per rank)
      harness_check_combination(spec, env, workload_kinds)
      workload = the declared builder of spec.workload
      model = harness_compress_before_training(model, workload, spec, device)   # compression axis
      model = harness_reduce_memory(model, workload, spec, device)              # memory axis
      precision = harness_setup_precision(model, spec, device)                  # precision axis
      optimizer = harness_build_optimizer(params, spec, device)                 # optimizer axis
      engine = harness_build_engine(model, optimizer, precision, spec, device, dist)   # parallelism axis
      scheduler = harness_build_lr_scheduler(optimizer, spec, total_steps)      # optimizer axis
      loss = harness_build_loss(model, workload, spec, device)                  # compression axis
      transform = harness_build_data_transform(workload, spec, device)          # data axis
      step = harness_compile_step(step, spec, device)                           # compile axis
      harness_trial_start(trial)
      train, each training batch through transform(inputs, targets) outside the step; at every timing window:
          metrics += harness_measure_window(trial, step, phase)                 # never per step
          harness_trial_window(trial, step, metrics)
        at every intermediate evaluation: harness_trial_evaluated(trial, step, metrics)
      evaluate the trained model: harness_trial_evaluated(trial, step, metrics)
      compressed = harness_compress_after_training(model, trainer, workload, spec, device)   # compression axis
      if compressed: evaluate it: harness_trial_evaluated(trial, step, metrics)
      metrics += harness_measure_model(model, workload, spec, device)           # rank 0
      throughput too noisy? time more windows (harness_measure_window, harness_trial_window again)
      metrics += harness_measure_trial(trial, status)                           # rank 0; failed trials too
      harness_trial_end(trial, result)                                          # rank 0; failed trials too
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

if TYPE_CHECKING:
    import optuna
    import torch

    from harness.config import Setting, TrialSpec
    from harness.measure import Metric
    from harness.outcomes import TrialRecord
    from harness.space import Environment, Technique
    from harness.step import DistInfo, Engine, Precision, TrainStep
    from harness.studyfile import StudyConfig
    from harness.trial import Trial, TrialResult
    from harness.workload import Targets, Workload, WorkloadInfo

hookspec = pluggy.HookspecMarker("harness")

_F = TypeVar("_F", bound=Callable[..., Any])

#: ``loss(outputs, targets, inputs) -> scalar tensor``, what ``harness_build_loss`` returns; ``targets`` are a
#: tensor or :class:`harness.workload.SoftTargets`.
LossFn = Callable[["torch.Tensor", "Targets", "torch.Tensor"], "torch.Tensor"]
#: ``transform(inputs, targets) -> (inputs, targets)``, what ``harness_build_data_transform`` returns.
DataTransform = Callable[["torch.Tensor", "Targets"], tuple["torch.Tensor", "Targets"]]


def technique_hook(axis: str) -> Callable[[_F], _F]:
    """Mark a hook as ``axis``'s: called only on the plugin of the trial's technique there; first non-None wins."""
    def mark(func: _F) -> _F:
        func.harness_axis = axis  # type: ignore[attr-defined]
        return hookspec(firstresult=True)(func)

    return mark


def axis_of(hook_name: str) -> str | None:
    """The axis a technique hook belongs to, or None for a declaration, trial or study hook."""
    return getattr(globals().get(hook_name), "harness_axis", None)


#: the hooks called on every plugin; the other hooks are axis-bound (:func:`axis_of`) or trial hooks.
STUDY_HOOKS = ("harness_study_start", "harness_study_end", "harness_study_interrupted")
DECLARATION_HOOKS = ("harness_declare_techniques", "harness_declare_workloads", "harness_declare_metrics",
                     "harness_declare_study_settings")


# ============================================================================ declarations (every plugin)
@hookspec
def harness_declare_techniques() -> list[Technique]:
    """Declare the techniques this plugin provides.

    Called once on every plugin when plugins load, in the driver and in every worker. A technique declared
    ``default=True`` is what a trial that leaves its axis out runs; its plugin cannot be disabled.

    :returns: a list of :class:`harness.space.Technique` (axis, name, search space, requirements,
        incompatibilities ``"axis:name"``, ``default``); a name is unique per axis (a second one is an error).
    """
    raise NotImplementedError


@hookspec
def harness_declare_workloads() -> list[WorkloadInfo]:
    """Declare the workloads this plugin provides.

    Called once on every plugin when plugins load. A trial's workload is ``build(device=..., seed=..., **params)``.

    :returns: a list of :class:`harness.workload.WorkloadInfo` (name, parameters, kinds, builder, ``default``).
    """
    raise NotImplementedError


@hookspec
def harness_declare_metrics() -> list[Metric]:
    """Declare the metrics this plugin adds to trial results (objectives or constraints in study files). Called
    once on every plugin when plugins load.

    :returns: a list of :class:`harness.measure.Metric` (study-file name, result key, unit, direction).
    """
    raise NotImplementedError


@hookspec
def harness_declare_study_settings() -> list[Setting]:
    """Declare a top-level section of study files that this plugin reads (``mlflow:`` for the tracker). Called
    once on every plugin when plugins load; the parser runs ``validate`` before any storage is opened.

    :returns: a list of :class:`harness.config.Setting` (key, validate, help).
    """
    raise NotImplementedError


# ============================================================================ feasibility (driver and worker)
@hookspec
def harness_check_combination(spec: TrialSpec, env: Environment, workload_kinds: tuple[str, ...]) -> str | None:
    """Veto a combination that declarations cannot express, *before* anything is launched.

    Called on the plugins taking part in the trial once its declared requirements passed: in the driver before
    launch, and first thing in the worker.

    :param spec: the :class:`harness.config.TrialSpec` of the candidate trial.
    :param env: the :class:`harness.space.Environment` (CUDA, device count, compute capability).
    :param workload_kinds: the kinds of ``spec.workload`` (e.g. ``("conv", "image")``).
    :returns: a one-sentence reason the trial is infeasible, or None (every implementation is called).
    """
    raise NotImplementedError


# ============================================================================ building a trial (worker, axis-bound)
@technique_hook("compression")
def harness_compress_before_training(model: torch.nn.Module, workload: Workload, spec: TrialSpec,
                                     device: torch.device) -> torch.nn.Module | None:
    """Compress the model before training (pruning at initialisation, QAT fake-quant, a distillation student).

    Called after the workload is built on the plugin of the trial's compression technique.

    :param model: the workload's model, on ``device``.
    :param workload: the built :class:`harness.workload.Workload`.
    :param spec: the TrialSpec; ``spec.compression.params`` holds the sampled values.
    :param device: the ``torch.device`` the trial runs on.
    :returns: the model to train, or None to keep ``model``.
    """
    raise NotImplementedError


@technique_hook("memory")
def harness_reduce_memory(model: torch.nn.Module, workload: Workload, spec: TrialSpec,
                          device: torch.device) -> torch.nn.Module | None:
    """Make training the model take less device memory (activation checkpointing).

    Called once per trial on the plugin of the trial's memory technique, after compression-before-training and
    before precision, optimizer, engine (which may shard it) and compilation. Parameter *names* must not change.

    :param model: the model to train, on ``device``.
    :param workload: the built :class:`harness.workload.Workload`.
    :param spec: the TrialSpec; ``spec.memory.params`` holds the sampled values.
    :param device: the ``torch.device`` the trial runs on.
    :returns: the model to train (``model`` changed in place, or a replacement), or None to keep ``model``.
    """
    raise NotImplementedError


@technique_hook("precision")
def harness_setup_precision(model: torch.nn.Module, spec: TrialSpec, device: torch.device) -> Precision:
    """Set up the trial's numeric precision.

    Called before the optimizer is built, on the plugin of the trial's precision technique (a precision that
    converts the model, to fp8 layers, does so before the optimizer sees the parameters).

    :param model: the model to train, on ``device``.
    :param spec: the TrialSpec; ``spec.precision.params`` holds the sampled values.
    :param device: the ``torch.device`` the trial runs on.
    :returns: a :class:`harness.step.Precision` (autocast, gradient scaler, compute dtype, converted model).
    """
    raise NotImplementedError


@technique_hook("optimizer")
def harness_build_optimizer(params: list[torch.nn.Parameter], spec: TrialSpec,
                            device: torch.device) -> torch.optim.Optimizer:
    """Return the optimizer for the trial's optimizer technique.

    Called once per trial, after precision setup, on the plugin of the trial's optimizer technique.

    :param params: the parameters to optimise (the model's parameters that require gradients).
    :param spec: the TrialSpec; ``spec.optimizer.params`` holds the sampled values.
    :param device: the ``torch.device`` the trial runs on (fused kernels exist per device type).
    :returns: a ``torch.optim.Optimizer``.
    """
    raise NotImplementedError


@technique_hook("parallelism")
def harness_build_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                         spec: TrialSpec, device: torch.device, dist: DistInfo) -> Engine:
    """Build the parallelism engine: what wraps the model and performs backward and optimizer steps.

    Called after the optimizer is built (the learning-rate schedule comes after it), on the plugin of the
    trial's parallelism technique. The process group is already initialised when ``dist.world > 1``.

    :param model: the model to train (possibly converted by the precision), on ``device``.
    :param optimizer: the optimizer axis's optimizer; an engine may rebuild it (``Engine.schedule_optimizer``).
    :param precision: the :class:`harness.step.Precision` set up by the precision technique.
    :param spec: the TrialSpec; ``spec.parallelism.params`` holds the sampled values.
    :param device: the ``torch.device`` of this rank.
    :param dist: the :class:`harness.step.DistInfo` (rank, world size, local rank, backend).
    :returns: a :class:`harness.step.Engine` (or subclass).
    """
    raise NotImplementedError


@technique_hook("optimizer")
def harness_build_lr_scheduler(optimizer: torch.optim.Optimizer, spec: TrialSpec,
                               total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Return a learning-rate scheduler stepped once per optimizer step, or None for a constant rate.

    Called right after :func:`harness_build_engine`, on the plugin of the trial's optimizer technique.

    :param optimizer: the torch optimizer the engine steps (:attr:`harness.step.Engine.schedule_optimizer`).
    :param spec: the TrialSpec; ``spec.optimizer.params`` holds the sampled values.
    :param total_steps: the trial's planned number of optimizer steps (0 for a seconds budget).
    :returns: a ``torch.optim.lr_scheduler.LRScheduler``, or None.
    """
    raise NotImplementedError


@technique_hook("compression")
def harness_build_loss(model: torch.nn.Module, workload: Workload, spec: TrialSpec,
                       device: torch.device) -> LossFn | None:
    """Return the training loss, or None for the workload's own loss.

    Called once after the engine is built, on the plugin of the trial's compression technique (distillation's
    loss also runs the teacher on ``inputs``).

    :param model: the model the engine trains (wrapped by the engine where it wraps it).
    :param workload: the built :class:`harness.workload.Workload`.
    :param spec: the TrialSpec; ``spec.compression.params`` holds the sampled values.
    :param device: the ``torch.device`` of this rank.
    :returns: ``loss(outputs, targets, inputs) -> scalar tensor`` (targets may be soft), or None.
    """
    raise NotImplementedError


@technique_hook("data")
def harness_build_data_transform(workload: Workload, spec: TrialSpec, device: torch.device) -> DataTransform | None:
    """Return the transform of every training batch (Mixup, CutMix, label smoothing).

    Called once per trial on the plugin of the trial's data technique, after the loss is built and before the step
    is compiled. The runner applies it to each training batch outside the train step (compilation and CUDA-graph
    capture see plain tensors of fixed shapes); evaluation batches are never transformed. Soft targets are a
    :class:`harness.workload.SoftTargets`, which the workload's loss must accept (the default loss does).

    :param workload: the built :class:`harness.workload.Workload`.
    :param spec: the TrialSpec; ``spec.data.params`` holds the sampled values.
    :param device: the ``torch.device`` of this rank (where batches are).
    :returns: ``transform(inputs, targets) -> (inputs, targets)``, or None for no transform.
    """
    raise NotImplementedError


@technique_hook("compile")
def harness_compile_step(step: TrainStep, spec: TrialSpec, device: torch.device) -> Callable[..., Any] | None:
    """Apply the trial's compile technique to the assembled train step.

    Called once, before training starts, on the plugin of the trial's compile technique. It may change the
    step's model or input transform, or return a callable ``(inputs, targets) -> loss`` replacing the step (a
    captured CUDA graph). The first call of the returned step may compile; the runner times it as ``compile_s``.

    :param step: the :class:`harness.step.TrainStep` (engine, loss, precision, input transform).
    :param spec: the TrialSpec; ``spec.compile.params`` holds the sampled values.
    :param device: the ``torch.device`` of this rank.
    :returns: the train step to run, or None to run ``step`` unchanged.
    """
    raise NotImplementedError


@technique_hook("compression")
def harness_compress_after_training(model: torch.nn.Module, trainer: Trial, workload: Workload, spec: TrialSpec,
                                    device: torch.device) -> torch.nn.Module | None:
    """Compress after training: post-training quantisation, or pruning followed by fine-tuning.

    Called after the final evaluation, on the plugin of the trial's compression technique. A returned model is
    evaluated again; the first evaluation is reported as ``accuracy_uncompressed``.

    :param model: the trained model (unwrapped from the engine).
    :param trainer: the running :class:`harness.trial.Trial`; ``trainer.train(steps)`` fine-tunes.
    :param workload: the built :class:`harness.workload.Workload`.
    :param spec: the TrialSpec; ``spec.compression.params`` holds the sampled values.
    :param device: the ``torch.device`` of this rank.
    :returns: the compressed model (on which evaluation and measurements run), or None.
    """
    raise NotImplementedError


# ============================================================================ measuring (worker, trial hooks)
@hookspec
def harness_measure_model(model: torch.nn.Module, workload: Workload, spec: TrialSpec,
                          device: torch.device) -> dict[str, float] | None:
    """Add measurements of the final model (serialised size, inference latency...). Called on the plugins taking
    part in the trial, after compression-after-training, on rank 0 only.

    :param model: the final model: the compressed one when compression returned one, else the trained one.
    :param workload: the built :class:`harness.workload.Workload`.
    :param spec: the TrialSpec.
    :param device: the ``torch.device`` of rank 0.
    :returns: a dict of metric name -> number, merged into the trial's result; or None.
    """
    raise NotImplementedError


@hookspec
def harness_measure_window(trial: Trial, step: int, phase: str) -> dict[str, float] | None:
    """Add measurements of a timing window that just ended (device power, utilisation...).

    Called on the plugins taking part in the trial, on every rank, at window boundaries only (never per step),
    before :func:`harness_trial_window`, which receives the merged metrics.

    :param trial: the running :class:`harness.trial.Trial`.
    :param step: the number of optimizer steps done.
    :param phase: ``warmup`` (the window after compilation) or ``timed``.
    :returns: a dict of metric name -> number added to the window's metrics, or None.
    """
    raise NotImplementedError


@hookspec
def harness_measure_trial(trial: Trial, status: str) -> dict[str, float] | None:
    """Add whole-trial measurements (energy per sample...). Called on the plugins taking part in the trial, on
    rank 0, before :func:`harness_trial_end`, for failed trials too.

    :param trial: the finished :class:`harness.trial.Trial` (``trial.metrics`` holds the core's metrics).
    :param status: ``ok`` or the failure class.
    :returns: a dict of metric name -> number merged into the trial's result, or None.
    """
    raise NotImplementedError


# ============================================================================ observers (worker, trial hooks)
@hookspec
def harness_trial_start(trial: Trial) -> None:
    """A trial's training is about to start. Called on the plugins taking part in the trial, on every rank, after
    the train step is compiled.

    :param trial: the running :class:`harness.trial.Trial` (``spec``, ``model``, ``workload``, ``device``...).
    :returns: nothing (the return value is ignored).
    """
    raise NotImplementedError


@hookspec
def harness_trial_window(trial: Trial, step: int, metrics: Mapping[str, Any]) -> None:
    """A timing window ended. Called on the plugins taking part in the trial, on every rank, at window boundaries
    only (never per step).

    :param trial: the running :class:`harness.trial.Trial`.
    :param step: the number of optimizer steps done.
    :param metrics: ``train_loss``, ``throughput_samples_per_s`` (timed windows), ``lr``, ``phase``, and what
        :func:`harness_measure_window` added. Read-only.
    :returns: nothing (the return value is ignored).
    """
    raise NotImplementedError


@hookspec
def harness_trial_evaluated(trial: Trial, step: int, metrics: Mapping[str, Any]) -> None:
    """Held-out evaluation finished (intermediate or final). Called on the plugins taking part in the trial, on
    every rank, after every evaluation.

    :param trial: the running :class:`harness.trial.Trial`.
    :param step: the number of optimizer steps done.
    :param metrics: ``accuracy``, ``val_loss`` and ``eval_samples``. Read-only.
    :returns: nothing (the return value is ignored).
    """
    raise NotImplementedError


@hookspec
def harness_trial_end(trial: Trial, result: TrialResult) -> None:
    """The trial finished. Called on the plugins taking part in the trial, in the worker, on rank 0, after
    :func:`harness_measure_trial`.

    :param trial: the finished :class:`harness.trial.Trial`.
    :param result: the :class:`harness.trial.TrialResult` (``status``: ``ok`` or a failure class). Read-only.
    :returns: nothing (the return value is ignored).
    """
    raise NotImplementedError


# ============================================================================ study driver
@hookspec
def harness_study_start(study: optuna.Study, config: StudyConfig) -> None:
    """A study is starting (or resuming) in this driver process. Called on every plugin, once per ``harness
    study``, after the storage is open and before the first trial.

    :param study: the ``optuna.Study``.
    :param config: the :class:`harness.studyfile.StudyConfig`; ``config.settings``: the plugins' sections.
    :returns: nothing (the return value is ignored).
    """
    raise NotImplementedError


@hookspec
def harness_trial_launch(spec: TrialSpec, trial_number: int, study: optuna.Study) -> dict[str, Any] | None:
    """A trial is about to be launched by the driver.

    Called on the plugins taking part in the trial, in the driver, after the feasibility check.

    :param spec: the TrialSpec about to run.
    :param trial_number: the Optuna trial number.
    :param study: the ``optuna.Study``.
    :returns: tags (JSON-able, e.g. a tracking run id) merged into ``spec.tags`` for the worker; or None.
    """
    raise NotImplementedError


@hookspec
def harness_trial_finished(spec: TrialSpec, record: TrialRecord, study: optuna.Study) -> None:
    """The driver has told Optuna a trial's outcome.

    Called on the plugins taking part in the trial, in the driver, for every trial (infeasible and reused ones
    too; on Ctrl-C with ``record.failure_class == "interrupted"``, before :func:`harness_study_interrupted`).

    :param spec: the trial's TrialSpec (with the tags of :func:`harness_trial_launch`).
    :param record: the :class:`harness.outcomes.TrialRecord` (state, failure class, metrics, values).
    :param study: the ``optuna.Study``.
    :returns: nothing (the return value is ignored).
    """
    raise NotImplementedError


@hookspec
def harness_study_end(study: optuna.Study, config: StudyConfig, records: list[TrialRecord],
                      pareto: list[TrialRecord], output_dir: Path) -> None:
    """The study's optimisation loop ended in this driver. Called on every plugin, once, after the report was
    printed and written.

    :param study: the ``optuna.Study``.
    :param config: the :class:`harness.studyfile.StudyConfig`.
    :param records: every :class:`harness.outcomes.TrialRecord` of the study.
    :param pareto: the non-dominated records (the Pareto front).
    :param output_dir: where the report's plots and tables were written.
    :returns: nothing (the return value is ignored).
    """
    raise NotImplementedError


@hookspec
def harness_study_interrupted(study: optuna.Study, config: StudyConfig) -> None:
    """The driver is stopping on Ctrl-C: close what the study holds open (a tracker's study run, as killed).

    Called on every plugin, once, instead of :func:`harness_study_end`, wherever the interrupt came, after a
    running trial was reported to :func:`harness_trial_finished` as ``interrupted``.

    :param study: the ``optuna.Study``.
    :param config: the :class:`harness.studyfile.StudyConfig`.
    :returns: nothing (the return value is ignored).
    """
    raise NotImplementedError
