"""Builders for online-learning tests."""

import random

import torch

from helpers import small_memory
from memsplice.online import Interaction
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
