"""`MemoryStore`: the persistent state of a memory service in one SQL database.

It keeps, per scope (a user, an agent): the transcript as spans, the scope's memory state (JSON plus safetensors
bytes of its latents), fallback events, replay samples and queued online-training data; globally: training
metrics and hashed API keys.

Guarantees:
- Every method is one transaction: it happens completely or not at all. A write that returned is committed
  (SQLite: WAL with synchronous=FULL by default; PostgreSQL: its own commit), so it survives a crash.
- `commit_write` stores the spans, the new memory state, fallback events and training data of one memory write
  together: a reader never sees spans without the state they produced.
- `delete_scope` removes the scope's rows from every table in `SCOPED_TABLES` and the scope itself in one
  transaction; foreign keys refuse rows for a scope that does not exist, so a late write cannot resurrect data
  of a deleted scope (it recreates an empty scope with only its own new data).
- API key secrets are never stored, only salted digests (see `keys`).
- Methods are thread-safe (each takes its own pooled connection).
"""

from __future__ import annotations

import base64
import fnmatch
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from . import keys as keylib
from .engine import WRITE_OPTION, describe_url, open_engine
from .schema import (
    SCHEMA_VERSION,
    SCOPED_TABLES,
    api_keys,
    fallback_events,
    meta_table,
    metadata,
    replay_samples,
    scope_states,
    scopes,
    spans,
    training_metrics,
    training_queue,
)

EXPORT_FORMAT = "memsplice.scope"
EXPORT_VERSION = 1


class StoreError(RuntimeError):
    """The database cannot be used as a memsplice store (e.g. written by an incompatible version)."""


class ScopeExistsError(ValueError):
    """An import would overwrite a scope that already holds data."""


def _like(pattern: str) -> str:
    """A shell-style pattern as a SQL LIKE pattern (escape character backslash)."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class MemoryStore:
    def __init__(self, url: str, *, sqlite_synchronous: str = "FULL", pool_size: int = 8, echo: bool = False):
        self.url = url
        self.engine = open_engine(url, sqlite_synchronous=sqlite_synchronous, pool_size=pool_size, echo=echo)
        self.backend = self.engine.dialect.name
        metadata.create_all(self.engine)
        with self._write() as conn:
            row = conn.execute(select(meta_table.c.value).where(meta_table.c.key == "schema_version")).first()
            if row is None:
                conn.execute(insert(meta_table).values(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(
                    f"{describe_url(url)} holds memsplice store schema {row[0]}; this version reads "
                    f"schema {SCHEMA_VERSION}"
                )

    def __repr__(self) -> str:
        return f"MemoryStore({describe_url(self.url)!r})"

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions ------------------------------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def _insert_ignore(self, table):
        dialect = postgresql if self.backend == "postgresql" else sqlite
        return dialect.insert(table)

    def _ensure_scope(self, conn: Connection, scope: str, now: float) -> None:
        keylib.validate_scope(scope)
        stmt = self._insert_ignore(scopes).values(id=scope, created_at=now, updated_at=now, turns=0)
        conn.execute(stmt.on_conflict_do_nothing(index_elements=["id"]))

    def integrity_check(self) -> str:
        """ "ok" when the database file is sound (SQLite's integrity_check; PostgreSQL is checked by the server)."""
        if self.backend != "sqlite":
            with self._read() as conn:
                conn.execute(select(1))
            return "ok"
        with self._read() as conn:
            return str(conn.exec_driver_sql("PRAGMA integrity_check").scalar())

    def ping(self) -> bool:
        """A cheap round trip to the database (for health checks; `integrity_check` reads the whole file)."""
        with self._read() as conn:
            return conn.execute(select(1)).scalar() == 1

    # -- scopes ------------------------------------------------------------------------------------------------
    def list_scopes(
        self, limit: int = 1000, offset: int = 0, patterns: Iterable[str] | None = None
    ) -> list[dict]:
        """Scopes in id order; with `patterns` (shell-style, as API keys hold them) only the scopes matching one."""
        stmt = select(scopes).order_by(scopes.c.id)
        patterns = None if patterns is None else list(patterns)
        if patterns is not None:
            if not patterns:
                return []
            if not any(c in p for p in patterns for c in "[]"):  # LIKE narrows it down; fnmatch decides below
                stmt = stmt.where(or_(*[scopes.c.id.like(_like(p), escape="\\") for p in patterns]))
        out: list[dict] = []
        with self._read() as conn:
            if patterns is None:
                return [dict(r) for r in conn.execute(stmt.limit(limit).offset(offset)).mappings()]
            skipped = 0
            for r in conn.execute(stmt).mappings():
                if not any(fnmatch.fnmatchcase(r["id"], p) for p in patterns):
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                out.append(dict(r))
                if len(out) >= limit:
                    break
        return out

    def get_scope(self, scope: str) -> dict | None:
        with self._read() as conn:
            row = conn.execute(select(scopes).where(scopes.c.id == scope)).mappings().first()
            return dict(row) if row else None

    def row_counts(self, scope: str) -> dict[str, int]:
        """Rows the scope holds in each table (the scope row itself under "scopes")."""
        with self._read() as conn:
            counts = {
                t.name: conn.execute(
                    select(func.count()).select_from(t).where(t.c.scope_id == scope)
                ).scalar()
                for t in SCOPED_TABLES
            }
            counts["scopes"] = conn.execute(
                select(func.count()).select_from(scopes).where(scopes.c.id == scope)
            ).scalar()
        return counts

    def delete_scope(self, scope: str) -> dict[str, int]:
        """Delete every row of `scope` from every table, in one transaction; returns rows deleted per table."""
        with self._write() as conn:
            deleted = {
                t.name: conn.execute(delete(t).where(t.c.scope_id == scope)).rowcount for t in SCOPED_TABLES
            }
            deleted["scopes"] = conn.execute(delete(scopes).where(scopes.c.id == scope)).rowcount
        return deleted

    # -- writes of memory ----------------------------------------------------------------------------------------
    def commit_write(
        self,
        scope: str,
        *,
        new_spans: Iterable[tuple[str, str, int]] = (),
        state: tuple[str, dict, bytes | None] | None = None,
        events: Iterable[dict] = (),
        training: Iterable[dict] = (),
    ) -> dict:
        """Store one memory write of `scope` atomically.

        new_spans: (role, text, tokens) appended to the transcript in order.
        state: (kind, JSON-able state, safetensors bytes or None) replacing the scope's memory state.
        events: fallback events (FallbackEvent.to_dict() form). training: payloads queued for online learning.
        Returns {"seqs": sequence numbers of the new spans, "version": the state's new version or None}.
        """
        now = time.time()
        new_spans, events, training = list(new_spans), list(events), list(training)
        with self._write() as conn:
            self._ensure_scope(conn, scope, now)
            turns = conn.execute(
                select(scopes.c.turns).where(scopes.c.id == scope).with_for_update()
            ).scalar_one()
            seqs = list(range(turns, turns + len(new_spans)))
            if new_spans:
                conn.execute(
                    insert(spans),
                    [
                        {
                            "scope_id": scope,
                            "seq": seq,
                            "role": role,
                            "text": text,
                            "tokens": int(tokens),
                            "created_at": now,
                        }
                        for seq, (role, text, tokens) in zip(seqs, new_spans, strict=True)
                    ],
                )
            conn.execute(
                update(scopes)
                .where(scopes.c.id == scope)
                .values(turns=turns + len(new_spans), updated_at=now)
            )
            version = self._put_state(conn, scope, state, now) if state is not None else None
            self._put_events(conn, scope, events)
            if training:
                conn.execute(
                    insert(training_queue),
                    [{"scope_id": scope, "payload": p, "created_at": now} for p in training],
                )
        return {"seqs": seqs, "version": version}

    def _put_state(
        self, conn: Connection, scope: str, state: tuple[str, dict, bytes | None], now: float
    ) -> int:
        kind, data, tensors = state
        old = conn.execute(select(scope_states.c.version).where(scope_states.c.scope_id == scope)).scalar()
        version = (old or 0) + 1
        values = {"kind": kind, "version": version, "state": data, "tensors": tensors, "updated_at": now}
        if old is None:
            conn.execute(insert(scope_states).values(scope_id=scope, **values))
        else:
            conn.execute(update(scope_states).where(scope_states.c.scope_id == scope).values(**values))
        return version

    def _put_events(self, conn: Connection, scope: str, events: list[dict]) -> None:
        if not events:
            return
        rows = []
        for e in events:
            detail = dict(e.get("detail") or {})
            norm = _finite(e.get("norm"))
            if norm is None and e.get("norm") is not None:
                detail["norm"] = str(e.get("norm"))
            rows.append(
                {
                    "scope_id": scope,
                    "reason": str(e["reason"]),
                    "norm": norm,
                    "bound": _finite(e.get("bound")),
                    "row": int(e.get("row", 0)),
                    "time": float(e.get("time", time.time())),
                    "detail": detail,
                }
            )
        conn.execute(insert(fallback_events), rows)

    def add_events(self, scope: str, events: Iterable[dict]) -> int:
        events = list(events)
        with self._write() as conn:
            self._ensure_scope(conn, scope, time.time())
            self._put_events(conn, scope, events)
        return len(events)

    # -- reads of memory -----------------------------------------------------------------------------------------
    def spans(self, scope: str, limit: int = 1000, offset: int = 0, newest_first: bool = False) -> list[dict]:
        order = spans.c.seq.desc() if newest_first else spans.c.seq
        with self._read() as conn:
            rows = conn.execute(
                select(spans.c.seq, spans.c.role, spans.c.text, spans.c.tokens, spans.c.created_at)
                .where(spans.c.scope_id == scope)
                .order_by(order)
                .limit(limit)
                .offset(offset)
            )
            return [dict(r) for r in rows.mappings()]

    def load_state(self, scope: str) -> dict | None:
        """{"kind", "version", "state", "tensors", "updated_at"} of the scope's memory, or None."""
        with self._read() as conn:
            row = (
                conn.execute(
                    select(
                        scope_states.c.kind,
                        scope_states.c.version,
                        scope_states.c.state,
                        scope_states.c.tensors,
                        scope_states.c.updated_at,
                    ).where(scope_states.c.scope_id == scope)
                )
                .mappings()
                .first()
            )
            return dict(row) if row else None

    def events(self, scope: str, limit: int = 100) -> list[dict]:
        with self._read() as conn:
            rows = conn.execute(
                select(fallback_events)
                .where(fallback_events.c.scope_id == scope)
                .order_by(fallback_events.c.id.desc())
                .limit(limit)
            ).mappings()
            return [{k: v for k, v in r.items() if k != "scope_id"} for r in rows]

    # -- online learning -----------------------------------------------------------------------------------------
    def enqueue_training(self, scope: str, payloads: Iterable[dict]) -> int:
        payloads = list(payloads)
        with self._write() as conn:
            self._ensure_scope(conn, scope, time.time())
            if payloads:
                conn.execute(
                    insert(training_queue),
                    [{"scope_id": scope, "payload": p, "created_at": time.time()} for p in payloads],
                )
        return len(payloads)

    def queued_training(self) -> int:
        with self._read() as conn:
            return conn.execute(select(func.count()).select_from(training_queue)).scalar()

    def take_training(self, limit: int) -> list[dict]:
        """Mark up to `limit` untaken queue items as taken and return them ({"id", "scope_id", "payload"})."""
        with self._write() as conn:
            rows = (
                conn.execute(
                    select(training_queue.c.id, training_queue.c.scope_id, training_queue.c.payload)
                    .where(training_queue.c.taken_at.is_(None))
                    .order_by(training_queue.c.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
                .mappings()
                .all()
            )
            if rows:
                conn.execute(
                    update(training_queue)
                    .where(training_queue.c.id.in_([r["id"] for r in rows]))
                    .values(taken_at=time.time())
                )
            return [dict(r) for r in rows]

    def release_training(self, ids: list[int] | None = None) -> int:
        """Put taken items back in the queue (all of them when `ids` is None, e.g. after a crash)."""
        stmt = update(training_queue).where(training_queue.c.taken_at.is_not(None))
        if ids is not None:
            stmt = stmt.where(training_queue.c.id.in_(ids))
        with self._write() as conn:
            return conn.execute(stmt.values(taken_at=None)).rowcount

    def finish_training(
        self,
        ids: list[int],
        replay: Iterable[tuple[str, dict]] = (),
        replay_capacity: int = 0,
        metrics: dict[str, float] | None = None,
        step: int | None = None,
    ) -> int:
        """After an online update: drop the consumed queue items, keep samples for replay (only for scopes that
        still exist), cap the replay buffer at `replay_capacity` rows (newest kept), and record metrics."""
        now = time.time()
        with self._write() as conn:
            if ids:
                conn.execute(delete(training_queue).where(training_queue.c.id.in_(ids)))
            replay = list(replay)
            if replay:
                alive = set(
                    conn.execute(select(scopes.c.id).where(scopes.c.id.in_({s for s, _ in replay}))).scalars()
                )
                rows = [{"scope_id": s, "payload": p, "created_at": now} for s, p in replay if s in alive]
                if rows:
                    conn.execute(insert(replay_samples), rows)
            newest = (
                select(replay_samples.c.id)
                .order_by(replay_samples.c.id.desc())
                .limit(max(replay_capacity, 0))
            )
            conn.execute(delete(replay_samples).where(replay_samples.c.id.not_in(newest.scalar_subquery())))
            if metrics and step is not None:
                conn.execute(
                    insert(training_metrics),
                    [{"step": step, "name": k, "value": float(v), "time": now} for k, v in metrics.items()],
                )
        return len(ids)

    def replay(self, limit: int, scope: str | None = None) -> list[dict]:
        stmt = select(replay_samples.c.id, replay_samples.c.scope_id, replay_samples.c.payload)
        if scope is not None:
            stmt = stmt.where(replay_samples.c.scope_id == scope)
        with self._read() as conn:
            return [dict(r) for r in conn.execute(stmt.order_by(func.random()).limit(limit)).mappings()]

    def add_metrics(self, step: int, values: dict[str, float]) -> None:
        with self._write() as conn:
            conn.execute(
                insert(training_metrics),
                [
                    {"step": step, "name": k, "value": float(v), "time": time.time()}
                    for k, v in values.items()
                ],
            )

    def metrics(self, limit: int = 2000) -> dict[str, list[dict]]:
        """{name: [{"step", "value", "time"}, ...]} in step order, the newest `limit` points overall."""
        with self._read() as conn:
            rows = conn.execute(
                select(training_metrics).order_by(training_metrics.c.id.desc()).limit(limit)
            ).mappings()
            out: dict[str, list[dict]] = {}
            for r in reversed(rows.all()):
                out.setdefault(r["name"], []).append(
                    {"step": r["step"], "value": r["value"], "time": r["time"]}
                )
        return out

    def last_step(self) -> int:
        with self._read() as conn:
            return int(conn.execute(select(func.max(training_metrics.c.step))).scalar() or 0)

    # -- API keys --------------------------------------------------------------------------------------------------
    def create_key(self, name: str, scopes_allowed: list[str]) -> str:
        """Create a key that may touch `scopes_allowed` (fnmatch patterns); returns the key, shown only now."""
        patterns = keylib.validate_patterns(scopes_allowed)
        full, key_id, secret = keylib.new_key()
        salt = keylib.secrets.token_bytes(16)
        with self._write() as conn:
            conn.execute(
                insert(api_keys).values(
                    key_id=key_id,
                    name=name,
                    salt=salt,
                    digest=keylib.digest_secret(secret, salt),
                    scopes=list(patterns),
                    created_at=time.time(),
                    revoked_at=None,
                )
            )
        return full

    def verify_key(self, key: str) -> keylib.ApiKey | None:
        """The key's record when `key` is a live key, else None."""
        parsed = keylib.parse_key(key)
        if parsed is None:
            return None
        key_id, secret = parsed
        with self._read() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).mappings().first()
        if row is None or row["revoked_at"] is not None:
            return None
        if not keylib.secret_matches(secret, bytes(row["salt"]), bytes(row["digest"])):
            return None
        return keylib.ApiKey(key_id=row["key_id"], name=row["name"], scopes=tuple(row["scopes"]))

    def list_keys(self) -> list[dict]:
        with self._read() as conn:
            rows = conn.execute(
                select(
                    api_keys.c.key_id,
                    api_keys.c.name,
                    api_keys.c.scopes,
                    api_keys.c.created_at,
                    api_keys.c.revoked_at,
                ).order_by(api_keys.c.created_at)
            ).mappings()
            return [dict(r) for r in rows]

    def count_live_keys(self) -> int:
        with self._read() as conn:
            return conn.execute(
                select(func.count()).select_from(api_keys).where(api_keys.c.revoked_at.is_(None))
            ).scalar()

    def revoke_key(self, key_id: str) -> bool:
        with self._write() as conn:
            return (
                conn.execute(
                    update(api_keys)
                    .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                    .values(revoked_at=time.time())
                ).rowcount
                == 1
            )

    # -- export / import -------------------------------------------------------------------------------------------
    def export_scope(self, scope: str) -> dict | None:
        """Everything the store holds for `scope`, as one JSON-able dict (tensors base64), or None."""
        with self._read() as conn:
            head = conn.execute(select(scopes).where(scopes.c.id == scope)).mappings().first()
            if head is None:
                return None
            rows = {
                t.name: [
                    {k: v for k, v in r.items() if k not in ("scope_id", "id")}
                    for r in conn.execute(
                        select(t).where(t.c.scope_id == scope).order_by(*t.primary_key.columns)
                    ).mappings()
                ]
                for t in SCOPED_TABLES
            }
        state = rows.pop("scope_states")
        if state:
            state = state[0]
            if state["tensors"] is not None:
                state["tensors"] = base64.b64encode(bytes(state["tensors"])).decode()
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "scope": scope,
            "exported_at": time.time(),
            "created_at": head["created_at"],
            "turns": head["turns"],
            "state": state or None,
            **rows,
        }

    def import_scope(self, scope: str, data: dict, replace: bool = False) -> dict[str, int]:
        """Load an `export_scope` dict into `scope` (which may differ from the exported one), in one transaction.

        Refuses (ScopeExistsError) a scope that already holds spans or state unless `replace`, which deletes its
        data first. Returns rows written per table.
        """
        _check_export(data)
        now = time.time()
        with self._write() as conn:
            exists = conn.execute(select(scopes.c.id).where(scopes.c.id == scope)).first() is not None
            if exists and not replace:
                raise ScopeExistsError(
                    f"scope {scope!r} already exists; delete it first or import with replace=true"
                )
            for t in SCOPED_TABLES:
                conn.execute(delete(t).where(t.c.scope_id == scope))
            conn.execute(delete(scopes).where(scopes.c.id == scope))
            self._ensure_scope(conn, scope, now)
            sp = data.get("spans") or []
            turns = max([int(s["seq"]) + 1 for s in sp] + [int(data.get("turns") or 0)])
            conn.execute(
                update(scopes)
                .where(scopes.c.id == scope)
                .values(turns=turns, updated_at=now, created_at=float(data.get("created_at", now)))
            )
            if sp:
                conn.execute(
                    insert(spans),
                    [
                        {
                            "scope_id": scope,
                            "seq": int(s["seq"]),
                            "role": str(s["role"]),
                            "text": str(s["text"]),
                            "tokens": int(s["tokens"]),
                            "created_at": float(s.get("created_at", now)),
                        }
                        for s in sp
                    ],
                )
            state = data.get("state")
            if state:
                tensors = base64.b64decode(state["tensors"]) if state.get("tensors") else None
                conn.execute(
                    insert(scope_states).values(
                        scope_id=scope,
                        kind=str(state["kind"]),
                        version=int(state.get("version", 1)),
                        state=state["state"],
                        tensors=tensors,
                        updated_at=now,
                    )
                )
            self._put_events(conn, scope, data.get("fallback_events") or [])
            for name, table in (("replay_samples", replay_samples), ("training_queue", training_queue)):
                items = data.get(name) or []
                if items:
                    conn.execute(
                        insert(table),
                        [
                            {
                                "scope_id": scope,
                                "payload": i["payload"],
                                "created_at": float(i.get("created_at", now)),
                            }
                            for i in items
                        ],
                    )
        return {
            "spans": len(sp),
            "scope_states": int(bool(state)),
            "fallback_events": len(data.get("fallback_events") or []),
            "replay_samples": len(data.get("replay_samples") or []),
            "training_queue": len(data.get("training_queue") or []),
        }


def _check_export(data: Any) -> None:
    """ValueError naming the first thing wrong with an export dict."""
    if not isinstance(data, dict):
        raise ValueError("an import must be a JSON object produced by the export endpoint")
    if data.get("format") != EXPORT_FORMAT:
        raise ValueError(f"format must be {EXPORT_FORMAT!r}, got {data.get('format')!r}")
    if data.get("version") != EXPORT_VERSION:
        raise ValueError(f"version must be {EXPORT_VERSION}, got {data.get('version')!r}")
    for key in ("spans", "fallback_events", "replay_samples", "training_queue"):
        if not isinstance(data.get(key, []), list):
            raise ValueError(f"{key} must be a list")
    for i, s in enumerate(data.get("spans", [])):
        if not isinstance(s, dict) or not {"seq", "role", "text", "tokens"} <= set(s):
            raise ValueError(f"spans[{i}] needs seq, role, text and tokens")
        if (
            not isinstance(s["text"], str)
            or not isinstance(s["seq"], int)
            or not isinstance(s["tokens"], int)
        ):
            raise ValueError(f"spans[{i}] has a field of the wrong type")
    if len({s["seq"] for s in data.get("spans", [])}) != len(data.get("spans", [])):
        raise ValueError("spans have repeated seq numbers")
    for key in ("replay_samples", "training_queue"):
        for i, item in enumerate(data.get(key, [])):
            if not isinstance(item, dict) or "payload" not in item:
                raise ValueError(f"{key}[{i}] needs a payload")
    for i, e in enumerate(data.get("fallback_events", [])):
        if not isinstance(e, dict) or "reason" not in e:
            raise ValueError(f"fallback_events[{i}] needs a reason")
    state = data.get("state")
    if state is not None:
        if not isinstance(state, dict) or not isinstance(state.get("kind"), str) or "state" not in state:
            raise ValueError("state needs kind and state")
        if state.get("tensors") is not None:
            try:
                base64.b64decode(state["tensors"], validate=True)
            except (ValueError, TypeError) as e:
                raise ValueError(f"state.tensors is not base64: {e}") from None
