"""Systems under test: each decides what the reasoner sees, and only that; costs are reported the same way."""

from __future__ import annotations

import pytest
import torch

from helpers import small_memory
from memsplice.eval.reader import (
    GenerationSettings,
    Reader,
    render_history,
    render_session_header,
    render_turn,
)
from memsplice.eval.systems import Runtime, SystemArgs, build_system
from memsplice.eval.systems.context import recent_window
from memsplice.eval.tasks import Question, Turn, load_locomo


def _runtime(reasoner, **kw):
    reader = Reader(reasoner, settings=GenerationSettings(max_new_tokens=4))
    return Runtime(reader, SystemArgs(**kw))


def _turns(n: int, session_every: int = 5) -> list[Turn]:
    return [
        Turn(
            id=f"t{i}",
            speaker="AB"[i % 2],
            text=f"turn number {i} about topic {i * 7 % 11}",
            session=1 + i // session_every,
            date=f"day {1 + i // session_every}",
        )
        for i in range(n)
    ]


def _question(evidence=()):
    return Question(
        id="q", question="What topic came up?", answer="topic", category="x", evidence=tuple(evidence)
    )


def test_recent_window_is_the_longest_suffix_within_budget(eval_reasoner):
    count = Reader(eval_reasoner).count_tokens
    turns = _turns(30)

    def cost(window):
        total = 0
        for i, t in enumerate(window):
            total += count(render_turn(t)) + 1
            if i == 0 or window[i - 1].session != t.session:
                total += count(render_session_header(t))
        return total

    for budget in (1, 40, 150, 10_000):
        older, recent = recent_window(turns, budget, count)
        assert older + recent == turns
        assert cost(recent) <= budget
        if older:  # one more turn would not fit
            assert cost([older[-1], *recent]) > budget


def test_same_prompt_for_systems_without_history_text(eval_reasoner):
    runtime = _runtime(eval_reasoner)
    q = _question()
    answers = {}
    for name in ("none", "latent"):
        system = build_system(name, runtime)
        system.reset()
        system.feed(_turns(12))
        answers[name] = system.answer(q).costs
    assert answers["none"].prompt_tokens == answers["latent"].prompt_tokens
    assert answers["none"].context_tokens == answers["latent"].context_tokens == 0
    assert answers["none"].memory_slots == 0 and answers["latent"].memory_slots > 0
    assert answers["latent"].kv_bytes > answers["none"].kv_bytes


def test_chunk_tokens_sets_the_memory_compression(eval_reasoner):
    """Shorter chunks: more encoder calls over the same history, so more slots in front of the question."""
    slots = {}
    for chunk in (None, 16):
        system = build_system("latent", _runtime(eval_reasoner, chunk_tokens=chunk))
        system.reset()
        system.feed(_turns(12))
        assert system.conversation.chunk_tokens == (
            chunk or system.conversation.memory.config.max_memory_tokens
        )
        slots[chunk] = system.answer(_question()).costs.memory_slots
    assert slots[16] > slots[None] > 0
    with pytest.raises(ValueError, match="chunk_tokens"):
        SystemArgs(chunk_tokens=0)


def test_feed_reports_history_a_memory_evicted(eval_reasoner):
    """A slot budget too small for the history evicts its oldest chunks, and the feed says how many spans went."""
    turns = _turns(200)
    probe = build_system("latent", _runtime(eval_reasoner))
    probe.reset()
    m = probe.conversation.memory.config.num_slots
    tight = build_system("latent", _runtime(eval_reasoner, chunk_tokens=16, slot_budget=4 * m))
    roomy = build_system("latent", _runtime(eval_reasoner, chunk_tokens=16, slot_budget=10_000))
    text = build_system("window", _runtime(eval_reasoner))
    fed = {}
    for name, system in (("tight", tight), ("roomy", roomy), ("text", text)):
        system.reset()
        fed[name] = system.feed(turns)
    assert fed["tight"].evicted_spans == len(tight.conversation.store.archived()) > 0
    assert fed["roomy"].evicted_spans == 0 and fed["text"].evicted_spans == 0
    assert fed["tight"].to_dict()["evicted_spans"] == fed["tight"].evicted_spans


def test_latent_select_injects_only_the_chunks_the_question_attends_to(eval_reasoner):
    runtime = _runtime(eval_reasoner, chunk_tokens=16)
    full = build_system("latent", runtime)
    select = build_system("latent-select", runtime)
    for system in (full, select):
        system.reset()
        system.feed(_turns(12))
    conv = select.conversation
    chunk_slots: dict[int, int] = {}
    for c, _ in conv.slot_sources():
        chunk_slots[c] = chunk_slots.get(c, 0) + 1
    assert len(chunk_slots) > 1
    a_full, a_sel = full.answer(_question()), select.answer(_question())
    assert a_sel.costs.memory_slots in chunk_slots.values()
    assert a_sel.costs.memory_slots < a_full.costs.memory_slots
    assert a_sel.costs.retrieval_s > 0
    # the chosen chunk is the one with the most attention per slot, composed alone
    ids = torch.tensor([runtime.reader.prompt_ids(_question().question, None)])
    two = conv.select(ids, top_chunks=2)
    assert two.num_slots > conv.select(ids, top_chunks=1).num_slots
    with pytest.raises(ValueError, match="top_chunks"):
        conv.select(ids, top_chunks=0)
    with pytest.raises(ValueError, match="select_chunks"):
        SystemArgs(select_chunks=0)


def test_latent_select_plus_window_keeps_the_window_as_text_and_reads_picked_chunks(eval_reasoner):
    runtime = _runtime(eval_reasoner, chunk_tokens=16, window_tokens=60)
    both = build_system("latent+window", runtime)
    picked = build_system("latent-select+window", runtime)
    for system in (both, picked):
        system.reset()
        system.feed(_turns(30))
    assert [t.id for t in picked.window] == [t.id for t in both.window] and picked.window
    assert picked.conversation.turns == both.conversation.turns > 0
    a_both, a_picked = both.answer(_question()), picked.answer(_question())
    # the same window text in the prompt, fewer memory slots in front of it
    assert a_picked.costs.context_tokens == a_both.costs.context_tokens > 0
    assert 0 < a_picked.costs.memory_slots < a_both.costs.memory_slots
    assert a_picked.costs.retrieval_s > 0
    # the probe ranks chunks by the prompt the answer has: question and window
    history = render_history(picked.window)
    ids = torch.tensor([runtime.reader.prompt_ids(_question().question, history)])
    assert a_picked.costs.memory_slots == picked.conversation.select(ids, top_chunks=1).num_slots
    # nothing older than the window yet: no memory, the window alone
    roomy = build_system(
        "latent-select+window", _runtime(eval_reasoner, chunk_tokens=16, window_tokens=10_000)
    )
    roomy.reset()
    roomy.feed(_turns(4))
    assert roomy.conversation.turns == 0 and roomy.answer(_question()).costs.memory_slots == 0


def test_full_answers_when_it_fits_and_reports_what_it_would_need_otherwise(eval_reasoner):
    runtime = _runtime(eval_reasoner)
    full = build_system("full", runtime)
    full.reset()
    turns = _turns(10)
    full.feed(turns)
    costs = full.answer(_question()).costs
    assert costs.fits and costs.context_tokens == runtime.reader.count_tokens(render_history(turns))
    full.reset()
    long = _turns(400)
    full.feed(long)
    answer = full.answer(_question())
    history = runtime.reader.count_tokens(render_history(long))
    assert history > runtime.reader.window and not answer.costs.fits and answer.text == ""
    assert answer.costs.kv_bytes >= history * runtime.reader.kv_bytes_per_position


def test_oracle_sees_exactly_the_evidence(eval_reasoner):
    runtime = _runtime(eval_reasoner)
    oracle = build_system("oracle", runtime)
    oracle.reset()
    turns = _turns(20)
    oracle.feed(turns)
    picked = [turns[3], turns[17]]
    costs = oracle.answer(_question([t.id for t in picked])).costs
    assert costs.context_tokens == runtime.reader.count_tokens(render_history(picked))
    assert oracle.answer(_question()).costs.context_tokens == 0


def test_latent_oracle_writes_only_the_evidence_turns(eval_reasoner):
    runtime = _runtime(eval_reasoner, chunk_tokens=16)
    oracle = build_system("latent-oracle", runtime)
    oracle.reset()
    turns = _turns(20)
    oracle.feed(turns)
    picked = [turns[3], turns[17]]
    answer = oracle.answer(_question([t.id for t in picked]))
    written = " | ".join(t["text"] for t in oracle.conversation.transcript())
    assert all(t.text in written for t in picked)
    assert not any(t.text in written for t in turns if t not in picked)
    assert answer.costs.memory_slots > 0 and answer.costs.retrieval_s > 0 and answer.costs.context_tokens == 0
    assert oracle.answer(_question()).costs.memory_slots == 0  # no evidence: no memory at all


def test_window_and_reset(eval_reasoner):
    runtime = _runtime(eval_reasoner, window_tokens=60)
    window = build_system("window", runtime)
    window.reset()
    turns = _turns(30)
    window.feed(turns)
    _, recent = recent_window(turns, 60, runtime.reader.count_tokens)
    assert window.answer(_question()).costs.context_tokens == runtime.reader.count_tokens(
        render_history(recent)
    )
    window.reset()
    assert window.answer(_question()).costs.context_tokens == 0


def test_bm25_finds_the_turn_with_the_rare_word(eval_reasoner):
    runtime = _runtime(eval_reasoner, top_k=2)
    bm25 = build_system("rag-bm25", runtime)
    bm25.reset()
    turns = _turns(25)
    turns[11] = Turn(id="t11", speaker="A", text="My neighbour collects zanzibarite crystals.", session=3)
    bm25.feed(turns)
    assert 11 in bm25.search("Who collects zanzibarite?")
    answer = bm25.answer(Question(id="q", question="Who collects zanzibarite?", answer="", category="x"))
    assert answer.costs.retrieval_s > 0 and answer.costs.ttft_s >= answer.costs.retrieval_s
    assert bm25.stored_bytes() > sum(len(render_turn(t)) for t in turns)


def test_dense_retrieval_ranks_by_meaning(eval_reasoner, locomo_path):
    runtime = _runtime(eval_reasoner, top_k=1)
    dense = build_system("rag-dense", runtime)
    episode = load_locomo(locomo_path)[0]
    dense.reset()
    dense.feed(episode.turns)
    (best,) = dense.search("What is the name of the pet Maya adopted?")
    assert episode.turns[best].id in ("D1:1", "D1:3")
    (best,) = dense.search("Where is Ravi travelling for work?")
    assert episode.turns[best].id == "D2:3"


def test_latent_plus_window_writes_only_what_left_the_window(eval_reasoner):
    runtime = _runtime(eval_reasoner, window_tokens=80)
    system = build_system("latent+window", runtime)
    system.reset()
    turns = _turns(30)
    costs = system.feed(turns)
    older, recent = recent_window(turns, 80, runtime.reader.count_tokens)
    assert system.window == recent
    headers = len({t.session for t in older})
    assert system.conversation.turns == len(older) + headers
    answer = system.answer(_question())
    assert answer.costs.memory_slots > 0
    assert answer.costs.context_tokens == runtime.reader.count_tokens(render_history(recent))
    assert costs.stored_bytes > 0 and costs.write_s > 0


def test_short_history_leaves_latent_window_without_memory(eval_reasoner):
    runtime = _runtime(eval_reasoner, window_tokens=10_000)
    system = build_system("latent+window", runtime)
    system.reset()
    system.feed(_turns(5))
    assert system.answer(_question()).costs.memory_slots == 0


def test_unknown_system_and_bad_args():
    with pytest.raises(ValueError, match="unknown system 'nope'"):
        build_system("nope", None)
    with pytest.raises(ValueError, match="window_tokens"):
        SystemArgs(window_tokens=0)
    with pytest.raises(ValueError, match="top_k"):
        SystemArgs(top_k=0)


def test_embedder_without_sentence_transformers_matches_it():
    """The transformers-only path (for machines without sentence-transformers) embeds like sentence-transformers."""
    from memsplice.eval.systems.embedder import SentenceEmbedder

    texts = ["Maya adopted a grey cat called Juniper.", "Ravi flies to Lisbon next month.", "ok"]
    a = SentenceEmbedder().encode(texts)
    b = SentenceEmbedder(use_sentence_transformers=False).encode(texts)
    assert a.shape == b.shape == (3, 384)
    assert (a * b).sum(1).min() > 0.9999
    assert abs(float((b * b).sum(1).mean()) - 1.0) < 1e-5


def _readback_checkpoint(reasoner, path):
    """A small memory with what read-back needs: an address head and a reconstruction instruction."""
    torch.manual_seed(0)
    memory = small_memory(
        reasoner,
        max_memory_tokens=32,
        encoder_layers=1,
        address_dim=8,
        reconstruction_instruction="Repeat the text.",
    )
    memory.save_pretrained(path)
    return path


def test_latent_readback_asks_over_the_text_read_back_from_the_picked_chunks(eval_reasoner, tmp_path):
    ckpt = _readback_checkpoint(eval_reasoner, tmp_path / "memory")
    runtime = _runtime(eval_reasoner, checkpoint=ckpt, chunk_tokens=16, select_chunks=2, write_turns=5)
    system = build_system("latent-readback", runtime)
    system.reset()
    system.feed(_turns(12))
    conv = system.conversation
    assert len(conv.write_seconds) == -(-(12 + 3) // 5)  # 12 turns and 3 session headers, 5 per write
    question = _question()
    texts = conv.read_back(question.question, 2)
    history = "\n".join(t.strip() for t in texts if t.strip())
    answer = system.answer(question)
    want = runtime.reader.read(question.question, history or None)
    assert answer.text == want.text
    assert answer.costs.memory_slots == 0 and answer.costs.retrieval_s > 0
    assert answer.costs.context_tokens == (runtime.reader.count_tokens(history) if history else 0)

    windowed = build_system(
        "latent-readback+window",
        _runtime(eval_reasoner, checkpoint=ckpt, chunk_tokens=16, select_chunks=1, window_tokens=60),
    )
    windowed.reset()
    windowed.feed(_turns(30))
    assert windowed.window and windowed.conversation.turns > 0
    recalled = windowed.conversation.read_back(question.question, 1)
    parts = [
        render_history(windowed.window),
        "\n".join(t.strip() for t in recalled if t.strip()),
    ]  # read-back last
    want = runtime.reader.read(question.question, "\n".join(p for p in parts if p))
    assert windowed.answer(question).text == want.text
    with pytest.raises(ValueError, match="write_turns"):
        SystemArgs(write_turns=0)


def test_recency_margin_overrides_the_checkpoints_for_the_run(eval_reasoner, tmp_path):
    from memsplice.eval.systems.latent import load_memory_model

    ckpt = _readback_checkpoint(eval_reasoner, tmp_path / "memory")
    assert load_memory_model(_runtime(eval_reasoner, checkpoint=ckpt)).config.address_recency_margin == 0.0
    runtime = _runtime(eval_reasoner, checkpoint=ckpt, recency_margin=2.5)
    assert load_memory_model(runtime).config.address_recency_margin == 2.5
    with pytest.raises(ValueError, match="recency_margin"):
        SystemArgs(recency_margin=-0.5)


def test_extra_margin_reads_a_second_chunk_only_where_the_head_is_unsure(eval_reasoner, tmp_path):
    """--extra-chunk-margin reaches the memory, and the conversation reads a chunk after the first only when the
    head scores it within the margin of the best."""
    from memsplice.eval.systems.latent import load_memory_model

    ckpt = _readback_checkpoint(eval_reasoner, tmp_path / "memory")
    assert load_memory_model(_runtime(eval_reasoner, checkpoint=ckpt)).config.address_extra_margin is None
    model = load_memory_model(_runtime(eval_reasoner, checkpoint=ckpt, extra_margin=0.0))
    assert model.config.address_extra_margin == 0.0
    from memsplice.conversation import ConversationMemory

    conv = ConversationMemory(model)  # 32-token chunks
    for text in (
        "My sister Ada moved to Lisbon last spring and loves the trams there.",
        "Bring 42 apples, seven pears and a crate of oranges on Tuesday.",
        "The violin concerto ended with a long cadenza that nobody expected.",
        "Zebra crossings near the school were repainted yellow and white.",
    ):
        conv.add_turn("user", text)
    slots = model.config.num_slots
    # margin 0: a chunk after the first only on an exact tie
    assert conv.address("Which fox jumps?", top_chunks=3).num_slots == slots
    model.set_extra_margin(1e6)
    assert conv.address("Which fox jumps?", top_chunks=3).num_slots == 3 * slots
    with pytest.raises(ValueError, match="extra_margin"):
        SystemArgs(extra_margin=-0.5)


def test_readback_context_reaches_the_conversation_and_none_turns_it_off(eval_reasoner, tmp_path):
    from memsplice.cli.main import build_parser

    ckpt = _readback_checkpoint(eval_reasoner, tmp_path / "memory")
    for role in ("system", None):
        system = build_system(
            "latent-readback", _runtime(eval_reasoner, checkpoint=ckpt, readback_context=role)
        )
        system.reset()
        assert system.conversation.config.readback_context_role == role
    parse = build_parser().parse_args
    assert parse(["eval", "--out", "o", "--readback-context", "none"]).readback_context is None
    assert parse(["eval", "--out", "o"]).readback_context == "system"
    assert parse(["bench", "online", "--readback-context", "None"]).readback_context is None


def test_systems_that_pick_chunks_by_address_keep_every_chunk_whatever_the_slot_budget(
    eval_reasoner, tmp_path
):
    """A slot budget sized for splicing the whole memory evicts chunks from `latent`; the address-head read paths
    never compose the whole memory, so their conversation keeps every chunk the head could pick."""
    from memsplice.eval.systems.latent import load_memory_model

    ckpt = _readback_checkpoint(eval_reasoner, tmp_path / "memory")
    budget = 4 * load_memory_model(_runtime(eval_reasoner, checkpoint=ckpt)).config.num_slots
    evicted = {}
    for name in ("latent", "latent-select", "latent-readback", "latent-readback+window"):
        runtime = _runtime(
            eval_reasoner, checkpoint=ckpt, chunk_tokens=16, slot_budget=budget, window_tokens=30
        )
        system = build_system(name, runtime)
        system.reset()
        system.feed(_turns(40))
        evicted[name] = system.evicted_spans()
        if name != "latent":
            assert system.conversation.config.slot_budget is None
    assert evicted["latent"] > 0
    assert evicted["latent-select"] == evicted["latent-readback"] == evicted["latent-readback+window"] == 0
