"""Opening a SQL database for `MemoryStore`: SQLite in WAL mode (the embedded default) or PostgreSQL by URL.

SQLite guarantees here: WAL journal (readers never block the writer), `synchronous=FULL` by default (a committed
transaction survives a crash of the process and of the machine), foreign keys enforced, a busy timeout instead of
immediate "database is locked" errors, and write transactions opened with BEGIN IMMEDIATE so two writers queue on
the lock instead of deadlocking on a read-to-write upgrade. PostgreSQL URLs (`postgresql://...`) are driven by
psycopg 3.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

logger = logging.getLogger(__name__)

SQLITE_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
WRITE_OPTION = "memsplice_write"
"""Execution option marking a connection whose transaction writes (BEGIN IMMEDIATE on SQLite)."""


def normalize_url(url: str) -> str:
    """`url` with the psycopg 3 driver for PostgreSQL and a created parent directory for SQLite files."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(
            f"database URL {url!r} is not a URL; use sqlite:///path/to/memsplice.db or "
            "postgresql://user:password@host/dbname"
        )
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    else:
        if backend != "postgresql":
            raise ValueError(
                f"unsupported database {backend!r}: memsplice stores run on sqlite or postgresql"
            )
    return parsed.render_as_string(hide_password=False)


def open_engine(
    url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 8, echo: bool = False
) -> Engine:
    url = normalize_url(url)
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        sync = sqlite_synchronous.upper()
        if sync not in SQLITE_SYNCHRONOUS:
            raise ValueError(
                f"sqlite_synchronous must be one of {SQLITE_SYNCHRONOUS}, got {sqlite_synchronous!r}"
            )
        if make_url(url).database in (None, "", ":memory:"):
            raise ValueError(
                "an in-memory SQLite database cannot be shared between threads; give a file path"
            )
        engine = create_engine(
            url,
            echo=echo,
            pool_size=pool_size,
            max_overflow=pool_size,
            connect_args={"check_same_thread": False, "timeout": 30},
        )
        _configure_sqlite(engine, sync)
        return engine
    return create_engine(url, echo=echo, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def _configure_sqlite(engine: Engine, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # The driver must not open transactions on its own: the "begin" hook below does, with the right mode.
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        mode = cur.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("SQLite refused WAL mode (journal_mode=%s); concurrent readers will block", mode)
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN")


def describe_url(url: str) -> str:
    """The URL without its password, for logs."""
    return make_url(normalize_url(url)).render_as_string(hide_password=True)
