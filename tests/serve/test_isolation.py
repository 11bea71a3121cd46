"""Isolation under concurrency: each request splices exactly the memory of its own scope, never another's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
from tests.serve.harness import Harness, live

from memsplice.serve.scope_memory import ScopeMemory
from memsplice.serve.service import kv_digest

FACTS = {
    "alice": "Ada lives in Lisbon and works as a carpenter.",
    "alice:work": "The quick brown fox jumps over the lazy dog.",
    "alice:home": "Numbers like 1234 and dates like 2024-05-17 appear in facts.",
}


def test_concurrent_requests_see_only_their_own_scope(tmp_path):
    h = Harness(tmp_path, expose_memory_digest=True, write_chat_turns=False)
    with live(h) as url:
        headers = h.headers()
        with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
            for scope, fact in FACTS.items():
                assert http.post(f"/v1/memory/scopes/{scope}/text", json={"text": fact}).status_code == 200

            def ask(scope: str) -> dict:
                r = http.post(
                    "/v1/chat/completions",
                    json={
                        "model": h.model,
                        "user": scope,
                        "max_tokens": 6,
                        "temperature": 0,
                        "messages": [{"role": "user", "content": "What do you remember?"}],
                    },
                )
                assert r.status_code == 200, r.text
                return r.json()

            def noise(i: int) -> None:  # concurrent writes to scopes nobody reads in this test
                r = http.post(f"/v1/memory/scopes/alice:noise{i % 3}/text", json={"text": f"noise {i}"})
                assert r.status_code == 200, r.text

            solo = {scope: ask(scope) for scope in FACTS}
            jobs = [scope for _ in range(8) for scope in FACTS]
            with ThreadPoolExecutor(max_workers=12) as pool:
                noise_futures = [pool.submit(noise, i) for i in range(12)]
                answers = list(pool.map(ask, jobs))
                for f in noise_futures:
                    f.result()

    digests = {scope: solo[scope]["memsplice"]["kv_sha256"] for scope in FACTS}
    assert len(set(digests.values())) == len(FACTS)  # three scopes, three different memories
    for scope, answer in zip(jobs, answers, strict=True):
        assert answer["memsplice"]["scope"] == scope
        assert answer["memsplice"]["kv_sha256"] == digests[scope]
        assert answer["choices"][0]["message"]["content"] == solo[scope]["choices"][0]["message"]["content"]

    # the memory a request used is the one computed for that scope alone, from its stored state
    h2_store = h.store.__class__(h.url)
    for scope in FACTS:
        row = h2_store.load_state(scope)
        alone = ScopeMemory.from_state(scope, h.memory, row["kind"], row["state"], row["tensors"])
        assert kv_digest(alone.memory_kv()) == digests[scope]
        fresh = ScopeMemory(scope, h.memory, h.service.conversation_config)
        fresh.add_turns([("note", FACTS[scope])])
        assert kv_digest(fresh.memory_kv()) == digests[scope]  # recomputed from the text alone
    h2_store.close()
