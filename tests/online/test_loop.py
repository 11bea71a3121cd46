import pytest
import torch
from online_builders import interactions, tiny_memory

from memsplice.conversation import ConversationConfig, ConversationMemory
from memsplice.online import Interaction, OnlineConfig, OnlineLearner, PrivacyConfig


def params(memory):
    return {n: p.detach().clone() for n, p in memory.named_parameters()}


def distance(a, b):
    return sum(float((a[n] - b[n]).pow(2).sum()) for n in a) ** 0.5


def small_config(**overrides):
    cfg = dict(
        batch_size=2, anchor_interval=4, context_tokens=24, target_tokens=12, replay_per_update=2, lr=1e-3
    )
    cfg.update(overrides)
    return OnlineConfig(**cfg)


def test_updates_follow_the_buffer_and_anchor_interval():
    memory = tiny_memory()
    digest = memory.reasoner.weights_digest()
    learner = OnlineLearner(memory, small_config(batch_size=3, anchor_interval=4))
    before = params(memory)
    updates, refreshes = [], []
    for t, it in enumerate(interactions(12), start=1):
        stats, refreshed = learner.observe(it)
        if stats is not None:
            updates.append(t)
            assert set(stats.parts) >= {"next_token", "denoising", "infonce", "ewc"}
            assert all(v == v for v in stats.parts.values())  # no NaN
        if refreshed:
            refreshes.append(t)
    assert updates == [3, 6, 9, 12] and refreshes == [4, 8, 12]
    assert learner.updates == 4 and len(learner.reservoir) == 12
    assert distance(before, params(memory)) > 0
    assert memory.reasoner.weights_digest() == digest
    assert not any(p.requires_grad for p in memory.reasoner.model.parameters())
    assert not memory.training


def test_loss_falls_on_a_repeated_batch():
    memory = tiny_memory()
    learner = OnlineLearner(memory, small_config(lr=3e-3, replay_per_update=0, ewc_weight=0.0))
    batch = interactions(2, seed=5)
    losses = [learner.update([it for it in batch]).parts["next_token"] for _ in range(12)]
    assert losses[-1] < 0.9 * losses[0]


def test_ewc_keeps_important_weights_near_the_anchor():
    final, fisher = {}, None
    for weight in (1e4, 0.0):
        memory = tiny_memory()
        start = params(memory)
        learner = OnlineLearner(memory, small_config(ewc_weight=weight, anchor_interval=1000, lr=3e-3))
        learner.update(
            interactions(2, seed=1)
        )  # with EWC, the first update estimates the Fisher at the anchor
        fisher = fisher or {n: f.clone() for n, f in learner.anchor.fisher.items()}
        for i in range(10):
            learner.update(interactions(2, seed=10 + i))
        final[weight] = (start, params(memory))
    # Drift weighted by the Fisher (what EWC constrains), for the same Fisher in both runs.
    drift = {
        w: sum(float((fisher[n] * (b[n] - a[n]).pow(2)).sum()) for n in fisher) for w, (a, b) in final.items()
    }
    assert drift[1e4] < 0.5 * drift[0.0]


def test_fallback_inputs_are_queued_and_trained_on():
    memory = tiny_memory()
    learner = OnlineLearner(memory, small_config())
    memory.config.max_latent_norm = 1e-6  # every write now falls back
    memory.write(torch.tensor([[5, 6, 7, 8]]))
    assert len(learner.fallbacks) == 1
    memory.config.max_latent_norm = 1000.0
    stats = learner.update(interactions(2))
    assert stats.fallbacks == 1 and "fallback_norm" in stats.parts and len(learner.fallbacks) == 0


def test_step_answers_records_and_conversation_follows_the_new_weights():
    memory = tiny_memory()
    learner = OnlineLearner(memory, small_config(batch_size=2))
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=32, track_attention=True))
    first = learner.step(conv, "Ada lives in Lisbon.", max_new_tokens=4)
    assert first.slots == 0 and first.update is None and conv.turns == 2
    second = learner.step(conv, "Where does Ada live?", max_new_tokens=4)
    assert second.slots > 0 and second.gate is not None and second.update is not None
    assert learner.reservoir.items[0].context == []  # the first step had no history
    assert learner.reservoir.items[1].context  # the second had the first exchange
    assert conv.store[0].uses >= 1  # the probe credited the attended span
    assert conv.add_turn("user", "thanks").refreshed  # memory re-encoded with the updated weights


def test_save_and_load_resume_identically(tmp_path):
    stream = interactions(10, seed=7)
    memory = tiny_memory()
    a = OnlineLearner(memory, small_config(anchor_interval=3))
    for it in stream[:5]:
        a.observe(it)
    a.save(tmp_path / "learner")
    b = OnlineLearner.load(tmp_path / "learner", reasoner=memory.reasoner)
    assert (b.steps, b.updates, len(b.buffer), len(b.reservoir)) == (
        a.steps,
        a.updates,
        len(a.buffer),
        len(a.reservoir),
    )
    for it in stream[5:]:
        a.observe(it)
        b.observe(type(it)(**it.to_dict()))
    pa, pb = params(a.memory), params(b.memory)
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], atol=1e-6, rtol=1e-5)


def test_an_update_steps_on_the_gradient_of_loss_plus_penalty():
    """The update adds the EWC gradient to .grad directly; it must step as a backward pass through
    loss + `anchor.penalty()` does (the sum of the two gradients may differ in its last bits)."""
    a, b = (OnlineLearner(tiny_memory(), small_config(replay_per_update=0, ewc_weight=50.0)) for _ in "ab")
    for learner in (a, b):
        learner.update(interactions(2, seed=1))  # estimates the Fisher, then steps away from the anchor
    batch = interactions(2, seed=2)
    rng = b.rng.getstate()
    stats = a.update(batch)
    b.rng.setstate(rng)
    b.memory.train()
    loss, _ = b._batch_loss(batch, [])
    total = loss + b.anchor.penalty()
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(b.memory.trainable_parameters(), b.config.max_grad_norm)
    b.optimizer.step()
    b.optimizer.zero_grad(set_to_none=True)
    b.memory.eval()
    assert stats.parts["ewc"] > 0 and isinstance(stats.parts["ewc"], float)
    assert stats.loss == pytest.approx(float(total.detach()), rel=1e-6)
    assert stats.grad_norm == pytest.approx(float(grad_norm), rel=1e-5)
    pa, pb = params(a.memory), params(b.memory)
    for n in pa:
        torch.testing.assert_close(pa[n], pb[n], rtol=1e-6, atol=1e-7)


def test_embedding_unties_after_the_warmup_and_keeps_training():
    memory = tiny_memory(embed_warmup_updates=2)
    learner = OnlineLearner(memory, small_config(replay_per_update=0))
    for i in range(3):
        learner.update(interactions(2, seed=i))
    assert not memory.encoder.embedding_tied
    emb = memory.encoder.token_embedding.detach().clone()
    learner.update(interactions(2, seed=9))
    assert not torch.equal(emb, memory.encoder.token_embedding.detach())


def test_private_updates_report_epsilon_and_bound_latents():
    memory = tiny_memory()
    learner = OnlineLearner(
        memory, small_config(privacy=PrivacyConfig(noise_multiplier=1.0, latent_norm_clip=5.0))
    )
    assert memory.config.latent_norm_clip == 5.0
    eps = []
    for i in range(3):
        stats = learner.update(interactions(2, seed=i))
        assert "infonce" not in stats.parts and stats.epsilon is not None
        eps.append(stats.epsilon)
    assert eps[0] < eps[-1]
    mem = memory.write(torch.tensor([[5, 6, 7, 8]]))
    assert float(mem.latents.detach().norm(dim=-1).max()) <= 5.0 + 1e-4


@pytest.mark.parametrize(
    "bad",
    [
        {"batch_size": 0},
        {"lr": 0},
        {"ewc_weight": -1},
        {"fisher_decay": 2.0},
        {"next_token_weight": 0, "denoise_weight": 0, "contrastive_weight": 0},
    ],
)
def test_bad_online_settings_name_the_field(bad):
    with pytest.raises(ValueError, match="OnlineConfig"):
        OnlineConfig(**bad)


def test_bad_input_is_refused():
    memory = tiny_memory()
    learner = OnlineLearner(memory, small_config())
    conv = ConversationMemory(memory, ConversationConfig(slot_budget=32))
    with pytest.raises(ValueError, match="user_text"):
        learner.step(conv, "   ")
    assert learner.steps == 0 and conv.turns == 0


def test_alternate_schedule_runs_one_reasoner_objective_per_update():
    memory = tiny_memory()
    learner = OnlineLearner(memory, small_config(objective_schedule="alternate"))
    kinds = []
    for i in range(4):
        parts = learner.update(interactions(2, seed=i)).parts
        kinds.append(("next_token" in parts, "denoising" in parts))
        assert "infonce" in parts
    assert kinds == [(True, False), (False, True), (True, False), (False, True)]


def test_observe_batch_updates_at_once_and_refreshes_the_anchor_on_crossing():
    memory = tiny_memory()
    learner = OnlineLearner(memory, small_config(anchor_interval=5))
    before = params(memory)
    stats, refreshed = learner.observe_batch(interactions(3, seed=1))
    assert stats.update == 1 and stats.samples == 3 and stats.loss == stats.loss and not refreshed
    assert distance(before, params(memory)) > 0 and len(learner.buffer) == 0
    stats, refreshed = learner.observe_batch(interactions(3, seed=2))  # steps 3 -> 6 pass 5
    assert refreshed and learner.steps == 6 and stats.replayed == 2
    assert [it.id for it in learner.reservoir.items] == list(range(6))  # ids assigned in order
    with pytest.raises(ValueError, match="no interactions"):
        learner.observe_batch([])


def test_forget_removes_a_scope_and_the_saved_state_follows(tmp_path):
    memory = tiny_memory()
    learner = OnlineLearner(memory, small_config(batch_size=10))
    batch = interactions(4, seed=3)
    for i, it in enumerate(batch):
        it.scope = "alice" if i < 2 else "bob"
    learner.observe_batch(batch)
    learner.observe(Interaction(**{**batch[0].to_dict(), "id": -1}))  # waits in the buffer
    memory.config.max_latent_norm = 1e-6
    memory.write(torch.tensor([[5, 6, 7]]), scope="alice")  # a fallback input of alice's
    memory.config.max_latent_norm = 1000.0
    assert learner.forget("alice") == 2 + 1 + 1
    learner.save(tmp_path / "learner")
    resumed = OnlineLearner.load(tmp_path / "learner", reasoner=memory.reasoner)
    held = [*resumed.reservoir.items, *resumed.buffer.items]
    assert {it.scope for it in held} == {"bob"} and len(resumed.fallbacks) == 0
    assert "alice" not in (tmp_path / "learner" / "online_state.json").read_text()


def test_read_objectives_share_one_reasoner_pass_and_equal_their_separate_losses(monkeypatch):
    """Next-token, denoising and rehearsal rows go through one encoder call and one reasoner pass, with each
    objective's loss what its own function computes alone (padding aside)."""
    from memsplice.memory.model import pad_rows
    from memsplice.online import RehearsalItem, RehearsalSet
    from memsplice.train import objectives
    from memsplice.train.data import DenoiseBatch

    memory = tiny_memory()
    rehearsal = RehearsalSet([RehearsalItem(memory=[5, 6, 7, 8, 9, 10], prompt=[11, 12], answer=[13, 14, 2])])
    learner = OnlineLearner(memory, small_config(rehearsal_per_update=1), rehearsal=rehearsal)
    batch = interactions(3, seed=4)
    reads = {
        "next_token": learner._continuation_rows(batch),
        "denoising": learner._denoise_rows([(it.query + it.response)[:12] for it in batch]),
        "rehearsal": learner._rehearsal_rows(),
    }
    passes = []
    real = objectives.hidden_states_with_memory
    monkeypatch.setattr(
        objectives, "hidden_states_with_memory", lambda *a, **k: passes.append(1) or real(*a, **k)
    )
    with torch.no_grad():
        joint = learner._read(reads)
        assert len(passes) == 1
        n = reads["next_token"]
        following = torch.tensor([p + t for p, t in zip(n.prompts, n.targets, strict=True)])
        alone = {"next_token": objectives.continuation(memory, torch.tensor(n.memory_inputs), following).loss}
        d = reads["denoising"]
        ids, mask = pad_rows(d.memory_inputs, pad_id=0, device=memory.reasoner.device)
        instruction = torch.tensor(d.prompts[0])
        alone["denoising"] = objectives.denoising(
            memory, DenoiseBatch(torch.tensor(d.targets), ids, mask), instruction
        ).loss
        r = reads["rehearsal"]
        kv = memory.write(torch.tensor(r.memory_inputs)).kv
        alone["rehearsal"] = objectives.answer(memory, kv, r.prompts, r.targets).loss
    assert set(joint) == set(alone)
    for name in alone:
        torch.testing.assert_close(joint[name].loss, alone[name], atol=1e-4, rtol=1e-4, msg=name)
    stats = learner.update(batch)
    assert {"rehearsal", "infonce", "ewc"} <= set(stats.parts)


def test_unpadded_reads_go_through_the_shared_fast_reader_with_the_same_losses_and_gradients(monkeypatch):
    """Rows of one length (what the alternate schedule gives every update) read through the reasoner's shared
    FastReader; the loss and the encoder's gradient are those of the transformers path."""
    from memsplice.online import loop
    from memsplice.train.fast_reader import FastReader

    memory = tiny_memory()
    learner = OnlineLearner(memory, small_config())
    rows = learner._continuation_rows(interactions(3, seed=6))
    assert len({len(p) + len(t) for p, t in zip(rows.prompts, rows.targets, strict=True)}) == 1

    def loss_and_grads():
        memory.zero_grad()
        loss = learner._read({"next_token": rows})["next_token"].loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in memory.named_parameters() if p.grad is not None}

    calls = []
    real = FastReader.hidden_states
    monkeypatch.setattr(FastReader, "hidden_states", lambda self, *a: calls.append(1) or real(self, *a))
    fast, fast_grads = loss_and_grads()
    assert calls == [1]
    monkeypatch.setattr(loop, "shared_reader", lambda reasoner: None)
    slow, slow_grads = loss_and_grads()
    assert calls == [1]
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert set(fast_grads) == set(slow_grads) and fast_grads
    for n in slow_grads:
        torch.testing.assert_close(fast_grads[n], slow_grads[n], atol=1e-5, rtol=1e-3, msg=n)


def test_the_fast_reader_is_shared_per_reasoner_and_refused_where_it_cannot_run():
    from memsplice.train.fast_reader import shared_reader
    from tiny import tiny_reasoner

    memory = tiny_memory()
    reader = shared_reader(memory.reasoner)
    assert reader is not None and shared_reader(memory.reasoner) is reader
    memory.reasoner.to(dtype=torch.float32)  # a move drops the copies made from the old weights
    assert shared_reader(memory.reasoner) not in (None, reader)
    other = tiny_reasoner("llama")
    other.model.config.hidden_act = "gelu"
    assert shared_reader(other) is None


def test_a_bf16_reasoner_on_the_cpu_updates_the_encoder_under_bf16_autocast():
    """An update autocasts the encoder's matmuls to bf16 wherever the reasoner runs in bf16 (CPUs with bf16 matmul
    units run them several times faster than float32 ones); master weights and the optimizer stay float32."""
    memory = tiny_memory()
    memory.reasoner.to(dtype=torch.bfloat16)
    learner = OnlineLearner(memory, small_config(objective_schedule="alternate"))
    seen = []
    first = memory.encoder.blocks[0].gate_up  # a matmul (the block's residual stream stays float32)
    handle = first.register_forward_hook(
        lambda m, i, out: seen.append(out.dtype) if memory.training else None
    )
    before = params(memory)
    for it in interactions(8):
        stats, _ = learner.observe(it)
        if stats is not None:
            assert stats.loss == stats.loss and abs(stats.loss) < 1e4
    handle.remove()
    assert learner.updates == 4 and seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in memory.trainable_parameters())
    assert distance(before, params(memory)) > 0
