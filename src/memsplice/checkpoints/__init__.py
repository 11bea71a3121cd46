"""Memory checkpoints that ship with memsplice, and loading "the checkpoint for this reasoner".

`load_memory(reasoner, checkpoint=None)` loads `checkpoint` if given, else the shipped checkpoint trained for the
reasoner (matched by weight fingerprint), else an untrained memory with the default config and a warning: an
untrained memory runs and obeys every guarantee of the core, but remembers nothing useful.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = Path(__file__).parent


def shipped_checkpoints() -> list[Path]:
    return sorted(p.parent for p in CHECKPOINTS_DIR.glob("*/memsplice_config.json"))


def checkpoint_for(reasoner) -> Path | None:
    """The shipped checkpoint trained for `reasoner` (same fingerprint), or None."""
    for path in shipped_checkpoints():
        cfg = json.loads((path / "memsplice_config.json").read_text())
        if cfg.get("reasoner_fingerprint") == reasoner.fingerprint:
            return path
    return None


def load_memory(reasoner, checkpoint: str | Path | None = None):
    from memsplice.memory import MemoryConfig, MemoryModel

    if checkpoint is not None:
        return MemoryModel.from_pretrained(checkpoint, reasoner=reasoner)
    shipped = checkpoint_for(reasoner)
    if shipped is not None:
        return MemoryModel.from_pretrained(shipped, reasoner=reasoner)
    logger.warning("no trained memory checkpoint for %s; using an untrained memory (pass --checkpoint)", reasoner.name)
    return MemoryModel(MemoryConfig(), reasoner)
