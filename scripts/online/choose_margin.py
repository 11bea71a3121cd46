"""Choose an address head's recency margin from `address_recall.py --split train --recency-margins ...` results
and write it into the checkpoint's config: the smallest margin with the most first picks right
(`memsplice.online.address.choose_recency_margin`).

    python scripts/online/choose_margin.py CHECKPOINT RESULT.json [RESULT.json ...] [--record TEXT] [--dry-run]

Sets `address_recency_margin` in CHECKPOINT/memsplice_config.json and records the choice (the count per margin, the
files) under `extra.address.recency_margin`; the weights are not touched. Prints the choice as JSON.
"""

import argparse
import json
from pathlib import Path

from memsplice.memory.config import MemoryConfig
from memsplice.online.address import choose_recency_margin


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument(
        "results", nargs="+", help="address_recall.py outputs (JSON), on the split the head trained on"
    )
    p.add_argument("--values", default="pools", choices=["pools", "open"])
    p.add_argument("--record", default=None, help="where the results are kept (written into the config)")
    p.add_argument("--dry-run", action="store_true", help="print the choice, leave the config as it is")
    args = p.parse_args(argv)
    results = [json.loads(Path(f).read_text()) for f in args.results]
    splits = {r.get("split") for r in results}
    if splits != {"train"}:
        raise SystemExit(f"choose_margin: choose on the train split, not {sorted(map(str, splits))}")
    margin, correct = choose_recency_margin(results, args.values)
    questions = sum(r[args.values]["questions"] for r in results)
    lengths = sorted({int(n) for r in results for n in r[args.values]["lengths"]})
    seeds = sorted({r["seed"] for r in results})
    choice = {
        "value": margin,
        "chosen_on": (
            f"train-split conversations of {', '.join(str(n) for n in lengths)} tokens (seeds "
            f"{', '.join(map(str, seeds))}, {questions} questions): the smallest margin with the best recall@1"
        ),
        "first_right_by_margin": {str(m): n for m, n in correct.items()},
        "record": args.record or ", ".join(args.results),
    }
    print(json.dumps(choice, indent=2))
    if not args.dry_run:
        config = MemoryConfig.load(args.checkpoint)
        config.address_recency_margin = margin
        config.extra.setdefault("address", {})["recency_margin"] = choice
        config.save(args.checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
