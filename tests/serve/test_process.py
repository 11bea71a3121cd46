"""The server as a process, started by `memsplice serve`: crash (SIGKILL) during writes, graceful SIGTERM, restart.

Every write the server acknowledged (HTTP 200) must be in the store after a restart, the store must open cleanly,
and spans and memory state must have been committed together (one state version per acknowledged write).
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
from tests.serve.harness import process_setup

from memsplice.bench.serve import server_command, spawn_server
from memsplice.serve.server import free_port
from memsplice.store import MemoryStore


@pytest.fixture
def setup(tmp_path):
    return process_setup(tmp_path)


def command(setup, port: int) -> list[str]:
    return server_command(
        setup["data"],
        port,
        reasoner=setup["reasoner"],
        checkpoint=setup["checkpoint"],
        torch_threads=1,
        extra=["--log-level", "info"],
    )


def writer(url: str, key: str, scope: str, acknowledged: list, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        i = 0
        while not stop.is_set():
            text = f"{scope} write {i}"
            try:
                r = http.post(f"/v1/memory/scopes/{scope}/turns", json={"turns": [{"content": text}]})
            except httpx.HTTPError:
                return  # the server is gone
            if r.status_code == 200:
                acknowledged.append(text)
            i += 1


def check_store(setup, acked: dict[str, list[str]], turns_per_write: dict[str, int] | None = None) -> None:
    """The store opens cleanly and holds every acknowledged turn, with one state version per write."""
    store = MemoryStore(f"sqlite:///{setup['data'] / 'memsplice.db'}")
    try:
        assert store.integrity_check() == "ok"
        for scope, texts in acked.items():
            stored = [s["text"] for s in store.spans(scope, limit=100_000)]
            assert set(texts) <= set(stored), f"{scope}: lost {sorted(set(texts) - set(stored))[:5]}"
            state = store.load_state(scope)
            # spans and state were committed together: one state version per write, and no state without a write
            # (a writer whose requests all came before the kill unanswered has nothing stored, and that is right)
            if not stored:
                assert state is None, f"{scope}: a memory state without any stored turn"
                continue
            assert state is not None, f"{scope}: {len(stored)} stored turns without a memory state"
            assert state["version"] * (turns_per_write or {}).get(scope, 1) == len(stored)
    finally:
        store.close()


def check_restart(setup, acked: dict[str, list[str]]) -> None:
    """A restarted server serves every acknowledged turn and continues the transcript after the last one."""
    port = free_port()
    with spawn_server(command(setup, port), port, log_path=setup["log"]) as (url, _proc):
        headers = {"Authorization": f"Bearer {setup['key']}"}
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
        for scope, texts in acked.items():
            spans = httpx.get(
                f"{url}/v1/memory/scopes/{scope}/spans", params={"limit": 100_000}, headers=headers
            ).json()["data"]
            assert set(texts) <= {s["text"] for s in spans}
            r = httpx.post(
                f"{url}/v1/memory/scopes/{scope}/turns",
                json={"turns": [{"content": "after restart"}]},
                headers=headers,
            )
            assert r.status_code == 200 and r.json()["seqs"] == [len(spans)]


def test_kill_during_writes_loses_no_acknowledged_write(setup):
    port = free_port()
    acked = {f"crash{w}": [] for w in range(4)}
    stop = threading.Event()
    with spawn_server(command(setup, port), port, log_path=setup["log"]) as (url, proc):
        threads = [
            threading.Thread(target=writer, args=(url, setup["key"], s, acked[s], stop)) for s in acked
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(map(len, acked.values())) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no cleanup of any kind
        proc.wait(30)
        stop.set()
        for t in threads:
            t.join(30)
    assert sum(map(len, acked.values())) >= 20
    check_store(setup, acked)
    check_restart(setup, acked)


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests(setup):
    port = free_port()
    acked = {f"term{w}": [] for w in range(3)}
    stop = threading.Event()
    chat_result = {}
    with spawn_server(command(setup, port), port, log_path=setup["log"]) as (url, proc):
        headers = {"Authorization": f"Bearer {setup['key']}"}
        model = httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]

        def long_chat():
            r = httpx.post(
                f"{url}/v1/chat/completions",
                headers=headers,
                timeout=60,
                json={
                    "model": model,
                    "user": "term-chat",
                    "max_tokens": 400,
                    "temperature": 1.0,
                    "seed": 1,
                    "messages": [{"role": "user", "content": "Tell me everything."}],
                },
            )
            chat_result["status"] = r.status_code
            chat_result["body"] = r.json()

        threads = [
            threading.Thread(target=writer, args=(url, setup["key"], s, acked[s], stop)) for s in acked
        ]
        threads.append(threading.Thread(target=long_chat))
        for t in threads:
            t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down, so the exit status reads "terminated by SIGTERM"
        assert proc.wait(60) in (0, -signal.SIGTERM)
        stop.set()
        for t in threads:
            t.join(60)
    log = setup["log"].read_text()
    assert '"event": "shutdown"' in log and '"level": "error"' not in log  # lifespan shutdown ran to its end
    assert chat_result["status"] == 200  # in flight when SIGTERM came, and answered
    written = chat_result["body"]["memsplice"]["written_turns"]
    acked["term-chat"] = ["Tell me everything.", chat_result["body"]["choices"][0]["message"]["content"]][
        :written
    ]
    check_store(setup, acked, {"term-chat": written})
