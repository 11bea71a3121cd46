"""Store fixtures: every test runs on SQLite, and on PostgreSQL too when MEMSPLICE_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import os

import pytest

from memsplice.store import MemoryStore
from memsplice.store.schema import metadata

POSTGRES_URL = os.environ.get("MEMSPLICE_TEST_POSTGRES_URL")


def fresh_postgres_store() -> MemoryStore:
    """A store on the test PostgreSQL database with every memsplice table dropped first (tests never share rows)."""
    from sqlalchemy import create_engine

    from memsplice.store.engine import normalize_url

    engine = create_engine(normalize_url(POSTGRES_URL))
    metadata.drop_all(engine)
    engine.dispose()
    return MemoryStore(POSTGRES_URL)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    if not POSTGRES_URL:
        pytest.skip("MEMSPLICE_TEST_POSTGRES_URL is not set (source .ci/postgres to start a server)")
    fresh_postgres_store().close()
    return POSTGRES_URL


@pytest.fixture
def store(store_url):
    s = MemoryStore(store_url)
    yield s
    s.close()
