"""Read-back: the reasoner regenerates, from a memory alone, the text the memory was written from.

A memory checkpoint is trained to be read back: after [memory][reconstruction instruction] the frozen reasoner
regenerates the passage (the formation objective). `read_back` runs that read with greedy decoding, so a memory can
be turned back into text without the text itself: the source is not consulted, only the memory's K/V. How faithful
the text is depends on the memory; a memory refined at write time (`memsplice.memory.refine`) is read back verbatim
at 4x and 8x (`benchmarks/results/formation/fidelity-refine-*.json`).

Why it matters: a refined memory holds a fact (its read-back contains it) more often than the reasoner answers a
question about the fact with the memory in front (`scripts/formation/readout.py`). Reading the memory back as text
and asking the question over that text is a read path that uses what the memory holds.

Guarantees:
- greedy and deterministic; no gradient, no parameter changes;
- row i of the result has at most `max_tokens[i]` tokens and stops before the first end-of-sequence or
  end-of-turn token;
- rows whose memory is not live (safety fallback) read back as empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..inject.memory_kv import MemoryKV
from .refine import reconstruction_instruction


def stop_token_ids(tokenizer) -> set[int]:
    """Tokens that end a read-back: end of sequence, and the chat template's end of turn when it has one."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for name in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        i = tokenizer.convert_tokens_to_ids(name)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i >= 0:
            stops.add(i)
    return stops


@torch.no_grad()
def read_back_ids(memory_model, memory: MemoryKV, max_tokens: int | Sequence[int]) -> list[list[int]]:
    """Token ids the reasoner regenerates from each row of `memory` (batch B) after the reconstruction instruction;
    `max_tokens`: one bound for all rows, or one per row (e.g. each passage's token count)."""
    b = memory.batch_size
    limits = [int(max_tokens)] * b if isinstance(max_tokens, int) else [int(n) for n in max_tokens]
    if len(limits) != b:
        raise ValueError(f"read_back: {len(limits)} token limits for a memory of {b} rows")
    if any(n < 1 for n in limits):
        raise ValueError(f"read_back: every token limit must be >= 1 (got {limits})")
    tok = memory_model.reasoner.require_tokenizer()
    instruction = reconstruction_instruction(memory_model)[None].expand(b, -1)
    out = memory_model.generate(
        instruction,
        torch.ones_like(instruction),
        memory=memory,
        max_new_tokens=max(limits),
        do_sample=False,
    )
    stops = stop_token_ids(tok)
    live = memory.live.tolist()
    rows = []
    for row, generated in enumerate(out[:, instruction.shape[1] :].tolist()):
        ids = []
        for t in generated[: limits[row]]:
            if t in stops:
                break
            ids.append(t)
        rows.append(ids if live[row] else [])
    return rows


def read_back(memory_model, memory: MemoryKV, max_tokens: int | Sequence[int]) -> list[str]:
    """`read_back_ids`, decoded."""
    tok = memory_model.reasoner.require_tokenizer()
    return [tok.decode(ids) for ids in read_back_ids(memory_model, memory, max_tokens)]
