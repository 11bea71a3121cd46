import json
import random

from online_builders import interactions

from memsplice.online import FallbackQueue, InteractionBuffer, ReplayReservoir, corrupt_spans
from memsplice.online.buffer import Interaction


def test_buffer_drains_a_batch():
    buf = InteractionBuffer(batch_size=3)
    for it in interactions(2):
        buf.append(it)
    assert not buf.full
    buf.append(interactions(1)[0])
    assert buf.full and len(buf.drain()) == 3 and len(buf) == 0


def test_reservoir_is_a_uniform_sample_of_everything_seen():
    counts = [0] * 200
    for seed in range(200):
        r = ReplayReservoir(capacity=20, seed=seed)
        for i in range(200):
            r.add(Interaction(id=i, context=[], query=[1], response=[2]))
        assert len(r) == 20 and r.seen == 200
        for it in r.items:
            counts[it.id] += 1
    # Each item is kept with probability 20/200: 20 expected per item over 200 runs; early and late alike.
    first, last = sum(counts[:100]), sum(counts[100:])
    assert abs(first - last) < 0.15 * (first + last)
    assert max(counts) < 45 and min(counts) > 5


def test_reservoir_round_trip_continues_the_same_sampling():
    r = ReplayReservoir(capacity=5, seed=3)
    for i, it in enumerate(interactions(12)):
        it.id = i
        r.add(it)
    copy = ReplayReservoir.from_dict(json.loads(json.dumps(r.to_dict())))
    assert [it.id for it in r.sample(3)] == [it.id for it in copy.sample(3)]
    assert [it.id for it in r.sample(2, exclude={r.items[0].id})] == [
        it.id for it in copy.sample(2, exclude={copy.items[0].id})
    ]


def test_fallback_queue_takes_inputs_from_events():
    class Event:
        def __init__(self, ids):
            self.detail = {"input_ids": ids} if ids is not None else {}

    q = FallbackQueue(maxlen=2)
    for ids in ([1, 2], None, [3], [4, 5]):
        q(Event(ids))
    assert q.received == 3 and q.pop(5) == [[3], [4, 5]] and len(q) == 0


def test_corrupt_spans_corrupts_about_the_ratio_and_never_empties():
    rng = random.Random(0)
    row = list(range(10, 210))
    for drop in (0.0, 1.0):
        out = corrupt_spans(row, rng, ratio=0.15, mean_span=3.0, drop=drop, mask_id=0)
        kept = [t for t in out if t != 0]
        assert 0.75 * 200 <= len(kept) <= 0.9 * 200
        assert (0 in out) == (drop == 0.0)
        assert kept == [t for t in row if t in set(kept)]  # order kept
    assert corrupt_spans([7], rng, 0.5, 3.0, 1.0, 0) == [0]


def test_forget_drops_one_scope_from_buffer_reservoir_and_fallback_queue():
    class Event:
        def __init__(self, ids, scope):
            self.detail, self.scope = {"input_ids": ids}, scope

    items = interactions(6)
    for i, it in enumerate(items):
        it.id, it.scope = i, "alice" if i % 2 else "bob"
    buf, res, q = InteractionBuffer(batch_size=10), ReplayReservoir(capacity=10), FallbackQueue(maxlen=4)
    for it in items:
        buf.append(it)
        res.add(it)
    for ids, scope in (([1], "alice"), ([2], "bob"), ([3], "alice")):
        q(Event(ids, scope))
    assert (buf.forget("alice"), res.forget("alice"), q.forget("alice")) == (3, 3, 2)
    assert {it.scope for it in buf.items} == {it.scope for it in res.items} == {"bob"}
    assert q.pop(5) == [[2]] and res.seen == 6
    assert buf.forget("carol") == res.forget("carol") == q.forget("carol") == 0


def test_fallback_queue_round_trip_keeps_scopes():
    class Event:
        def __init__(self, ids, scope):
            self.detail, self.scope = {"input_ids": ids}, scope

    q = FallbackQueue(maxlen=4)
    q(Event([1, 2], "alice"))
    q(Event([3], None))
    copy = FallbackQueue.from_dict(json.loads(json.dumps(q.to_dict())))
    assert list(copy.scopes) == ["alice", None] and copy.received == 2
    assert copy.forget("alice") == 1 and copy.pop(5) == [[3]]
    old = {"maxlen": 4, "received": 1, "items": [[7]]}  # saved before scopes were kept
    assert FallbackQueue.from_dict(old).pop(1) == [[7]]
