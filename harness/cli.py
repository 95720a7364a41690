"""The ``harness`` command: ``run`` one trial, ``study`` a search, ``report`` a study, list ``plugins``.

Bad input (files, flags, plugin declarations) is reported in one line naming the field and what is allowed,
with exit status 2 and no traceback. A trial that runs but fails exits 1.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from harness.errors import SpecError, one_line, shown
from harness.listing import axis_listing, plugin_listing, trial_settings
from harness.redact import mask_credentials
from harness.studyfile import DEFAULT_STORAGE

if TYPE_CHECKING:
    from rich.console import Console

    from harness.config import TrialSpec
    from harness.launch import LaunchOptions
    from harness.plugins import Registry
    from harness.trial import TrialResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: OSErrors that mean "cannot write there" rather than a bug, reported in one line (exit 2): a full disk or a
#: file-size limit always; a forbidden or read-only place when the error names the file.
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
_WRITE_ERRNOS = _FULL_ERRNOS | {errno.EROFS, errno.EACCES, errno.EPERM}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse would print the usage block too)
        raise SpecError(f"{self.prog}: {message}")


def _parse_override(text: str) -> tuple[list[str], Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {shown(text)}: expected FIELD=VALUE, e.g. optimizer.lr=0.01 or budget.steps=300")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(data: Mapping[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    """Fold the command-line flags into a trial mapping (flags win over the file)."""
    from harness.space import AXES

    data = dict(data or {})
    if args.workload:
        data["workload"] = args.workload
    for axis in AXES:
        name = getattr(args, axis)
        if name:
            old = data.get(axis)
            data[axis] = {**old, "name": name} if isinstance(old, dict) and old.get("name") == name else name
    for field, value in (("batch_size", args.batch_size), ("seed", args.seed), ("devices", args.devices),
                         ("device", args.device)):
        if value is not None:
            data[field] = value
    budget = {k: v for k, v in (("steps", args.steps), ("epochs", args.epochs), ("seconds", args.seconds))
              if v is not None}
    if budget:
        old = {k: v for k, v in dict(data.get("budget") or {}).items() if k not in ("steps", "epochs", "seconds")}
        data["budget"] = {**old, **budget}
    for item in args.set or []:
        path, value = _parse_override(item)
        target = data
        for part in path[:-1]:
            current = target.get(part)
            if isinstance(current, str):
                current = {"name": current}
            elif not isinstance(current, dict):
                current = {}
            target[part] = current = dict(current)
            target = current
        target[path[-1]] = value
    return data


def _add_trial_flags(p: argparse.ArgumentParser) -> None:
    from harness.space import AXES

    p.add_argument("--workload", help="workload name or module:function")
    for axis in AXES:
        p.add_argument(f"--{axis}", metavar="NAME", help=f"{axis} technique")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--seconds", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--devices", type=int, help="processes (one per GPU)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"))
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="any trial field, e.g. optimizer.lr=0.01, budget.windows=10 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harness", description=__doc__.splitlines()[0])
    parser.add_argument("--disable", action="append", default=[], metavar="PLUGIN",
                        help="disable a plugin by name (repeatable)")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    run = sub.add_parser("run", help="run one trial")
    run.add_argument("trial", nargs="?", help="trial YAML file (flags override its fields)")
    _add_trial_flags(run)
    run.add_argument("--timeout", type=float, default=0, help="seconds before the trial is killed (0: none)")
    run.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    run.add_argument("--nnodes", type=int, default=1)
    run.add_argument("--node-rank", type=int, default=0)
    run.add_argument("--rdzv-endpoint", default="")

    plugins = sub.add_parser("plugins", help="list plugins, their techniques, workloads and hooks")
    plugins.add_argument("--json", action="store_true", help="print the list as JSON (for scripts)")
    plugins.add_argument("--check", action="store_true",
                         help="also run the conformance check (harness.testing.check_plugin) on every plugin")

    study = sub.add_parser("study", help="search technique combinations (an Optuna study) from a study file")
    study.add_argument("file", help="study YAML file (studies/quickstart.yaml)")
    study.add_argument("--n-trials", type=int, help="override n_trials")
    study.add_argument("--timeout", type=float, help="override timeout_s (seconds before no new trial starts)")
    study.add_argument("--storage", help=f"override the Optuna storage URL (default {DEFAULT_STORAGE})")
    study.add_argument("--output-dir", help="override output_dir (plots, trials.csv, pareto.json)")
    study.add_argument("--gpus", help="override gpus: the GPUs whose slots run trials at once ('all' or '0,1')")

    report = sub.add_parser("report", help="re-print the Pareto table of a study from its storage")
    report.add_argument("study", help="study name")
    report.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default {DEFAULT_STORAGE})")
    report.add_argument("--output-dir", help="also (re)write trials.csv, pareto.json and the plots here")
    return parser


# ------------------------------------------------------------------------------------------------ run
def cmd_run(args: argparse.Namespace, registry: Registry) -> int:
    from harness.config import load_yaml, trial_from_mapping
    from harness.launch import LaunchOptions

    data = load_yaml(args.trial) if args.trial else {}
    where = args.trial or "trial"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping of trial fields, got {type(data).__name__}")
    study_keys = [k for k in ("axes", "n_trials", "timeout_s", "objectives", "constraints", "sampler") if k in data]
    if study_keys:
        raise SpecError(f"{where}: this looks like a study file (top-level {', '.join(study_keys)}; a trial file "
                        "names one technique per axis): run it with `harness study FILE`")
    spec = trial_from_mapping(where, apply_overrides(data, args), registry)
    if args.timeout < 0:
        raise SpecError(f"--timeout: expected seconds >= 0, got {args.timeout}")
    options = LaunchOptions(nnodes=args.nnodes, node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint,
                            timeout_s=args.timeout)
    print_settings(spec, options)
    result = run_with_progress(spec, options)
    print_result(spec, result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1, default=str))
    return EXIT_OK if result.ok else EXIT_FAILED


def run_with_progress(spec: TrialSpec, options: LaunchOptions) -> TrialResult:
    """Launch the trial in its own process and show a progress bar fed by its event stream. The trial's working
    directory is removed afterwards, unless the failure message points into it (its ``worker.log``)."""
    import shutil

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from harness.launch import launch

    workdir = tempfile.mkdtemp(prefix="harness-run-")
    result: TrialResult | None = None
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} steps"), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), transient=False) as progress:
            task = progress.add_task(spec.label(), total=None, info="starting")

            def on_event(event: dict[str, Any]) -> None:
                kind = event.get("event")
                if kind == "start":
                    progress.update(task, total=event.get("total_steps") or None, info="compiling / warming up")
                elif kind in ("progress", "window"):
                    progress.update(task, completed=event["step"])
                    if kind == "window":
                        m = event["metrics"]
                        progress.update(task, info=f"loss {m['train_loss']:.4g}  "
                                                   f"{m['throughput_samples_per_s']:,.0f} samples/s")
                elif kind == "eval":
                    progress.update(task, info=f"accuracy {event['metrics']['accuracy']:.4f}")

            result = launch(spec, Path(workdir), options, on_event=on_event)
            progress.update(task, info=result.status)
    finally:
        if result is None or result.ok or workdir not in result.message:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def print_settings(spec: TrialSpec, options: LaunchOptions | None = None) -> None:
    """Print the settings the trial runs with, before it starts (so the result table is never a puzzle)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="settings", show_header=False)
    table.add_column("setting")
    table.add_column("value", overflow="fold")
    for key, value in trial_settings(spec, options):
        table.add_row(key, mask_credentials(value))
    Console().print(table)


def print_result(spec: TrialSpec, result: TrialResult) -> None:
    from rich.console import Console
    from rich.table import Table

    from harness.report import fmt

    console = Console()
    table = Table(title=f"trial: {spec.workload}  [{spec.label()}]  -> {result.status}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(result.metrics):
        table.add_row(key, fmt(key, result.metrics[key]))
    for key in ("device_name", "torch", "cuda", "date"):
        if key in result.conditions:
            table.add_row(key, result.conditions[key])
    console.print(table)
    if not result.ok:
        console.print(f"[red]{result.status}[/red]: {result.message}")


# ------------------------------------------------------------------------------------------------ study, report
def _wide_console() -> Console:
    """The terminal's console; in logs and CI one wide enough for the Pareto table."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def cmd_study(args: argparse.Namespace, registry: Registry) -> int:
    """``harness study FILE``: validate everything (file, plugins' sections, storage), then run the study.
    Exits 1 when the baseline trial that relative constraints need failed."""
    from harness.config import integer, positive
    from harness.driver import StudyDriver
    from harness.studyfile import StudyConfig, check_destinations

    config = StudyConfig.from_yaml(args.file, registry)
    if args.storage:
        config.storage = args.storage
    if args.output_dir:
        config.output_dir = args.output_dir
    if args.gpus is not None:
        from harness.slots import parse_gpus

        config.gpus = parse_gpus("--gpus", args.gpus)
    check_destinations(config)  # with the flags applied, before any storage is opened
    n_trials = integer("--n-trials", args.n_trials) if args.n_trials is not None else None
    timeout_s = positive("--timeout", args.timeout, " of seconds") if args.timeout is not None else None
    driver = StudyDriver(config, registry, _wide_console(), n_trials=n_trials, timeout_s=timeout_s)
    driver.open()
    try:
        driver.run()
    except OSError as exc:
        if exc.filename is None and exc.errno in _FULL_ERRNOS:  # a write() names no file: say where outputs go
            exc.filename = f"output_dir {config.output_dir}"
        raise
    return EXIT_FAILED if config.needs_baseline and driver.baseline is None else EXIT_OK


def cmd_report(args: argparse.Namespace, registry: Registry) -> int:
    """``harness report STUDY``: re-print the Pareto table of a study from its storage alone (the objectives
    are stored on the study), and with ``--output-dir`` rewrite its files."""
    import optuna

    from harness import report
    from harness.outcomes import Objective, TrialRecord, pareto_front
    from harness.space import did_you_mean
    from harness.storage import open_storage
    from harness.studyfile import check_sqlite_file

    check_sqlite_file("--storage", args.storage, must_exist=True)
    storage = open_storage(args.storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]
    if args.study not in names:
        raise SpecError(f"study: no study {args.study!r} in {args.storage} (studies: {', '.join(names) or 'none'})"
                        f"{did_you_mean(args.study, names)}")
    study = optuna.load_study(study_name=args.study, storage=storage)
    # a study the driver did not create has no stored objectives: show it by throughput
    objectives = report.objectives_of(study) or [Objective.of(registry.metric("objectives", "throughput"))]
    records = report.records_from_study(study)
    stored = study.user_attrs.get("baseline")
    baseline = TrialRecord.from_dict(stored) if stored else None
    pareto = pareto_front(records, objectives, baseline)
    console = _wide_console()
    report.print_table(console, study, records, pareto, baseline=baseline, objectives=objectives)
    if args.output_dir:
        written = report.write_outputs(study, records, pareto, objectives, Path(args.output_dir), baseline=baseline)
        console.print(f"wrote {', '.join(p.name for p in written)} to {args.output_dir}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ plugins
def cmd_plugins(args: argparse.Namespace, registry: Registry) -> int:
    """``harness plugins``: every plugin with its distribution and version, the techniques and workloads it
    adds (and whether this machine can run each technique) and the hooks it implements. A plugin that failed to
    load is listed with its error (exit 0 all the same: the others work). ``--check`` adds the conformance check
    and exits 1 when a plugin fails it or failed to load."""
    from rich.console import Console
    from rich.table import Table

    listing = plugin_listing(registry)
    check = getattr(args, "check", False)
    if check:
        from harness.testing.conformance import check_plugin

        for entry in listing:
            plugin = registry.plugin(entry["name"])
            entry["problems"] = check_plugin(plugin, raises=False) if plugin is not None else []
    broken = [e["name"] for e in listing if e["error"]]
    failed = check and (bool(broken) or any(entry.get("problems") for entry in listing))
    if getattr(args, "json", False):
        print(json.dumps(listing, indent=1, default=repr))
        return EXIT_FAILED if failed else EXIT_OK
    console = Console()
    if not console.is_terminal:  # pipes and logs: wide enough that errors stay readable
        console = Console(width=200)
    table = Table(title="harness plugins")
    for col in ("plugin", "distribution", "adds", "hooks"):
        table.add_column(col)
    for entry in listing:
        dist = f"{entry['distribution']} {entry['version']}".strip()
        if entry["error"]:
            table.add_row(entry["name"], dist, f"[red]error: {entry['error']}[/red]", "")
            continue
        adds = []
        for t in entry["techniques"]:
            label = f"{t['axis']}: {t['name']}"
            why = t["why_not"].removeprefix(f"{t['axis']} technique {t['name']!r} ")
            adds.append(label if t["runs_here"] else f"{label} [yellow](not on this machine: {why})[/yellow]")
        adds += [f"workload: {w['name']}" for w in entry["workloads"]]
        hooks = [h.removeprefix("harness_") for h in entry["hooks"]]
        table.add_row(entry["name"], dist, "\n".join(adds), ", ".join(hooks))
    console.print(table)
    console.print("techniques by axis (the default first):")
    for axis, names in axis_listing(registry):
        console.print(f"  {axis}: {', '.join(names)}", highlight=False, markup=False)
    if broken:
        console.print(f"[red]{len(broken)} plugin(s) failed to load and are left out: {', '.join(broken)}[/red]")
    if check:
        for entry in listing:
            for problem in entry.get("problems", []):
                console.print(f"[red]conformance:[/red] {problem}", highlight=False, markup=False)
        checked = sum(1 for e in listing if not e["error"])
        verdict = f"{checked} plugin(s) conform"
        if any(entry.get("problems") for entry in listing):
            verdict = "problems found"
        elif broken:
            verdict += f", {len(broken)} failed to load"
        console.print("conformance: " + verdict)
    return EXIT_FAILED if failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return EXIT_USAGE
        from harness.plugins import get_registry, workload_search_path

        registry = get_registry(disable=args.disable)
        handler = {"run": cmd_run, "plugins": cmd_plugins, "study": cmd_study, "report": cmd_report}[args.command]
        # Trial processes load their own plugins: --disable reaches them through HARNESS_DISABLE_PLUGINS.
        previous = os.environ.get("HARNESS_DISABLE_PLUGINS")
        if args.disable:
            os.environ["HARNESS_DISABLE_PLUGINS"] = ",".join(filter(None, [previous, *args.disable]))
        # A `module:function` workload is found in the current directory or next to the study or trial file
        # (here and, through PYTHONPATH, in the trial processes).
        file = getattr(args, "file", None) or getattr(args, "trial", None)
        undo_path = workload_search_path(os.getcwd(), *([os.path.dirname(os.path.abspath(file))] if file else []))
        try:
            return handler(args, registry)
        finally:
            undo_path()
            if args.disable:
                if previous is None:
                    os.environ.pop("HARNESS_DISABLE_PLUGINS", None)
                else:
                    os.environ["HARNESS_DISABLE_PLUGINS"] = previous
    except SpecError as exc:
        print(f"harness: error: {one_line(mask_credentials(str(exc)))}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        # a full disk, a file-size limit, a read-only or forbidden place met while writing outputs: one line;
        # any other OSError is a bug and keeps its traceback
        if not (exc.errno in _FULL_ERRNOS or (exc.errno in _WRITE_ERRNOS and exc.filename)):
            raise
        where = f" {one_line(mask_credentials(str(exc.filename)), 300)}" if exc.filename else ""
        hint = " (the disk is full or a file-size limit is reached)" if exc.errno in _FULL_ERRNOS else ""
        verb = "write" if exc.errno in _FULL_ERRNOS or exc.errno == errno.EROFS else "access"
        print(f"harness: error: cannot {verb}{where}: {exc.strerror or exc}{hint}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
