"""The official `openai` client against a live server on loopback: models, chat with memory across sessions
(with a server restart between them), streaming, and errors surfacing as the client's own exception types."""

from __future__ import annotations

import openai
import pytest
from tests.serve.harness import Harness, live

from memsplice.serve import MemoryService, ServeConfig, create_app
from memsplice.serve.server import serve_in_thread
from memsplice.store import MemoryStore


def test_openai_client_chats_with_memory_across_sessions_and_streams(tmp_path):
    h = Harness(tmp_path, expose_memory_digest=True)
    with live(h) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=h.key, max_retries=0)
        assert [m.id for m in client.models.list()] == [h.model]
        first = client.chat.completions.create(
            model=h.model,
            user="alice",
            max_tokens=6,
            temperature=0,
            messages=[
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "My name is Ada and I live in Lisbon."},
            ],
        )
        assert first.choices[0].message.role == "assistant"
        assert first.usage.completion_tokens <= 6 and first.usage.prompt_tokens > 0
        assert first.model_extra["memsplice"]["live"] is False  # session 1 starts with an empty memory
        first_digest_source = h.store.load_state("alice")["version"]
        assert first_digest_source == 1

    # a new server process reads the same store: session 2 starts where session 1 stopped
    config = ServeConfig(data_dir=str(tmp_path), log_format="text", expose_memory_digest=True, port=0)
    service = MemoryService(h.memory, MemoryStore(h.url), config)
    with serve_in_thread(create_app(service), config) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=h.key, max_retries=0)
        session1_turns = len(service.store.spans("alice"))
        second = client.chat.completions.create(
            model=h.model,
            user="alice",
            max_tokens=6,
            temperature=0,
            messages=[{"role": "user", "content": "Where do I live?"}],
        )
        info = second.model_extra["memsplice"]
        assert info["live"] is True and info["turns_in_memory"] == session1_turns >= 1
        texts = [s["text"] for s in service.store.spans("alice")]
        assert texts[0] == "My name is Ada and I live in Lisbon." and "Where do I live?" in texts

        stream = client.chat.completions.create(
            model=h.model,
            user="alice",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "And my name?"}],
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish in (["stop"], ["length"])
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
        plain = client.chat.completions.create(
            model=h.model,
            user="alice",
            max_tokens=8,
            temperature=0,
            extra_body={"memory": False},
            messages=[{"role": "user", "content": "And my name?"}],
        )
        assert plain.model_extra["memsplice"]["live"] is False
        spans = [(s["role"], s["text"]) for s in service.store.spans("alice")]
        streamed = [("user", "And my name?")] + ([("assistant", text)] if text.strip() else [])
        assert (
            spans[-len(streamed) :] == streamed
        )  # the streamed exchange was written, the memory=false one not

        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(
                model=h.model, user="bob", messages=[{"role": "user", "content": "x"}]
            )
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=h.model, n=3, messages=[{"role": "user", "content": "x"}])
        bad = openai.OpenAI(base_url=f"{url}/v1", api_key="msk_wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
