"""Greedy chat requests decode on `GreedyDecoder` and answer exactly what eager `generate()` answered: the same
tokens, text, usage and finish_reason, streamed or not, with and without memory, with stop strings, eos and
cancellation; sampling requests and requests beyond the window stay eager."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from tests.serve.harness import Harness, small_memory

from memsplice.inject import generate_with_memory
from memsplice.serve.schemas import ChatCompletionRequest
from memsplice.serve.service import GenerationParams, TextStream

FACTS = [
    "Ada Lovelace lives in Lisbon and works as a carpenter.",
    "The quick brown fox jumps over the lazy dog.",
]
QUESTIONS = ["Where does Ada live?", "What did the fox do?", "Tell me about memory slots."]


def _harness(tmp_path, engine: str, eos: int | None = None) -> Harness:
    memory = small_memory()
    if eos is not None:  # a token the tiny reasoner does emit, so that answers end on eos
        memory.reasoner.model.generation_config.eos_token_id = [2, eos]
    return Harness(tmp_path / engine, memory=memory, engine=engine)


def _body(h: Harness, content: str, **extra) -> dict:
    return {
        "model": h.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 12,
        "temperature": 0,
        **extra,
    }


def _answers(h: Harness, requests: list[dict]) -> list[dict]:
    """Each request's text, finish_reason, usage and memsplice info (streamed requests: joined deltas)."""
    from tests.serve.test_api import sse_events

    out = []
    with TestClient(h.app) as client:
        client.post(
            "/v1/memory/scopes/alice/turns",
            headers=h.headers(),
            json={"turns": [{"role": "user", "content": f} for f in FACTS]},
        )
        for extra in requests:
            body = _body(h, **extra)
            r = client.post("/v1/chat/completions", headers=h.headers(), json=body)
            assert r.status_code == 200, r.text
            if body.get("stream"):
                chunks = [e for e in sse_events(r.text)[:-1] if e.get("choices")]
                text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
                finish = [
                    c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]
                ]
                usage = [e["usage"] for e in sse_events(r.text)[:-1] if e.get("usage")]
                out.append({"text": text, "finish": finish, "usage": usage})
            else:
                j = r.json()
                info = {k: v for k, v in j["memsplice"].items() if k not in ("state_version",)}
                out.append(
                    {
                        "text": j["choices"][0]["message"]["content"],
                        "finish": j["choices"][0]["finish_reason"],
                        "usage": j["usage"],
                        "memsplice": info,
                    }
                )
    return out


def _requests() -> list[dict]:
    reqs = []
    for q in QUESTIONS:
        reqs += [
            {"content": q, "user": "alice"},  # memory read (and the exchange written) in scope alice
            {"content": q},  # no scope: the bare reasoner
            {"content": q, "user": "alice", "memory": False},
            {"content": q, "user": "alice", "max_tokens": 3},
            {"content": q, "user": "alice", "stream": True, "stream_options": {"include_usage": True}},
        ]
    return reqs


def test_greedy_answers_equal_the_eager_server(tmp_path):
    auto = _harness(tmp_path, "auto")
    eager = _harness(tmp_path, "eager")
    got, want = _answers(auto, _requests()), _answers(eager, _requests())
    assert got == want
    assert auto.service.decoders.decoders, "greedy requests must decode on the engine"
    assert eager.service.decoders is None
    assert any(a.get("memsplice", {}).get("live") for a in got), "some answers must read live memory"


def test_stop_strings_and_eos_end_answers_as_before(tmp_path):
    """finish_reason and completion_tokens for eos, stop strings (streamed or not) and the token limit."""
    first = _answers(_harness(tmp_path / "probe", "eager"), [{"content": QUESTIONS[0], "max_tokens": 16}])[0]
    tok = small_memory().reasoner.tokenizer
    eos = tok(first["text"], add_special_tokens=False)["input_ids"][2]  # ends answers from now on
    free = _answers(
        _harness(tmp_path / "probe-eos", "eager", eos), [{"content": QUESTIONS[1], "max_tokens": 16}]
    )
    free = free[0]["text"]
    assert len(free) > 4
    stop = free[2:4]
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    reqs = [
        {"content": QUESTIONS[0], "max_tokens": 16},
        {"content": QUESTIONS[0], "max_tokens": 16, **stream},
        {"content": QUESTIONS[1], "max_tokens": 16, "stop": [stop, "no such text"]},
        {"content": QUESTIONS[1], "max_tokens": 16, "stop": [stop], **stream},
        {"content": QUESTIONS[1], "max_tokens": 16, "stop": ["no such text"], **stream},
        {"content": QUESTIONS[2], "max_tokens": 2},
    ]
    got = _answers(_harness(tmp_path, "auto", eos=eos), reqs)
    want = _answers(_harness(tmp_path, "eager", eos=eos), reqs)
    assert got == want
    assert got[0]["finish"] == "stop" and got[0]["usage"]["completion_tokens"] < 16  # eos
    assert got[1]["finish"] == ["stop"] and got[1]["usage"] == [got[0]["usage"]]
    assert got[2]["text"] == got[3]["text"] == free[: free.index(stop)] and got[2]["finish"] == "stop"
    assert got[4]["text"] == free
    assert got[5]["finish"] == "length" and got[5]["usage"]["completion_tokens"] == 2


def _service(tmp_path, engine="auto", **config):
    return Harness(tmp_path / engine, memory=small_memory(), engine=engine, **config).service


def test_decode_greedy_gives_eager_tokens_with_and_without_memory(tmp_path):
    """The worker-side functions directly: engine tokens == `generate_with_memory(do_sample=False)`."""
    svc = _service(tmp_path)
    tok = svc.reasoner.tokenizer
    asyncio.run(svc.add_turns("alice", [("user", f) for f in FACTS]))
    sm = asyncio.run(svc._scope_memory("alice"))
    params = GenerationParams(10, 0.0, None, [], None)
    for question in QUESTIONS:
        ids = svc.reasoner.chat_ids([{"role": "user", "content": question}])
        for kv in (None, sm.memory_kv(question)):
            decoder = svc._greedy_decoder(len(ids), kv, params)
            assert decoder is not None
            got = svc._decode_greedy(decoder, ids, kv, params, TextStream(tok, [], None), threading.Event())
            x = torch.tensor([ids])
            ref = generate_with_memory(
                svc.reasoner, x, torch.ones_like(x), kv, max_new_tokens=10, do_sample=False, pad_token_id=0
            )[0, len(ids) :].tolist()
            assert got == ref
    assert sm.memory_kv(QUESTIONS[0]).any_live
    svc.close()


class _GraphLike:
    """A decoder that reports CUDA graphs, so the service takes its one-sync path (cut at stop strings after)."""

    cuda_graphs = True

    def __init__(self, decoder):
        self.decoder, self.callbacks = decoder, []

    def generate(self, *args, **kwargs):
        self.callbacks.append(kwargs.get("on_token"))
        return self.decoder.generate(*args, **kwargs)


def test_unstreamed_stop_strings_are_cut_after_one_sync_decode(tmp_path):
    svc = _service(tmp_path)
    tok = svc.reasoner.tokenizer
    ids = svc.reasoner.chat_ids([{"role": "user", "content": QUESTIONS[0]}])
    free = TextStream(tok, [], None)
    svc._decode_eager(ids, None, GenerationParams(16, 0.0, None, [], None), free, threading.Event())
    assert len(free.text) > 4
    for stop in (free.text[1:3], free.text[-2:], "no such text"):
        params = GenerationParams(16, 0.0, None, [stop], None)
        want_stream = TextStream(tok, [stop], None)
        want = svc._decode_eager(ids, None, params, want_stream, threading.Event())
        decoder = _GraphLike(svc._greedy_decoder(len(ids), None, params))
        got_stream = TextStream(tok, [stop], None)
        got = svc._decode_greedy(decoder, ids, None, params, got_stream, threading.Event())
        assert decoder.callbacks == [None], "an unstreamed request must not read tokens one by one"
        assert got == want and got_stream.text == want_stream.text
        assert got_stream.stopped.is_set() == want_stream.stopped.is_set()
    svc.close()


@pytest.mark.parametrize("engine", ["auto", "eager"])
def test_cancelling_a_stream_stops_decoding(tmp_path, engine):
    """The client went away after the first delta: decoding stops after that token, the answer is not written."""
    svc = _service(tmp_path, engine)
    cancel = threading.Event()
    deltas = []

    def sink(delta):
        deltas.append(delta)
        cancel.set()

    req = ChatCompletionRequest(
        model=svc.model_id,
        messages=[{"role": "user", "content": QUESTIONS[2]}],
        max_tokens=20,
        temperature=0,
    )
    result = asyncio.run(svc.chat(req, "alice", sink=sink, cancel=cancel))
    full = asyncio.run(svc.chat(req, None))
    assert result.finish_reason == "cancelled"
    assert 1 <= result.completion_tokens < full.completion_tokens == 20
    assert full.text.startswith(result.text) and result.text.startswith(deltas[0])
    if engine == "auto":  # the engine stops right after the token the client saw last
        assert len(deltas) == 1 and result.text == deltas[0]
    assert svc.store.spans("alice") == []  # a cancelled exchange is not written
    if engine == "auto":
        assert svc.decoders.decoders
    svc.close()


def test_sampling_and_oversized_requests_stay_eager(tmp_path):
    svc = _service(tmp_path)
    sample = ChatCompletionRequest(
        model=svc.model_id,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0.7,
        seed=3,
    )
    a, b = asyncio.run(svc.chat(sample, None)), asyncio.run(svc.chat(sample, None))
    assert a.text == b.text and a.completion_tokens == 4  # seeded sampling, eager as before
    assert svc.decoders.decoders == {}
    svc.decoders.window = 16  # this prompt + max_tokens no longer fit: eager, as before the engine
    greedy = ChatCompletionRequest(
        model=svc.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert asyncio.run(svc.chat(greedy, None)).completion_tokens == 4
    assert svc.decoders.decoders == {}
    svc.close()


def test_a_generation_config_the_engine_cannot_reproduce_keeps_eager(tmp_path):
    memory = small_memory()
    memory.reasoner.model.generation_config.repetition_penalty = 1.5
    h = Harness(tmp_path, memory=memory)
    assert h.service.config.engine == "auto" and h.service.decoders is None
    h.service.close()
