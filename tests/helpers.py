"""Small builders shared by tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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


def load_script(relative: str):
    """A script of the repository's `scripts/` folder (e.g. "online/merge_recall.py"), imported as a module."""
    path = Path(__file__).resolve().parents[1] / "scripts" / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def random_ids(batch: int, length: int, vocab: int = 384, low: int = 3) -> torch.Tensor:
    return torch.randint(low, vocab, (batch, length))


def memory_grads(memory, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """Backpropagate a loss that weighs every position of `hidden` differently; the memory's parameter gradients."""
    (hidden.pow(2).mean() + hidden[:, -1].sum()).backward()
    return {n: p.grad.clone() for n, p in memory.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict, rel: float) -> None:
    """Same parameters (the gate among them), each gradient within `rel` of the reference's largest entry."""
    assert got.keys() == want.keys() and "gate.weight" in want
    for name, g in want.items():
        scale = g.abs().max().clamp(min=1e-6)
        assert ((got[name] - g).abs().max() / scale) < rel, name
