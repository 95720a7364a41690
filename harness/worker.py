"""A trial's process: ``python -m harness.worker SPEC.json --result R.json --events E.jsonl``.

Started by :mod:`harness.launch` (directly, or once per rank by torchrun). Rank 0 writes the result; any
rank that fails writes its own ``R.rank<N>.json`` so the driver can name the rank and its error. Exit status
0 means the trial ran (its result says how it went); 1 means it failed in a classified way.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from harness.config import TrialSpec
from harness.trial import run_trial, write_json_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.worker")
    parser.add_argument("spec")
    parser.add_argument("--result", required=True)
    parser.add_argument("--events", default=None)
    args = parser.parse_args(argv)
    spec = TrialSpec.from_dict(json.loads(Path(args.spec).read_text()))
    rank = int(os.environ.get("RANK", "0"))
    events = open(args.events, "a", buffering=1) if args.events and rank == 0 else None

    def on_event(event: dict[str, Any]) -> None:
        if events is not None:
            events.write(json.dumps(event, default=str) + "\n")

    result = run_trial(spec, on_event=on_event)
    result.metrics["rank"] = rank
    if rank == 0:
        write_json_atomic(Path(args.result), result.to_dict())
    elif not result.ok:
        write_json_atomic(Path(f"{args.result}.rank{rank}.json"), result.to_dict())
    if events is not None:
        events.close()
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not result.ok:
            # Leave at once: peers may be blocked in a collective, and an orderly shutdown of the process group
            # would wait for them. torchrun sees the exit and stops the other ranks.
            os._exit(1)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
