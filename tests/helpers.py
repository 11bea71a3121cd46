"""Small builders shared by tests."""

from __future__ import annotations

import torch

from memsplice import MemoryConfig, MemoryModel


def small_memory(reasoner, operator: str = "prepend_kv", **overrides) -> MemoryModel:
    cfg = dict(
        num_slots=4,
        max_memory_tokens=48,
        encoder_layers=2,
        encoder_width=32,
        encoder_heads=2,
        operator=operator,
    )
    cfg.update(overrides)
    return MemoryModel(MemoryConfig(**cfg), reasoner)


def random_ids(batch: int, length: int, vocab: int = 384, low: int = 3) -> torch.Tensor:
    return torch.randint(low, vocab, (batch, length))
