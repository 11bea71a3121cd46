"""The online-learning worker: its queue lives in the store, it never blocks a request, its weights reach serving
as one swap (saved atomically), a deleted scope's samples never become replay data, and a restart re-queues what
a crashed update had taken.

The learner here is a test double with the worker's interface (`update`, `state_dict`) that trains nothing but
changes the weights visibly; the worker, queue, swap, persistence and deletion paths it exercises are the real ones.
"""

from __future__ import annotations

import copy
import threading
import time

import httpx
import torch
from tests.serve.harness import Harness, live

from memsplice.memory import MemoryModel


class GateShiftLearner:
    """Each update lowers the gate bias of a copy of the memory by 0.5 (a visible weight change); can be held."""

    def __init__(self, memory: MemoryModel):
        self.memory = MemoryModel(copy.deepcopy(memory.config), memory.reasoner)
        self.memory.load_state_dict(memory.state_dict())
        self.seen: list[list[dict]] = []
        self.replayed: list[list[dict]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()

    def update(self, samples: list[dict], replay: list[dict]) -> dict[str, float]:
        self.entered.set()
        assert self.hold.wait(30), "the test never released the update"
        self.seen.append(samples)
        self.replayed.append(replay)
        with torch.no_grad():
            self.memory.gate.bias.sub_(0.5)
        return {"loss": float(len(self.seen))}

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.memory.state_dict().items()}


def make(tmp_path, **config):
    h = Harness(tmp_path, online_learning=False, online_interval_s=0.05, **config)
    learner = GateShiftLearner(h.memory)
    from memsplice.serve import MemoryService, create_app

    h.service = MemoryService(h.memory, h.store, h.config, learner=learner, weights_dir=tmp_path / "memory")
    h.app = create_app(h.service)
    return h, learner


def wait_for(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_updates_run_in_the_background_without_blocking_requests(tmp_path):
    h, learner = make(tmp_path)
    learner.hold.clear()  # the first update will block until released
    with live(h) as url, httpx.Client(base_url=url, headers=h.headers(), timeout=30) as http:
        gate_before = None
        r = http.post("/v1/memory/scopes/alice/text", json={"text": "Ada lives in Lisbon."})
        assert r.status_code == 200
        wait_for(learner.entered.is_set)  # an update is now in flight, holding its samples
        # requests keep being served while the update is blocked
        t0 = time.perf_counter()
        for i in range(3):
            r = http.post(
                "/v1/chat/completions",
                json={
                    "model": h.model,
                    "user": "alice",
                    "max_tokens": 3,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": f"q{i}"}],
                },
            )
            assert r.status_code == 200
        assert time.perf_counter() - t0 < 20
        gate_before = http.get("/v1/memory/scopes/alice/gate").json()["mean"]
        weights_before = h.service.weights
        assert h.store.queued_training() > 0  # the chats' turns wait in the store's queue
        learner.hold.set()
        wait_for(lambda: h.store.queued_training() == 0 and h.service.online.step >= 2)
        assert h.service.weights != weights_before  # swapped in
        gate_after = http.get("/v1/memory/scopes/alice/gate").json()["mean"]
        assert gate_after < gate_before  # the scope's memory was re-encoded with the new weights
        training = http.get("/v1/memory/training").json()
        assert training["enabled"] and training["status"]["step"] >= 2
        assert [p["value"] for p in training["metrics"]["loss"]][:2] == [1.0, 2.0]
    [first] = learner.seen[0]  # one sample per memory write: its turns, the history before it, token ids
    assert first["scope"] == "alice" and first["turns"] == [{"role": "note", "text": "Ada lives in Lisbon."}]
    assert first["context"] == [] and first["query"] and first["response"] == []
    # a chat exchange: context = alice's note, query = the user turn, response = the reply
    chat_sample = learner.seen[1][0]
    assert [t["role"] for t in chat_sample["turns"]] == ["user", "assistant"]
    assert chat_sample["context"][: len(first["query"])] == first["query"] and chat_sample["response"]
    saved = MemoryModel.from_pretrained(tmp_path / "memory", reasoner=h.memory.reasoner)
    assert torch.equal(saved.gate.bias, h.memory.gate.bias)  # what is served is what was saved
    replay = h.store.replay(100)
    assert {t["text"] for r in replay for t in r["payload"]["turns"]} >= {"Ada lives in Lisbon."}


def test_deleting_a_scope_during_an_update_keeps_none_of_its_samples(tmp_path):
    h, learner = make(tmp_path)
    learner.hold.clear()
    with live(h) as url, httpx.Client(base_url=url, headers=h.headers(h.admin_key), timeout=30) as http:
        http.post("/v1/memory/scopes/alice/text", json={"text": "alice's secret"})
        http.post("/v1/memory/scopes/bob/text", json={"text": "bob's note"})
        wait_for(learner.entered.is_set)
        # The deletion waits for the update in flight (it forgets on the online thread after it), so the update is
        # released while the deletion is pending, not after it returns.
        release = threading.Timer(0.5, learner.hold.set)
        release.start()
        assert http.delete("/v1/memory/scopes/alice").status_code == 200
        release.join()
        assert learner.seen  # the update that held alice's sample finished, and trained on it
        wait_for(lambda: h.store.queued_training() == 0 and h.service.online.step >= 1)
        time.sleep(0.2)
    assert all(v == 0 for v in h.store.row_counts("alice").values())
    texts = {t["text"] for r in h.store.replay(100) for t in r["payload"]["turns"]}
    assert "alice's secret" not in texts and "bob's note" in texts


def test_queued_samples_survive_a_restart(tmp_path):
    h, _ = make(tmp_path)
    # samples queued and taken by an update that never finished (the process died)
    h.store.commit_write("alice", new_spans=[("user", "x", 1)], training=[{"role": "user", "text": "x"}])
    assert len(h.store.take_training(10)) == 1 and h.store.take_training(10) == []
    h2, learner = make(tmp_path)
    with live(h2):
        wait_for(lambda: h2.store.queued_training() == 0)
    assert learner.seen and learner.seen[0][0]["text"] == "x"
