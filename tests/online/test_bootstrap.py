import random

import pytest
from online_builders import tiny_memory

pytest.importorskip("memsplice.eval.tasks")

from memsplice.online.bootstrap import BootstrapConfig, _synthetic_episodes, answer_accuracy, qa_interactions  # noqa: E402


def test_questions_become_windows_that_hold_their_evidence():
    memory = tiny_memory()
    tok = memory.reasoner.tokenizer
    cfg = BootstrapConfig(episodes=2, history_tokens=[512], facts=3)
    episodes = _synthetic_episodes(cfg, 2, 0, lambda t: len(tok(t)["input_ids"]))
    items = qa_interactions(episodes, memory.reasoner, "{role}: {text}\n", 48, random.Random(0))
    assert items
    evidence = {q.answer: e for e in episodes for q in e.questions}
    for it in items:
        assert len(it.context) == 48
        answer = tok.decode(it.response).replace(tok.eos_token, "")
        assert answer in evidence and answer in tok.decode(it.context)  # the window holds the evidence
    acc = answer_accuracy(memory, items[:4])
    assert 0.0 <= acc <= 1.0


def test_bad_bootstrap_settings_name_the_field():
    with pytest.raises(ValueError, match="updates"):
        BootstrapConfig(updates=0)
    with pytest.raises(ValueError, match="history_tokens"):
        BootstrapConfig(history_tokens=[100])
