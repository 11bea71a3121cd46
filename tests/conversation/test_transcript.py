import json

import pytest

from memsplice.conversation.transcript import TOKEN_CAP, TranscriptStore


def fill(store, n, tokens=10):
    spans = []
    for i in range(n):
        store.begin_step()
        spans.append(store.add("user", f"turn {i}", list(range(tokens)), turn=i))
    return spans


def test_lru_eviction_archives_least_recently_used_and_logs():
    store = TranscriptStore(max_live_tokens=50, protect_fraction=0.0)
    spans = fill(store, 5)
    store.mark_used(spans[0].id, 0.5)  # span 0 used at step 5: now more recent than spans 1..4's creation
    store.begin_step()
    store.add("user", "new", list(range(10)), turn=5)
    records = store.evict_over_cap()
    assert [r.span_id for r in records] == [spans[1].id]
    assert store.live_tokens == 50
    assert spans[1].archived and spans[1].archive_reason == TOKEN_CAP
    assert spans[1].id in store.spans  # archived, not deleted
    assert list(store.eviction_log) == records


def test_current_step_is_evicted_last():
    store = TranscriptStore(max_live_tokens=10, protect_fraction=0.0)
    store.begin_step()
    a = store.add("user", "a", [1] * 8, turn=0)
    store.begin_step()
    b = store.add("user", "b", [1] * 8, turn=1)
    store.evict_over_cap()
    assert a.archived and not b.archived


def test_salience_protects_spans_until_nothing_else_is_left():
    store = TranscriptStore(max_live_tokens=40, protect_fraction=0.5)
    spans = fill(store, 4)
    store.mark_used(spans[0].id, 1.0, focus=1.0, used=False)  # salient but not recently used
    store.begin_step()
    store.add("user", "x", list(range(10)), turn=4)
    records = store.evict_over_cap()
    assert [r.span_id for r in records] == [spans[1].id]
    assert not spans[0].archived
    # With a cap that forces eviction of everything older, the protected span goes last and is flagged.
    store.max_live_tokens = 10
    records = store.evict_over_cap()
    assert records[-1].span_id == spans[0].id and records[-1].protected


def test_round_trip_is_plain_json():
    store = TranscriptStore(max_live_tokens=30)
    spans = fill(store, 5)
    store.mark_used(spans[2].id, 0.3, focus=0.5)
    store.evict_over_cap()
    data = json.loads(json.dumps(store.to_dict()))
    again = TranscriptStore.from_dict(data)
    assert again.to_dict() == store.to_dict()
    assert again.live_tokens == store.live_tokens


@pytest.mark.parametrize("bad", [{"max_live_tokens": 0}, {"protect_fraction": 1.5}, {"salience_decay": -0.1}])
def test_bad_settings_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TranscriptStore(**bad)


def test_from_dict_rejects_other_data():
    with pytest.raises(ValueError, match="transcript store"):
        TranscriptStore.from_dict({"format": "something else"})
