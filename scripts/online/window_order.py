"""Where the read-back text should sit next to the recent window: `latent-readback+window` asked three ways over
the same memory and the same questions.

- before: the read-back text of the picked chunk, then the window's turns (what the system does);
- after: the window's turns, then the read-back text, nearest the question;
- alone: the read-back text only (what `latent-readback` reads, here from the memory of turns older than the window).

Runs `memsplice eval` with the system's `answer` wrapped so that each question is read all three ways (the harness
scores the first; this script prints one JSON line per question and a summary of `contains` for each way):

    python scripts/online/window_order.py eval --task synthetic --examples 2 --lengths 1k,2k \\
        --systems latent-readback+window --window-tokens 256 --refine-steps 5 --write-turns 64 --select-chunks 1 \\
        --device cpu --out runs/window-order --quiet
"""

from __future__ import annotations

import json
import sys

from memsplice.cli.main import main
from memsplice.eval.metrics import contains_answer
from memsplice.eval.reader import render_history
from memsplice.eval.systems import latent

WAYS = ("before", "after", "alone")
LOG: list[dict] = []


def answer_three_ways(self, question):
    recalled, seconds = self._read_back(question, self.window)
    window = render_history(self.window) if self.window else None
    histories = {
        "before": "\n".join(h for h in (recalled, window) if h) or None,
        "after": "\n".join(h for h in (window, recalled) if h) or None,
        "alone": recalled or None,
    }
    answers = {w: self.reader.read(question.question, h, retrieval_s=seconds) for w, h in histories.items()}
    row = {"question": question.question, "gold": question.answer}
    for w, a in answers.items():
        row[w] = a.text
        row[f"ok_{w}"] = contains_answer(a.text, question.answer)
    LOG.append(row)
    print(json.dumps(row), flush=True)
    return answers["before"]


if __name__ == "__main__":
    latent.LatentReadbackPlusWindow.answer = answer_three_ways
    try:
        status = main(sys.argv[1:])
    finally:
        if LOG:
            n = len(LOG)
            summary = {w: sum(r[f"ok_{w}"] for r in LOG) / n for w in WAYS}
            print("SUMMARY", json.dumps({"questions": n, "contains": summary}))
    sys.exit(status)
