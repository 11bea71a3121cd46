"""The memory: config, zero-pretrained encoder, safety fallback, and the model that binds them to a reasoner."""

from .config import MemoryConfig
from .encoder import CausalPoolEncoder, MemoryEncoder, build_encoder
from .model import CheckpointError, Memory, MemoryModel, ReasonerMismatchError, pad_rows
from .safety import FallbackEvent, FallbackLog, check_latents

__all__ = [
    "CausalPoolEncoder",
    "CheckpointError",
    "FallbackEvent",
    "FallbackLog",
    "Memory",
    "MemoryConfig",
    "MemoryEncoder",
    "MemoryModel",
    "build_encoder",
    "ReasonerMismatchError",
    "check_latents",
    "pad_rows",
]
