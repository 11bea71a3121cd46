"""Stitch the metrics logs of consecutive formation runs (a run, then runs started from its weights with
`--init-from`) into one curve over cumulative steps, and draw it with memsplice's own plot.

    python scripts/formation/lineage.py OUT.png RUN1.jsonl RUN2.jsonl ...

Each log's steps are offset by the last step of the logs before it, so the x axis counts every optimizer update
the final weights went through. Prints the held-out accuracy at the end of each run.
"""

import json
import sys
from pathlib import Path

from memsplice.train.plots import plot_curves


def main(out: str, logs: list[str]) -> None:
    records, offset = [], 0
    for log in logs:
        rows = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
        last = 0
        for r in rows:
            records.append({**r, "step": r["step"] + offset})
            last = max(last, r["step"])
        evals = [r for r in rows if r.get("kind") == "eval"]
        if evals:
            e = evals[-1]
            acc = {k.split("/")[1]: round(v, 4) for k, v in e.items() if k.startswith("accuracy/")}
            print(f"{log}: steps {offset}..{offset + last}, held-out accuracy {acc}")
        offset += last
    plot_curves(records, out, title=f"memory formation, {len(logs)} runs, {offset} updates")
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
