import json
import random

import pytest
import torch
from conversation_builders import tiny_memory

from memsplice.conversation import ConversationConfig, ConversationMemory
from memsplice.conversation.chunks import chunk_input, pack_turns, turn_chunks
from memsplice.conversation.hierarchy import compose
from memsplice.inject import concat_slots, forward_with_memory, generate_with_memory
from memsplice.inject.compose import shift_keys

VOCABULARY = "Ada lives in Lisbon and works as a carpenter the quick brown fox jumps over lazy dog 1234"
WORDS = VOCABULARY.split()


def sentence(rng, n=None):
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(2, 9)))


def count_encoder_tokens(memory):
    seen = []
    handle = memory.encoder.register_forward_pre_hook(lambda m, args: seen.append(int(args[1].sum())))
    return seen, handle


def check_invariants(conv):
    cfg = conv.config
    assert conv.num_slots <= cfg.slot_budget
    assert conv.store.live_tokens <= cfg.max_live_tokens
    homes = {}
    for chunk in conv._all_chunks():
        assert chunk.tokens <= conv.chunk_tokens
        assert chunk.tokens == sum(conv.store[s].num_tokens for s in chunk.span_ids)
        assert not chunk.dirty
        for s in chunk.span_ids:
            assert s not in homes, f"span {s} in two chunks"
            homes[s] = chunk.id
    live = {s.id for s in conv.store.live()}
    assert set(homes) == live
    assert len(conv.store.archived()) == len(conv.store.eviction_log)
    kv = conv.memory_kv()
    if kv is not None:
        assert kv.batch_size == 1 and kv.num_slots == conv.num_slots == len(conv.slot_sources())


def test_empty_memory_is_none(memory):
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=16))
    assert conv.memory_kv() is None
    assert conv.stats()["slots"] == 0


def test_add_turn_writes_incrementally_and_reports_cost(memory):
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=64))
    seen, handle = count_encoder_tokens(memory)
    rng = random.Random(0)
    try:
        for i in range(40):
            before = len(seen)
            stats = conv.add_turn("user" if i % 2 == 0 else "assistant", sentence(rng))
            assert stats.seconds > 0 and stats.tokens > 0 and stats.slots == conv.num_slots
            # One encoder call over the open chunk only: never the whole history.
            assert len(seen) - before == stats.encoder_calls == 1
            assert seen[-1] == stats.encoded_tokens <= conv.chunk_tokens
            check_invariants(conv)
    finally:
        handle.remove()
    assert conv.stats()["chunks"] > 3


def test_long_stream_keeps_budget_and_cap():
    memory = tiny_memory()
    conv = ConversationMemory(
        memory,
        ConversationConfig(slot_budget=24, max_live_tokens=400, keep_full_chunks=1, min_slots_per_chunk=1),
    )
    rng = random.Random(1)
    merges = 0
    for _i in range(150):
        stats = conv.add_turn("user", sentence(rng, rng.randint(1, 30)))
        merges += stats.merges
        check_invariants(conv)
    s = conv.stats()
    assert merges > 0 and s["spans_archived"] > 0
    assert max(int(level) for level in s["node_levels"]) >= 1
    # Older chunks hold fewer slots than newer ones (the hierarchy compresses with age).
    quotas = [c.quota for c in conv._all_chunks()]
    assert quotas[0] <= quotas[-1] and min(quotas) < memory.config.num_slots


def test_no_slot_budget_keeps_every_chunk_and_reads_nothing_without_a_question():
    memory = tiny_memory()
    budget = 3 * memory.config.num_slots
    rng = random.Random(2)
    turns = [("user", sentence(rng, rng.randint(5, 20))) for _ in range(60)]
    bounded = ConversationMemory(memory, ConversationConfig(slot_budget=budget, keep_full_chunks=0))
    unbounded = ConversationMemory(memory, ConversationConfig(slot_budget=None, max_live_tokens=10_000))
    for role, text in turns:
        bounded.add_turn(role, text)
        stats = unbounded.add_turn(role, text)
        assert stats.merges == 0
    assert bounded.stats()["spans_archived"] > 0 and bounded.num_slots <= budget
    assert unbounded.stats()["spans_archived"] == 0 and not unbounded.store.archived()
    assert all(c.quota == memory.config.num_slots for c in unbounded._all_chunks())
    assert unbounded.read(None) is None and unbounded.read("") is None  # nothing to pick by
    assert unbounded.memory_kv().num_slots == unbounded.num_slots > budget  # asked for, the whole memory
    again = ConversationMemory.from_dict(json.loads(json.dumps(unbounded.to_dict())), memory)
    assert again.config.slot_budget is None and again.num_slots == unbounded.num_slots
    for bad in (0, -1, "256"):
        with pytest.raises(ValueError, match="slot_budget"):
            ConversationConfig(slot_budget=bad)


def test_long_turn_is_split_into_spans(memory):
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=64))
    stats = conv.add_turn("user", " ".join(WORDS * 6))
    assert stats.spans > 1
    assert len(conv.transcript()) == 1
    check_invariants(conv)


def test_pack_turns_builds_the_chunks_a_conversation_builds(memory):
    rng = random.Random(3)
    turns = [
        (rng.choice(["user", "assistant"]), " ".join(rng.sample(WORDS * 8, rng.randint(1, 40))))
        for _ in range(30)
    ]
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=4096))
    ids = []
    for role, text in turns:
        rendered = conv.config.turn_template.format(role=role, text=text)
        ids.append(conv.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        conv.add_turn(role, text)
    assert [chunk_input(c, conv.store) for c in conv._all_chunks()] == pack_turns(ids, conv.chunk_tokens)
    assert max(len(i) for i in ids) > conv.chunk_tokens  # a turn longer than a chunk was cut
    # turn_chunks says which chunks hold each turn: the chunks the conversation put its spans in
    owners = turn_chunks(ids, conv.chunk_tokens)
    order = [c.id for c in conv._all_chunks()]
    for turn, chunks in enumerate(owners):
        spans = [s.id for s in conv.store.spans.values() if s.turn == turn]
        held = sorted({order.index(conv._chunk_of(s).id) for s in spans})
        assert chunks == held


def test_address_splices_the_chunks_the_head_scores_best(memory):
    rng = random.Random(4)
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=4096))
    for _ in range(12):
        conv.add_turn("user", sentence(rng, 12))
    with pytest.raises(ValueError, match="no address head"):
        conv.address("Where does Ada live?")
    memory.add_address_head(8)
    chunks = conv._all_chunks()
    assert len(chunks) >= 3
    m = memory.config.num_slots
    kv = conv.address("Where does Ada live?", top_chunks=2)
    assert kv.num_slots == 2 * m
    # the two picked are the two best by the head's own scores, composed oldest first at full resolution
    with torch.no_grad():
        q = memory.encode(
            torch.tensor(
                [conv.tokenizer("user: Where does Ada live?\n", add_special_tokens=False)["input_ids"]]
            )
        )
        keys = memory.address.keys(torch.stack([c.latents for c in chunks]))
        scores = memory.address.score(memory.address.queries(q), keys)[0]
    best = sorted(torch.topk(scores, 2).indices.tolist())
    want = compose([chunks[i] for i in best], memory.reasoner, full_resolution=True)[0]
    for got, ref in zip(kv.keys + kv.values, want.keys + want.values, strict=True):
        assert torch.equal(got, ref)
    assert conv.address("Where does Ada live?", top_chunks=100).num_slots == len(chunks) * m
    with pytest.raises(ValueError, match="non-empty"):
        conv.address("  ")


def test_address_gives_a_near_tie_to_the_later_chunk_by_the_configured_margin(memory):
    rng = random.Random(5)
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=4096))
    for _ in range(12):
        conv.add_turn("user", sentence(rng, 12))
    memory.add_address_head(8)
    chunks = conv._all_chunks()
    question = "Where does Ada live?"
    with torch.no_grad():
        q = memory.encode(
            torch.tensor([conv.tokenizer(f"user: {question}\n", add_special_tokens=False)["input_ids"]])
        )
        keys = memory.address.keys(torch.stack([c.latents for c in chunks]))
        scores = memory.address.score(memory.address.queries(q), keys)[0]
    order = torch.argsort(scores, descending=True).tolist()
    assert conv.address(question).num_slots == memory.config.num_slots

    def picked() -> list[int]:
        kv = conv.address(question)
        for i, chunk in enumerate(chunks):
            ref = compose([chunk], memory.reasoner, full_resolution=True)[0]
            if all(torch.equal(a, b) for a, b in zip(kv.keys, ref.keys, strict=True)):
                return [i]
        return []

    assert picked() == [order[0]]
    # a margin that makes every chunk a tie: the latest chunk is read
    memory.config.address_recency_margin = float(scores.max() - scores.min()) + 1.0
    assert picked() == [len(chunks) - 1]
    # a margin just short of the runner-up: the best again
    memory.config.address_recency_margin = float(scores[order[0]] - scores[order[1]]) / 2
    assert picked() == [order[0]]
    memory.config.address_recency_margin = 0.0


def test_address_reuses_chunk_keys_until_memory_or_weights_change(memory, monkeypatch):
    rng = random.Random(6)
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=4096))
    for _ in range(12):
        conv.add_turn("user", sentence(rng, 12))
    memory.add_address_head(8)
    head = memory.address
    calls = []
    keys = head.keys
    monkeypatch.setattr(head, "keys", lambda latents: calls.append(latents.shape[0]) or keys(latents))

    def picked(question):
        kv = conv.address(question, top_chunks=1)
        return kv.keys[0].clone()

    first = picked("Where does Ada live?")
    assert calls == [len(conv._all_chunks())]
    assert torch.equal(picked("Where does Ada live?"), first) and len(calls) == 1  # same chunks: keys reused
    picked("What does Bram do?")
    assert len(calls) == 1
    conv.add_turn("user", sentence(rng, 12))  # the open chunk is re-encoded: keys again
    picked("Where does Ada live?")
    assert len(calls) == 2
    with torch.no_grad():
        head.key_proj.weight.mul_(
            -1.0
        )  # a weight changed in place: keys again, and they are the new weights'
    picked("Where does Ada live?")
    assert len(calls) == 3
    live = [c for c in conv._all_chunks() if c.live]
    assert torch.equal(conv._keys_cache[2], keys(torch.stack([c.latents for c in live])))


def test_read_follows_the_configured_policy(memory):
    rng = random.Random(5)
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=4096, select_chunks=1))
    for _ in range(12):
        conv.add_turn("user", sentence(rng, 12))
    m = memory.config.num_slots
    assert conv.read("Where does Ada live?").num_slots == conv.memory_kv().num_slots  # no head: every chunk
    memory.add_address_head(8)
    assert conv.read("Where does Ada live?").num_slots == m
    # a memory with a head (its scale is a 0-d tensor) still signs and restores its conversations
    restored = ConversationMemory.from_dict(json.loads(json.dumps(conv.to_dict())), memory)
    assert restored.read("Where does Ada live?").num_slots == m
    assert conv.read(None).num_slots == conv.memory_kv().num_slots  # no question: every chunk
    conv.config.select_chunks = None
    assert conv.read("Where does Ada live?").num_slots == conv.memory_kv().num_slots
    with pytest.raises(ValueError, match="select_chunks"):
        ConversationConfig(select_chunks=0)


def test_conversation_chunks_at_the_size_the_memory_was_trained_for(memory):
    memory.config.chunk_tokens = 16
    try:
        assert ConversationMemory(memory, ConversationConfig(slot_budget=64)).chunk_tokens == 16
        assert (
            ConversationMemory(memory, ConversationConfig(slot_budget=64, chunk_tokens=24)).chunk_tokens == 24
        )
    finally:
        memory.config.chunk_tokens = None


def test_compose_equals_concat_slots_at_full_resolution(memory):
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=64))
    rng = random.Random(2)
    while len(conv._all_chunks()) < 3:
        conv.add_turn("user", sentence(rng))
    chunks = conv._all_chunks()
    assert all(c.quota == memory.config.num_slots for c in chunks)
    ours = conv.memory_kv()
    theirs = concat_slots([c.kv for c in chunks], memory.reasoner)
    for a, b in zip(ours.keys + ours.values, theirs.keys + theirs.values, strict=False):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours.gate_bias, theirs.gate_bias)


def test_compressed_slots_keep_their_distance_to_the_text(memory):
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=64))
    conv.add_turn("user", "Ada lives in Lisbon")
    chunk = conv._all_chunks()[0]
    m = memory.config.num_slots
    chunk.quota = 2
    kv, layout = compose([chunk], memory.reasoner)
    assert [c for c, _ in layout] == [chunk.id] * 2
    # A query at the text's first position (S) scores a kept slot exactly as a query at position M scored it alone.
    d = kv.keys[0].shape[-1]
    q = torch.randn(1, 1, 1, d)
    q_at_s = shift_keys(q, kv.num_slots, memory.reasoner)
    q_at_m = shift_keys(q, m, memory.reasoner)
    for pos, (_, j) in enumerate(layout):
        s_new = (q_at_s * kv.keys[1][:, :1, pos : pos + 1]).sum()
        s_old = (q_at_m * chunk.kv.keys[1][:, :1, j : j + 1]).sum()
        torch.testing.assert_close(s_new, s_old, atol=1e-4, rtol=1e-4)


def test_memory_reads_into_the_reasoner(memory):
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=16))
    conv.add_turn("user", "Ada lives in Lisbon")
    tok = memory.reasoner.tokenizer
    ids = torch.tensor([tok("Where does Ada live?")["input_ids"]])
    kv = conv.memory_kv()
    bare = forward_with_memory(memory.reasoner, ids).logits
    with_memory = forward_with_memory(memory.reasoner, ids, memory=kv).logits
    assert torch.isfinite(with_memory).all() and not torch.allclose(bare, with_memory)
    out = generate_with_memory(
        memory.reasoner, ids, memory=kv, max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert out.shape == (1, ids.shape[1] + 3)


def test_round_trip_restores_the_same_memory_without_encoding():
    memory = tiny_memory()
    conv = ConversationMemory(
        memory, ConversationConfig(slot_budget=24, max_live_tokens=200, keep_full_chunks=1)
    )
    rng = random.Random(3)
    for _ in range(30):
        conv.add_turn("user", sentence(rng))
    conv.record_attention(torch.rand(conv.num_slots), focus=0.5)
    state = json.loads(json.dumps(conv.to_dict()))
    seen, handle = count_encoder_tokens(memory)
    try:
        again = ConversationMemory.from_dict(state, memory)
    finally:
        handle.remove()
    assert seen == []
    a, b = conv.memory_kv(), again.memory_kv()
    for x, y in zip(a.keys + a.values, b.keys + b.values, strict=False):
        torch.testing.assert_close(x, y)
    assert again.stats() | {"mean_write_seconds": 0} == conv.stats() | {"mean_write_seconds": 0}
    # Writing continues where it stopped.
    s1, s2 = conv.add_turn("user", "one more"), again.add_turn("user", "one more")
    assert s1.slots == s2.slots
    check_invariants(again)


def test_changed_weights_trigger_one_refresh_and_restore_reencodes():
    memory = tiny_memory()
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=32))
    rng = random.Random(4)
    for _ in range(12):
        conv.add_turn("user", sentence(rng))
    state = conv.to_dict()
    with torch.no_grad():
        memory.encoder.slots.add_(0.5)  # an in-place update, as an optimizer step makes
    stats = conv.add_turn("user", "after the update")
    assert stats.refreshed and stats.encoder_calls >= 1
    assert not conv.add_turn("user", "and again").refreshed
    # The stored latents came from the old weights: restoring re-encodes and matches a fresh build.
    restored = ConversationMemory.from_dict(state, memory)
    fresh = ConversationMemory(memory, ConversationConfig(slot_budget=32))
    for t in restored.transcript():
        fresh.add_turn_ids(
            "user",
            t["text"],
            [i for s in restored.store.spans.values() if s.turn == t["turn"] for i in s.token_ids],
        )
    torch.testing.assert_close(restored.memory_kv().values[0], fresh.memory_kv().values[0])


def test_a_changed_address_head_reencodes_nothing_and_keeps_saved_latents(monkeypatch):
    """The head only reads latents: training it or swapping in another re-encodes no chunk and leaves a saved
    conversation's latents valid, while its keys are the new head's."""
    import memsplice.conversation.memory as conversation_module

    memory = tiny_memory()
    memory.add_address_head(8)
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=None))
    rng = random.Random(6)
    for _ in range(10):
        conv.add_turn("user", sentence(rng, 12))
    conv.address("Where does Ada live?")
    state = conv.to_dict()
    encoded = []
    real = conversation_module.encode_chunks
    monkeypatch.setattr(
        conversation_module,
        "encode_chunks",
        lambda m, chunks, *a, **k: encoded.extend(chunks) or real(m, chunks, *a, **k),
    )
    with torch.no_grad():
        memory.address.key_proj.weight.mul_(-1.0)  # trained in place
    conv.address("Where does Ada live?")
    memory.address = type(memory.address)(memory.reasoner.shapes.hidden_size, 8)  # swapped for another
    conv.address("Where does Ada live?")
    live = [c for c in conv._all_chunks() if c.live]
    assert torch.equal(conv._keys_cache[2], memory.address.keys(torch.stack([c.latents for c in live])))
    restored = ConversationMemory.from_dict(state, memory)
    assert not any(c.dirty for c in restored._all_chunks() if c.span_ids)  # the saved latents were kept
    restored.address("Where does Ada live?")
    assert encoded == []  # no chunk was encoded again
    with torch.no_grad():
        memory.encoder.slots.add_(0.5)  # an encoder weight still invalidates both
    assert conv.add_turn("user", "after the update").refreshed and encoded
    before = len(encoded)
    ConversationMemory.from_dict(state, memory).memory_kv()
    assert len(encoded) > before  # the saved latents were the old encoder's: encoded again


def test_attention_usage_keeps_used_spans_from_eviction():
    memory = tiny_memory()
    conv = ConversationMemory(
        memory, ConversationConfig(slot_budget=32, max_live_tokens=100, protect_fraction=0.0)
    )
    rng = random.Random(5)
    for _ in range(4):  # turns of ~20 tokens: one chunk each
        conv.add_turn("user", sentence(rng, 12))
    assert len({conv._chunk_of(i).id for i in range(4)}) == 4
    # The reasoner's attention goes to the chunk holding turn 0 only.
    turn0_chunk = conv._chunk_of(0).id
    mass = torch.tensor([1.0 if c == turn0_chunk else 0.0 for c, _ in conv.slot_sources()])
    assert conv.record_attention(mass, focus=1.0) == [0]
    while not conv.store.archived():
        conv.add_turn("user", sentence(rng, 12))
    assert not conv.store[0].archived, "the span the reasoner attended to must outlive unused older ones"
    assert conv.store[1].archived
    assert conv.store.eviction_log[0].span_id == 1


def test_record_attention_checks_length(memory):
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=16))
    conv.add_turn("user", "hi")
    with pytest.raises(ValueError, match="slot weights"):
        conv.record_attention(torch.ones(conv.num_slots + 1))


def test_fallback_chunks_are_left_out():
    memory = tiny_memory(max_latent_norm=1e-6)
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=16, scope="u1"))
    stats = conv.add_turn("user", "Ada lives in Lisbon")
    assert stats.fallback and conv.memory_kv() is None and conv.num_slots == 0
    event = memory.fallback_log.recent(1)[0]
    assert event.scope == "u1" and event.detail["input_ids"]


@pytest.mark.parametrize(
    "bad",
    [
        {"slot_budget": 0},
        {"slot_selection": "random"},
        {"turn_template": "no text here"},
        {"turn_template": "{speaker}: {text}"},
        {"protect_fraction": 1.0},
        {"keep_full_chunks": -1},
    ],
)
def test_bad_config_names_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        ConversationConfig(**bad)


def test_config_that_does_not_fit_the_memory_is_refused(memory):
    with pytest.raises(ValueError, match="chunk_tokens"):
        ConversationMemory(memory, ConversationConfig(chunk_tokens=64))
    with pytest.raises(ValueError, match="slot_budget"):
        ConversationMemory(memory, ConversationConfig(slot_budget=8))


@pytest.mark.parametrize("role,text", [("", "x"), (None, "x"), ("user", None)])
def test_bad_turns_are_refused_and_change_nothing(memory, role, text):
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=16))
    conv.add_turn("user", "hello")
    before = conv.to_dict()
    with pytest.raises(ValueError):
        conv.add_turn(role, text)
    assert conv.to_dict() == before


def test_add_turns_places_turns_as_one_add_turn_per_turn_does_in_one_write(memory):
    rng = random.Random(8)
    turns = [("user" if i % 2 else "assistant", sentence(rng, rng.randint(3, 20))) for i in range(30)]
    one_by_one = ConversationMemory(memory, ConversationConfig(slot_budget=4096))
    for role, text in turns:
        one_by_one.add_turn(role, text)
    batched = ConversationMemory(memory, ConversationConfig(slot_budget=4096, encode_batch=4))
    seen, handle = count_encoder_tokens(memory)
    try:
        stats = batched.add_turns(turns)
    finally:
        handle.remove()
    check_invariants(batched)
    assert batched.turns == len(turns) == len(batched.write_seconds) * len(turns)
    assert [c.span_ids for c in batched._all_chunks()] == [c.span_ids for c in one_by_one._all_chunks()]
    chunks = batched._all_chunks()
    assert stats.encoder_calls == len(seen) == -(-len(chunks) // 4)  # every chunk once, in batches of 4
    assert stats.encoded_tokens == sum(c.tokens for c in chunks) == stats.tokens
    for a, b in zip(chunks, one_by_one._all_chunks(), strict=True):
        torch.testing.assert_close(a.latents, b.latents, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no turns"):
        batched.add_turns([])
    with pytest.raises(ValueError, match="role"):
        batched.add_turns([("user", "fine"), ("", "no role")])
    assert batched.turns == len(turns)  # a refused batch writes nothing


def test_read_back_reads_the_picked_chunks_from_memory_alone(memory, monkeypatch):
    from memsplice.memory.readback import read_back

    memory.config.reconstruction_instruction = "Repeat the text."
    rng = random.Random(9)
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=4096))
    conv.add_turns([("user", sentence(rng, 12)) for _ in range(12)])
    with pytest.raises(ValueError, match="no address head"):
        conv.read_back("Where does Ada live?")
    memory.add_address_head(8)
    picked = conv._address_chunks("Where does Ada live?", 2)
    assert [c.id for c in picked] == sorted(c.id for c in picked)
    for span in conv.store.spans.values():  # the transcript is not read: blank it
        monkeypatch.setattr(span, "text", "")
    texts = conv.read_back("Where does Ada live?", 2)
    want = [read_back(memory, c.kv, c.tokens)[0] for c in picked]
    assert texts == want and len(texts) == 2
    empty = ConversationMemory(memory, ConversationConfig(slot_budget=4096))
    assert empty.read_back("Where does Ada live?") == []


def test_read_back_puts_the_session_header_read_back_from_its_own_chunk_in_front(memory, monkeypatch):
    from memsplice.memory.readback import read_back, read_back_ids

    memory.config.reconstruction_instruction = "Repeat the text."
    memory.add_address_head(8)
    rng = random.Random(11)
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=4096))
    turns = [("system", "[Session 1, 8 May]")] + [("user", sentence(rng, 9)) for _ in range(6)]
    turns += [("system", "[Session 2, 9 May]")] + [("user", sentence(rng, 9)) for _ in range(12)]
    conv.add_turns(turns)
    chunks = [c for c in conv._all_chunks() if c.live]
    header = next(s for s in conv.store.spans.values() if "Session 2" in s.text)
    holder = conv._chunk_of(header.id)
    later = [c for c in chunks if min(c.span_ids) > header.id]
    assert len(later) >= 2, "the test needs two chunks of session 2 without its header"
    picked = later[-1]
    context = conv._readback_context(picked)
    assert context is not None and context[0] is holder and context[1] == header.id
    start, end = context[2], context[3]
    assert (
        chunk_input(holder, conv.store)[start:end] == header.token_ids
    )  # the header's positions in its chunk
    assert conv._readback_context(holder) is None  # a chunk holding a header gets none in front

    monkeypatch.setattr(conv, "_address_chunks", lambda question, k: [picked])
    for span in conv.store.spans.values():  # the transcript is not read: blank it
        monkeypatch.setattr(span, "text", "")
    tok = memory.reasoner.tokenizer
    want = (
        tok.decode(read_back_ids(memory, holder.kv, end)[0][start:end])
        + read_back(memory, picked.kv, picked.tokens)[0]
    )
    assert conv.read_back("Where does Ada live?") == [want]
    # two picked chunks of the same session: the header once, in front of the first
    monkeypatch.setattr(conv, "_address_chunks", lambda question, k: later[-2:])
    texts = conv.read_back("Where does Ada live?", 2)
    assert texts[0].startswith(want[: len(want) - len(read_back(memory, picked.kv, picked.tokens)[0])])
    assert texts[1] == read_back(memory, later[-1].kv, later[-1].tokens)[0]
    conv.config.readback_context_role = None
    monkeypatch.setattr(conv, "_address_chunks", lambda question, k: [picked])
    assert conv.read_back("Where does Ada live?") == [read_back(memory, picked.kv, picked.tokens)[0]]


def test_read_back_context_skips_a_header_that_is_too_long_or_a_piece(memory):
    rng = random.Random(12)
    long_header = " ".join(["Session"] * 40)
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=4096, readback_context_tokens=8))
    conv.add_turns(
        [("system", "[Session 1, 8 May, a long day]")] + [("user", sentence(rng, 9)) for _ in range(8)]
    )
    last = conv._all_chunks()[-1]
    assert conv._readback_context(last) is None  # longer than readback_context_tokens
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=4096, readback_context_tokens=4096))
    conv.add_turns([("system", long_header)] + [("user", sentence(rng, 9)) for _ in range(8)])
    assert conv._readback_context(conv._all_chunks()[-1]) is None  # a piece of a turn cut across chunks
    with pytest.raises(ValueError, match="readback_context_role"):
        ConversationConfig(readback_context_role="")


def test_refined_chunks_are_addressed_by_the_encoders_latents_and_keep_them_when_saved(memory):
    memory.config.reconstruction_instruction = "Repeat the text."
    memory.config.refine_steps = 2
    memory.add_address_head(8)
    rng = random.Random(10)
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=4096))
    conv.add_turns([("user", sentence(rng, 12)) for _ in range(8)])
    chunk = conv._all_chunks()[0]
    with torch.no_grad():
        encoded = memory.encode(torch.tensor([chunk_input(chunk, conv.store)]))[0]
    torch.testing.assert_close(chunk.address_latents, encoded)
    assert not torch.allclose(chunk.latents, encoded)
    conv.address("Where does Ada live?")
    live = [c for c in conv._all_chunks() if c.live]
    with torch.no_grad():
        keys = memory.address.keys(torch.stack([c.address_latents for c in live]))
    assert torch.equal(conv._keys_cache[2], keys)
    restored = ConversationMemory.from_dict(json.loads(json.dumps(conv.to_dict())), memory)
    for a, b in zip(restored._all_chunks(), conv._all_chunks(), strict=True):
        assert torch.equal(a.address_latents, b.address_latents) and torch.equal(a.latents, b.latents)


def test_recall_joins_what_the_address_head_or_the_prompt_picks(memory):
    memory.config.reconstruction_instruction = "Repeat the text."
    rng = random.Random(13)
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=4096))
    conv.add_turns([("user", sentence(rng, 9)) for _ in range(8)])
    prompt = memory.reasoner.tokenizer("Where does Ada live?", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="prompt_ids"):
        conv.recall("Where does Ada live?")  # no address head: attention, which needs the prompt
    by_attention = conv.read_back(input_ids=torch.tensor([prompt]), top_chunks=2)
    want = "\n".join(t.strip() for t in by_attention if t.strip()) or None
    assert conv.recall("Where does Ada live?", 2, prompt_ids=prompt) == want
    memory.add_address_head(8)
    by_address = "\n".join(t.strip() for t in conv.read_back("Where does Ada live?", 2) if t.strip()) or None
    assert conv.recall("Where does Ada live?", 2) == by_address
    assert conv.recall("Where does Ada live?", 2, prompt_ids=prompt, select_by="attention") == want
    with pytest.raises(ValueError, match="select_by"):
        conv.recall("Where does Ada live?", select_by="bm25")
