"""Persistent state of the memory service: scopes, transcripts, memory states, events, training data, API keys.

SQLAlchemy over SQLite (WAL, the embedded default) or PostgreSQL (by URL). See `memory_store` for the guarantees.
"""

from .keys import ApiKey, validate_scope
from .memory_store import EXPORT_FORMAT, MemoryStore, ScopeExistsError, StoreError
from .schema import SCOPED_TABLES

__all__ = [
    "EXPORT_FORMAT",
    "SCOPED_TABLES",
    "ApiKey",
    "MemoryStore",
    "ScopeExistsError",
    "StoreError",
    "validate_scope",
]
