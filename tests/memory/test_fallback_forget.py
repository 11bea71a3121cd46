"""FallbackLog.forget: a deleted scope's kept events (their detail may hold its inputs) leave the log."""

from __future__ import annotations

from memsplice.memory.safety import NON_FINITE, FallbackEvent, FallbackLog


def test_forget_drops_only_that_scopes_events():
    log = FallbackLog(keep=10)
    for scope in ("alice", "bob", "alice", None):
        log.record(
            FallbackEvent(
                reason=NON_FINITE,
                norm=float("nan"),
                bound=1.0,
                scope=scope,
                row=0,
                detail={"input_ids": [1, 2, 3]},
            )
        )
    assert log.forget("alice") == 2
    assert [e.scope for e in log.recent(10)] == ["bob", None]
    assert log.recent(10, scope="alice") == []
    assert log.counts[NON_FINITE] == 4  # counts hold no content and stay
    assert log.forget("alice") == 0
    log.record(FallbackEvent(reason=NON_FINITE, norm=1.0, bound=1.0, scope="carol", row=0))
    assert len(log.events) == 3  # the log keeps working (and keeps its size bound) afterwards
