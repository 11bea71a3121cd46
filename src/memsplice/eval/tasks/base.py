"""What every evaluation task produces: episodes (a history of turns plus questions about it), and the task registry.

A task is data: `build_episodes(TaskArgs, count_tokens)` returns a list of `Episode`s, each with the full history
and the questions asked after it. Every question carries the ids of its evidence turns (what an `oracle` system puts
in context) and a category for per-category scores. Tasks register under a name with `@register_task`.

Guarantees: episodes are a pure function of the arguments (seeded), turn ids are unique within an episode, and every
evidence id names a turn of that episode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Turn:
    """One utterance of the history."""

    id: str
    """Unique within the episode (LoCoMo's `dia_id`, e.g. "D3:12")."""
    speaker: str
    text: str
    session: int = 1
    """Sessions are numbered from 1; a new session is rendered with its date header."""
    date: str | None = None
    """The session's date and time as the source gives it (LoCoMo's `session_<n>_date_time`)."""


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    answer: str
    """The gold answer (for adversarial LoCoMo items: the empty string; see `adversarial_answer`)."""
    category: str
    evidence: tuple[str, ...] = ()
    """Ids of the turns that establish the answer."""
    adversarial_answer: str | None = None
    """LoCoMo category 5: the tempting wrong answer; the right response is to say the history does not say."""
    aliases: tuple[str, ...] = ()
    """Other ways of writing the gold answer that count as it (e.g. "September 9" for "9 September")."""

    @property
    def adversarial(self) -> bool:
        return self.adversarial_answer is not None


@dataclass(frozen=True)
class Episode:
    """One history and the questions asked after all of it."""

    id: str
    turns: tuple[Turn, ...]
    questions: tuple[Question, ...]
    meta: dict = field(default_factory=dict)
    """Task-specific facts about the episode, e.g. {"target_tokens": 4096} or {"depth": 0.5}."""

    def __post_init__(self):
        ids = [t.id for t in self.turns]
        if len(set(ids)) != len(ids):
            raise ValueError(f"episode {self.id}: turn ids are not unique")
        known = set(ids)
        for q in self.questions:
            missing = [e for e in q.evidence if e not in known]
            if missing:
                raise ValueError(f"episode {self.id}, question {q.id}: evidence {missing} names no turn")

    def turns_by_id(self, ids: Sequence[str]) -> list[Turn]:
        wanted = set(ids)
        return [t for t in self.turns if t.id in wanted]


@dataclass
class TaskArgs:
    """What a task needs to build its episodes; fields a task does not use are ignored by it."""

    examples: int = 2
    """Episodes per history length (synthetic, passkey), or the first N samples of a data file (LoCoMo; 0: all)."""
    lengths: tuple[int, ...] = (1024,)
    """History lengths in reasoner tokens (synthetic, passkey)."""
    seed: int = 0
    split: str = "test"
    """"train" or "test": synthetic facts and filler dialogues of the two splits never overlap."""
    data: Path | None = None
    """A data file (LoCoMo JSON) or corpus directory (filler dialogues; default: the shared corpora, else the
    dialogues bundled with the package)."""
    facts: int = 6
    """Synthetic: questions (facts asked about) per episode."""
    values: str = "pools"
    """Synthetic: "pools" (values from the fixed per-split lists of cities, jobs, ...) or "open" (made-up words and
    numbers drawn afresh for every fact, so that an answer can only come from the history)."""
    names: str = "pools"
    """Synthetic: "pools" (first and last names from the fixed per-split lists) or "open" (pronounceable names made
    up for each episode, never one of the listed names: a model trained on them cannot lean on a name it has seen)."""
    perspective: str = "others"
    """Synthetic: "others" (two friends chat about facts of other people) or "user" (a user chats with an
    assistant, and half the facts are the user's own, told in the first person)."""
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Passkey: where the needle sits, as a fraction of the history."""

    def __post_init__(self):
        if self.examples < 0:
            raise ValueError(f"TaskArgs.examples must be >= 0 (got {self.examples})")
        if not self.lengths or any(n < 64 for n in self.lengths):
            raise ValueError(
                f"TaskArgs.lengths must be history lengths of at least 64 tokens (got {self.lengths})"
            )
        if self.split not in ("train", "test"):
            raise ValueError(f'TaskArgs.split must be "train" or "test" (got {self.split!r})')
        if self.values not in ("pools", "open"):
            raise ValueError(f'TaskArgs.values must be "pools" or "open" (got {self.values!r})')
        if self.names not in ("pools", "open"):
            raise ValueError(f'TaskArgs.names must be "pools" or "open" (got {self.names!r})')
        if self.perspective not in ("others", "user"):
            raise ValueError(f'TaskArgs.perspective must be "others" or "user" (got {self.perspective!r})')
        if self.facts < 1:
            raise ValueError(f"TaskArgs.facts must be >= 1 (got {self.facts})")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"TaskArgs.depths must lie in [0, 1] (got {self.depths})")


CountTokens = Callable[[str], int]
TaskBuilder = Callable[[TaskArgs, CountTokens], list[Episode]]

TASKS: dict[str, TaskBuilder] = {}
TASK_HELP: dict[str, str] = {}
MAIN_METRIC: dict[str, str] = {}
"""The score a task is summarised by (one of memsplice.eval.metrics.METRICS)."""


def register_task(name: str, help: str, main_metric: str):
    """Register `build(args, count_tokens) -> list[Episode]` under `name`, summarised by `main_metric`."""

    def wrap(fn: TaskBuilder) -> TaskBuilder:
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        TASKS[name] = fn
        TASK_HELP[name] = help
        MAIN_METRIC[name] = main_metric
        return fn

    return wrap


def get_task(name: str) -> TaskBuilder:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(sorted(TASKS))}") from None


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (about 4 characters per token), for building episodes without a reasoner."""
    return max(1, len(text) // 4)
