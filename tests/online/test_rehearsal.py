import random

import pytest
import torch
from online_builders import interactions, small_online_config, tiny_memory

pytest.importorskip("memsplice.eval.tasks")

from memsplice.online import (  # noqa: E402
    OnlineConfig,
    OnlineLearner,
    PrivacyConfig,
    RehearsalItem,
    RehearsalSet,
    rehearsal_from_synthetic,
)
from memsplice.online.bootstrap import write_chunks  # noqa: E402
from memsplice.train.objectives import answer  # noqa: E402

CHUNK = 40


def small_set(memory, questions=6, seed=1000, values="mixed"):
    return rehearsal_from_synthetic(
        memory.reasoner, questions, seed=seed, chunk_tokens=CHUNK, history_tokens=512, facts=2, values=values
    )


def config(**overrides):
    return small_online_config(**{"rehearsal_per_update": 2, **overrides})


def test_items_hold_the_answer_in_their_memory_input_and_come_from_the_train_split():
    memory = tiny_memory()
    tok = memory.reasoner.tokenizer
    rehearsal = small_set(memory)
    assert len(rehearsal) == 6 and "train split" in rehearsal.source and "mixed" in rehearsal.source
    for it in rehearsal.items:
        assert 0 < len(it.memory) <= CHUNK
        answer_text = tok.decode(it.answer, skip_special_tokens=True).strip()
        assert answer_text and answer_text in tok.decode(it.memory)
    again = small_set(memory)
    assert [it.to_dict() for it in again.items] == [it.to_dict() for it in rehearsal.items]  # seeded
    both = rehearsal_from_synthetic(
        memory.reasoner, 6, seed=1000, chunk_tokens=CHUNK, history_tokens=512, facts=2, prompts="both"
    )
    assert [it.memory for it in both.items] == [it.memory for it in rehearsal.items]
    assert [it.prompt for it in both.items][::2] == [it.prompt for it in rehearsal.items][::2]
    assert all(a.prompt != b.prompt for a, b in zip(both.items[1::2], rehearsal.items[1::2], strict=True))
    other = small_set(memory, seed=7)
    assert [it.to_dict() for it in other.items] != [it.to_dict() for it in rehearsal.items]


def test_bad_rehearsal_settings_are_refused():
    memory = tiny_memory()
    with pytest.raises(ValueError, match="values"):
        small_set(memory, values="some")
    with pytest.raises(ValueError, match="prompts"):
        rehearsal_from_synthetic(memory.reasoner, 2, prompts="system")
    with pytest.raises(ValueError, match="questions"):
        rehearsal_from_synthetic(memory.reasoner, 0)
    with pytest.raises(ValueError, match="item 0"):
        RehearsalSet([RehearsalItem(memory=[], prompt=[1], answer=[2])])
    with pytest.raises(ValueError, match="rehearsal set"):
        OnlineLearner(memory, config())
    with pytest.raises(ValueError, match="rehearsal_per_update"):
        OnlineConfig(rehearsal_per_update=-1)


def test_an_update_adds_the_answer_loss_of_the_items_it_draws():
    memory = tiny_memory()
    rehearsal = small_set(memory)
    learner = OnlineLearner(memory, config(replay_per_update=0, ewc_weight=0.0), rehearsal=rehearsal)
    rng_state = learner.rng.getstate()
    probe = random.Random()
    probe.setstate(rng_state)
    with torch.no_grad():
        drawn = rehearsal.sample(2, probe)
        written = write_chunks(memory, [it.memory for it in drawn])
        expected = answer(memory, written.kv, [it.prompt for it in drawn], [it.answer for it in drawn]).loss
    learner.rng.setstate(rng_state)
    got = learner._rehearsal_loss()
    torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=1e-5)
    assert got.requires_grad


def rehearsal_set_loss(memory, rehearsal) -> float:
    with torch.no_grad():
        written = write_chunks(memory, [it.memory for it in rehearsal.items])
        prompts, answers = [it.prompt for it in rehearsal.items], [it.answer for it in rehearsal.items]
        return float(answer(memory, written.kv, prompts, answers).loss)


def test_rehearsal_keeps_the_answer_skill_the_stream_alone_does_not_train():
    losses = {}
    for per_update in (0, 2):
        memory = tiny_memory()
        digest = memory.reasoner.weights_digest()
        rehearsal = small_set(memory, questions=2)
        learner = OnlineLearner(
            memory,
            config(lr=3e-3, replay_per_update=0, ewc_weight=0.0, rehearsal_per_update=per_update),
            rehearsal=rehearsal,
        )
        before = rehearsal_set_loss(memory, rehearsal)
        for k in range(10):
            stats = learner.update(interactions(2, seed=k))
            assert ("rehearsal" in stats.parts) == (per_update > 0)
        losses[per_update] = rehearsal_set_loss(memory, rehearsal)
        assert memory.reasoner.weights_digest() == digest and not memory.training
    assert losses[2] < before and losses[2] < losses[0]


def test_a_learner_with_rehearsal_saves_and_resumes_identically(tmp_path):
    stream = interactions(10, seed=7)
    memory = tiny_memory()
    a = OnlineLearner(memory, config(anchor_interval=3), rehearsal=small_set(memory))
    for it in stream[:5]:
        a.observe(it)
    a.save(tmp_path / "learner")
    b = OnlineLearner.load(tmp_path / "learner", reasoner=memory.reasoner)
    assert b.rehearsal is not None and b.rehearsal.to_dict() == a.rehearsal.to_dict()
    for it in stream[5:]:
        sa, _ = a.observe(it)
        sb, _ = b.observe(type(it)(**it.to_dict()))
        if sa is not None:
            assert sa.parts["rehearsal"] == pytest.approx(sb.parts["rehearsal"], rel=1e-4)
    for (n, pa), pb in zip(a.memory.named_parameters(), b.memory.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=n)


def test_private_updates_rehearse_outside_the_clipping():
    memory = tiny_memory()
    learner = OnlineLearner(
        memory,
        config(privacy=PrivacyConfig(noise_multiplier=1.0)),
        rehearsal=small_set(memory),
    )
    stats = learner.update(interactions(2, seed=1))
    assert stats.parts["rehearsal"] > 0 and stats.epsilon is not None
