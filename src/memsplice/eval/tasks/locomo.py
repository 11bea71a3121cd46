"""`locomo`: conversations and questions in the LoCoMo format, read from a JSON file given as `--data PATH`.

The file is a JSON list of samples, each with
- `conversation`: `speaker_a`, `speaker_b`, and per session n `session_<n>` (a list of `{speaker, dia_id, text}`,
  optionally `blip_caption` for a shared image) and `session_<n>_date_time`;
- `qa`: a list of `{question, answer, evidence, category}`; category 5 items (adversarial) carry
  `adversarial_answer` instead of `answer`.
Categories are reported as "1 multi-hop", "2 temporal", "3 open-domain", "4 single-hop", "5 adversarial" (the
numbering of the LoCoMo release; only 5 = adversarial changes how a question is scored).

Guarantees: every sample becomes one episode; turn ids are LoCoMo's `dia_id`s; evidence ids that name no turn (the
release has a few malformed ones) are dropped with a warning rather than failing the file; a file that is not in this
format is refused with a message naming the sample and the field.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .base import CountTokens, Episode, Question, TaskArgs, Turn, register_task

logger = logging.getLogger(__name__)

CATEGORY_NAMES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
ADVERSARIAL = 5


def category_label(category: int) -> str:
    return f"{category} {CATEGORY_NAMES.get(category, 'other')}"


class LoCoMoFormatError(ValueError):
    """The data file is not in the LoCoMo format."""


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise LoCoMoFormatError(f"{where}: {msg}")


def _turn_text(raw: dict) -> str:
    text = str(raw.get("text", "")).strip()
    caption = raw.get("blip_caption")
    if caption:  # LoCoMo's own prompts describe a shared image by its caption
        text = f"{text} [shares a photo: {caption}]".strip()
    return text


def parse_sample(sample: dict, index: int) -> Episode:
    where = (
        f"sample {index} ({sample.get('sample_id', 'no sample_id')})"
        if isinstance(sample, dict)
        else f"sample {index}"
    )
    _need(isinstance(sample, dict), where, "must be a JSON object")
    conv = sample.get("conversation")
    _need(isinstance(conv, dict), where, "needs a `conversation` object")
    sessions = sorted((int(m.group(1)), key) for key in conv if (m := re.fullmatch(r"session_(\d+)", key)))
    _need(bool(sessions), where, "`conversation` has no `session_<n>` lists")
    turns: list[Turn] = []
    for n, key in sessions:
        _need(isinstance(conv[key], list), where, f"`{key}` must be a list of turns")
        date = conv.get(f"{key}_date_time")
        for j, raw in enumerate(conv[key]):
            _need(
                isinstance(raw, dict) and "speaker" in raw and "text" in raw,
                where,
                f"`{key}[{j}]` needs `speaker` and `text`",
            )
            turn_id = str(raw.get("dia_id") or f"D{n}:{j + 1}")
            turns.append(
                Turn(id=turn_id, speaker=str(raw["speaker"]), text=_turn_text(raw), session=n, date=date)
            )
    known = {t.id for t in turns}
    qa = sample.get("qa", [])
    _need(isinstance(qa, list), where, "`qa` must be a list")
    questions = []
    dropped = 0
    for j, item in enumerate(qa):
        _need(
            isinstance(item, dict) and "question" in item and "category" in item,
            where,
            f"`qa[{j}]` needs `question` and `category`",
        )
        try:
            category = int(item["category"])
        except (TypeError, ValueError):
            raise LoCoMoFormatError(f"{where}: `qa[{j}].category` must be an integer") from None
        adversarial = item.get("adversarial_answer") if category == ADVERSARIAL else None
        _need("answer" in item or category == ADVERSARIAL, where, f"`qa[{j}]` needs `answer`")
        evidence = []
        for e in item.get("evidence", []) or []:
            for part in re.split(r"[;,]", str(e)):
                part = part.strip()
                if part in known:
                    evidence.append(part)
                elif part:
                    dropped += 1
        questions.append(
            Question(
                id=f"q{j}",
                question=str(item["question"]),
                answer=str(item.get("answer", "")),
                category=category_label(category),
                evidence=tuple(dict.fromkeys(evidence)),
                adversarial_answer=None if category != ADVERSARIAL else str(adversarial or ""),
            )
        )
    if dropped:
        logger.warning("%s: dropped %d evidence ids that name no turn", where, dropped)
    speakers = [conv.get("speaker_a"), conv.get("speaker_b")]
    return Episode(
        str(sample.get("sample_id", f"locomo-{index}")),
        tuple(turns),
        tuple(questions),
        meta={"speakers": [s for s in speakers if s]},
    )


def load_locomo(path: str | Path, limit: int = 0) -> list[Episode]:
    """Episodes from a LoCoMo-format JSON file (the first `limit` samples; 0: all)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoCoMo data file at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LoCoMoFormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise LoCoMoFormatError(f"{path} must hold a JSON list of samples")
    samples = data[:limit] if limit else data
    return [parse_sample(s, i) for i, s in enumerate(samples)]


@register_task(
    "locomo", help="LoCoMo-format conversation QA from a JSON file (--data PATH)", main_metric="f1"
)
def build_locomo(args: TaskArgs, count_tokens: CountTokens) -> list[Episode]:
    if args.data is None:
        raise ValueError("the locomo task reads a LoCoMo-format JSON file: pass --data PATH")
    return load_locomo(args.data, args.examples)
