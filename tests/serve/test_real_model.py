"""The server on the real SmolLM2-135M-Instruct reasoner (with an untrained memory): the chat template, greedy
answers with and without memory, streaming equal to the plain answer."""

from __future__ import annotations

import json

import pytest
import torch

from memsplice.memory import MemoryConfig, MemoryModel
from memsplice.serve import MemoryService, ServeConfig, create_app
from memsplice.store import MemoryStore


@pytest.mark.real_model
def test_real_reasoner_chat_and_stream(real_reasoner, tmp_path):
    from fastapi.testclient import TestClient

    torch.manual_seed(0)
    memory = MemoryModel(MemoryConfig(num_slots=8, max_memory_tokens=128, encoder_layers=2), real_reasoner)
    store = MemoryStore(f"sqlite:///{tmp_path / 'db.sqlite'}")
    service = MemoryService(memory, store, ServeConfig(data_dir=str(tmp_path), auth=False, log_format="text"))
    with TestClient(create_app(service)) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        assert model == "memsplice-SmolLM2-135M-Instruct"
        body = {
            "model": model,
            "max_tokens": 12,
            "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
        }
        bare = client.post("/v1/chat/completions", json=body).json()
        assert (
            "Paris" in bare["choices"][0]["message"]["content"]
        )  # the reasoner itself works through the server
        client.post(
            "/v1/memory/scopes/alice/text", json={"text": "Alice lives in Porto and has a cat called Miso."}
        )
        with_memory = client.post("/v1/chat/completions", json={**body, "user": "alice"}).json()
        assert with_memory["memsplice"]["live"] and with_memory["memsplice"]["slots"] == 8
        r = client.post(
            "/v1/chat/completions", json={**body, "user": "alice", "stream": True, "memory": False}
        )
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert streamed == bare["choices"][0]["message"]["content"]
