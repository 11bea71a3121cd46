"""The metrics log of a run (JSON lines) and its curves as PNG.

`MetricsLog` appends one JSON object per line to <output_dir>/metrics.jsonl; a resumed run keeps appending (lines
from steps after the resume point are dropped first, so a crash and resume leave one line per step).
`plot_curves` draws the training losses and the held-out reconstruction accuracy per passage length over steps.
matplotlib is an optional dependency (the `train` extra); without it no PNG is written and a warning is logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.is_file():
            self.path.unlink()

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(records: list[dict], path: str | Path, title: str = "memory formation") -> Path | None:
    """Loss (left) and held-out token accuracy per length (right) against steps; returns the PNG path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'memsplice[train]'); no curves written")
        return None
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    losses = sorted({k for r in train for k in r if k.startswith("loss/")})
    for key in losses:
        pts = [(r["step"], r[key]) for r in train if key in r]
        left.plot([p[0] for p in pts], [p[1] for p in pts], label=key.removeprefix("loss/"))
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.set_yscale("log")
    left.set_title("training loss")
    if losses:
        left.legend()
    lengths = sorted({int(k.split("/")[1]) for r in evals for k in r if k.startswith("accuracy/")})
    for n in lengths:
        key = f"accuracy/{n}"
        pts = [(r["step"], r[key]) for r in evals if key in r]
        right.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=f"{n} tokens")
    right.set_xlabel("step")
    right.set_ylabel("held-out token accuracy (%)")
    right.set_title("reconstruction fidelity")
    if lengths:
        right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
