"""memsplice: long-term memory for a frozen LLM, spliced into its KV cache as a few latent slots.

The public API:
    load_reasoner(source=None)                     -> Reasoner (frozen; default SmolLM2-135M-Instruct)
    MemoryModel(MemoryConfig(...), reasoner)       -> encoder + gate + injection operator
    MemoryModel.from_pretrained(dir, reasoner=...) / .save_pretrained(dir)
    memory.write(ids) / .write_text(texts)         -> Memory (latents, gate, K/V)
    memory(input_ids, memory=mem) / memory.generate(input_ids, memory=mem)
"""

from .inject import MemoryKV, forward_with_memory, generate_with_memory
from .memory import (
    CheckpointError,
    FallbackEvent,
    FallbackLog,
    Memory,
    MemoryConfig,
    MemoryModel,
    ReasonerMismatchError,
)
from .reasoner import Reasoner, ReasonerNotFoundError, load_reasoner

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "FallbackEvent",
    "FallbackLog",
    "Memory",
    "MemoryConfig",
    "MemoryKV",
    "MemoryModel",
    "Reasoner",
    "ReasonerMismatchError",
    "ReasonerNotFoundError",
    "forward_with_memory",
    "generate_with_memory",
    "load_reasoner",
]
