"""Answer scores: exact match and token F1 under LoCoMo's normalisation, answer containment, and LoCoMo's rules for
multi-hop and adversarial questions.

Normalisation (as in the LoCoMo paper's evaluation, which extends SQuAD's): lowercase, drop commas, strip
punctuation, drop the words a / an / the / and, collapse whitespace. F1 then Porter-stems every token, as LoCoMo's
evaluation does (NLTK's `PorterStemmer`, in the `eval` extra), so "biologists" matches "biologist".

Scores per question (all in [0, 1]):
- `em`: normalised prediction == normalised answer;
- `f1`: token F1 of the normalised, stemmed strings; for multi-hop LoCoMo items (category 1) the answer is split on commas
  and each part scored against the best-matching part of the prediction, then averaged (LoCoMo's partial credit);
- `contains`: the normalised answer occurs in the normalised prediction as a whole-word phrase (the main score of
  the synthetic and passkey tasks, whose answers are single facts inside free-form replies);
- adversarial items (LoCoMo category 5) score 1 on every metric when the prediction says the history does not
  contain the answer, else 0;
- a task may declare aliases of an answer (other spellings, e.g. "September 9" for "9 September"); every metric
  takes the best over the answer and its aliases.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the|and)\b")
ABSTENTIONS = (
    "not mentioned",
    "no information",
    "not specified",
    "not stated",
    "does not say",
    "doesn't say",
    "unknown",
    "not known",
    "cannot be determined",
    "can't be determined",
    "no mention",
    "not say",
)


def normalize_answer(text: str) -> str:
    text = str(text).lower().replace(",", "")
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


@lru_cache(maxsize=1)
def _stemmer():
    try:
        from nltk.stem import PorterStemmer
    except ImportError as e:
        raise ImportError(
            "token F1 stems tokens as LoCoMo's evaluation does and needs NLTK: pip install 'memsplice[eval]'"
        ) from e
    return PorterStemmer()


def _stemmed_tokens(text: str) -> list[str]:
    stem = _stemmer().stem
    return [stem(w) for w in normalize_answer(text).split()]


def token_f1(prediction: str, answer: str) -> float:
    pred = _stemmed_tokens(prediction)
    gold = _stemmed_tokens(answer)
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def multi_answer_f1(prediction: str, answer: str) -> float:
    """LoCoMo multi-hop partial credit: mean over comma-separated gold parts of the best F1 against any predicted part."""
    golds = [g for g in str(answer).split(",") if g.strip()]
    preds = [p for p in str(prediction).split(",") if p.strip()] or [prediction]
    if not golds:
        return token_f1(prediction, answer)
    return sum(max(token_f1(p, g) for p in preds) for g in golds) / len(golds)


def contains_answer(prediction: str, answer: str) -> float:
    gold = normalize_answer(answer)
    if not gold:
        return 0.0
    return float(f" {gold} " in f" {normalize_answer(prediction)} ")


def abstains(prediction: str) -> bool:
    text = str(prediction).lower()
    return any(phrase in text for phrase in ABSTENTIONS)


@dataclass(frozen=True)
class Scores:
    em: float
    f1: float
    contains: float

    def to_dict(self) -> dict[str, float]:
        return {"em": self.em, "f1": self.f1, "contains": self.contains}


def score_answer(
    prediction: str,
    answer: str,
    *,
    adversarial: bool = False,
    multi_hop: bool = False,
    aliases: tuple[str, ...] | list[str] = (),
) -> Scores:
    """All scores of one prediction (see the module docstring for the rules); each metric takes the best over the
    answer and its `aliases` (other spellings of the same answer that a task declares)."""
    if adversarial:
        s = float(abstains(prediction))
        return Scores(s, s, s)
    golds = [answer, *aliases]
    f1 = max((multi_answer_f1 if multi_hop else token_f1)(prediction, g) for g in golds)
    return Scores(
        max(exact_match(prediction, g) for g in golds), f1, max(contains_answer(prediction, g) for g in golds)
    )


METRICS = ("em", "f1", "contains")
