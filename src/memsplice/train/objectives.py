"""The memory's training objectives, one function each, shared by offline formation and the online loop.

Each objective writes memory with the model being trained, runs the frozen reasoner with that memory in front, and
returns an `ObjectiveResult` whose `loss` is a differentiable mean:
- `continuation` (next-token): the reasoner reads [memory of the context] and predicts the text that follows it;
- `denoising` (span denoising): the encoder reads a passage with spans masked or dropped, and the reasoner, after an
  instruction, restores the original passage;
- `infonce`: the pooled latents of a query and of the passage it belongs to are pulled together against the other
  rows of the batch (in-batch negatives).

Inputs to the reasoner are unpadded (all rows of a batch share one length), so no padding token is ever a target.
Logits are formed only at target positions (`reasoner.model.get_output_embeddings()` on those hidden states), never
for the whole (batch, tokens, vocab) block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..inject.splice import hidden_states_with_memory


@dataclass
class PairBatch:
    """InfoNCE pairs: row i's query and row i's passage are positives."""

    query: torch.Tensor
    """(B, Tq) token ids, right-padded."""
    query_mask: torch.Tensor
    """(B, Tq)."""
    passage: torch.Tensor
    """(B, T) token ids (unpadded)."""


@dataclass
class DenoiseBatch:
    """A passage and its corrupted copy (what the encoder sees)."""

    passage: torch.Tensor
    """(B, T) the original passage: the reasoner's target."""
    corrupted: torch.Tensor
    """(B, Tc) the encoder's input, right-padded."""
    corrupted_mask: torch.Tensor
    """(B, Tc)."""


@dataclass
class ObjectiveResult:
    loss: torch.Tensor
    """Mean loss (differentiable)."""
    tokens: int
    """Target tokens (or pairs, for InfoNCE) the mean is over."""
    correct: torch.Tensor | None = None
    """Argmax hits among the target tokens (no gradient); None for InfoNCE."""


def read_back(memory_model, memory, prompt: torch.Tensor, target: torch.Tensor) -> ObjectiveResult:
    """Teacher-forced cross-entropy of `target` (B, T) after [memory][prompt (B, I)], at the T target positions."""
    reasoner = memory_model.reasoner
    b, t = target.shape
    i = prompt.shape[1]
    text = torch.cat([prompt, target], dim=1)  # (B, I+T)
    hidden = hidden_states_with_memory(reasoner, text, None, memory.kv)  # (B, I+T, d)
    logits = reasoner.model.get_output_embeddings()(hidden[:, i - 1 : i + t - 1]).float()  # (B, T, V)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    correct = (logits.detach().argmax(-1) == target).sum()
    return ObjectiveResult(loss, b * t, correct)


def continuation(memory_model, context: torch.Tensor, following: torch.Tensor) -> ObjectiveResult:
    """context (B, T) -> memory; the reasoner predicts following[:, 1:] from following[:, :-1] (next-token)."""
    memory = memory_model.write(context)
    return read_back(memory_model, memory, following[:, :1], following[:, 1:])


def denoising(memory_model, batch: DenoiseBatch, instruction: torch.Tensor) -> ObjectiveResult:
    """The encoder reads the corrupted passage; after `instruction` (I,) the reasoner restores the original."""
    memory = memory_model.write(batch.corrupted, batch.corrupted_mask)
    prompt = instruction.to(torch.long).view(1, -1).expand(batch.passage.shape[0], -1)
    return read_back(memory_model, memory, prompt, batch.passage)


def pooled_latent(memory_model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, d) unit-norm mean of the M latents of `ids`."""
    z = memory_model.encode(ids, mask)  # (B, M, d)
    return F.normalize(z.float().mean(dim=1), dim=-1)


def infonce(memory_model, batch: PairBatch, temperature: float) -> ObjectiveResult:
    """Symmetric InfoNCE between pooled latents of queries and passages, other rows as negatives."""
    q = pooled_latent(memory_model, batch.query, batch.query_mask)  # (B, d)
    a = pooled_latent(memory_model, batch.passage)  # (B, d)
    logits = q @ a.T / temperature  # (B, B)
    labels = torch.arange(len(q), device=q.device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return ObjectiveResult(loss, len(q), None)
