"""The plugin authors' contract: every hook the harness calls, when, with what, and what a return value means.

Implement hooks with ``@harness.hookimpl`` in a module registered under the ``harness.plugins`` entry-point
group. An implementation may accept any subset of a hook's arguments (pluggy passes them by name).

Order inside a trial's worker process (DESIGN.md, "Data flow of one trial")::

    harness_build_workload -> harness_compress_before_training -> harness_setup_precision
    -> harness_build_optimizer -> harness_build_engine -> harness_build_lr_scheduler -> harness_build_loss
    -> harness_compile_step -> harness_trial_start -> (train; harness_trial_window at every timing window,
    harness_trial_evaluated at every evaluation) -> harness_compress_after_training -> harness_measure_model
    -> harness_trial_end

Hooks marked *firstresult* stop at the first implementation returning something other than None; by
convention an implementation returns None unless the trial selected *its* technique (``spec.<axis>.name``).
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("harness")


# ============================================================================ declarations (any process)
@hookspec
def harness_declare_techniques():
    """Declare the techniques this plugin provides.

    Called once when the plugin manager loads plugins, in the study driver and in every worker.

    :returns: a list of :class:`harness.space.Technique`: axis, name, search space (``Float``/``Int``/
        ``Categorical``), requirements (CUDA, compute capability, process count, packages, workload kinds) and
        incompatibilities (``"axis:name"``). A technique name is unique per axis across all plugins.
    """


@hookspec
def harness_declare_workloads():
    """Declare the workloads this plugin provides.

    Called once when plugins are loaded.

    :returns: a list of :class:`harness.workload.WorkloadInfo` (name, parameters, kinds, builder).
    """


@hookspec
def harness_check_combination(spec, env, workload_kinds):
    """Veto a combination that declarations cannot express, *before* anything is launched.

    Called for every candidate trial after the declared requirements and incompatibilities passed.

    :param spec: the :class:`harness.config.TrialSpec`.
    :param env: the :class:`harness.space.Environment` (CUDA, device count, compute capability).
    :param workload_kinds: the kinds of ``spec.workload`` (e.g. ``("conv", "image")``).
    :returns: a one-sentence reason the trial is infeasible, or None. Every implementation is called; the
        first reason is reported.
    """


# ============================================================================ building a trial (worker)
@hookspec(firstresult=True)
def harness_build_workload(spec, device, params):
    """Build the workload named by ``spec.workload`` for one trial.

    Called first in the worker. The built-in implementation looks the name up among the declared workloads and
    resolves ``module:function`` names; a plugin only needs to declare its workloads.

    :param device: the ``torch.device`` the trial runs on.
    :param params: the validated workload parameters.
    :returns: a :class:`harness.workload.Workload` (data may stay on the CPU: the runner moves it).
    """


@hookspec(firstresult=True)
def harness_compress_before_training(model, workload, spec, device):
    """Compress the model before training (pruning at initialisation, fake-quant insertion for QAT, or
    replacing it by a distillation student).

    Called after the workload is built, before precision setup.

    :returns: the model to train, or None to keep ``model``.
    """


@hookspec(firstresult=True)
def harness_setup_precision(model, spec, device):
    """Set up the trial's numeric precision (``spec.precision``).

    Called after compression-before-training, before the optimizer is built, so a precision that converts
    the model (fp8 layers) does so before the optimizer sees the parameters.

    :returns: a :class:`harness.step.Precision` (autocast factory, gradient scaler, compute dtype, and a
        replacement model when the precision converts it).
    """


@hookspec(firstresult=True)
def harness_build_optimizer(params, spec, device):
    """Return the optimizer for the trial's optimizer technique (``spec.optimizer``).

    Called once per trial, after precision setup and before the parallelism engine is built.

    :param params: the parameters to optimise (a list of tensors).
    :param spec: the TrialSpec; ``spec.optimizer.params`` holds the sampled values.
    :returns: a ``torch.optim.Optimizer``.
    """


@hookspec(firstresult=True)
def harness_build_engine(model, optimizer, precision, spec, device, dist):
    """Build the parallelism engine for ``spec.parallelism``: what wraps the model and performs backward
    and optimizer steps.

    Called after the optimizer is built (the learning-rate schedule comes after it). ``dist`` is a
    :class:`harness.step.DistInfo` (rank, world size, backend); the process group is already initialised when
    ``dist.world > 1``.

    :returns: a :class:`harness.step.Engine` (or subclass).
    """


@hookspec(firstresult=True)
def harness_build_lr_scheduler(optimizer, spec, total_steps):
    """Return a learning-rate scheduler stepped once per optimizer step, or None for a constant rate.

    Called right after :func:`harness_build_engine`, with the torch optimizer the engine steps
    (:attr:`harness.step.Engine.schedule_optimizer`: the optimizer axis's own, or the one a parallelism engine
    rebuilt or substituted for it).

    :param total_steps: the trial's planned number of optimizer steps (an estimate for a seconds budget).
    """


@hookspec(firstresult=True)
def harness_build_loss(model, workload, spec, device):
    """Return the training loss as ``loss(outputs, targets, inputs) -> scalar tensor``, or None for the
    workload's own loss.

    Called once after the engine is built (not per step). Knowledge distillation returns a loss that also
    runs the teacher on ``inputs``.
    """


@hookspec(firstresult=True)
def harness_compile_step(step, spec, device):
    """Apply the trial's compile technique (``spec.compile``) to the assembled train step.

    Called once, after the engine and loss exist and before training starts. ``step`` is a
    :class:`harness.step.TrainStep`; an implementation may change its model (``step.engine.model``), add an
    input transform, or return a new callable ``(inputs, targets) -> loss`` that replaces it (a captured
    CUDA graph). The first call of the returned step may compile; the runner times it as ``compile_s``.

    :returns: the train step to run, or None to run ``step`` unchanged.
    """


@hookspec(firstresult=True)
def harness_compress_after_training(model, trainer, workload, spec, device):
    """Compress after training: post-training quantisation, or pruning followed by fine-tuning
    (``trainer.train(steps)`` runs more optimizer steps of the same train step).

    Called after the final evaluation of the trained model; when a model is returned it is evaluated again
    and the first evaluation is reported as ``accuracy_uncompressed``.

    :returns: the compressed model (on which evaluation and measurements run), or None.
    """


@hookspec
def harness_measure_model(model, workload, spec, device):
    """Add measurements of the final model (serialised size, non-zero parameters, inference latency...).

    Called after compression-after-training, on rank 0 only.

    :returns: a dict of metric name -> number, merged into the trial's result; or None.
    """


# ============================================================================ observers (worker)
@hookspec
def harness_trial_start(trial):
    """A trial's training is about to start.

    :param trial: the running :class:`harness.trial.Trial` (``spec``, ``model``, ``optimizer``, ``workload``,
        ``device``, ``dist``, ``conditions``).
    """


@hookspec
def harness_trial_window(trial, step, metrics):
    """A timing window ended. Called on every rank at window boundaries only (never per step).

    :param step: the number of optimizer steps done.
    :param metrics: ``train_loss``, ``throughput_samples_per_s`` (windowed), ``lr``, ``phase`` (``warmup``
        or ``timed``).
    """


@hookspec
def harness_trial_evaluated(trial, step, metrics):
    """Held-out evaluation finished (intermediate or final).

    :param metrics: ``accuracy`` and ``val_loss``.
    """


@hookspec
def harness_trial_end(trial, result):
    """The trial finished (``result.status`` is ``ok`` or a failure class). Called in the worker, rank 0."""


# ============================================================================ observers (study driver)
@hookspec
def harness_study_start(study, config):
    """A study is starting (or resuming) in this driver process.

    :param study: the ``optuna.Study``.
    :param config: the :class:`harness.study.StudyConfig`.
    """


@hookspec
def harness_trial_launch(spec, trial_number, study):
    """A trial is about to be launched by the driver. Implementations may add entries to ``spec.tags`` that
    the worker's observers read (e.g. a tracking run id)."""


@hookspec
def harness_trial_finished(spec, record, study):
    """The driver has told Optuna a trial's outcome.

    :param record: the :class:`harness.study.TrialRecord` (number, state, failure class and message, metrics,
        objective values).
    """


@hookspec
def harness_study_end(study, config, records, pareto, output_dir):
    """The study's optimisation loop ended in this driver.

    :param records: every :class:`harness.study.TrialRecord` of the study; ``pareto`` the non-dominated ones.
    :param output_dir: where the report's plots and tables were written.
    """
