"""Scores follow LoCoMo's normalisation and rules; each check here can fail on a plausible mistake."""

from __future__ import annotations

import pytest

from memsplice.eval.metrics import (
    abstains,
    contains_answer,
    exact_match,
    multi_answer_f1,
    normalize_answer,
    score_answer,
    token_f1,
)


def test_normalisation_drops_case_punctuation_articles_and_commas():
    assert normalize_answer("The Cat, and a Dog!") == "cat dog"
    assert normalize_answer("  An   apple.  ") == "apple"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


def test_exact_match_after_normalisation():
    assert exact_match("Lisbon.", "lisbon") == 1.0
    assert exact_match("in Lisbon", "Lisbon") == 0.0


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("the cat sat", "cat sat on mat", 2 * (1.0 * 0.5) / 1.5),  # P = 2/2, R = 2/4
        ("Porto", "Porto", 1.0),
        ("Lisbon", "Porto", 0.0),
        ("", "Porto", 0.0),
        ("red red", "red", 2 * (0.5 * 1.0) / 1.5),  # repeated tokens count once against one gold token
    ],
)
def test_token_f1(prediction, answer, expected):
    assert token_f1(prediction, answer) == pytest.approx(expected)


def test_token_f1_stems_like_locomo():
    # LoCoMo's evaluation Porter-stems tokens before F1: inflections match, other words do not
    assert token_f1("marine biologists", "marine biologist") == pytest.approx(1.0)
    assert token_f1("she is running", "runs") == pytest.approx(2 * (1 / 3) * 1.0 / (1 / 3 + 1.0))
    assert token_f1("Lyon", "Lisbon") == 0.0


def test_contains_is_whole_word_and_normalised():
    assert contains_answer("She lives in Porto now.", "porto") == 1.0
    assert contains_answer("She lives in Portofino.", "Porto") == 0.0
    assert contains_answer("The pass key is 48213.", "48213") == 1.0
    assert contains_answer("anything", "") == 0.0


def test_multi_hop_partial_credit():
    assert multi_answer_f1("pottery", "pottery, Lisbon") == pytest.approx(0.5)
    assert multi_answer_f1("Lisbon, pottery", "pottery, Lisbon") == pytest.approx(1.0)


def test_adversarial_scores_abstention_only():
    assert abstains("That is not mentioned in the conversation.")
    assert score_answer("Not mentioned in the conversation", "", adversarial=True).f1 == 1.0
    assert score_answer("Juniper", "", adversarial=True).to_dict() == {"em": 0.0, "f1": 0.0, "contains": 0.0}


def test_score_answer_combines():
    s = score_answer("Porto", "Porto")
    assert (s.em, s.f1, s.contains) == (1.0, 1.0, 1.0)
    s = score_answer("He lives in Porto", "Porto")
    assert s.em == 0.0 and 0 < s.f1 < 1 and s.contains == 1.0


def test_aliases_count_as_the_answer():
    from memsplice.eval.tasks.synthetic import answer_aliases

    aliases = answer_aliases("birthday", "9 September")
    assert "September 9" in aliases and "September 9th" in aliases
    s = score_answer("Her birthday is on September 9.", "9 September", aliases=aliases)
    assert s.contains == 1.0 and s.f1 == pytest.approx(0.5)  # 2 of 6 predicted tokens, both gold tokens
    assert score_answer("Her birthday is on September 9.", "9 September").contains == 0.0
    assert answer_aliases("birthday", "21 May")[1] == "May 21st" and answer_aliases("city", "Porto") == ()
