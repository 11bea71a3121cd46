"""Server fixtures (helpers live in tests/serve/harness.py)."""

from __future__ import annotations

import pytest
from tests.serve.harness import Harness


@pytest.fixture
def harness(tmp_path):
    return Harness(tmp_path)


@pytest.fixture
def client(harness):
    from fastapi.testclient import TestClient

    with TestClient(harness.app) as c:
        c.harness = harness
        yield c
