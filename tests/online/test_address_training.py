"""Address-head training: positives are the chunks that hold the evidence; only the head learns."""

import json

import pytest
import torch
from online_builders import tiny_memory

pytest.importorskip("memsplice.eval.tasks")

from memsplice.eval.reader import Reader, memory_turn_sources, memory_turns  # noqa: E402
from memsplice.memory import MemoryModel  # noqa: E402
from memsplice.online.address import (  # noqa: E402
    AddressConfig,
    address_examples,
    choose_recency_margin,
    recall_at,
    run_address,
)
from memsplice.online.bootstrap import episode_examples, synthetic_episodes  # noqa: E402

CHUNK = 40


def small_config(**overrides) -> AddressConfig:
    settings = dict(
        steps=3,
        episodes=2,
        eval_episodes=1,
        history_tokens=[512],
        facts=2,
        chunk_tokens=CHUNK,
        episodes_per_step=2,
        eval_every=2,
    )
    return AddressConfig(**{**settings, **overrides})


def test_memory_turn_sources_line_up_with_memory_turns():
    memory = tiny_memory()
    cfg = small_config()
    episode = synthetic_episodes(cfg, 1, 0, Reader(memory.reasoner).count_tokens)[0]
    pairs, sources = memory_turns(episode.turns), memory_turn_sources(episode.turns)
    assert len(pairs) == len(sources)
    by_id = {t.id: t for t in episode.turns}
    for (role, text), source in zip(pairs, sources, strict=True):
        if source is None:
            assert role == "system"
        else:
            assert (role, text) == (by_id[source].speaker, by_id[source].text)


def test_positives_are_the_chunks_that_hold_the_evidence():
    memory = tiny_memory()
    cfg = small_config()
    episodes = synthetic_episodes(cfg, 2, 0, Reader(memory.reasoner).count_tokens)
    examples = address_examples(memory, episode_examples(episodes, memory.reasoner, CHUNK))
    tok = memory.reasoner.tokenizer
    from memsplice.conversation.chunks import pack_turns
    from memsplice.online.bootstrap import TURN_TEMPLATE

    for episode, example in zip(episodes, examples, strict=True):
        ids = [
            tok(TURN_TEMPLATE.format(role=r, text=t), add_special_tokens=False)["input_ids"]
            for r, t in memory_turns(episode.turns)
        ]
        chunks = pack_turns(ids, CHUNK)
        assert example.chunk_latents.shape[:2] == (len(chunks), memory.config.num_slots)
        questions = [q for q in episode.questions if q.answer]
        assert example.query_latents.shape[0] == len(questions) == len(example.positives)
        for q, positives in zip(questions, example.positives, strict=True):
            assert positives
            evidence = episode.turns_by_id(q.evidence)[0]
            first = tok(
                TURN_TEMPLATE.format(role=evidence.speaker, text=evidence.text), add_special_tokens=False
            )["input_ids"][: min(8, CHUNK)]
            held = [c for c in range(len(chunks)) if _contains(chunks[c], first)]
            assert set(held) & set(positives)


def _contains(row, piece):
    return any(row[i : i + len(piece)] == piece for i in range(len(row) - len(piece) + 1))


def test_run_trains_only_the_head_and_saves_it(tmp_path):
    memory = tiny_memory()
    before = {k: v.clone() for k, v in memory.state_dict().items()}
    report = run_address(memory, small_config(), tmp_path)
    after = memory.state_dict()
    changed = {k for k in after if k not in before or not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("address.") for k in changed)
    assert [e["step"] for e in report["curve"]] == [0, 2, 3]
    for entry in report["curve"]:
        for k in (1, 2, 4):
            assert 0.0 <= entry[f"recall@{k}"] <= 1.0
            assert 0.0 < entry[f"chance@{k}"] <= 1.0
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["train_episodes"] == 2
    loaded = MemoryModel.from_pretrained(tmp_path / "checkpoint", reasoner=memory.reasoner)
    assert loaded.config.address_dim == 128
    assert loaded.config.extra["address"]["chunk_tokens"] == CHUNK


def test_user_perspective_mix_and_a_fresh_head(tmp_path):
    """--user-perspective mixes user-perspective episodes in (recorded with the head); --new-head replaces a trained
    head instead of training it further."""
    memory = tiny_memory()
    old = memory.add_address_head(128)
    old.log_scale.data.fill_(1.234)
    report = run_address(memory, small_config(episodes=4, user_perspective=0.5, new_head=True), tmp_path)
    assert memory.address is not old and report["config"]["user_perspective"] == 0.5
    assert memory.config.extra["address"]["user_perspective"] == 0.5
    speakers = {
        t.speaker
        for e in synthetic_episodes(
            small_config(), 1, 0, Reader(memory.reasoner).count_tokens, perspective="user"
        )
        for t in e.turns
    }
    assert speakers == {"user", "assistant"}


def test_open_names_share_each_group_of_episodes():
    """open_names gives that share of every group (default, user perspective, made-up values) made-up names, and
    leaves the mix as it was at 0."""
    from memsplice.online.bootstrap import mixed_episodes

    count = Reader(tiny_memory().reasoner).count_tokens
    plain = mixed_episodes(small_config(open_values=0.5, user_perspective=0.5), 8, 0, count)
    named = mixed_episodes(small_config(open_values=0.5, user_perspective=0.5, open_names=0.5), 8, 0, count)
    assert len(named) == len(plain) == 8
    assert not any("names" in e.id for e in plain)
    kinds = lambda episodes: sorted(("user" in e.id, "-open" in e.id, "names" in e.id) for e in episodes)  # noqa: E731
    assert kinds(named) == sorted(
        [(False, False, False), (False, False, True), (True, False, False), (True, False, True)] * 1
        + [(False, True, False), (False, True, True)] * 2
    )


def test_command_line_takes_the_share_and_the_switch():
    from memsplice.online.address import __doc__ as doc
    from memsplice.online.offline_run import config_from_args, config_parser

    parser = config_parser("address", doc, AddressConfig, "checkpoint")
    cfg = config_from_args(AddressConfig, parser.parse_args(["--output", "x", "--user-perspective", "0.3"]))
    assert cfg.user_perspective == 0.3 and cfg.new_head is False
    cfg = config_from_args(AddressConfig, parser.parse_args(["--output", "x", "--new-head"]))
    assert cfg.new_head is True and cfg.user_perspective == 0.0


def test_a_step_may_ask_for_more_episodes_than_there_are(tmp_path):
    memory = tiny_memory()
    report = run_address(memory, small_config(steps=2, episodes=2, episodes_per_step=5), tmp_path)
    assert report["curve"][-1]["step"] == 2


def test_recall_is_perfect_for_a_head_that_sees_the_answer():
    """recall_at ranks within each question's own conversation: with queries and keys projected alike, a question
    whose latents equal its positive chunk's latents is always found."""
    memory = tiny_memory()
    head = memory.add_address_head(16)
    head.query_proj.load_state_dict(head.key_proj.state_dict())
    episodes = synthetic_episodes(small_config(), 1, 0, Reader(memory.reasoner).count_tokens)
    examples = address_examples(memory, episode_examples(episodes, memory.reasoner, CHUNK))
    ex = examples[0]
    ex.query_latents = torch.stack([ex.chunk_latents[pos[0]] for pos in ex.positives])
    result = recall_at(memory, examples)
    assert result["recall@1"] == 1.0


def test_config_refuses_nonsense():
    with pytest.raises(ValueError, match="steps"):
        AddressConfig(steps=0)
    with pytest.raises(ValueError, match="open_values"):
        AddressConfig(open_values=2.0)
    with pytest.raises(ValueError, match="user_perspective"):
        AddressConfig(user_perspective=-0.1)
    with pytest.raises(ValueError, match="open_names"):
        AddressConfig(open_names=1.5)
    with pytest.raises(ValueError, match="history_tokens"):
        AddressConfig(history_tokens=[100])


def _margins(**recall1):
    """An address_recall.py result with 24 pool-value questions: recall@1 per margin ("0.25" written m0_25)."""
    by_margin = {k[1:].replace("_", "."): {"questions": 24, "recall@1": v / 24} for k, v in recall1.items()}
    return {"split": "train", "pools": {"by_margin": by_margin}}


def test_recency_margin_is_the_smallest_with_the_most_first_picks_right():
    results = [_margins(m0=22, m0_25=24, m0_5=24, m1=23), _margins(m0=24, m0_25=23, m0_5=24, m1=24)]
    margin, correct = choose_recency_margin(results)
    assert correct == {0.0: 46, 0.25: 47, 0.5: 48, 1.0: 47}
    assert margin == 0.5
    assert choose_recency_margin([_margins(m0=24, m1=24)])[0] == 0.0


def test_recency_margin_refuses_results_it_cannot_compare():
    with pytest.raises(ValueError, match="by_margin"):
        choose_recency_margin([{"split": "train", "pools": {"questions": 24, "recall@1": 1.0}}])
    with pytest.raises(ValueError, match="different margins"):
        choose_recency_margin([_margins(m0=24, m1=24), _margins(m0=24, m0_5=24)])
