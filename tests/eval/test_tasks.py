"""Tasks are reproducible data with sound evidence, and the synthetic splits never share a fact."""

from __future__ import annotations

import json
import re

import pytest

from memsplice.eval.reader import render_turn
from memsplice.eval.tasks import LoCoMoFormatError, TaskArgs, approx_tokens, get_task, load_locomo
from memsplice.eval.tasks.filler import _dialogues
from memsplice.eval.tasks.synthetic import ATTRIBUTES, INTRODUCTIONS, SELF_TEMPLATES


def _synthetic(**kw):
    args = dict(examples=2, lengths=(512,), seed=0, split="test")
    args.update(kw)
    return get_task("synthetic")(TaskArgs(**args), approx_tokens)


def test_synthetic_is_reproducible_and_seeded():
    a, b = _synthetic(), _synthetic()
    assert a == b
    c = _synthetic(seed=1)
    assert [e.turns for e in a] != [e.turns for e in c]


def test_episodes_come_example_by_example_across_lengths():
    """A run cut by its time budget has then covered every length as far as it got; and an episode does not depend
    on which other lengths are in the run (so runs split by length can be merged)."""
    both = _synthetic(lengths=(256, 512))
    assert [e.id.rsplit("-", 2)[-2:] for e in both] == [
        ["256", "0"],
        ["512", "0"],
        ["256", "1"],
        ["512", "1"],
    ]
    assert [e for e in both if "-512-" in e.id] == _synthetic(lengths=(512,))
    keys = get_task("passkey")(TaskArgs(examples=1, lengths=(256, 512), depths=(0.0, 1.0)), approx_tokens)
    assert [e.id.split("-")[2:4] for e in keys] == [
        ["256", "d0.00"],
        ["512", "d0.00"],
        ["256", "d1.00"],
        ["512", "d1.00"],
    ]


def test_synthetic_lengths_and_sessions():
    for length in (256, 2048):
        (episode,) = _synthetic(examples=1, lengths=(length,))
        tokens = sum(approx_tokens(render_turn(t)) for t in episode.turns)
        longest = max(approx_tokens(render_turn(t)) for t in episode.turns)
        assert length <= tokens <= length + 12 * longest  # planned turns may land after the filler
        sessions = [t.session for t in episode.turns]
        assert sessions == sorted(sessions) and sessions[0] == 1 and sessions[-1] >= 2
        assert all(t.date for t in episode.turns)


def test_synthetic_evidence_states_the_answer_and_updates_come_later():
    for episode in _synthetic(examples=3, lengths=(1024,)):
        assert len(episode.questions) == 6
        order = {t.id: i for i, t in enumerate(episode.turns)}
        for q in episode.questions:
            (evidence,) = episode.turns_by_id(q.evidence)
            assert q.answer in evidence.text
            person = [w.rstrip("?").removesuffix("'s") for w in q.question.split(" ")]
            name = next(
                f"{a} {b}" for a, b in zip(person, person[1:], strict=False) if f"{a} {b}" in evidence.text
            )
            mentions = [t for t in episode.turns if name.split()[0] in t.text]
            if q.category == "updated":  # an earlier turn told another value
                earlier = [t for t in mentions if order[t.id] < order[evidence.id]]
                assert earlier and all(q.answer not in t.text for t in earlier)
            elif q.category == "distractor":  # another turn names the person without the answer
                assert any(t.id != evidence.id and q.answer not in t.text for t in mentions)
            else:
                assert q.category == "single" and mentions == [evidence]


def test_synthetic_train_and_test_share_no_fact():
    def facts(split):
        out, names = set(), set()
        for e in _synthetic(split=split, examples=4, lengths=(256,)):
            for q in e.questions:
                out.add(q.answer)
                names.add(q.question)
        return out, names

    train_values, train_questions = facts("train")
    test_values, test_questions = facts("test")
    assert not train_values & test_values
    assert not train_questions & test_questions
    for attribute in ATTRIBUTES:  # the pools themselves are disjoint
        from memsplice.eval.tasks.synthetic import _pool

        assert not set(_pool(attribute.name, attribute.values, "train")) & set(
            _pool(attribute.name, attribute.values, "test")
        )


def test_filler_splits_are_disjoint():
    train, test = set(_dialogues("train", None)), set(_dialogues("test", None))
    assert train and test and not train & test


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_needle_sits_at_its_depth(depth):
    (episode,) = get_task("passkey")(TaskArgs(examples=1, lengths=(1024,), depths=(depth,)), approx_tokens)
    (q,) = episode.questions
    (needle,) = episode.turns_by_id(q.evidence)
    assert q.answer in needle.text and len(q.answer) == 5 and q.category == f"depth {depth:.2f}"
    costs = [approx_tokens(render_turn(t)) for t in episode.turns]
    before = sum(costs[: episode.turns.index(needle)])
    assert abs(before / sum(costs) - depth) < 0.1
    others = [t for t in episode.turns if t is not needle]
    assert all(q.answer not in t.text for t in others)


def test_locomo_fixture_parses(locomo_path):
    episodes = load_locomo(locomo_path)
    assert [e.id for e in episodes] == ["fixture-1", "fixture-2"]
    first, second = episodes
    assert len(first.turns) == 8 and first.turns[0].id == "D1:1" and first.turns[4].session == 2
    assert first.turns[4].date == "7:10 pm on 20 May, 2023"
    assert "grey kitten" in first.turns_by_id(["D1:3"])[0].text  # the shared photo's caption is kept
    cats = {q.category for q in first.questions}
    assert cats == {"1 multi-hop", "2 temporal", "3 open-domain", "4 single-hop", "5 adversarial"}
    adversarial = [q for q in first.questions if q.adversarial]
    assert len(adversarial) == 1 and adversarial[0].adversarial_answer == "Juniper"
    assert second.questions[1].evidence == ("D2:2",)  # the malformed id is dropped, the good one kept
    assert second.questions[2].answer == "2023"
    assert load_locomo(locomo_path, limit=1)[0].id == "fixture-1"


def test_locomo_refuses_bad_files(tmp_path, locomo_path):
    with pytest.raises(FileNotFoundError):
        load_locomo(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LoCoMoFormatError, match="not valid JSON"):
        load_locomo(bad)
    bad.write_text(json.dumps({"conversation": {}}))
    with pytest.raises(LoCoMoFormatError, match="JSON list"):
        load_locomo(bad)
    data = json.loads(locomo_path.read_text())
    del data[1]["conversation"]
    bad.write_text(json.dumps(data))
    with pytest.raises(LoCoMoFormatError, match="fixture-2.*conversation"):
        load_locomo(bad)
    data = json.loads(locomo_path.read_text())
    data[0]["qa"][0]["category"] = "four"
    bad.write_text(json.dumps(data))
    with pytest.raises(LoCoMoFormatError, match="category"):
        load_locomo(bad)


def test_open_values_are_made_up_per_fact_and_keep_the_episode_sound():
    opened = _synthetic(examples=3, lengths=(1024,), values="open", split="train")
    assert opened == _synthetic(examples=3, lengths=(1024,), values="open", split="train")
    listed = {v for a in ATTRIBUTES for v in a.values}
    answers = [q.answer for e in opened for q in e.questions]
    assert len(set(answers)) == len(answers)  # drawn afresh: no value repeats across these episodes
    assert not set(answers) & listed
    for episode in opened:
        assert "open" in episode.id
        for q in episode.questions:
            (evidence,) = episode.turns_by_id(q.evidence)
            assert q.answer in evidence.text
            others = [t for t in episode.turns if t.id != evidence.id]
            if q.category == "single":
                assert all(q.answer not in t.text for t in others)
    # the option leaves pool episodes exactly as they were
    assert _synthetic(values="pools") == _synthetic()


def test_user_perspective_is_a_users_chat_with_first_person_facts():
    """The user names themselves in the first turn; half the facts (rounded up) are theirs, told by them in the first
    person, and asked about by a name their fact's turn does not hold; the other facts are told by the user too."""
    episodes = _synthetic(examples=3, lengths=(1024,), perspective="user", split="train")
    assert episodes == _synthetic(examples=3, lengths=(1024,), perspective="user", split="train")
    assert {a.name for a in ATTRIBUTES} == set(SELF_TEMPLATES)
    for episode in episodes:
        assert "user" in episode.id
        assert {t.speaker for t in episode.turns} == {"user", "assistant"}
        first = episode.turns[0]
        assert first.speaker == "user"
        patterns = [re.escape(t).replace(re.escape("{name}"), "(.+)") for t in INTRODUCTIONS]
        (user,) = [m.group(1) for p in patterns if (m := re.fullmatch(p, first.text))]
        given = user.split()[0]
        own = 0
        for q in episode.questions:
            (evidence,) = episode.turns_by_id(q.evidence)
            assert evidence.speaker == "user" and q.answer in evidence.text
            if given in q.question:
                own += 1
                assert given not in evidence.text  # the fact's turn says "I", not the name
        assert own == 3  # 6 facts: 3 the user's own
    # the option leaves the default perspective exactly as it was
    assert _synthetic(perspective="others") == _synthetic()


def test_task_args_validate():
    for bad in (
        dict(perspective="mine"),
        dict(values="random"),
        dict(examples=-1),
        dict(lengths=()),
        dict(lengths=(10,)),
        dict(split="dev"),
        dict(depths=(1.5,)),
    ):
        with pytest.raises(ValueError, match="TaskArgs"):
            TaskArgs(**bad)
    with pytest.raises(ValueError, match="--data"):
        get_task("locomo")(TaskArgs(), approx_tokens)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


def test_open_names_are_made_up_and_never_listed():
    """names="open": every person of an episode has a made-up first and last name, none of either split's lists;
    each question still has its one evidence turn, and pool-name episodes are unchanged."""
    from memsplice.eval.tasks.synthetic import FIRST_NAMES, LAST_NAMES

    named = _synthetic(examples=3, lengths=(1024,), names="open", split="train")
    assert named == _synthetic(examples=3, lengths=(1024,), names="open", split="train")
    listed = set(FIRST_NAMES) | set(LAST_NAMES)
    for episode in named:
        assert "names" in episode.id
        for q in episode.questions:
            (evidence,) = episode.turns_by_id(q.evidence)
            assert q.answer in evidence.text
            asked = set(re.findall(r"\b[A-Z][a-z]+\b", q.question)) - {"What", "When", "Where", "Which"}
            assert len(asked) == 2 and not asked & listed
    with pytest.raises(ValueError, match="names"):
        TaskArgs(names="made-up")
    assert _synthetic(names="pools") == _synthetic()
