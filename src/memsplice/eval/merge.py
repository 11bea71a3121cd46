"""Merge the results of several runs of one evaluation into one, e.g. history lengths run side by side on two GPUs
(one run "merges" into itself plus `merged_from`, so scripts treat any number of runs alike).

    merged = merge_results([load_results("runs/eval-a"), load_results("runs/eval-b")])
    write_report(merged, "runs/eval")

Guarantees: only runs of the same task, systems, reasoner (fingerprint), memory checkpoint and settings other than
the history lengths and the time budget are merged (anything else raises `ValueError` naming the difference); no
episode may appear in two runs (the same seed and length in both would be the same episode counted twice). Records
and feeds are kept as they are, in run order; the merged config lists every run's lengths; `merged_from` keeps each
run's provenance and episode counts, so where each number came from stays visible.
"""

from __future__ import annotations

import json
from pathlib import Path

# Config fields that may differ between runs merged into one: which lengths each ran, and how long each could take.
_MAY_DIFFER = {("task_args", "lengths"), ("time_budget_s",), ("progress",), ("device",)}


def load_results(path: str | Path) -> dict:
    """The raw results of a run: `path` is its results.json or the directory `write_report` wrote it into."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(f"no eval results at {p} (give a results.json or the directory holding it)")
    data = json.loads(p.read_text())
    missing = {"task", "systems", "config", "reasoner", "records", "feeds", "episodes"} - set(data)
    if missing:
        raise ValueError(f"{p} is not a memsplice eval results.json: missing {', '.join(sorted(missing))}")
    data.pop("summary", None)  # recomputed from the records
    data["source"] = str(p)
    return data


def _config_differences(a: dict, b: dict, prefix: tuple = ()) -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        path = (*prefix, key)
        if path in _MAY_DIFFER:
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(_config_differences(va, vb, path))
        elif va != vb:
            out.append(f"{'.'.join(path)}: {va!r} vs {vb!r}")
    return out


def merge_results(runs: list[dict]) -> dict:
    """One results dict (as `run_eval` returns) holding every run's records; see the module docstring."""
    if not runs:
        raise ValueError("merge_results: give at least one run")
    first = runs[0]
    for run in runs[1:]:
        where = run.get("source", "a run")
        for key in ("task", "systems", "checkpoint", "main_metric"):
            if run.get(key) != first.get(key):
                raise ValueError(f"cannot merge {where}: {key} is {run.get(key)!r}, not {first.get(key)!r}")
        if run["reasoner"].get("fingerprint") != first["reasoner"].get("fingerprint"):
            raise ValueError(f"cannot merge {where}: another reasoner (weights fingerprint differs)")
        diff = _config_differences(first["config"], run["config"])
        if diff:
            raise ValueError(f"cannot merge {where}: its config differs in {'; '.join(diff)}")
    seen: dict[str, str] = {}
    for run in runs:
        for episode in dict.fromkeys(r["episode"] for r in run["feeds"]):
            if episode in seen:
                raise ValueError(
                    f"cannot merge: episode {episode!r} is in both {seen[episode]} and {run.get('source', 'a run')}"
                )
            seen[episode] = run.get("source", "a run")
    lengths = sorted({n for run in runs for n in run["config"]["task_args"]["lengths"]})
    config = json.loads(json.dumps(first["config"]))
    config["task_args"]["lengths"] = lengths
    config["time_budget_s"] = None
    return {
        **{k: first[k] for k in ("task", "main_metric", "systems", "reasoner", "checkpoint") if k in first},
        "config": config,
        "episodes": sum(run["episodes"] for run in runs),
        "episodes_planned": sum(run.get("episodes_planned", run["episodes"]) for run in runs),
        "questions": sum(run.get("questions", 0) for run in runs),
        "provenance": first.get("provenance"),
        "merged_from": [
            {
                "source": run.get("source"),
                "lengths": run["config"]["task_args"]["lengths"],
                "episodes": run["episodes"],
                "episodes_planned": run.get("episodes_planned", run["episodes"]),
                "provenance": run.get("provenance"),
            }
            for run in runs
        ],
        "records": [r for run in runs for r in run["records"]],
        "feeds": [f for run in runs for f in run["feeds"]],
    }
