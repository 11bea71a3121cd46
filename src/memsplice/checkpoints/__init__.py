"""Memory checkpoints that ship with memsplice, and loading "the checkpoint for this reasoner".

`load_memory(reasoner, checkpoint=None)` loads `checkpoint` if given, else the shipped checkpoint trained for the
reasoner (matched by weight fingerprint), else an untrained memory with the default config and a warning: an
untrained memory runs and obeys every guarantee of the core, but remembers nothing useful.
`default_checkpoint_dir()` is the folder of the memory trained for the default reasoner, SmolLM2-135M-Instruct;
it raises FileNotFoundError, saying how to train one, while no trained memory ships there.

Reading prefixes (`memsplice.reading`) ship beside them, in folders with a `reading_config.json`:
`load_reading_prefix(reasoner, "shipped")` loads the one trained for the reasoner, `load_reading_prefix(reasoner,
DIR)` any other.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = Path(__file__).parent
DEFAULT_NAME = "smollm2-135m-instruct"


def checkpoint_dir(name: str = DEFAULT_NAME, must_exist: bool = True) -> Path:
    """The folder of a shipped checkpoint; raises FileNotFoundError when it holds no trained memory."""
    path = CHECKPOINTS_DIR / name
    if must_exist and not (path / "memsplice_config.json").is_file():
        raise FileNotFoundError(
            f"no trained memory is shipped at {path}; train one with `memsplice train --config "
            "configs/formation-smollm2.yaml` and pass its output_dir/memory as --checkpoint"
        )
    return path


def default_checkpoint_dir(must_exist: bool = True) -> Path:
    """The memory trained for the default reasoner, SmolLM2-135M-Instruct."""
    return checkpoint_dir(DEFAULT_NAME, must_exist=must_exist)


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
    logger.warning(
        "no trained memory checkpoint for %s; using an untrained memory (pass --checkpoint)", reasoner.name
    )
    return MemoryModel(MemoryConfig(), reasoner)


SHIPPED = "shipped"
"""What `--reading-prefix` takes for the prefix shipped for the reasoner."""


def reading_prefix_for(reasoner) -> Path | None:
    """The shipped reading prefix trained for `reasoner` (same fingerprint), or None."""
    for config in sorted(CHECKPOINTS_DIR.glob("*/reading_config.json")):
        if json.loads(config.read_text()).get("reasoner_fingerprint") == reasoner.fingerprint:
            return config.parent
    return None


def load_reading_prefix(reasoner, where: str | Path):
    """The reading prefix at `where`: a directory, or "shipped" for the one shipped for `reasoner`."""
    from memsplice.reading import ReadingPrefix, ReadingPrefixError

    if str(where) == SHIPPED:
        found = reading_prefix_for(reasoner)
        if found is None:
            raise ReadingPrefixError(
                f"no reading prefix ships for {reasoner.name}; train one with python -m memsplice.reading.train and "
                "pass its output/prefix directory"
            )
        where = found
    return ReadingPrefix.from_pretrained(where, reasoner=reasoner)
