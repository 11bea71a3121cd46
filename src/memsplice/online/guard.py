"""Skill guard: roll the memory back to its anchor when online updates cost it the skill of answering from memory.

EWC, replay and rehearsal slow the drift of an encoder that learns from everyday dialogue, but none of them stops
it: on the stability stream the early facts were still 25-38% down after a few thousand updates. The guard adds a
check with a veto. At every anchor refresh (every `OnlineConfig.anchor_interval` steps) it scores the memory on a
fixed canary set: questions answered, teacher-forced, from a memory written from their own evidence (a
`RehearsalSet`, built from the synthetic task's train split with a seed of its own, so it shares no item with the
rehearsal set and nothing with a benchmark's test split or a user's conversation). Then:
- score >= reference * (1 - tolerance): the updates since the last refresh are kept and become the new anchor;
- otherwise they are discarded: every parameter goes back to the anchor (`ElasticAnchor.restore`), the optimizer's
  moments of the discarded steps are dropped, and the learner goes on from there with the next interactions.

The reference is the canary score of the weights the learner started from, so the canary never ends more than
`tolerance` below where it began, however long the stream; learning that keeps the skill is accepted, and the rest
is lost. What the guard cannot promise is the same for other facts: the canary is a sample of one skill, and the
stability benchmark measures forgetting on facts of another kind that the guard never sees.

    guard = default_guard(memory, tolerance=0.01)               # 128 canary questions, train split
    learner = OnlineLearner(memory, OnlineConfig(guard_tolerance=0.01), guard=guard)
    learner.guard.events                                        # every check: update, score, kept or rolled back
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from .rehearsal import RehearsalSet, default_rehearsal

logger = logging.getLogger(__name__)

GUARD_SEED = 2000
"""Seed of the default canary set's episodes (rehearsal sets use 1000 + the run's seed)."""


@dataclass
class GuardEvent:
    update: int
    """Updates done when the check ran."""
    score: float
    """Canary answer-token accuracy of the weights checked."""
    reference: float
    kept: bool
    """True: the weights became the anchor; False: they were rolled back to it."""


class SkillGuard:
    """A canary set, a tolerance, the reference score, and the log of every check (see the module docstring)."""

    def __init__(
        self,
        canary: RehearsalSet,
        tolerance: float,
        *,
        batch: int = 32,
        reference: float | None = None,
        events: list[GuardEvent] | None = None,
    ):
        if not 0.0 <= tolerance < 1.0:
            raise ValueError(f"SkillGuard: tolerance must be in [0, 1) (got {tolerance})")
        if batch < 1:
            raise ValueError(f"SkillGuard: batch must be positive (got {batch})")
        self.canary = canary
        self.tolerance = tolerance
        self.batch = batch
        self.reference = reference
        """Canary score of the starting weights (set by `start`)."""
        self.events: list[GuardEvent] = list(events or [])

    @property
    def rollbacks(self) -> int:
        return sum(not e.kept for e in self.events)

    @torch.no_grad()
    def score(self, memory) -> float:
        """Teacher-forced answer-token accuracy over the canary items, each question reading a memory written from its
        own evidence; memory in eval mode, no autograd."""
        from ..train.objectives import answer
        from .bootstrap import write_chunks

        correct = total = 0
        with memory.evaluating():
            items = self.canary.items
            for start in range(0, len(items), self.batch):
                part = items[start : start + self.batch]
                written = write_chunks(memory, [it.memory for it in part])
                result = answer(memory, written.kv, [it.prompt for it in part], [it.answer for it in part])
                correct += int(result.correct)
                total += result.tokens
        return correct / max(total, 1)

    def start(self, memory) -> float:
        """Score the starting weights as the reference (once; a restored guard keeps its own)."""
        if self.reference is None:
            self.reference = self.score(memory)
            logger.info("skill guard: reference canary score %.4f", self.reference)
        return self.reference

    def check(self, memory, update: int) -> bool:
        """Score the current weights; True when they may become the anchor, False when they must be rolled back."""
        reference = self.start(memory)
        score = self.score(memory)
        kept = score >= reference * (1.0 - self.tolerance)
        self.events.append(GuardEvent(update=update, score=score, reference=reference, kept=kept))
        if not kept:
            logger.warning(
                "skill guard: canary %.4f below %.4f (reference %.4f, tolerance %.3f) at update %d: rolled back",
                score,
                reference * (1.0 - self.tolerance),
                reference,
                self.tolerance,
                update,
            )
        return kept

    def to_dict(self) -> dict:
        return {
            "canary": self.canary.to_dict(),
            "tolerance": self.tolerance,
            "batch": self.batch,
            "reference": self.reference,
            "events": [asdict(e) for e in self.events],
        }

    @classmethod
    def from_dict(cls, d: dict) -> SkillGuard:
        return cls(
            RehearsalSet.from_dict(d["canary"]),
            d["tolerance"],
            batch=d.get("batch", 32),
            reference=d.get("reference"),
            events=[GuardEvent(**e) for e in d.get("events", [])],
        )


def default_guard(
    memory, tolerance: float, questions: int = 128, *, seed: int = GUARD_SEED, data=None
) -> SkillGuard:
    """A guard with `questions` canary items from the synthetic train split (evidence cut to the memory's chunk size,
    asked both as the eval reader asks and as a bare chat turn), seeded apart from the rehearsal sets."""
    canary = default_rehearsal(memory, questions, seed=seed, prompts="both", data=data)
    canary.source = "canary: " + canary.source
    return SkillGuard(canary, tolerance)


def ensure_guard(learner, tolerance: float | None) -> None:
    """Set `learner`'s skill guard to `tolerance` (None: no guard): a learner without one (new, or resumed from a
    state saved without one) gets `default_guard`, whose reference is the score of the weights it has now; one that
    has a guard keeps it, canary, reference and log, with the new tolerance."""
    learner.config.guard_tolerance = tolerance
    if tolerance is None:
        learner.guard = None
        return
    if learner.guard is None:
        learner.guard = default_guard(learner.memory, tolerance)
    learner.guard.tolerance = tolerance
    learner.guard.start(learner.memory)
