"""Builders for conversation-memory tests."""

import torch

from helpers import small_memory
from memsplice.memory import MemoryModel
from tiny import tiny_reasoner


def tiny_memory(arch: str = "llama", attn: str = "sdpa", **overrides) -> MemoryModel:
    """A small memory on a tiny reasoner: 4 slots, chunks of at most 32 tokens."""
    torch.manual_seed(1)
    return small_memory(
        tiny_reasoner(arch, attn=attn), **{"max_memory_tokens": 32, "encoder_layers": 1, **overrides}
    )
