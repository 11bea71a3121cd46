"""memsplice demo on a tiny reasoner: every system answers every scripted question, with costs, as JSON."""

from __future__ import annotations

import json

from memsplice.cli.main import main
from memsplice.eval.tasks.demo import QUESTIONS, build_demo_episode
from tiny import tiny_reasoner


def test_demo_episode_evidence_states_each_answer():
    episode = build_demo_episode()
    by_id = {t.id: t for t in episode.turns}
    for q in episode.questions:
        assert all(q.answer in by_id[e].text for e in q.evidence)
    assert len({t.session for t in episode.turns}) == 4
    lyon = next(q for q in episode.questions if q.answer == "Lyon")
    assert "Porto" in by_id[lyon.evidence[0]].text, "the updated fact must replace an earlier one"


def test_demo_runs_every_system(tmp_path, capsys):
    r = tiny_reasoner("llama")
    r.model.save_pretrained(tmp_path / "tiny")
    r.tokenizer.save_pretrained(tmp_path / "tiny")
    code = main(
        ["demo", "--reasoner", str(tmp_path / "tiny"), "--device", "cpu", "--max-new-tokens", "3", "--json"]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["systems"]) == {"none", "latent", "latent-readback", "latent+window", "full"}
    for name, s in out["systems"].items():
        assert len(s["answers"]) == len(QUESTIONS)
        slots = [a["costs"]["memory_slots"] for a in s["answers"]]
        # read-back puts text in the prompt: the answer itself reads no memory slots
        assert (max(slots) > 0) == (name in ("latent", "latent+window")), name
    full = out["systems"]["full"]["answers"][0]["costs"]
    latent = out["systems"]["latent"]["answers"][0]["costs"]
    assert full["prompt_tokens"] > latent["prompt_tokens"]
