"""Skill rehearsal: questions answered from memory, kept beside the online stream so its updates keep that skill.

The online objectives (next-token prediction of the conversation, span denoising, InfoNCE) say nothing about
answering a question from memory, and a stream of everyday dialogue rarely asks one about a fact it told long ago.
Measured on the stability stream, EWC towards a slow anchor only slowed the loss of that skill (early-fact accuracy
38.5% down over 6,487 updates). Rehearsal replays the skill itself: a `RehearsalSet` holds (memory input, question,
answer) items, and each update adds the teacher-forced answer loss (`train.objectives.answer`) of
`OnlineConfig.rehearsal_per_update` of them, each question reading a memory written from its own evidence.

`rehearsal_from_synthetic` builds the set from the eval harness's synthetic multi-session task, **train split
only** (the bootstrap's data: each question's evidence turns as one memory input, as the `latent-oracle` system
writes them), so nothing of the benchmarks' test split or of a user's conversation is in it. It is public synthetic
text: under the privacy options its gradient is added outside the per-sample clipping and noise, as the EWC pull is.

Items are plain token ids with `to_dict` / `from_dict`, so the learner saves the set with its state and a resumed
learner rehearses the same items in the same order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PROMPTS = ("reader", "chat", "both")
"""How `rehearsal_from_synthetic` asks its questions (see there)."""


@dataclass
class RehearsalItem:
    memory: list[int]
    """Token ids written into memory (the evidence of the question)."""
    prompt: list[int]
    """The question in the reasoner's chat template, up to where the answer starts."""
    answer: list[int]
    """The gold answer's token ids (ending with the end-of-turn token)."""

    def to_dict(self) -> dict:
        return asdict(self)


class RehearsalSet:
    """A fixed list of `RehearsalItem`s; `sample` draws without replacement within one call."""

    def __init__(self, items: list[RehearsalItem], source: str = ""):
        items = list(items)
        for k, it in enumerate(items):
            if not (it.memory and it.prompt and it.answer):
                raise ValueError(f"RehearsalSet: item {k} needs memory, prompt and answer tokens")
        if not items:
            raise ValueError("RehearsalSet: no items")
        self.items = items
        self.source = source
        """What the items were built from (recorded with the learner's state)."""

    def sample(self, k: int, rng) -> list[RehearsalItem]:
        return rng.sample(self.items, min(k, len(self.items)))

    def __len__(self) -> int:
        return len(self.items)

    def to_dict(self) -> dict:
        return {"source": self.source, "items": [it.to_dict() for it in self.items]}

    @classmethod
    def from_dict(cls, d: dict) -> RehearsalSet:
        return cls([RehearsalItem(**it) for it in d["items"]], source=d.get("source", ""))


def rehearsal_from_synthetic(
    reasoner,
    questions: int = 512,
    *,
    seed: int = 1000,
    chunk_tokens: int = 64,
    history_tokens: int = 512,
    facts: int = 6,
    values: str = "mixed",
    prompts: str = "reader",
    data: str | None = None,
) -> RehearsalSet:
    """`questions` items from train-split synthetic episodes (`history_tokens` long, `facts` questions each): each
    question's evidence turns (their last `chunk_tokens` tokens, rendered as the conversation memory renders turns)
    as the memory input, the question in the eval reader's prompt, and its answer.

    values: "pools" (the task's value pools), "open" (values made up for every fact, so only memory can carry them)
    or "mixed" (half the episodes each, as the bootstrap trains).

    prompts: how a question is asked: "reader" (the eval reader's prompt, with its system message and "Short answer:",
    as the latent eval systems ask), "chat" (the bare question as the user's turn in the reasoner's chat template, as
    `memsplice chat` and the server pass it on) or "both" (every other item each way)."""
    if questions < 1:
        raise ValueError(f"rehearsal_from_synthetic: questions must be positive (got {questions})")
    if values not in ("pools", "open", "mixed"):
        raise ValueError(
            f'rehearsal_from_synthetic: values must be "pools", "open" or "mixed" (got {values!r})'
        )
    if prompts not in PROMPTS:
        raise ValueError(f"rehearsal_from_synthetic: prompts must be one of {PROMPTS} (got {prompts!r})")
    from ..eval.reader import Reader
    from .bootstrap import BootstrapConfig, episode_examples, synthetic_episodes

    cfg = BootstrapConfig(history_tokens=[history_tokens], facts=facts, chunk_tokens=chunk_tokens, data=data)
    episodes = -(-questions // facts) + 1  # a few episodes come short of `facts` answered questions
    count = Reader(reasoner).count_tokens
    kinds = {"pools": ["pools"], "open": ["open"], "mixed": ["pools", "open"]}[values]
    share = -(-episodes // len(kinds))
    drawn = [
        ep for k, kind in enumerate(kinds) for ep in synthetic_episodes(cfg, share, seed + k, count, kind)
    ]
    items = []
    for ex in episode_examples(drawn, reasoner, chunk_tokens):
        for question, e, p, a in zip(ex.questions, ex.evidence, ex.prompts, ex.answers, strict=True):
            if prompts == "chat" or (prompts == "both" and len(items) % 2 == 1):
                p = reasoner.chat_ids([{"role": "user", "content": question}])
            items.append(RehearsalItem(memory=e, prompt=p, answer=a))
    source = (
        f"synthetic train split: {len(drawn)} episodes of {history_tokens} tokens, {facts} facts, "
        f"{values} values, seed {seed}, evidence of up to {chunk_tokens} tokens"
        + ("" if prompts == "reader" else f", {prompts} prompts")
    )
    return RehearsalSet(items[:questions], source=source)


def default_rehearsal(memory, questions: int = 512, *, seed: int = 1000, prompts: str = "reader", data=None):
    """`rehearsal_from_synthetic` for `memory`: evidence cut to the chunk size its conversations use (the checkpoint's
    `chunk_tokens`, else 64 tokens), within what its encoder reads."""
    chunk = min(memory.config.chunk_tokens or 64, memory.config.max_memory_tokens)
    return rehearsal_from_synthetic(
        memory.reasoner, questions, seed=seed, chunk_tokens=chunk, prompts=prompts, data=data
    )


def ensure_rehearsal(learner) -> None:
    """Give `learner` the default rehearsal set when its config asks for rehearsal and it has none (a learner
    resumed from a state saved without rehearsal, then told to rehearse)."""
    if learner.config.rehearsal_per_update > 0 and learner.rehearsal is None:
        learner.rehearsal = default_rehearsal(learner.memory)
