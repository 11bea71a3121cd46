import pytest
import torch
from online_builders import interactions, small_online_config, tiny_memory

pytest.importorskip("memsplice.eval.tasks")

from memsplice.online import (  # noqa: E402
    OnlineConfig,
    OnlineLearner,
    SkillGuard,
    rehearsal_from_synthetic,
)
from memsplice.online.bootstrap import write_chunks  # noqa: E402
from memsplice.train.objectives import answer  # noqa: E402

CHUNK = 40


def canary(memory, questions=4, seed=2000):
    return rehearsal_from_synthetic(
        memory.reasoner, questions, seed=seed, chunk_tokens=CHUNK, history_tokens=512, facts=2, prompts="both"
    )


def config(**overrides):
    return small_online_config(**{"guard_tolerance": 0.01, **overrides})


def weights(memory) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in memory.named_parameters()}


def test_the_score_is_the_canary_answer_accuracy_and_changes_nothing():
    memory = tiny_memory()
    items = canary(memory)
    guard = SkillGuard(items, 0.01, batch=3)  # batches of 3 over 4 items: the last one short
    memory.eval()
    before = weights(memory)
    got = guard.score(memory)
    with torch.no_grad():
        written = write_chunks(memory, [it.memory for it in items.items])
        want = answer(
            memory, written.kv, [it.prompt for it in items.items], [it.answer for it in items.items]
        )
    assert got == pytest.approx(int(want.correct) / want.tokens)
    assert all(torch.equal(before[n], p) for n, p in memory.named_parameters())
    assert not memory.training and guard.events == []


def test_a_failed_check_rolls_the_weights_back_to_the_anchor():
    memory = tiny_memory()
    start = weights(memory)
    guard = SkillGuard(canary(memory), 0.0, reference=2.0)  # no score reaches it: every check fails
    learner = OnlineLearner(memory, config(guard_tolerance=0.0), guard=guard)
    refreshed = []
    for it in interactions(8, seed=3):
        stats, r = learner.observe(it)
        refreshed.append(r)
        if stats is not None and learner.steps % 4:
            assert learner.optimizer.state  # an update between checks builds optimizer moments
    assert refreshed == [False] * 8 and learner.updates == 4
    assert [e.kept for e in guard.events] == [False, False] and guard.rollbacks == 2
    assert all(e.reference == 2.0 and 0.0 <= e.score <= 1.0 for e in guard.events)
    for n, p in memory.named_parameters():  # the anchor never moved: back at the starting weights
        torch.testing.assert_close(p, start[n], atol=0, rtol=0, msg=n)
    assert not learner.optimizer.state  # the discarded steps' moments are gone


def test_a_guard_that_keeps_everything_changes_nothing():
    stream = interactions(8, seed=5)
    runs = []
    for guarded in (False, True):
        torch.manual_seed(0)
        memory = tiny_memory()
        guard = SkillGuard(canary(memory), 0.01, reference=-1.0) if guarded else None
        learner = OnlineLearner(memory, config(guard_tolerance=0.01 if guarded else None), guard=guard)
        flags = [learner.observe(type(it)(**it.to_dict()))[1] for it in stream]
        runs.append((weights(memory), flags))
        if guarded:
            assert [e.kept for e in guard.events] == [True, True] and guard.rollbacks == 0
    (a, fa), (b, fb) = runs
    assert fa == fb == [False, False, False, True] * 2
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=0, rtol=0, msg=n)


def test_the_reference_is_the_starting_score_and_survives_save_and_load(tmp_path):
    memory = tiny_memory()
    guard = SkillGuard(canary(memory), 0.05)
    learner = OnlineLearner(memory, config(guard_tolerance=0.05), guard=guard)
    assert guard.reference == pytest.approx(SkillGuard(canary(memory), 0.05).score(memory))
    for it in interactions(4, seed=1):
        learner.observe(it)
    assert len(guard.events) == 1
    learner.save(tmp_path / "learner")
    again = OnlineLearner.load(tmp_path / "learner", reasoner=memory.reasoner)
    assert again.guard is not None and again.guard.to_dict() == guard.to_dict()


def test_bad_guard_settings_are_refused():
    memory = tiny_memory()
    with pytest.raises(ValueError, match="skill guard"):
        OnlineLearner(memory, config())
    with pytest.raises(ValueError, match="guard_tolerance is None"):
        OnlineLearner(memory, config(guard_tolerance=None), guard=SkillGuard(canary(memory), 0.01))
    with pytest.raises(ValueError, match="guard_tolerance"):
        OnlineConfig(guard_tolerance=1.5)
    with pytest.raises(ValueError, match="tolerance"):
        SkillGuard(canary(memory), -0.1)
