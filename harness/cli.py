"""The ``harness`` command: ``run`` one trial, ``study`` a search, ``report`` a study, list ``plugins``.

Bad input (files, flags, plugin declarations) is reported in one line naming the field and what is allowed,
with exit status 2 and no traceback. A trial that runs but fails exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness.errors import SpecError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage block too)
        raise SpecError(f"{self.prog}: {message}")


def _parse_override(text: str) -> tuple[list[str], Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {text!r}: expected FIELD=VALUE, e.g. optimizer.lr=0.01 or budget.steps=300")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(data: dict, args) -> dict:
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

    try:
        from harness import study as study_mod
    except ImportError:
        study_mod = None
    if study_mod is not None and hasattr(study_mod, "add_cli"):
        study_mod.add_cli(sub)
    return parser


# ------------------------------------------------------------------------------------------------ run
def cmd_run(args, registry) -> int:
    from harness.config import load_yaml, trial_from_mapping
    from harness.launch import LaunchOptions

    data = load_yaml(args.trial) if args.trial else {}
    where = args.trial or "trial"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping of trial fields, got {type(data).__name__}")
    spec = trial_from_mapping(where, apply_overrides(data, args), registry)
    if args.timeout < 0:
        raise SpecError(f"--timeout: expected seconds >= 0, got {args.timeout}")
    options = LaunchOptions(nnodes=args.nnodes, node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint,
                            timeout_s=args.timeout)
    result = run_with_progress(spec, options)
    print_result(spec, result)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1, default=str))
    return EXIT_OK if result.ok else EXIT_FAILED


def run_with_progress(spec, options):
    """Launch the trial in its own process and show a progress bar fed by its event stream."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from harness.launch import launch

    with tempfile.TemporaryDirectory(prefix="harness-run-") as tmp, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=False) as progress:
        task = progress.add_task(spec.label(), total=None, info="starting")

        def on_event(event):
            kind = event.get("event")
            if kind == "start":
                progress.update(task, total=event.get("total_steps") or None, info="compiling / warming up")
            elif kind in ("progress", "window"):
                info = ""
                if kind == "window":
                    m = event["metrics"]
                    info = f"loss {m['train_loss']:.4g}  {m['throughput_samples_per_s']:,.0f} samples/s"
                progress.update(task, completed=event["step"], **({"info": info} if info else {}))
            elif kind == "eval":
                progress.update(task, info=f"accuracy {event['metrics']['accuracy']:.4f}")
            return None

        result = launch(spec, Path(tmp), options, on_event=on_event)
        progress.update(task, info=result.status)
    return result


def format_metric(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key.endswith("_bytes"):
            return f"{value / 2**20:,.1f} MiB"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, int) and key.endswith("_bytes"):
        return f"{value / 2**20:,.1f} MiB"
    return str(value)


def print_result(spec, result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"trial: {spec.workload}  [{spec.label()}]  -> {result.status}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(result.metrics):
        table.add_row(key, format_metric(key, result.metrics[key]))
    for key in ("device_name", "torch", "cuda", "date"):
        if key in result.conditions:
            table.add_row(key, result.conditions[key])
    console.print(table)
    if not result.ok:
        console.print(f"[red]{result.status}[/red]: {result.message}")


# ------------------------------------------------------------------------------------------------ plugins
def plugin_listing(registry) -> list[dict[str, Any]]:
    """One JSON-able entry per plugin: name, module, distribution, version, what it adds, its hooks, its error."""
    out = []
    for name, rec in sorted(registry.records.items()):
        if name == "harness-core":
            continue
        out.append({"name": name, "module": rec.module, "distribution": rec.distribution, "version": rec.version,
                    "techniques": [{"axis": t.axis, "name": t.name, "params": sorted(t.space)}
                                   for t in rec.techniques],
                    "workloads": [{"name": w.name, "params": sorted(w.params)} for w in rec.workloads],
                    "hooks": list(rec.hooks), "error": rec.error})
    return out


def cmd_plugins(args, registry) -> int:
    """``harness plugins``: every plugin with its distribution and version, the techniques and workloads it
    adds and the hooks it implements. A plugin that failed to load is listed with its error (exit 0 all the
    same: the others work). ``--check`` adds the conformance check and exits 1 when a plugin fails it."""
    from rich.console import Console
    from rich.table import Table

    listing = plugin_listing(registry)
    check = getattr(args, "check", False)
    if check:
        from harness.testing import check_plugin

        for entry in listing:
            plugin = registry.pm.get_plugin(entry["name"])
            entry["problems"] = check_plugin(plugin, raises=False) if plugin is not None else []
    failed = any(entry.get("problems") for entry in listing)
    if getattr(args, "json", False):
        print(json.dumps(listing, indent=1))
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
        adds = ([f"{t['axis']}: {t['name']}" for t in entry["techniques"]]
                + [f"workload: {w['name']}" for w in entry["workloads"]])
        hooks = [h.removeprefix("harness_") for h in entry["hooks"]]
        table.add_row(entry["name"], dist, "\n".join(adds), ", ".join(hooks))
    console.print(table)
    broken = [e["name"] for e in listing if e["error"]]
    if broken:
        console.print(f"[red]{len(broken)} plugin(s) failed to load and are left out: {', '.join(broken)}[/red]")
    if check:
        for entry in listing:
            for problem in entry.get("problems", []):
                console.print(f"[red]conformance:[/red] {problem}", highlight=False, markup=False)
        checked = sum(1 for e in listing if not e["error"])
        console.print("conformance: " + ("problems found" if failed else f"{checked} plugin(s) conform"))
    return EXIT_FAILED if failed else EXIT_OK


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return EXIT_USAGE
        from harness.plugins import get_registry

        registry = get_registry(disable=args.disable)
        handler = {"run": cmd_run, "plugins": cmd_plugins}.get(args.command) or args.handler
        # Trial processes load their own plugins: --disable reaches them through HARNESS_DISABLE_PLUGINS.
        previous = os.environ.get("HARNESS_DISABLE_PLUGINS")
        if args.disable:
            os.environ["HARNESS_DISABLE_PLUGINS"] = ",".join(filter(None, [previous, *args.disable]))
        try:
            return handler(args, registry)
        finally:
            if args.disable:
                if previous is None:
                    os.environ.pop("HARNESS_DISABLE_PLUGINS", None)
                else:
                    os.environ["HARNESS_DISABLE_PLUGINS"] = previous
    except SpecError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
