import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memsplice.memory import MemoryConfig, MemoryModel  # noqa: E402
from tiny import tiny_reasoner  # noqa: E402


def tiny_memory(arch: str = "llama", attn: str = "sdpa", **overrides) -> MemoryModel:
    reasoner = tiny_reasoner(arch, attn=attn)
    torch.manual_seed(1)
    cfg = dict(num_slots=4, max_memory_tokens=32, encoder_layers=1, encoder_width=32, encoder_heads=2)
    cfg.update(overrides)
    return MemoryModel(MemoryConfig(**cfg), reasoner)


@pytest.fixture
def memory():
    return tiny_memory()
