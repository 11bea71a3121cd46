"""The formation objectives, one function each.

Every objective returns an `ObjectiveResult` with a differentiable mean loss plus token counts for metrics:
- `reconstruction`: the reasoner reads [memory of P][instruction] and regenerates P (teacher-forced cross-entropy).
- `continuation`: the reasoner reads [memory of P] and predicts the text that follows P.
- `denoising`: the encoder reads P with spans masked or dropped; the reasoner regenerates the original P.
- `infonce`: latents of a query span and of the passage it comes from are pulled together against in-batch negatives.
- `reconstruction_with_target`: reconstruction, plus the encoder's latents pulled towards where a few steps of
  write-time refinement (`memsplice.memory.refine`) take them: the refined latents are read back better than the
  encoder's own (at 8x two steps took the reasoner-state memory from 94.0% to 98.4% on 16 passages), so they are a
  target the encoder might learn to jump to (semi-amortised training; measured without gain, docs/formation.md).
- `answer`: the reasoner reads [memory][question prompt] and produces the answer (teacher-forced cross-entropy on the
  answer tokens only): what question answering from memory asks of it. `answer_groups` computes several such
  objectives (any [memory][prompt] -> target read) in one reasoner pass.

The reasoner's hidden states come from `hidden_states_with_memory` (through the active `FastReader` for the unpadded
reads of formation, see `memsplice.train.fast_reader`); logits are formed only at target positions and
in chunks by `lm_head_cross_entropy` (`memsplice.reasoner.head_loss`), which never holds (tokens, vocab) logits for
more than one chunk at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..inject.memory_kv import MemoryKV
from ..inject.splice import hidden_states_with_memory
from ..memory.model import pad_rows
from ..memory.refine import adam_on_latents
from ..reasoner.head_loss import LOGIT_CHUNK, chunk_cross_entropy
from ..reasoner.head_loss import lm_head_cross_entropy as head_cross_entropy
from .data import DenoiseBatch, PairBatch
from .fast_reader import active_reader, read_hidden_states


def lm_head_cross_entropy(
    reasoner, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = LOGIT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """`memsplice.reasoner.head_loss.lm_head_cross_entropy`, with the active `FastReader`'s compiled chunk loss."""
    reader = active_reader(reasoner)
    return head_cross_entropy(
        reasoner,
        hidden,
        targets,
        chunk,
        chunk_fn=reader.chunk_cross_entropy if reader is not None else chunk_cross_entropy,
    )


@dataclass
class ObjectiveResult:
    loss: torch.Tensor
    """Mean loss (differentiable)."""
    tokens: int
    """Target tokens (or pairs, for InfoNCE) the mean is over."""
    correct: torch.Tensor | None = None
    """Argmax hits among the target tokens (no gradient); None for InfoNCE."""


def _instruction(ids: torch.Tensor, rows: int) -> torch.Tensor:
    return ids.to(torch.long).view(1, -1).expand(rows, -1)


def read_back(memory_model, memory, prompt: torch.Tensor, target: torch.Tensor) -> ObjectiveResult:
    """Teacher-forced loss of `target` (B, T) after [memory][prompt (B, I)], at the T target positions only."""
    b, t = target.shape
    text = torch.cat([prompt, target], dim=1)  # (B, I+T)
    hidden = read_hidden_states(memory_model.reasoner, text, memory.kv)  # (B, I+T, d)
    i = prompt.shape[1]
    loss_sum, correct = lm_head_cross_entropy(memory_model.reasoner, hidden[:, i - 1 : i + t - 1], target)
    return ObjectiveResult(loss_sum / (b * t), b * t, correct)


def reconstruction(memory_model, passage: torch.Tensor, instruction: torch.Tensor) -> ObjectiveResult:
    """passage (B, T) -> memory -> the reasoner regenerates it after `instruction` (I,)."""
    memory = memory_model.write(passage)
    return read_back(memory_model, memory, _instruction(instruction, passage.shape[0]), passage)


def reconstruction_with_target(
    memory_model, passage: torch.Tensor, instruction: torch.Tensor, steps: int, lr: float
) -> tuple[ObjectiveResult, ObjectiveResult]:
    """(reconstruction of `passage` (B, T) from the encoder's latents, their distance to the refined latents).

    The refined latents are the encoder's after `steps` Adam steps (lr `lr`) on the same read (`adam_on_latents`,
    through the active reader; no gradient reaches the encoder or the memory's parameters from them). The distance
    is the squared error summed over the latent dims and averaged over slots, over the refined latents' mean
    squared norm (so 1.0 is as far as the target is long), and its gradient reaches the encoder."""
    b = passage.shape[0]
    z = memory_model.encode(passage)  # (B, M, d)
    prompt = _instruction(instruction, b)
    result = read_back(memory_model, memory_model.inject(z), prompt, passage)

    def loss_of(latents: torch.Tensor) -> torch.Tensor:  # sum over rows of each row's mean (rows independent)
        return read_back(memory_model, memory_model.inject(latents), prompt, passage).loss * b

    target, _ = adam_on_latents(z, loss_of, steps=steps, lr=lr, max_norm=memory_model.config.max_latent_norm)
    zf = z.float()
    distance = (zf - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean().clamp(min=1e-12)
    return result, ObjectiveResult(distance, b * z.shape[1], None)


def continuation(memory_model, context: torch.Tensor, following: torch.Tensor) -> ObjectiveResult:
    """context (B, T) -> memory; the reasoner predicts following[1:] (B, Tf-1) from following[:-1]."""
    memory = memory_model.write(context)
    return read_back(memory_model, memory, following[:, :1], following[:, 1:])


def denoising(memory_model, batch: DenoiseBatch, instruction: torch.Tensor) -> ObjectiveResult:
    """The encoder reads the corrupted passage; the reasoner regenerates the original."""
    memory = memory_model.write(batch.corrupted, batch.corrupted_mask)
    return read_back(memory_model, memory, _instruction(instruction, batch.passage.shape[0]), batch.passage)


def pooled_latent(memory_model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, d) unit-norm mean of the M latents of `ids`."""
    z = memory_model.encode(ids, mask)  # (B, M, d)
    return F.normalize(z.float().mean(dim=1), dim=-1)


def infonce(memory_model, batch: PairBatch, temperature: float) -> ObjectiveResult:
    """Symmetric InfoNCE: row i's query and row i's passage are positives, other rows negatives."""
    q = pooled_latent(memory_model, batch.query, batch.query_mask)  # (B, d)
    a = pooled_latent(memory_model, batch.passage)  # (B, d)
    logits = q @ a.T / temperature  # (B, B)
    labels = torch.arange(len(q), device=q.device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return ObjectiveResult(loss, len(q), None)


def answer(
    memory_model, memory: MemoryKV | None, prompts: list[list[int]], answers: list[list[int]]
) -> ObjectiveResult:
    """Teacher-forced loss of each row's answer after [memory][prompt], at the answer tokens only.

    Rows (prompt + answer) are left-padded to one length; `memory` has one row per prompt, or one row that all
    prompts read (one conversation asked several questions), or is None (the reasoner alone)."""
    return answer_groups(memory_model, memory, prompts, answers, [len(prompts)])[0]


def answer_groups(
    memory_model,
    memory: MemoryKV | None,
    prompts: list[list[int]],
    answers: list[list[int]],
    sizes: list[int],
) -> list[ObjectiveResult]:
    """`answer` for consecutive groups of rows (`sizes` rows each) in ONE reasoner pass: one result per group, each
    the mean over that group's own answer tokens. Objectives of one update that all read [memory][prompt] -> target
    (next-token, denoising, answering) share the pass this way instead of running the reasoner once each."""
    if len(prompts) != len(answers) or not prompts or not all(answers):
        raise ValueError("answer: needs as many non-empty answers as prompts, and at least one")
    if sum(sizes) != len(prompts) or any(n < 1 for n in sizes):
        raise ValueError(
            f"answer_groups: group sizes {sizes} must be positive and add up to {len(prompts)} rows"
        )
    reasoner = memory_model.reasoner
    if memory is not None and memory.batch_size == 1 and len(prompts) > 1:
        memory = memory.index_rows([0] * len(prompts))
    rows = [p + a for p, a in zip(prompts, answers, strict=True)]
    ids, mask = pad_rows(rows, pad_id=0, device=reasoner.device, left=True)
    if len({len(r) for r in rows}) == 1:  # unpadded: the active FastReader may take it
        hidden = read_hidden_states(reasoner, ids, memory)  # (B, T, d)
    else:
        hidden = hidden_states_with_memory(reasoner, ids, mask, memory)
    t = ids.shape[1]
    out, first = [], 0
    for n in sizes:
        group = range(first, first + n)
        row = torch.cat([torch.full((len(answers[r]),), r, dtype=torch.long) for r in group])
        pos = torch.cat([torch.arange(t - len(answers[r]) - 1, t - 1) for r in group])
        row, pos = row.to(ids.device), pos.to(ids.device)
        loss_sum, correct = lm_head_cross_entropy(reasoner, hidden[row, pos], ids[row, pos + 1])
        out.append(ObjectiveResult(loss_sum / int(row.numel()), int(row.numel()), correct))
        first += n
    return out
