"""Saving benchmark numbers with what produced them: command, commit, device, date.

Every result file under benchmarks/results/ is written by `save_result`, and headline numbers are merged into
benchmarks/results/summary.json under one top-level key per area ("core", "formation", "latency", "eval",
"online", "serve") by `update_summary`, so no number appears without the command and commit that made it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path(os.environ.get("MEMSPLICE_RESULTS", "benchmarks/results"))


def git_commit() -> str:
    """The commit results are recorded against: $MEMSPLICE_COMMIT when set (a copy of the tree on another machine
    may carry a stale .git, so whoever sent the tree says which commit it is), else git's HEAD, "-dirty" when
    tracked files differ from it."""
    if os.environ.get("MEMSPLICE_COMMIT"):
        return os.environ["MEMSPLICE_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        commit = out.stdout.strip() or "unknown"
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_description(device=None) -> str:
    import torch

    if (
        device is not None
        and torch.device(device).type == "cuda"
        or device is None
        and torch.cuda.is_available()
    ):
        idx = torch.device(device).index if device is not None else None
        return f"{torch.cuda.get_device_name(idx or 0)} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} (torch {torch.__version__})"


def _program() -> str:
    """How the running command is invoked: `python -m memsplice.cli.main` and the `memsplice` script are both
    recorded as `memsplice`."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "main.py" and argv0.parent.name == "cli":
        return "memsplice"
    return argv0.name


def provenance(device=None) -> dict:
    return {
        "command": " ".join(shlex.quote(a) for a in [_program(), *sys.argv[1:]]),
        "commit": git_commit(),
        "device": device_description(device),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def save_result(name: str, data: dict, device=None, directory: Path | None = None) -> Path:
    """Write `data` plus provenance to <results>/<name>.json (atomically) and return the path."""
    path = Path(directory or RESULTS_DIR) / f"{name}.json"  # a name may hold folders, e.g. "formation/x"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**provenance(device), **data}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def update_summary(area: str, data: dict, device=None, directory: Path | None = None) -> Path:
    """Merge `data` (plus device, commit, date) into summary.json under `area`."""
    directory = Path(directory or RESULTS_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    prov = provenance(device)
    summary[area] = {
        **summary.get(area, {}),
        **data,
        "device": prov["device"],
        "commit": prov["commit"],
        "date": prov["date"],
        "command": prov["command"],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, path)
    return path
