import pytest
import torch
from online_builders import interactions, small_online_config, tiny_memory

from memsplice.online import OnlineConfig, OnlineLearner, PrivacyConfig
from memsplice.online.consolidation import WriteConsolidation


def config(**overrides):
    return small_online_config(
        **{
            "consolidation_weight": 1.0,
            "consolidation_capacity": 6,
            "consolidation_per_update": 3,
            **overrides,
        }
    )


def written(memory, ids):
    with torch.no_grad():
        m = memory.write(torch.tensor([ids]), refine_steps=0).kv
    return torch.stack([torch.stack(m.keys), torch.stack(m.values)])[:, :, 0]


def test_held_writes_are_what_the_memory_wrote_and_cost_nothing_until_it_changes():
    memory = tiny_memory()
    memory.eval()
    held = WriteConsolidation(capacity=4, max_tokens=16)
    items = interactions(3, seed=1)
    assert held.offer(memory, items) == 3
    assert [t.input_ids for t in held.targets] == [it.context[-16:] for it in items]
    for t in held.targets:
        assert torch.equal(t.kv, written(memory, t.input_ids))
        assert t.gate.shape == (len(memory.reasoner.decoder.layers), memory.config.num_slots)
    loss = held.loss(memory, held.targets)
    assert loss is not None and loss.item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():  # the memory changes: the loss sees it, and its gradient reaches the encoder
        for p in memory.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss = held.loss(memory, held.targets)
    assert loss.item() > 1e-4
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in memory.encoder.parameters())


def test_the_reservoir_is_a_bounded_uniform_sample_and_skips_empty_histories():
    memory = tiny_memory()
    memory.eval()
    held = WriteConsolidation(capacity=5, max_tokens=16, seed=0)
    items = interactions(40, seed=2)
    for k, it in enumerate(items):
        it.id = k
    items[0].context = []
    for k in range(0, 40, 4):
        held.offer(memory, items[k : k + 4])
    assert len(held) == 5 and held.seen == 39
    assert len({t.id for t in held.targets}) == 5 and 0 not in {t.id for t in held.targets}
    assert any(t.id >= 20 for t in held.targets)  # later items replaced earlier ones


def test_updates_hold_old_writes_closer_than_without_consolidation():
    stream = interactions(40, seed=4)
    early = stream[:6]

    def drift(weight: float) -> float:
        memory = tiny_memory()
        learner = OnlineLearner(
            memory, config(consolidation_weight=weight, consolidation_capacity=64, lr=3e-3, ewc_weight=0.0)
        )
        for it in early:
            learner.observe(it)
        before = [written(memory, it.context[-24:]) for it in early]
        for it in stream[6:]:
            learner.observe(it)
        after = [written(memory, it.context[-24:]) for it in early]
        return sum(float((a - b).pow(2).sum() / b.pow(2).sum()) for a, b in zip(after, before, strict=True))

    held, free = drift(100.0), drift(0.0)
    assert held < 0.5 * free, (held, free)


def test_the_learner_reports_the_term_and_saves_and_restores_the_held_writes(tmp_path):
    memory = tiny_memory()
    learner = OnlineLearner(memory, config())
    stats = [learner.observe(it)[0] for it in interactions(10, seed=5)]
    updates = [s for s in stats if s is not None]
    assert "consolidation" not in updates[0].parts  # nothing held before the first update
    assert all("consolidation" in s.parts for s in updates[1:])
    assert len(learner.consolidation) == 6
    learner.save(tmp_path / "state")
    back = OnlineLearner.load(tmp_path / "state", reasoner=memory.reasoner)
    assert back.consolidation.seen == learner.consolidation.seen
    for a, b in zip(back.consolidation.targets, learner.consolidation.targets, strict=True):
        assert a.id == b.id and a.input_ids == b.input_ids
        assert torch.equal(a.kv, b.kv) and torch.equal(a.gate, b.gate)


def test_forget_drops_a_scopes_held_writes():
    memory = tiny_memory()
    learner = OnlineLearner(memory, config(consolidation_capacity=64))
    for k, it in enumerate(interactions(8, seed=6)):
        it.scope = "alice" if k % 2 else "bob"
        learner.observe(it)
    assert {t.scope for t in learner.consolidation.targets} == {"alice", "bob"}
    learner.forget("alice")
    assert {t.scope for t in learner.consolidation.targets} == {"bob"}


def test_consolidation_is_refused_with_privacy():
    with pytest.raises(ValueError, match="not available with privacy"):
        OnlineConfig(consolidation_weight=1.0, privacy=PrivacyConfig(noise_multiplier=1.0))
    with pytest.raises(ValueError, match="consolidation_capacity"):
        OnlineConfig(consolidation_weight=1.0, consolidation_capacity=0)
