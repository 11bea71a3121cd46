"""Natural filler dialogue for synthetic histories: real human-human chat turns from the open corpora.

Filler comes from the dialogue corpora (`memsplice.data.iter_dialogues`): the "test" split draws from the fixed
held-out dialogues, "train" from the rest, so a test history never reuses a dialogue a memory was trained on. Without
a corpus directory the 300 dialogues bundled with the package are used, split in two halves by the same hash rule.

Guarantees: the same (split, data, seed) gives the same stream of turns; whole dialogues are taken in order, so the
filler reads like conversation; no test dialogue is also a train dialogue (duplicates in the corpora are dropped
from test); the stream cycles (reshuffled) when a split runs out.
"""

from __future__ import annotations

import datetime
import functools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ...data import bundled_dialogues, iter_dialogues, split_of
from .base import Turn

logger = logging.getLogger(__name__)

BUNDLED_HELDOUT_FRACTION = 0.5


@functools.cache
def _dialogues(split: str, data: str | None) -> tuple[tuple[str, ...], ...]:
    corpus_split = "heldout" if split == "test" else "train"
    try:
        dialogues = list(iter_dialogues(data, split=corpus_split))
    except FileNotFoundError:
        dialogues = []
    if not dialogues:
        if data is not None:
            raise FileNotFoundError(f"no dialogue corpus under {data} (expected chitchat/ or topical-chat/)")
        logger.info("no corpus directory; filler comes from the dialogues bundled with memsplice")
        dialogues = [
            d
            for d in bundled_dialogues()
            if (split_of(d.id, BUNDLED_HELDOUT_FRACTION) == "heldout") == (split == "test")
        ]
    texts = tuple(tuple(text for _, text in d.turns) for d in dialogues)
    if split == "test":  # the corpora hold a few duplicates under two ids; keep test filler out of train's
        train = set(_dialogues("train", data))
        texts = tuple(t for t in texts if t not in train)
    return texts


def filler_dialogues(split: str, data: Path | None = None) -> list[tuple[str, ...]]:
    """The dialogues (each its turns' texts) the filler of `split` ("train" or "test") comes from: the corpora's
    train or held-out split, else the dialogues bundled with memsplice."""
    return list(_dialogues(split, None if data is None else str(data)))


def filler_turns(split: str, seed: int, data: Path | None = None) -> Iterator[str]:
    """An endless stream of filler utterances (texts only; the caller assigns speakers)."""
    dialogues = filler_dialogues(split, data)
    if not dialogues:
        raise FileNotFoundError(f"no filler dialogues for split {split!r}")
    rng = random.Random(seed)
    while True:
        rng.shuffle(dialogues)
        for dialogue in dialogues:
            yield from dialogue


@dataclass(frozen=True)
class PlannedTurn:
    """A turn the task wants at a given place in the history."""

    at: float
    """Where it goes, as a fraction of the history's tokens (0: first turn, 1: after all filler)."""
    text: str
    key: str
    """The task's name for it; the built turn's id is returned under this key."""
    speaker: int | None = None
    """Who says it (0 or 1: an index into the history's two speakers); None: whoever's turn it is."""


def session_count(target_tokens: int) -> int:
    """Sessions in a history of `target_tokens`: about one per 1,500 tokens, at least 2, at most 48."""
    return max(2, min(48, round(target_tokens / 1500)))


def session_dates(count: int, rng: random.Random) -> list[str]:
    """LoCoMo-style session times ("1:56 pm on 8 May, 2023"), a few days apart, in order."""
    day = datetime.date(2023, 1, 1) + datetime.timedelta(days=rng.randrange(300))
    dates = []
    for _ in range(count):
        hour, minute = rng.randrange(8, 22), rng.randrange(60)
        clock = f"{(hour - 1) % 12 + 1}:{minute:02d} {'am' if hour < 12 else 'pm'}"
        dates.append(f"{clock} on {day.day} {day.strftime('%B')}, {day.year}")
        day += datetime.timedelta(days=rng.randrange(1, 10))
    return dates


def assemble_history(
    target_tokens: int,
    planned: list[PlannedTurn],
    speakers: tuple[str, str],
    filler: Iterator[str],
    count_tokens,
    rng: random.Random,
) -> tuple[list[Turn], dict[str, str]]:
    """Filler turns up to `target_tokens`, with `planned` turns inserted at their fractions, split into sessions.

    Returns the turns (ids "S<session>:<index>", speakers alternating except where a planned turn names its
    speaker) and {planned key: turn id}.
    """
    sessions = session_count(target_tokens)
    dates = session_dates(sessions, rng)
    queue = sorted(planned, key=lambda p: p.at)
    turns: list[Turn] = []
    placed: dict[str, str] = {}
    used = 0
    index_in_session = 0
    session = 1

    def add(text: str, key: str | None = None, speaker: int | None = None) -> None:
        nonlocal used, index_in_session
        index_in_session += 1
        turn = Turn(
            id=f"S{session}:{index_in_session}",
            speaker=speakers[len(turns) % 2 if speaker is None else speaker],
            text=text,
            session=session,
            date=dates[session - 1],
        )
        turns.append(turn)
        used += count_tokens(f"{turn.speaker}: {text}")
        if key is not None:
            placed[key] = turn.id

    while used < target_tokens or queue:
        while queue and queue[0].at * target_tokens <= used:
            item = queue.pop(0)
            add(item.text, item.key, item.speaker)
        if used >= target_tokens:
            for item in queue:
                add(item.text, item.key, item.speaker)
            break
        boundary = session * target_tokens / sessions
        if used >= boundary and session < sessions:
            session += 1
            index_in_session = 0
        add(next(filler).strip())
    return turns, placed
