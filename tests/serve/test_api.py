"""The HTTP API on a tiny reasoner: chat with memory, streaming, models, memory endpoints, export/import, deletion."""

from __future__ import annotations

import json

import pytest
import torch
from tests.serve.harness import Harness

from memsplice.inject.memory_kv import MemoryKV


def chat(client, content: str, scope: str | None = "alice", **extra):
    body = {
        "model": client.harness.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        "temperature": 0,
        **extra,
    }
    if scope is not None:
        body["user"] = scope
    return client.post("/v1/chat/completions", headers=client.harness.headers(), json=body)


def sse_events(text: str) -> list:
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_health_models_metrics(client):
    h = client.harness
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["store"] == "ok" and health["model"] == h.model
    models = client.get("/v1/models", headers=h.headers()).json()
    assert [m["id"] for m in models["data"]] == [h.model]
    assert client.get(f"/v1/models/{h.model}", headers=h.headers()).json()["id"] == h.model
    assert client.get("/v1/models/gpt-4", headers=h.headers()).status_code == 404
    chat(client, "hello")
    text = client.get("/metrics").text
    assert 'memsplice_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0' in text
    assert "memsplice_memory_writes_total 1.0" in text
    assert "alice" not in text  # scope ids never become label values


def test_chat_writes_the_exchange_and_reads_it_next_time(client):
    h = client.harness
    first = chat(client, "Ada lives in Lisbon.").json()
    assert first["object"] == "chat.completion" and first["choices"][0]["message"]["role"] == "assistant"
    assert first["usage"]["completion_tokens"] <= 6
    assert first["memsplice"]["live"] is False  # nothing was in memory before the first exchange
    assert first["memsplice"]["written_turns"] >= 1
    spans = client.get("/v1/memory/scopes/alice/spans", headers=h.headers()).json()["data"]
    assert spans[-1]["text"] == "Ada lives in Lisbon." and spans[-1]["role"] == "user"
    assert all(s["resident"] for s in spans)
    second = chat(client, "Where does Ada live?").json()
    assert second["memsplice"]["live"] is True and second["memsplice"]["turns_in_memory"] == len(spans)
    # without a scope (or with memory off) nothing is read or written
    assert chat(client, "stateless", scope=None).json()["memsplice"] == {
        "scope": None,
        "live": False,
        "memory": "no scope",
    }
    chat(client, "not stored", memory=False)
    texts = [
        s["text"] for s in client.get("/v1/memory/scopes/alice/spans", headers=h.headers()).json()["data"]
    ]
    assert "stateless" not in texts and "not stored" not in texts


def test_memory_changes_the_answer_and_closed_memory_does_not(client):
    """Greedy answers with the scope's memory differ from the bare reasoner's, which memory=false reproduces."""
    h = client.harness
    client.post(
        "/v1/memory/scopes/alice/turns",
        headers=h.headers(),
        json={"turns": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog."}]},
    )
    with_memory = chat(client, "What did the fox do?", max_tokens=12, **{"memory": True}).json()
    bare = chat(client, "What did the fox do?", scope="bob-free", max_tokens=12, memory=False)
    assert bare.status_code == 403  # alice's key may not even name bob's scope
    bare = chat(client, "What did the fox do?", scope=None, max_tokens=12).json()
    assert with_memory["memsplice"]["live"]
    assert with_memory["choices"][0]["message"]["content"] != bare["choices"][0]["message"]["content"]


def test_stream_matches_the_non_streamed_answer(client):
    h = client.harness
    body = {
        "model": h.model,
        "messages": [{"role": "user", "content": "Tell me about memory slots."}],
        "max_tokens": 10,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    plain = client.post("/v1/chat/completions", headers=h.headers(), json=body).json()
    r = client.post("/v1/chat/completions", headers=h.headers(), json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert (
        len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


def test_stop_strings_cut_the_answer(client):
    free = chat(client, "Ada Lovelace lives in Lisbon", scope=None, max_tokens=16).json()["choices"][0][
        "message"
    ]["content"]
    assert len(free) > 2
    stop = free[1:3]
    cut = chat(client, "Ada Lovelace lives in Lisbon", scope=None, max_tokens=16, stop=[stop]).json()
    assert cut["choices"][0]["message"]["content"] == free[: free.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_memory_endpoints(client):
    h = client.harness
    r = client.post(
        "/v1/memory/scopes/alice/turns",
        headers=h.headers(),
        json={
            "turns": [{"role": "user", "content": "I like tea."}, {"role": "assistant", "content": "Noted."}]
        },
    )
    assert r.status_code == 200 and r.json()["seqs"] == [0, 1]
    r = client.post(
        "/v1/memory/scopes/alice/text", headers=h.headers(), json={"text": "Ada was born in 1815."}
    )
    assert r.json()["seqs"] == [2]
    summary = client.get("/v1/memory/scopes/alice", headers=h.headers()).json()
    assert summary["turns"] == 3 and summary["memory"]["turns"] == 3 and summary["memory"]["live_spans"] == 3
    assert summary["rows"]["spans"] == 3 and summary["rows"]["scope_states"] == 1
    slots = client.get("/v1/memory/scopes/alice/slots", headers=h.headers()).json()
    assert len(slots["slots"]) == summary["memory"]["slots"] >= h.memory.config.num_slots
    assert all(0 <= s["gate"] <= 1 and s["norm"] > 0 and s["turns"] for s in slots["slots"])
    gate = client.get("/v1/memory/scopes/alice/gate", headers=h.headers()).json()
    assert gate["min"] <= gate["mean"] <= gate["max"] and len(gate["per_slot"]) == len(slots["slots"])
    assert client.get("/v1/memory/scopes/alice/events", headers=h.headers()).json()["data"] == []
    listed = client.get("/v1/memory/scopes", headers=h.headers(h.admin_key)).json()["data"]
    assert [s["id"] for s in listed] == ["alice"]
    assert client.get("/v1/memory/scopes", headers=h.headers(h.bob_key)).json()["data"] == []
    assert client.get("/v1/memory/scopes/alice:other", headers=h.headers()).status_code == 404


def test_eviction_keeps_the_transcript_and_marks_lru_state(tmp_path):
    from fastapi.testclient import TestClient

    h = Harness(tmp_path, memory_max_live_tokens=120)
    with TestClient(h.app) as client:
        for i in range(12):
            client.post(
                "/v1/memory/scopes/alice/text",
                headers=h.headers(),
                json={"text": f"Fact number {i}: the quick brown fox jumps over the lazy dog."},
            )
        spans = client.get(
            "/v1/memory/scopes/alice/spans", headers=h.headers(), params={"limit": 100}
        ).json()["data"]
        summary = client.get("/v1/memory/scopes/alice", headers=h.headers()).json()["memory"]
    assert len(spans) == 12  # the store keeps the whole transcript
    resident = [s["seq"] for s in spans if s["resident"]]
    assert 0 < len(resident) < 12 and max(resident) == 11  # newest kept, least recently used evicted
    assert sorted(resident) == list(range(12 - len(resident), 12))
    evicted = [s for s in spans if not s["resident"]]
    assert all(s["evicted_because"] == "token_cap" for s in evicted)
    assert all(s["steps_since_use"] >= 0 for s in spans)
    assert summary["live_tokens"] <= summary["max_live_tokens"] == 120
    assert summary["evictions"] == 12 - len(resident) and summary["live_spans"] == len(resident)


def test_export_import_into_another_scope_gives_the_same_memory(client):
    h = client.harness
    client.post(
        "/v1/memory/scopes/alice/turns",
        headers=h.headers(),
        json={"turns": [{"role": "user", "content": "My cat is called Ziggy."}]},
    )
    exported = client.get("/v1/memory/scopes/alice/export", headers=h.headers()).json()
    assert (
        exported["format"] == "memsplice.scope" and exported["spans"][0]["text"] == "My cat is called Ziggy."
    )
    r = client.post("/v1/memory/scopes/alice:copy/import", headers=h.headers(), json=exported)
    assert r.status_code == 200 and r.json()["imported"]["spans"] == 1
    assert (
        client.post("/v1/memory/scopes/alice:copy/import", headers=h.headers(), json=exported).status_code
        == 409
    )
    a = client.get("/v1/memory/scopes/alice/slots", headers=h.headers()).json()["slots"]
    b = client.get("/v1/memory/scopes/alice:copy/slots", headers=h.headers()).json()["slots"]
    assert a == b
    r = client.post("/v1/memory/scopes/alice:copy/import?replace=true", headers=h.headers(), json=exported)
    assert r.status_code == 200


def test_delete_removes_the_scope_from_every_store(client):
    h = client.harness
    svc = h.service
    client.post(
        "/v1/memory/scopes/alice/turns",
        headers=h.headers(),
        json={"turns": [{"role": "user", "content": "secret: my PIN is 4321"}]},
    )
    chat(client, "remember this")
    # a fallback event of alice's, in the memory's log and in the store, and queued training data of hers
    bad = torch.full((1, h.memory.config.num_slots, h.memory.reasoner.shapes.hidden_size), float("nan"))
    h.memory.inject(bad, scope="alice")
    h.store.add_events("alice", svc._take_events("alice"))
    h.store.enqueue_training("alice", [{"role": "user", "text": "secret: my PIN is 4321"}])
    h.store.commit_write("bob", new_spans=[("user", "bob's own", 3)])
    before = h.store.row_counts("alice")
    assert all(v > 0 for k, v in before.items() if k != "replay_samples")
    assert h.memory.fallback_log.recent(10, scope="alice") and "alice" in svc._scopes

    r = client.delete("/v1/memory/scopes/alice", headers=h.headers())
    assert r.status_code == 200 and r.json()["deleted"]["spans"] == before["spans"]
    assert all(v == 0 for v in h.store.row_counts("alice").values())
    assert h.memory.fallback_log.recent(1000, scope="alice") == []
    assert "alice" not in svc._scopes and svc._take_events("alice") == []
    assert h.store.export_scope("alice") is None
    assert client.get("/v1/memory/scopes/alice", headers=h.headers()).status_code == 404
    assert [s["text"] for s in h.store.spans("bob")] == ["bob's own"]
    # the next chat of alice's starts from nothing
    assert chat(client, "who am I?").json()["memsplice"]["live"] is False


def test_fallback_runs_the_bare_reasoner_and_records_the_event(tmp_path):
    """A latent over the safety bound is never spliced: the answer equals the bare reasoner's, an event is stored."""
    from fastapi.testclient import TestClient
    from tests.serve.harness import small_memory

    h = Harness(tmp_path, memory=small_memory(max_latent_norm=1e-3))
    with TestClient(h.app) as client:
        client.harness = h
        client.post(
            "/v1/memory/scopes/alice/text", headers=h.headers(), json={"text": "Ada lives in Lisbon."}
        )
        with_memory = chat(client, "Where does Ada live?", max_tokens=10).json()
        bare = chat(client, "Where does Ada live?", scope=None, max_tokens=10).json()
        assert with_memory["memsplice"]["live"] is False
        assert with_memory["choices"][0]["message"]["content"] == bare["choices"][0]["message"]["content"]
        events = client.get("/v1/memory/scopes/alice/events", headers=h.headers()).json()["data"]
        assert events and events[0]["reason"] == "norm_exceeded" and events[0]["bound"] == 1e-3


def test_memory_kv_is_fresh_for_every_request(harness):
    """Two reads of one scope give equal but separate tensors: mutating one cannot reach the next request."""
    import asyncio

    svc = harness.service

    async def go():
        await svc.add_turns("alice", [("user", "Ada lives in Lisbon.")])
        sm = await svc._scope_memory("alice")
        return sm

    sm = asyncio.run(go())
    a: MemoryKV = sm.memory_kv()
    b: MemoryKV = sm.memory_kv()
    assert all(torch.equal(x, y) for x, y in zip(a.keys, b.keys, strict=True))
    assert all(x.data_ptr() != y.data_ptr() for x, y in zip(a.keys, b.keys, strict=True))
    with torch.inference_mode():
        a.keys[0].add_(1.0)
    c = sm.memory_kv()
    assert torch.equal(c.keys[0], b.keys[0])
    svc.close()


def test_chat_reads_only_the_chunks_the_address_head_picks(tmp_path):
    """memory_select_chunks with a memory that has an address head: a chat splices that many chunk memories, the
    ones its last user message picks; the same server without the setting reads every chunk."""
    from fastapi.testclient import TestClient
    from tests.serve.harness import Harness, small_memory

    memory = small_memory()
    memory.add_address_head(8)
    slots = {}
    for select in (1, None):
        h = Harness(
            tmp_path / str(select), memory=memory, memory_chunk_tokens=16, memory_select_chunks=select
        )
        with TestClient(h.app) as client:
            client.harness = h
            turns = [
                {"role": "user", "content": f"Fact number {i}: Ada keeps {i} red books."} for i in range(6)
            ]
            r = client.post("/v1/memory/scopes/alice/turns", headers=h.headers(), json={"turns": turns})
            assert r.status_code == 200
            reply = chat(client, "How many books does Ada keep?").json()
            slots[select] = reply["memsplice"]["slots"]
    assert slots[1] == memory.config.num_slots
    assert slots[None] > 2 * memory.config.num_slots


def test_chat_reads_memory_back_as_text_with_memory_read_back(tmp_path):
    """memory_read_back: a chat gets the chunk memories its last user message picks read back as text, in front of
    that message or in its system message (memory_read_back_placement), and no memory K/V; a memory that cannot be
    read back is refused when the server starts."""
    from fastapi.testclient import TestClient
    from tests.serve.harness import Harness, small_memory

    from memsplice.conversation import ConversationConfig
    from memsplice.memory.readback import RECALL_FRAME, RECALL_HEADER
    from memsplice.serve import ServeConfig
    from memsplice.serve.scope_memory import ScopeMemory

    with pytest.raises(ValueError, match="reconstruction instruction"):
        Harness(tmp_path / "refused", memory=small_memory(), memory_read_back=True)
    with pytest.raises(ValueError, match="memory_read_back"):
        ServeConfig(memory_read_back="yes")
    with pytest.raises(ValueError, match="memory_read_back_placement"):
        ServeConfig(memory_read_back_placement="prompt")
    prompts = {}
    for address in (False, True):  # the prompt's attention picks, then the address head
        memory = small_memory(reconstruction_instruction="Repeat the text.")
        if address:
            memory.add_address_head(8)
        placement = "message" if address else "system"  # each placement once
        h = Harness(
            tmp_path / str(address),
            memory=memory,
            memory_chunk_tokens=16,
            memory_read_back=True,
            memory_read_back_placement=placement,
        )
        # picking by the address head, scopes keep every chunk (no slot budget), restored ones too
        assert h.service.conversation_config.slot_budget == (None if address else h.config.memory_slot_budget)
        restored = ScopeMemory("carol", memory, ConversationConfig(slot_budget=512))
        budget = h.service._with_slot_budget(restored).conversation.config.slot_budget
        assert budget == h.service.conversation_config.slot_budget
        rendered, real = [], h.service.reasoner.chat_ids
        h.service.reasoner.chat_ids = lambda messages, real=real, rendered=rendered: (
            rendered.append(messages) or real(messages)
        )
        with TestClient(h.app) as client:
            client.harness = h
            empty = chat(client, "How many books does Ada keep?").json()  # nothing written yet
            assert empty["memsplice"]["read_back_tokens"] == 0 and not empty["memsplice"]["live"]
            turns = [
                {"role": "user", "content": f"Fact number {i}: Ada keeps {i} red books."} for i in range(6)
            ]
            r = client.post("/v1/memory/scopes/alice/turns", headers=h.headers(), json={"turns": turns})
            assert r.status_code == 200
            reply = chat(client, "How many books does Ada keep?").json()
            info = reply["memsplice"]
            assert info["slots"] == 0 and info["live"] and info["read_back_tokens"] > 0
            prompts[address] = (reply["usage"]["prompt_tokens"], empty["usage"]["prompt_tokens"])
            first, last = rendered[-1][0]["content"], rendered[-1][-1]["content"]
            if placement == "message":
                assert last.startswith(RECALL_FRAME.split("{")[0]) and RECALL_HEADER not in first
            else:
                assert RECALL_HEADER in first and last == "How many books does Ada keep?"
    for with_memory, without in prompts.values():
        assert with_memory > without  # the read-back text is in the prompt


def test_read_back_with_a_reading_prefix_decodes_with_the_prefix_in_front(tmp_path):
    """memory_reading_prefix: a chat whose prompt carries read-back text decodes with the prefix's K/V in front, as
    generate() does with it; a chat with nothing read back decodes without it; the setting needs memory_read_back."""
    import torch
    from fastapi.testclient import TestClient
    from tests.serve.harness import Harness, small_memory

    from memsplice.reading import ReadingPrefix, ReadingPrefixConfig
    from memsplice.serve import ServeConfig

    with pytest.raises(ValueError, match="memory_reading_prefix"):
        ServeConfig(memory_reading_prefix="shipped")
    memory = small_memory(reconstruction_instruction="Repeat the text.")
    memory.add_address_head(8)
    prefix = ReadingPrefix.from_text(memory.reasoner, ReadingPrefixConfig(num_slots=5))
    prefix.save_pretrained(tmp_path / "prefix", dtype=None)
    h = Harness(
        tmp_path / "server",
        memory=memory,
        memory_chunk_tokens=16,
        memory_read_back=True,
        memory_reading_prefix=str(tmp_path / "prefix"),
    )
    rendered, real = [], h.service.reasoner.chat_ids
    h.service.reasoner.chat_ids = lambda messages, real=real, rendered=rendered: (
        rendered.append(real(messages)) or rendered[-1]
    )
    with TestClient(h.app) as client:
        client.harness = h
        empty = chat(client, "How many books does Ada keep?").json()
        assert empty["memsplice"]["reading_prefix_slots"] == 0
        turns = [{"role": "user", "content": f"Fact number {i}: Ada keeps {i} red books."} for i in range(6)]
        assert client.post(
            "/v1/memory/scopes/alice/turns", headers=h.headers(), json={"turns": turns}
        ).is_success
        reply = chat(client, "How many books does Ada keep?").json()
    assert reply["memsplice"]["reading_prefix_slots"] == 5 and reply["memsplice"]["slots"] == 0
    ids = torch.tensor([rendered[-1]])
    with torch.no_grad():
        out = memory.generate(
            ids,
            memory=prefix.memory_kv(),
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=memory.reasoner.eos_ids,
        )
    want = memory.reasoner.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert reply["choices"][0]["message"]["content"].strip() == want.strip()
