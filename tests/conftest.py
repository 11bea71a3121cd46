"""Shared fixtures: tiny random reasoners (fast, no downloads) and the real SmolLM2 reasoner (marked real_model)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # makes tests/tiny.py importable from every test folder

from tiny import tiny_reasoner  # noqa: E402

ARCHS = ["llama", "qwen2", "llama_mha"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def reasoner(arch):
    return tiny_reasoner(arch)


@pytest.fixture(scope="session")
def real_reasoner():
    from memsplice import load_reasoner

    return load_reasoner(device="cpu", dtype=torch.float32)
