"""Builders for online-learning tests."""

import random

import torch

from helpers import small_memory
from memsplice.online import Interaction, OnlineConfig
from tiny import tiny_reasoner

VOCAB = 384


def tiny_memory(**overrides):
    torch.manual_seed(1)
    return small_memory(tiny_reasoner("llama"), **{"max_memory_tokens": 48, "encoder_layers": 1, **overrides})


def interactions(
    n: int, seed: int = 0, context: int = 24, query: int = 8, response: int = 12
) -> list[Interaction]:
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(3, VOCAB) for _ in range(k)]  # noqa: E731
    return [
        Interaction(id=-1, context=tok(context), query=tok(query), response=tok(response)) for _ in range(n)
    ]


def small_online_config(**overrides) -> OnlineConfig:
    """An `OnlineConfig` for `tiny_memory`: batches of 2, an anchor refresh every 4 steps, short rows, a large rate."""
    cfg = dict(
        batch_size=2,
        anchor_interval=4,
        context_tokens=24,
        target_tokens=12,
        replay_per_update=2,
        lr=1e-3,
    )
    return OnlineConfig(**{**cfg, **overrides})
