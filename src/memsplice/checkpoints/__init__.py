"""Memory checkpoints that ship with memsplice, one folder per reasoner.

`default_checkpoint_dir()` is the trained memory for SmolLM2-135M-Instruct (safetensors in bf16 plus
memsplice_config.json); `MemoryModel.from_pretrained(default_checkpoint_dir(), reasoner=load_reasoner())` loads it.
A build without the checkpoint raises FileNotFoundError naming what is missing and how to train one.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_NAME = "smollm2-135m-instruct"


def checkpoint_dir(name: str = DEFAULT_NAME, must_exist: bool = True) -> Path:
    """The folder of a shipped checkpoint; raises FileNotFoundError when it holds no trained memory."""
    path = Path(str(resources.files(__package__) / name))
    if must_exist and not (path / "memsplice_config.json").is_file():
        raise FileNotFoundError(
            f"no trained memory is shipped at {path}; train one with `memsplice train --config "
            "configs/formation-smollm2.yaml` and pass its output_dir/memory as --checkpoint"
        )
    return path


def default_checkpoint_dir(must_exist: bool = True) -> Path:
    """The memory trained for the default reasoner, SmolLM2-135M-Instruct."""
    return checkpoint_dir(DEFAULT_NAME, must_exist=must_exist)
