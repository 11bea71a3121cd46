"""MemoryStore on SQLite and PostgreSQL: atomic writes, deletion from every table, keys, export/import, queue."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from memsplice.store import SCOPED_TABLES, MemoryStore, ScopeExistsError, StoreError
from memsplice.store.engine import normalize_url
from memsplice.store.schema import api_keys, meta_table, scopes, spans, training_metrics

EVENT = {
    "reason": "non_finite",
    "norm": "nan",
    "bound": 1000.0,
    "row": 0,
    "time": 1.0,
    "detail": {"input_ids": [5, 6]},
}


def fill(store: MemoryStore, *scopes_: str, n: int = 2) -> None:
    """Give each scope rows in every table: spans, state, an event, a replay sample and a queued sample."""
    for scope in scopes_:
        store.commit_write(
            scope,
            new_spans=[("user", f"{scope} fact {i}", 4) for i in range(n)],
            state=("recent_window", {"turns": n}, b"\x00\x01"),
            events=[EVENT],
            training=[{"role": "user", "text": f"{scope} sample"}],
        )
    taken = store.take_training(100)
    store.finish_training([t["id"] for t in taken], [(t["scope_id"], t["payload"]) for t in taken], 100)
    for scope in scopes_:
        store.enqueue_training(scope, [{"role": "user", "text": f"{scope} queued"}])


def direct_counts(store: MemoryStore, scope: str) -> dict[str, int]:
    """Rows of `scope` in every table, counted with plain SQL (not through the store's own helpers)."""
    with store.engine.connect() as conn:
        counts = {
            t.name: conn.execute(select(func.count()).select_from(t).where(t.c.scope_id == scope)).scalar()
            for t in SCOPED_TABLES
        }
        counts["scopes"] = conn.execute(
            select(func.count()).select_from(scopes).where(scopes.c.id == scope)
        ).scalar()
    return counts


def test_commit_write_is_ordered_and_versioned(store):
    a = store.commit_write(
        "alice", new_spans=[("user", "one", 3), ("assistant", "two", 4)], state=("k", {"v": 1}, b"t1")
    )
    b = store.commit_write("alice", new_spans=[("user", "three", 5)], state=("k", {"v": 2}, None))
    assert a == {"seqs": [0, 1], "version": 1}
    assert b == {"seqs": [2], "version": 2}
    assert [s["text"] for s in store.spans("alice")] == ["one", "two", "three"]
    assert [s["seq"] for s in store.spans("alice", newest_first=True)] == [2, 1, 0]
    state = store.load_state("alice")
    assert state["state"] == {"v": 2} and state["tensors"] is None and state["version"] == 2
    assert store.get_scope("alice")["turns"] == 3
    assert store.load_state("nobody") is None and store.get_scope("nobody") is None


def test_non_finite_event_norm_is_kept_in_detail(store):
    store.add_events("alice", [EVENT, {**EVENT, "norm": 5.0, "reason": "norm_exceeded"}])
    events = store.events("alice")
    assert [e["reason"] for e in events] == ["norm_exceeded", "non_finite"]
    assert events[1]["norm"] is None and events[1]["detail"] == {"input_ids": [5, 6], "norm": "nan"}
    assert events[0]["norm"] == 5.0


def test_delete_scope_removes_rows_from_every_table(store):
    fill(store, "alice", "bob")
    before = direct_counts(store, "alice")
    assert all(before[t] > 0 for t in before), before  # every table holds something of alice's
    deleted = store.delete_scope("alice")
    assert deleted == before
    assert all(v == 0 for v in direct_counts(store, "alice").values())
    assert direct_counts(store, "bob") == before  # bob untouched
    assert store.export_scope("alice") is None
    assert store.delete_scope("alice")["scopes"] == 0  # deleting twice is harmless


def test_rows_of_a_missing_scope_are_refused(store):
    with pytest.raises(IntegrityError), store.engine.begin() as conn:
        conn.execute(
            insert(spans).values(scope_id="ghost", seq=0, role="user", text="x", tokens=1, created_at=0.0)
        )
    # an online update that finishes after its scope was deleted keeps no replay sample of it
    fill(store, "alice")
    store.enqueue_training("alice", [{"text": "late"}])
    taken = store.take_training(100)
    store.delete_scope("alice")
    store.finish_training([t["id"] for t in taken], [(t["scope_id"], t["payload"]) for t in taken], 100)
    assert all(v == 0 for v in direct_counts(store, "alice").values())


def test_invalid_scope_ids_are_refused(store):
    for bad in ("", "a/b", "-lead", "x" * 129, "sp ace"):
        with pytest.raises(ValueError, match="invalid scope"):
            store.commit_write(bad, new_spans=[("user", "x", 1)])
    assert store.list_scopes() == []


def test_api_keys_are_stored_hashed_and_checked(store):
    key = store.create_key("app", ["alice", "team:*"])
    info = store.verify_key(key)
    assert info.scopes == ("alice", "team:*") and info.name == "app"
    assert info.may_touch("alice") and info.may_touch("team:x") and not info.may_touch("alice2")
    assert store.verify_key(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.verify_key("msk_nothing") is None and store.verify_key("") is None
    secret = key[len("msk_") + 13 :]
    with store.engine.connect() as conn:
        for row in conn.execute(select(api_keys)).mappings():
            for value in row.values():
                assert secret not in str(value) and secret.encode() not in bytes(str(value), "utf8")
                if isinstance(value, bytes | memoryview):
                    assert secret.encode() not in bytes(value)
    assert store.revoke_key(info.key_id) and not store.revoke_key(info.key_id)
    assert store.verify_key(key) is None
    assert store.count_live_keys() == 0
    with pytest.raises(ValueError, match="at least one scope"):
        store.create_key("empty", [])


def test_export_import_round_trip(store):
    fill(store, "alice", n=3)
    data = store.export_scope("alice")
    assert store.import_scope("alice-copy", data) == {
        "spans": 3,
        "scope_states": 1,
        "fallback_events": 1,
        "replay_samples": 1,
        "training_queue": 1,
    }
    copy = store.export_scope("alice-copy")
    for k in ("spans", "fallback_events", "turns", "created_at"):
        assert copy[k] == data[k], k
    assert {**copy["state"], "updated_at": None} == {**data["state"], "updated_at": None}
    assert [r["payload"] for r in copy["replay_samples"]] == [r["payload"] for r in data["replay_samples"]]
    with pytest.raises(ScopeExistsError):
        store.import_scope("alice-copy", data)
    store.commit_write("alice-copy", new_spans=[("user", "extra", 1)])
    store.import_scope("alice-copy", data, replace=True)
    assert [s["text"] for s in store.spans("alice-copy")] == [s["text"] for s in data["spans"]]
    assert store.get_scope("alice-copy")["turns"] == 3  # the next write continues at seq 3
    assert store.commit_write("alice-copy", new_spans=[("user", "next", 1)])["seqs"] == [3]


@pytest.mark.parametrize(
    "broken,match",
    [
        ({"format": "other"}, "format"),
        ({"spans": [{"seq": 0, "role": "user"}]}, "spans\\[0\\]"),
        ({"spans": [{"seq": "0", "role": "user", "text": "x", "tokens": 1}]}, "wrong type"),
        ({"spans": "nope"}, "must be a list"),
        ({"state": {"kind": "k", "state": {}, "tensors": "%%%"}}, "base64"),
    ],
)
def test_invalid_imports_write_nothing(store, broken, match):
    fill(store, "alice")
    data = {**store.export_scope("alice"), **broken}
    with pytest.raises(ValueError, match=match):
        store.import_scope("target", data)
    assert all(v == 0 for v in direct_counts(store, "target").values())


def test_training_queue_take_release_finish(store):
    store.commit_write("alice", new_spans=[("user", "x", 1)], training=[{"i": i} for i in range(5)])
    first = store.take_training(3)
    assert [t["payload"]["i"] for t in first] == [0, 1, 2]
    second = store.take_training(10)
    assert [t["payload"]["i"] for t in second] == [3, 4]  # taken items are not handed out twice
    assert store.take_training(10) == []
    assert store.release_training([t["id"] for t in second]) == 2
    assert [t["payload"]["i"] for t in store.take_training(10)] == [3, 4]
    assert store.release_training() == 5  # a restart puts everything taken back
    items = store.take_training(10)
    store.finish_training(
        [t["id"] for t in items],
        [(t["scope_id"], t["payload"]) for t in items],
        replay_capacity=3,
        metrics={"loss": 2.5},
        step=1,
    )
    assert store.queued_training() == 0
    replay = store.replay(10)
    assert sorted(r["payload"]["i"] for r in replay) == [2, 3, 4]  # capped, newest kept
    assert store.metrics() == {
        "loss": [{"step": 1, "value": 2.5, "time": pytest.approx(store.metrics()["loss"][0]["time"])}]
    }
    assert store.last_step() == 1


def test_concurrent_writers_lose_nothing(store):
    errors = []

    def writer(w: int):
        try:
            for i in range(15):
                store.commit_write(f"s{w}", new_spans=[("user", f"{w}-{i}", 1)], state=("k", {"i": i}, None))
                store.commit_write("shared", new_spans=[("user", f"{w}-{i}", 1)])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for w in range(6):
        assert [s["text"] for s in store.spans(f"s{w}")] == [f"{w}-{i}" for i in range(15)]
        assert store.load_state(f"s{w}")["version"] == 15
    shared = store.spans("shared", limit=1000)
    assert [s["seq"] for s in shared] == list(range(90))
    assert sorted(s["text"] for s in shared) == sorted(f"{w}-{i}" for w in range(6) for i in range(15))


def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path):
    store = MemoryStore(f"sqlite:///{tmp_path / 'x.db'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert store.integrity_check() == "ok"
    store.close()


def test_reopen_resumes_and_refuses_other_schema(store_url):
    store = MemoryStore(store_url)
    fill(store, "alice")
    store.close()
    again = MemoryStore(store_url)
    assert [s["text"] for s in again.spans("alice")] == ["alice fact 0", "alice fact 1"]
    with again.engine.begin() as conn:
        conn.execute(meta_table.update().where(meta_table.c.key == "schema_version").values(value="999"))
    again.close()
    with pytest.raises(StoreError, match="schema 999"):
        MemoryStore(store_url)


def test_urls():
    assert normalize_url("postgresql://u:p@h/db").startswith("postgresql+psycopg://")
    with pytest.raises(ValueError, match="not a URL"):
        normalize_url("memsplice.db")
    with pytest.raises(ValueError, match="unsupported database"):
        normalize_url("mysql://u@h/db")
    with pytest.raises(ValueError, match="in-memory"):
        MemoryStore("sqlite://")


def test_metrics_are_global(store):
    store.add_metrics(1, {"loss": 3.0, "ewc": 0.1})
    store.add_metrics(2, {"loss": 2.0})
    m = store.metrics()
    assert [p["value"] for p in m["loss"]] == [3.0, 2.0] and [p["step"] for p in m["ewc"]] == [1]
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(training_metrics)).scalar() == 3


def test_list_scopes_by_key_patterns(store):
    for scope in ("alice", "alice:work", "Alice", "bob", "team-a:x", "team-a:y", "team-b:z"):
        store.commit_write(scope, new_spans=[("user", "x", 1)])
    ids = lambda **kw: [s["id"] for s in store.list_scopes(**kw)]  # noqa: E731
    assert ids() == sorted(["alice", "alice:work", "Alice", "bob", "team-a:x", "team-a:y", "team-b:z"])
    assert ids(patterns=["alice"]) == ["alice"]  # case-sensitive, exact
    assert ids(patterns=["alice", "alice:*"]) == ["alice", "alice:work"]
    assert ids(patterns=["team-?:*"]) == ["team-a:x", "team-a:y", "team-b:z"]
    assert ids(patterns=["team-[ab]:x"]) == ["team-a:x"]
    assert ids(patterns=["*"], limit=2, offset=1) == sorted(["alice", "alice:work", "Alice", "bob"])[1:3]
    assert ids(patterns=["team-*"], limit=1, offset=1) == ["team-a:y"]
    assert ids(patterns=[]) == []
