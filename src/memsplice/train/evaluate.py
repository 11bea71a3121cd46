"""Held-out reconstruction fidelity: teacher-forced token accuracy and exact match of regenerated passages.

For each passage P the reasoner reads [memory of P][instruction] P and is scored on predicting every token of P
from what precedes it. Token accuracy is the share of positions whose argmax is the true token; exact match is the
share of passages with every position right, which is exactly when greedy decoding reproduces P verbatim.
With `memory_model=None` the reasoner reads [instruction] P with no memory at all (the floor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inject.memory_kv import MemoryKV
from ..inject.splice import passage_hidden_states

LOGIT_CHUNK = 4096


@dataclass
class Fidelity:
    token_accuracy: float
    exact_match: float
    passages: int
    tokens: int

    def to_dict(self) -> dict:
        return {
            "token_accuracy": self.token_accuracy,
            "exact_match": self.exact_match,
            "passages": self.passages,
            "tokens": self.tokens,
        }


@torch.no_grad()
def position_hits(reasoner, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: argmax of the LM head on `hidden` (B, T, d) equals `targets` (B, T); chunked over rows."""
    head = reasoner.model.get_output_embeddings()
    flat, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    hits = torch.empty_like(y, dtype=torch.bool)
    for start in range(0, len(y), LOGIT_CHUNK):
        hits[start : start + LOGIT_CHUNK] = (
            head(flat[start : start + LOGIT_CHUNK]).argmax(-1) == y[start : start + LOGIT_CHUNK]
        )
    return hits.view_as(targets)


@torch.no_grad()
def passage_hits(
    reasoner, memory: MemoryKV | None, passages: torch.Tensor, instruction: torch.Tensor
) -> torch.Tensor:
    """(B, T) bool: which tokens of `passages` (B, T) the reasoner predicts (argmax) when it reads
    [memory][instruction (I,)] P teacher-forced; `memory` None reads no memory (the floor)."""
    return position_hits(reasoner, passage_hidden_states(reasoner, instruction, passages, memory), passages)


@torch.no_grad()
def reconstruction_hits(
    reasoner,
    memory_model,
    passages: torch.Tensor,
    instruction: torch.Tensor,
    batch_rows: int = 32,
    progress=None,
    refine_steps: int = 0,
) -> torch.Tensor:
    """(N, T) bool on the CPU: which tokens of `passages` (N, T) the reasoner predicts after [memory of the passage,
    written by `memory_model` in batches of `batch_rows`, or no memory when None][instruction]; `refine_steps`
    write-time refinement steps per memory (`memsplice.memory.refine`)."""
    device = reasoner.device
    instruction = instruction.to(device)
    hits = []
    for start in range(0, passages.shape[0], batch_rows):
        p = passages[start : start + batch_rows].to(device)
        memory = memory_model.write(p, refine_steps=refine_steps).kv if memory_model is not None else None
        hits.append(passage_hits(reasoner, memory, p, instruction).cpu())
        if progress is not None:
            progress.update(p.shape[0])
    return torch.cat(hits)


@torch.no_grad()
def reconstruction_fidelity(
    reasoner,
    memory_model,
    passages: torch.Tensor,
    instruction: torch.Tensor,
    batch_rows: int = 32,
    progress=None,
    refine_steps: int = 0,
) -> Fidelity:
    """Fidelity of `memory_model` (or of no memory, when None) on `passages` (N, T) (`reconstruction_hits`)."""
    hits = reconstruction_hits(
        reasoner, memory_model, passages, instruction, batch_rows, progress, refine_steps
    )
    n, tokens = hits.shape[0], hits.numel()
    return Fidelity(int(hits.sum()) / tokens, int(hits.all(dim=1).sum()) / n, n, tokens)
