"""Merge `memsplice bench online --part recall` runs made one (history length, seed) at a time
(`scripts/gpu/online-recall.sh` with SPLIT=1) into one table: each system's accuracy per history length, the mean
over seeds (every seed asks the same number of questions), its share of the oracle's, and the per-seed values.

    python scripts/online/merge_recall.py FILE... [--record NAME] [--what TEXT]

A FILE is either one run's result (its seed read from its command's `--seed`) or an earlier merge (its "per_seed").
The same system at the same length and seed in two files is an error: nothing is silently preferred. Every seed
must have the same systems at the same lengths, so that no mean is taken over a different set of questions.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path

from memsplice.bench.record import save_result


def seed_of(result: dict, path: str) -> str:
    words = shlex.split(result.get("command", ""))
    if "--seed" not in words[:-1]:
        raise ValueError(f"{path}: its command has no --seed, so its seed is unknown")
    return words[words.index("--seed") + 1]


def cut_short(result: dict) -> bool:
    """Whether a length of one run's result ran fewer episodes than planned: its "episodes_planned", or for runs
    recorded before that was kept (whose "complete" did not see a time budget), its command's `--examples`."""
    words = shlex.split(result.get("command", ""))
    asked = int(words[words.index("--examples") + 1]) if "--examples" in words[:-1] else None
    for length in result.get("lengths", {}).values():
        planned = length.get("episodes_planned", asked)
        if planned is not None and length.get("episodes", planned) < planned:
            return True
    return False


def merge(paths: list[str]) -> dict:
    acc: dict[str, dict[str, dict[str, float]]] = defaultdict(
        lambda: defaultdict(dict)
    )  # seed -> length -> sys
    kv: dict[str, dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )  # length -> system -> values
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "per_seed" in data:
            entries = [(seed, lengths) for seed, lengths in data["per_seed"].items()]
        else:
            if not data.get("complete", False) or cut_short(data):
                raise ValueError(f"{path}: the run did not complete (its time budget ran out)")
            entries = [(seed_of(data, path), data["recall"])]
            for length, systems in data.get("kv_fraction_answer", {}).items():
                for system, value in systems.items():
                    kv[length][system].append(value)
        for seed, lengths in entries:
            for length, systems in lengths.items():
                for system, value in systems.items():
                    if system in acc[seed][length]:
                        raise ValueError(
                            f"{path}: {system} at {length} tokens, seed {seed}, is in another file too"
                        )
                    acc[seed][length][system] = value
    shapes = {seed: {n: sorted(s) for n, s in lengths.items()} for seed, lengths in acc.items()}
    if len({json.dumps(s, sort_keys=True) for s in shapes.values()}) > 1:
        raise ValueError(f"the seeds do not hold the same systems at the same lengths: {shapes}")
    seeds = sorted(acc, key=int)
    lengths = sorted(acc[seeds[0]], key=int)
    recall = {
        n: {s: sum(acc[seed][n][s] for seed in seeds) / len(seeds) for s in acc[seeds[0]][n]} for n in lengths
    }
    of_oracle = {
        n: {s: v / recall[n]["oracle"] for s, v in recall[n].items() if s != "oracle"}
        for n in lengths
        if recall[n].get("oracle")
    }
    return {
        "seeds": [int(s) for s in seeds],
        "recall": recall,
        "of_oracle": of_oracle,
        "kv_fraction_answer_of_new_runs": {
            n: {s: sum(v) / len(v) for s, v in systems.items()} for n, systems in kv.items()
        },
        "per_seed": {seed: dict(acc[seed]) for seed in seeds},
        "sources": paths,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--record", default=None, help="save as benchmarks/results/NAME.json with provenance")
    p.add_argument("--what", default=None, help="a sentence on what was run, kept in the record")
    args = p.parse_args()
    try:
        out = merge(args.files)
    except (OSError, ValueError, KeyError) as e:
        print(f"merge_recall: {e}", file=sys.stderr)
        return 2
    if args.what:
        out = {"what": args.what, **out}
    if args.record:
        print(f"saved {save_result(args.record, out)}")
    print(json.dumps({k: out[k] for k in ("seeds", "recall", "of_oracle")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
