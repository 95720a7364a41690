"""The plugin authors' kit: the helpers the harness's own tests use, with real components.

Installing the harness also installs its pytest plugin (:mod:`harness.testing.fixtures`, the ``pytest11`` entry
point ``harness``), so a plugin's test suite gets these as fixtures without a conftest: ``harness_registry``,
``make_registry``, ``tiny_spec``, ``run_trial``, ``hook_recorder``, ``harness_cli``, ``study_storage``, and
the ``gpu`` marker. The functions below are the same pieces for direct use:

- :func:`make_spec`: a small, fast TrialSpec (digits, 60 steps, CPU) with any field overridden.
- :func:`run_one_trial`: run a spec in this process (``isolated=False``) or in its own worker process;
  :func:`assert_trial_ok` / :func:`assert_trial_status` fail with the trial's status and message.
- :func:`tiny_workload` (:data:`TINY_WORKLOAD`): random Gaussian blobs and a small MLP, built in well under a
  second, so a plugin's tests need no data set.
- :func:`run_small_study`: a study file or mapping through the real study driver, in a temporary directory
  with its own SQLite storage.
- :func:`run_cli`: the ``harness`` command in this process.
- :class:`HookRecorder`: which hooks the core called, on which plugins, with what.
- :func:`check_plugin`: the conformance check of a plugin's declarations and hook implementations.
"""
from harness.testing.conformance import check_plugin
from harness.testing.recorder import HookCall, HookRecorder
from harness.testing.trials import (
    TINY_WORKLOAD,
    assert_trial_ok,
    assert_trial_status,
    make_spec,
    run_cli,
    run_one_trial,
    run_small_study,
    tiny_workload,
    working_directory,
)

__all__ = ["TINY_WORKLOAD", "HookCall", "HookRecorder", "assert_trial_ok", "assert_trial_status", "check_plugin",
           "make_spec", "run_cli", "run_one_trial", "run_small_study", "tiny_workload", "working_directory"]
