"""The SQL tables behind `MemoryStore`, one per kind of thing a memory service keeps.

Every table that holds data of a memory scope has a `scope_id` column with a foreign key to `scopes` (ON DELETE
CASCADE), so a row of a scope that no longer exists cannot be inserted, and `SCOPED_TABLES` lists them all:
deleting a scope deletes from each of them explicitly, in one transaction, and the deletion tests look in each.
Times are float seconds since the epoch (portable across SQLite and PostgreSQL). Payloads that differ between
memory implementations are JSON; tensors are safetensors bytes.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

SCHEMA_VERSION = 1
MAX_SCOPE_LENGTH = 128

metadata = MetaData()


def _scope_fk(primary_key: bool = False) -> Column:
    return Column(
        "scope_id",
        String(MAX_SCOPE_LENGTH),
        ForeignKey("scopes.id", ondelete="CASCADE"),
        nullable=False,
        primary_key=primary_key,
    )


meta_table = Table(
    "memsplice_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

scopes = Table(
    "scopes",
    metadata,
    Column("id", String(MAX_SCOPE_LENGTH), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column(
        "turns",
        Integer,
        nullable=False,
        default=0,
        comment="Spans ever added (the next span's sequence number).",
    ),
)

spans = Table(
    "spans",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _scope_fk(),
    Column("seq", Integer, nullable=False),
    Column("role", String(32), nullable=False),
    Column("text", Text, nullable=False),
    Column("tokens", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("scope_id", "seq", name="uq_spans_scope_seq"),
)

scope_states = Table(
    "scope_states",
    metadata,
    _scope_fk(primary_key=True),
    Column(
        "kind",
        String(64),
        nullable=False,
        comment='Which memory implementation wrote `state` (e.g. "conversation", "recent_window").',
    ),
    Column(
        "version",
        Integer,
        nullable=False,
        comment="Bumped by every write; lets a reader tell two states of one scope apart.",
    ),
    Column("state", JSON, nullable=False),
    Column(
        "tensors",
        LargeBinary,
        nullable=True,
        comment="safetensors bytes (latents and anything else tensor-shaped), or NULL.",
    ),
    Column("updated_at", Float, nullable=False),
)

fallback_events = Table(
    "fallback_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _scope_fk(),
    Column("reason", String(32), nullable=False),
    Column("norm", Float, nullable=True),
    Column("bound", Float, nullable=True),
    Column("row", Integer, nullable=False),
    Column("time", Float, nullable=False),
    Column("detail", JSON, nullable=False),
)

replay_samples = Table(
    "replay_samples",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _scope_fk(),
    Column("payload", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
)

training_queue = Table(
    "training_queue",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    _scope_fk(),
    Column("payload", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
    Column(
        "taken_at",
        Float,
        nullable=True,
        comment="Set while an online update works on the item; cleared again if the update fails.",
    ),
)

training_metrics = Table(
    "training_metrics",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("step", Integer, nullable=False),
    Column("name", String(64), nullable=False),
    Column("value", Float, nullable=False),
    Column("time", Float, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column(
        "key_id",
        String(32),
        primary_key=True,
        comment="The public part of a key (`msk_<key_id>_<secret>`), used to find its row.",
    ),
    Column("name", String(128), nullable=False),
    Column("salt", LargeBinary, nullable=False),
    Column(
        "digest",
        LargeBinary,
        nullable=False,
        comment="sha256(salt || secret); the secret itself is never stored.",
    ),
    Column("scopes", JSON, nullable=False, comment="Scope patterns (fnmatch) this key may touch."),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float, nullable=True),
)

Index("ix_spans_scope_seq", spans.c.scope_id, spans.c.seq)
Index("ix_fallback_events_scope", fallback_events.c.scope_id, fallback_events.c.id)
Index("ix_replay_samples_scope", replay_samples.c.scope_id)
Index("ix_training_queue_taken", training_queue.c.taken_at, training_queue.c.id)
Index("ix_training_queue_scope", training_queue.c.scope_id)

SCOPED_TABLES = (spans, scope_states, fallback_events, replay_samples, training_queue)
"""Every table holding data of one scope; `scopes` itself is deleted last."""
