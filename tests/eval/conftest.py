"""Fixtures for the evaluation tests: one tiny reasoner per session and the LoCoMo-format fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny import tiny_reasoner

LOCOMO_FIXTURE = Path(__file__).parents[1] / "fixtures" / "locomo_tiny.json"


@pytest.fixture(scope="session")
def eval_reasoner():
    return tiny_reasoner("llama")


@pytest.fixture(scope="session")
def locomo_path() -> Path:
    return LOCOMO_FIXTURE
