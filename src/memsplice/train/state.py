"""`TrainState` and training checkpoints: everything a run needs to continue exactly where it stopped.

A training checkpoint is a directory `<output_dir>/checkpoints/step-<N>/` holding
    memory/            the memory weights in float32 (`MemoryModel.save_pretrained`) with its config
    trainer.pt         optimizer state, RNG states (torch CPU and CUDA, Python) and the `TrainState`
    train_config.yaml  the full run configuration
and `<output_dir>/checkpoints/LATEST` names the newest one. Guarantees:
- Writes are atomic: the directory is assembled under a temporary name and renamed into place, then LATEST is
  replaced with `os.replace`; a crash leaves the previous checkpoint intact and LATEST pointing at it.
- Resuming restores weights, optimizer moments, the learning-rate schedule (a function of the step), RNG states
  and the data position (batches are a function of the step), so N steps in one go and k + (N - k) steps with a
  restart give identical weights on the same device (tests/train/test_resume.py).
- `trainer.pt` holds tensors and plain containers only and is loaded with `weights_only=True`.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..atomic import atomic_directory

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "LATEST"
TRAINER_FILE = "trainer.pt"


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken; also the data position (batches are drawn as a function of the step)."""
    planned_steps: int | None = None
    """Steps the schedule spans; fixed at the start of a run (from run.steps or run.plan_minutes)."""
    passages_seen: int = 0
    """Training passages read by the encoder over all ranks and objectives."""
    tokens_seen: int = 0
    """Passage tokens read by the encoder over all ranks and objectives."""
    train_seconds: float = 0.0
    """Wall-clock seconds spent in training steps (evaluation and saving excluded)."""
    embedding_untied: bool = False
    """Whether the encoder's token embedding has been untied from the reasoner's."""
    last_eval: dict = field(default_factory=dict)
    """The latest held-out evaluation: {length: {"accuracy", "exact_match"}}."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(obj):
    return tuple(_as_tuples(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_root(output_dir)
    marker = root / LATEST
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / TRAINER_FILE).is_file():
        raise FileNotFoundError(
            f"{marker} names {path.name}, which is incomplete or missing; remove {marker} to "
            "start over, or point LATEST at an intact checkpoint"
        )
    return path


def save_checkpoint(
    output_dir: str | Path, memory_model, optimizer, state: TrainState, config_yaml: str, keep: int = 2
) -> Path:
    """Write a checkpoint atomically, point LATEST at it and prune all but the `keep` newest."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:08d}"
    final = root / name
    with atomic_directory(final) as tmp:
        memory_model.save_pretrained(tmp / "memory")
        payload = {"state": state.to_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state()}
        torch.save(payload, tmp / TRAINER_FILE)
        (tmp / "train_config.yaml").write_text(config_yaml)
    marker_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    marker_tmp.write_text(name + "\n")
    os.replace(marker_tmp, root / LATEST)
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_file(path: Path) -> dict:
    try:
        return torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise ValueError(f"cannot read training state {path / TRAINER_FILE}: {e}") from e
