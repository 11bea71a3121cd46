"""`AddressHead`: which chunk memories a question should read, scored from latents alone.

    head = AddressHead(hidden_size=576, dim=128)
    scores = head.score(head.queries(question_latents), head.keys(chunk_latents))   # (Q, C)
    loss = address_loss(scores, positives)                                         # multi-positive InfoNCE

A conversation's memory is many chunk memories of M latent slots each. Putting all of them in front of a question
makes the reasoner find the fact among them, which it does badly; the address head lets the question pick the few
chunks to splice instead. It reads only what memory already holds: the chunk's stored latents (M, d) give M keys,
the question's own latents (the same encoder run over the question as a turn) give M queries, and a chunk's score is
late interaction: the mean over queries of the best-matching key (as in ColBERT), times a learned scale. No text is
re-read and nothing is stored beyond the latents.

The head is trained with `address_loss` (InfoNCE with several positives: the chunks holding the question's evidence
against every other chunk of the batch), by `memsplice.online.address`; the encoder stays as it is, so the memories
read back exactly as before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AddressHead(nn.Module):
    def __init__(self, hidden_size: int, dim: int):
        super().__init__()
        self.dim = dim
        self.query_norm = nn.LayerNorm(hidden_size)
        self.key_norm = nn.LayerNorm(hidden_size)
        self.query_proj = nn.Linear(hidden_size, dim, bias=False)
        self.key_proj = nn.Linear(hidden_size, dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def queries(self, latents: torch.Tensor) -> torch.Tensor:
        """Question latents (..., M, d) -> unit query vectors (..., M, dim)."""
        return F.normalize(self.query_proj(self.query_norm(latents.float())), dim=-1)

    def keys(self, latents: torch.Tensor) -> torch.Tensor:
        """Chunk latents (..., M, d) -> unit key vectors (..., M, dim)."""
        return F.normalize(self.key_proj(self.key_norm(latents.float())), dim=-1)

    def score(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Queries (Q, Mq, dim) against keys (C, Mk, dim) -> scores (Q, C): mean over query slots of the best key slot,
        times the learned scale."""
        sim = torch.einsum("qid,cjd->qcij", queries, keys)  # (Q, C, Mq, Mk)
        return sim.max(dim=-1).values.mean(dim=-1) * self.log_scale.exp().clamp(max=100.0)


def address_loss(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """InfoNCE with several positives: -log(sum of exp(score) over positive chunks / over all chunks), mean over the
    questions that have a positive. scores (Q, C), positives (Q, C) bool."""
    if scores.shape != positives.shape:
        raise ValueError(f"address_loss: scores {tuple(scores.shape)} and positives {tuple(positives.shape)}")
    has = positives.any(dim=1)
    if not bool(has.any()):
        raise ValueError("address_loss: no question has a positive chunk")
    scores, positives = scores[has], positives[has]
    pos = torch.logsumexp(scores.masked_fill(~positives, float("-inf")), dim=1)
    return (torch.logsumexp(scores, dim=1) - pos).mean()


def rank_chunks(scores: torch.Tensor, recency_margin: float = 0.0, limit: int | None = None) -> list[int]:
    """Chunk indices for one question (scores (C,), chunks in conversation order), best first: all of them, or the
    first `limit`.

    With `recency_margin` > 0, scores within that margin of the best remaining one count as a tie, and among them
    the latest chunk ranks first: when two chunks are about equally relevant, the newer one is more likely to hold
    what is true now (a fact told, then changed: the head ranks both, and by its scores alone it cannot tell them
    apart). The margin is in the head's score units (`MemoryConfig.address_recency_margin`); 0 ranks by score alone.
    """
    if recency_margin < 0:
        raise ValueError(f"rank_chunks: recency_margin must be >= 0 (got {recency_margin})")
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    n = len(order) if limit is None else min(limit, len(order))
    if recency_margin == 0:
        return order[:n]
    values = scores.tolist()
    ranked, left = [], order
    while len(ranked) < n:
        floor = values[left[0]] - recency_margin
        tied = 1  # left is in score order: the ties of its best are a prefix
        while tied < len(left) and values[left[tied]] >= floor:
            tied += 1
        pick = max(left[:tied])
        ranked.append(pick)
        left = [i for i in left if i != pick]
    return ranked


def top_chunks(
    scores: torch.Tensor, k: int, recency_margin: float = 0.0, extra_margin: float | None = None
) -> list[int]:
    """Indices of the `k` chunks `rank_chunks` ranks first for one question (scores (C,)), in their original (time)
    order. With `extra_margin`, a chunk after the first is kept only if its score is within that margin of the best
    score: the head reads more than one chunk only where it is unsure which one holds the answer."""
    if k < 1:
        raise ValueError(f"top_chunks: k must be >= 1 (got {k})")
    if extra_margin is not None and extra_margin < 0:
        raise ValueError(f"top_chunks: extra_margin must be >= 0 (got {extra_margin})")
    ranked = rank_chunks(scores, recency_margin, limit=k)
    if extra_margin is not None and len(ranked) > 1:
        floor = float(scores.max()) - extra_margin
        ranked = ranked[:1] + [i for i in ranked[1:] if float(scores[i]) >= floor]
    return sorted(ranked)
