"""Online learning with the real learner (`memsplice.online.OnlineLearner` behind `serve.online`), on the tiny
reasoner: chats queue samples, the worker runs real updates (weights change, a measured loss is recorded), requests
are answered while an update runs and never see half-updated weights, deletion reaches the learner's replay and its
saved state, fallback events after an update land under their scope, and a restart resumes the learner.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import threading
import time

import httpx
import pytest
import torch
from tests.serve.harness import Harness, live, process_setup, small_memory

from memsplice.serve import MemoryService, create_app
from memsplice.serve.online import ServerOnlineLearner, build_online_learner
from memsplice.serve.scope_memory import weights_digest


def make(tmp_path, memory=None, **config) -> tuple[Harness, ServerOnlineLearner]:
    config = {
        "online_learning": True,
        "online_interval_s": 0.05,
        "online_batch_size": 2,
        "online_lr": 1e-3,
        "online_replay_per_update": 2,
        "online_anchor_interval": 4,
        **config,
    }
    h = Harness(tmp_path, memory=memory, **config)
    learner = build_online_learner(h.memory, h.config)
    h.service = MemoryService(h.memory, h.store, h.config, learner=learner, weights_dir=h.config.weights_dir)
    h.app = create_app(h.service)
    return h, learner


def chat(http, h, scope: str, text: str) -> httpx.Response:
    r = http.post(
        "/v1/chat/completions",
        json={
            "model": h.model,
            "user": scope,
            "max_tokens": 4,
            "temperature": 0,
            "messages": [{"role": "user", "content": text}],
        },
    )
    assert r.status_code == 200, r.text
    return r


def wait_for(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class Hold:
    """A forward pre-hook on the learner's encoder that parks the update until released: a slow update."""

    def __init__(self, module: torch.nn.Module):
        self.entered, self.release = threading.Event(), threading.Event()
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.entered.set()
        assert self.release.wait(60), "the test never released the update"

    def remove(self) -> None:
        self.release.set()
        self.handle.remove()


def test_chats_drive_real_updates_that_change_the_served_weights(tmp_path):
    h, learner = make(tmp_path)
    served = weights_digest(h.memory)
    with live(h) as url, httpx.Client(base_url=url, headers=h.headers(), timeout=60) as http:
        for text in ("Ada lives in Lisbon.", "Her cat is called Pim.", "She plays the cello."):
            chat(http, h, "alice", text)
        wait_for(lambda: h.store.queued_training() == 0 and h.service.online.step >= 2)
        training = http.get("/v1/memory/training").json()
    status = training["status"]
    assert status["errors"] == 0 and status["learner"]["updates"] >= 2
    assert status["learner"]["replay_items"] == 3  # every chat exchange, now in the learner's reservoir
    losses = [p["value"] for p in training["metrics"]["loss"]]
    assert losses and all(math.isfinite(v) and v > 0 for v in losses)
    assert {"loss_next_token", "loss_denoising", "loss_ewc", "grad_norm"} <= set(training["metrics"])
    assert sum(p["value"] for p in training["metrics"]["samples"]) == 3.0  # each exchange trained on once
    # real training: the served weights moved, equal the learner's, and were saved as served
    assert h.service.weights == weights_digest(h.memory) != served
    assert weights_digest(learner.memory) == h.service.weights
    assert learner.memory is not h.memory
    from memsplice.memory import MemoryModel

    saved = MemoryModel.from_pretrained(h.config.weights_dir, reasoner=h.memory.reasoner)
    assert weights_digest(saved) == h.service.weights
    # a chat exchange became the interaction observe_exchange would record: history, user turn, answer (when the
    # tiny reasoner said anything); each exchange's history ends with the one before it
    items = sorted(learner.learner.reservoir.items, key=lambda it: it.id)
    assert items[0].context == [] and all(it.query for it in items)
    for prev, it in zip(items, items[1:], strict=False):
        assert it.context[-len(prev.query + prev.response) :] == prev.query + prev.response
    assert {it.scope for it in items} == {"alice"}
    assert h.store.replay(100) == []  # the learner's reservoir is the replay; the store keeps none besides


def test_requests_are_answered_while_an_update_runs_and_never_see_half_updated_weights(tmp_path):
    h, learner = make(tmp_path)
    hold = Hold(learner.memory.encoder)
    before = weights_digest(h.memory)
    try:
        with live(h) as url, httpx.Client(base_url=url, headers=h.headers(), timeout=60) as http:
            chat(http, h, "alice", "Ada lives in Lisbon.")
            assert hold.entered.wait(30)  # the update is parked inside the learner's forward pass
            for i in range(3):
                t0 = time.perf_counter()
                r = chat(http, h, "alice", f"question {i}")
                assert time.perf_counter() - t0 < 10  # not waiting for the update
                assert r.json()["memsplice"]["live"]
                # the serving weights are untouched while the learner's copy trains
                assert weights_digest(h.memory) == h.service.weights == before
            assert h.service.online.status()["running"] and h.store.queued_training() > 0
            hold.remove()
            wait_for(lambda: h.store.queued_training() == 0 and h.service.online.step >= 2)
            # after the swap: exactly the learner's weights, not a mix
            assert weights_digest(h.memory) == h.service.weights == weights_digest(learner.memory) != before
            r = chat(http, h, "alice", "Where does Ada live?")  # scope memory re-encoded with the new weights
            assert r.json()["memsplice"]["live"]
    finally:
        hold.remove()


def test_deletion_reaches_the_learners_replay_and_saved_state(tmp_path):
    h, learner = make(tmp_path)
    with (
        live(h) as url,
        httpx.Client(base_url=url, headers=h.headers(h.admin_key), timeout=60) as http,
    ):
        chat(http, h, "alice", "alice's secret is 4321")
        chat(http, h, "bob", "bob's note")
        wait_for(lambda: h.store.queued_training() == 0 and h.service.online.step >= 1)
        scopes = {it.scope for it in learner.learner.reservoir.items}
        assert scopes == {"alice", "bob"}
        # another update in flight, holding an alice sample, while alice is deleted
        hold = Hold(learner.memory.encoder)
        try:
            chat(http, h, "alice", "one more secret")
            assert hold.entered.wait(30)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                deletion = pool.submit(http.delete, "/v1/memory/scopes/alice")
                t0 = time.perf_counter()
                chat(http, h, "bob", "still served")  # other scopes do not wait for the deletion
                assert time.perf_counter() - t0 < 10
                time.sleep(0.2)
                assert not deletion.done()  # it waits for the update in flight to finish
                hold.remove()
                r = deletion.result(60)
        finally:
            hold.remove()
        assert r.status_code == 200 and r.json()["online_learner_items"] >= 2
    assert all(v == 0 for v in h.store.row_counts("alice").values())
    inner = learner.learner
    held = [*inner.reservoir.items, *inner.buffer.items]
    assert held and {it.scope for it in held} == {"bob"}
    assert "alice" not in list(inner.fallbacks.scopes)
    state = (h.config.online_dir / "online_state.json").read_text()
    assert '"alice"' not in state and '"bob"' in state  # the saved state was rewritten without her
    assert {it["scope"] for it in json.loads(state)["reservoir"]["items"]} == {"bob"}


def test_fallback_events_of_the_updated_memory_are_recorded_under_their_scope(tmp_path):
    h, learner = make(tmp_path)
    with live(h) as url, httpx.Client(base_url=url, headers=h.headers(), timeout=60) as http:
        chat(http, h, "alice", "Ada lives in Lisbon.")
        chat(http, h, "alice", "Her cat is called Pim.")
        wait_for(lambda: h.store.queued_training() == 0 and h.service.online.step >= 1)
        served = h.service.weights
        h.memory.config.max_latent_norm = 1e-6  # every latent of the updated memory now fails the check
        r = http.post("/v1/memory/scopes/alice:work/text", json={"text": "a note"})
        assert r.status_code == 200
        events = http.get("/v1/memory/scopes/alice:work/events").json()["data"]
        assert events and events[0]["reason"] == "norm_exceeded" and h.service.weights == served
        assert http.get("/v1/memory/scopes/alice/events").json()["data"] == []
        # the learner took the fallback input and trained on it in the update of the note's sample
        wait_for(lambda: h.store.queued_training() == 0 and h.service.online.step >= 2)
        training = http.get("/v1/memory/training").json()
    assert learner.learner.fallbacks.received >= 1
    assert sum(p["value"] for p in training["metrics"]["fallbacks"]) >= 1
    assert "loss_fallback_norm" in training["metrics"]


def test_restart_resumes_the_learner_state(tmp_path):
    h, learner = make(tmp_path)
    with live(h) as url, httpx.Client(base_url=url, headers=h.headers(), timeout=60) as http:
        for text in ("one", "two", "three", "four"):
            chat(http, h, "alice", text)
        wait_for(lambda: h.store.queued_training() == 0 and h.service.online.step >= 2)
    inner = learner.learner
    h.store.close()
    memory = small_memory(seed=99)  # different weights: the restart must take the saved ones
    from memsplice.serve.server import load_memory

    memory = load_memory(h.config, memory.reasoner)
    h2, learner2 = make(tmp_path, memory=memory)
    again = learner2.learner
    assert (again.updates, again.steps, again.next_id) == (inner.updates, inner.steps, inner.next_id)
    assert [it.to_dict() for it in again.reservoir.items] == [it.to_dict() for it in inner.reservoir.items]
    assert again.optimizer.state_dict()["state"] and again.anchor.refreshes == inner.anchor.refreshes
    assert weights_digest(again.memory) == weights_digest(memory) == weights_digest(inner.memory)
    assert h2.service.online.step == h.service.online.step
    with live(h2) as url, httpx.Client(base_url=url, headers=h2.headers(), timeout=60) as http:
        chat(http, h2, "alice", "five")
        chat(http, h2, "alice", "six")
        wait_for(lambda: h2.store.queued_training() == 0 and again.updates > inner.updates)
    assert again.next_id == inner.next_id + 2


def test_online_settings_reach_the_learner_and_bad_ones_name_the_field(tmp_path):
    from memsplice.serve import ServeConfig

    _, learner = make(tmp_path, online_lr=2e-4, online_ewc_weight=0.0, replay_capacity=7)
    cfg = learner.learner.config
    assert (cfg.lr, cfg.ewc_weight, cfg.replay_capacity, cfg.batch_size) == (2e-4, 0.0, 7, 2)
    with pytest.raises(ValueError, match="online_lr"):
        ServeConfig(online_lr=0)
    with pytest.raises(ValueError, match="online_replay_per_update"):
        ServeConfig(online_replay_per_update=-1)
    with pytest.raises(ValueError, match="online_rehearsal_per_update"):
        ServeConfig(online_rehearsal_per_update=-1)
    env = ServeConfig.load(environ={"MEMSPLICE_ONLINE_ANCHOR_INTERVAL": "16", "MEMSPLICE_ONLINE_LR": "1e-4"})
    assert env.online_config().anchor_interval == 16 and env.online_config().lr == 1e-4


def test_online_rehearsal_gives_the_learner_a_synthetic_set_also_when_resumed(tmp_path):
    _, learner = make(tmp_path / "new", online_rehearsal_per_update=1)
    inner = learner.learner
    assert inner.config.rehearsal_per_update == 1 and "train split" in inner.rehearsal.source
    assert "rehearsal" in inner.update(_two_interactions()).parts
    _, plain = make(tmp_path / "resumed")
    plain.learner.save(tmp_path / "resumed" / "state")
    from memsplice.online import OnlineLearner
    from memsplice.serve.online import apply_settings

    resumed = OnlineLearner.load(tmp_path / "resumed" / "state", reasoner=plain.learner.reasoner)
    assert resumed.rehearsal is None
    apply_settings(resumed, _online_config(online_rehearsal_per_update=2))
    assert resumed.config.rehearsal_per_update == 2 and len(resumed.rehearsal) > 0


def test_online_guard_gives_the_learner_a_canary_also_when_resumed(tmp_path):
    from memsplice.serve import ServeConfig

    _, learner = make(tmp_path / "new", online_guard_tolerance=0.05)
    inner = learner.learner
    assert inner.config.guard_tolerance == 0.05 and inner.guard.tolerance == 0.05
    assert "canary" in inner.guard.canary.source and 0.0 <= inner.guard.reference <= 1.0
    assert learner.status()["guard_checks"] == 0 and learner.status()["guard_rollbacks"] == 0
    for _ in range(2):  # 4 samples: one anchor refresh (online_anchor_interval 4), so one check
        learner.learner.observe_batch(_two_interactions())
    assert learner.status()["guard_checks"] == 1
    _, plain = make(tmp_path / "resumed")
    assert plain.learner.guard is None and "guard_checks" not in plain.status()
    plain.learner.save(tmp_path / "resumed" / "state")
    from memsplice.online import OnlineLearner
    from memsplice.serve.online import apply_settings

    resumed = OnlineLearner.load(tmp_path / "resumed" / "state", reasoner=plain.learner.reasoner)
    apply_settings(resumed, _online_config(online_guard_tolerance=0.02))
    assert resumed.guard is not None and resumed.guard.tolerance == 0.02
    with pytest.raises(ValueError, match="online_guard_tolerance"):
        ServeConfig(online_guard_tolerance=1.0)


def _two_interactions():
    from memsplice.online import Interaction

    return [Interaction(id=-1, context=[5, 6, 7, 8], query=[9, 10, 11], response=[12, 13, 14]) for _ in "ab"]


def _online_config(**overrides):
    from memsplice.serve import ServeConfig

    return ServeConfig(**overrides).online_config()


def test_memsplice_serve_online_learning_trains_in_the_server_process(tmp_path):
    from memsplice.bench.serve import server_command, spawn_server
    from memsplice.serve.server import free_port

    setup = process_setup(tmp_path)
    data, key = setup["data"], setup["key"]
    port = free_port()
    cmd = server_command(
        data,
        port,
        reasoner=setup["reasoner"],
        checkpoint=setup["checkpoint"],
        torch_threads=1,
        extra=["--online-learning"],
    )
    env = {"MEMSPLICE_ONLINE_BATCH_SIZE": "1", "MEMSPLICE_ONLINE_INTERVAL_S": "0.1"}
    with (
        spawn_server(cmd, port, log_path=setup["log"], env=env) as (url, _),
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http,
    ):
        model = http.get("/v1/models").json()["data"][0]["id"]
        r = http.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "user": "alice",
                "max_tokens": 3,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        assert r.status_code == 200

        def trained():
            status = http.get("/v1/memory/training").json()["status"]
            return status["step"] >= 1 and status["queued"] == 0

        wait_for(trained)
        training = http.get("/v1/memory/training").json()
        assert training["enabled"] and training["status"]["errors"] == 0
        assert math.isfinite(training["metrics"]["loss"][0]["value"])
    assert (data / "online" / "online_state.json").is_file()


def test_online_consolidation_holds_writes_also_when_resumed(tmp_path):
    _, learner = make(tmp_path / "new", online_consolidation_weight=10.0)
    inner = learner.learner
    inner.observe_batch(_two_interactions())
    assert learner.status()["held_writes"] == len(inner.consolidation) > 0
    assert "consolidation" in inner.update(_two_interactions()).parts
    _, plain = make(tmp_path / "resumed")
    assert plain.learner.consolidation is None and "held_writes" not in plain.status()
    plain.learner.save(tmp_path / "resumed" / "state")
    from memsplice.online import OnlineLearner
    from memsplice.serve.online import apply_settings

    resumed = OnlineLearner.load(tmp_path / "resumed" / "state", reasoner=plain.learner.reasoner)
    apply_settings(resumed, _online_config(online_consolidation_weight=5.0))
    assert resumed.consolidation is not None and len(resumed.consolidation) == 0
    apply_settings(resumed, _online_config())
    assert resumed.consolidation is None
