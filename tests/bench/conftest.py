"""Fixtures for benchmark tests."""

import pytest

from formation_helpers import write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "data")
