"""`passkey`: one pass key said once in a long chat, asked for at the end; needle retrieval at growing depth.

For every history length and every depth in `TaskArgs.depths` (0: the first turn, 1: the last), `examples` episodes
are built from real filler dialogue with one needle turn ("The pass key is 48213. Remember it. 48213 is the pass
key.") placed at that fraction of the history's tokens. The category of each question is its depth, so scores come
out per depth. Seeded and reproducible; keys are five-digit numbers.
"""

from __future__ import annotations

import random

from .base import CountTokens, Episode, Question, TaskArgs, register_task
from .filler import PlannedTurn, assemble_history, filler_turns


def depth_category(depth: float) -> str:
    return f"depth {depth:.2f}"


def build_episode(
    args: TaskArgs, target_tokens: int, depth: float, index: int, count_tokens: CountTokens
) -> Episode:
    rng = random.Random(f"passkey|{args.split}|{args.seed}|{target_tokens}|{depth}|{index}")
    key = str(rng.randrange(10000, 100000))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    filler = filler_turns(args.split, seed=rng.randrange(2**31), data=args.data)
    turns, placed = assemble_history(
        target_tokens, [PlannedTurn(depth, needle, "needle")], ("A", "B"), filler, count_tokens, rng
    )
    question = Question(
        id="q0",
        question="What is the pass key?",
        answer=key,
        category=depth_category(depth),
        evidence=(placed["needle"],),
    )
    return Episode(
        f"passkey-{args.split}-{target_tokens}-d{depth:.2f}-{index}",
        tuple(turns),
        (question,),
        meta={"target_tokens": target_tokens, "depth": depth},
    )


@register_task(
    "passkey", help="a five-digit pass key said once, at depths 0..1 of a long chat", main_metric="contains"
)
def build_passkey(args: TaskArgs, count_tokens: CountTokens) -> list[Episode]:
    # example-major, then depth: a run cut by its time budget has covered every length as far as it got
    return [
        build_episode(args, length, depth, i, count_tokens)
        for i in range(args.examples)
        for depth in args.depths
        for length in args.lengths
    ]
