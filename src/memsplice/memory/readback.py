"""Read-back: the reasoner regenerates, from a memory alone, the text the memory was written from.

A memory checkpoint is trained to be read back: after [memory][reconstruction instruction] the frozen reasoner
regenerates the passage (the formation objective). `read_back` runs that read with greedy decoding, so a memory can
be turned back into text without the text itself: the source is not consulted, only the memory's K/V. How faithful
the text is depends on the memory; a memory refined at write time (`memsplice.memory.refine`) is read back verbatim
at 4x and 8x (`benchmarks/results/formation/fidelity-refine-*.json`).

Why it matters: a refined memory holds a fact (its read-back contains it) more often than the reasoner answers a
question about the fact with the memory in front (`scripts/formation/readout.py`). Reading the memory back as text
and asking the question over that text is a read path that uses what the memory holds.

Decoding runs through transformers' `generate()` (all rows in one batch), or, given a `DecoderPool`, on memsplice's
batch-1 engine (`memsplice.engine`, CUDA graphs on a GPU), one row after another: on a GPU several times faster for
the one or two chunks a question reads.

Guarantees:
- greedy and deterministic; no gradient, no parameter changes; the engine decodes what `generate()` decodes (the
  engine's own guarantee, for reasoners whose generation config is plain greedy);
- row i of the result has at most `max_tokens[i]` tokens and stops before the first end-of-sequence or
  end-of-turn token;
- rows whose memory is not live (safety fallback) read back as empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..inject.memory_kv import MemoryKV
from ..reasoner.reasoner import turn_marker_ids
from .refine import reconstruction_instruction


def stop_token_ids(tokenizer) -> set[int]:
    """Tokens that end a read-back: end of sequence, and the chat template's turn markers when it has them."""
    stops = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return stops | turn_marker_ids(tokenizer)


@torch.no_grad()
def read_back_ids(
    memory_model, memory: MemoryKV, max_tokens: int | Sequence[int], *, decoders=None
) -> list[list[int]]:
    """Token ids the reasoner regenerates from each row of `memory` (batch B) after the reconstruction instruction;
    `max_tokens`: one bound for all rows, or one per row (e.g. each passage's token count). `decoders`: a
    `memsplice.engine.DecoderPool` of the memory's reasoner to decode on (None: `generate()`)."""
    b = memory.batch_size
    limits = [int(max_tokens)] * b if isinstance(max_tokens, int) else [int(n) for n in max_tokens]
    if len(limits) != b:
        raise ValueError(f"read_back: {len(limits)} token limits for a memory of {b} rows")
    if any(n < 1 for n in limits):
        raise ValueError(f"read_back: every token limit must be >= 1 (got {limits})")
    tok = memory_model.reasoner.require_tokenizer()
    stops = stop_token_ids(tok)
    live = memory.live.tolist()
    if decoders is not None:
        return _on_engine(memory_model, memory, limits, live, stops, decoders)
    instruction = reconstruction_instruction(memory_model)[None].expand(b, -1)
    out = memory_model.generate(
        instruction,
        torch.ones_like(instruction),
        memory=memory,
        max_new_tokens=max(limits),
        do_sample=False,
    )
    rows = []
    for row, generated in enumerate(out[:, instruction.shape[1] :].tolist()):
        ids = []
        for t in generated[: limits[row]]:
            if t in stops:
                break
            ids.append(t)
        rows.append(ids if live[row] else [])
    return rows


def _on_engine(memory_model, memory: MemoryKV, limits, live, stops, decoders) -> list[list[int]]:
    if decoders.reasoner is not memory_model.reasoner:
        raise ValueError("read_back: the decoder pool belongs to another reasoner")
    if max(limits) > decoders.max_new_tokens:
        raise ValueError(
            f"read_back: {max(limits)} tokens to read back, but the decoder pool decodes at most "
            f"{decoders.max_new_tokens}"
        )
    instruction = reconstruction_instruction(memory_model).tolist()
    rows = []
    for row, limit in enumerate(limits):
        if not live[row]:
            rows.append([])
            continue
        kv = memory.index_rows([row])
        decoder = decoders.decoder_for(kv.num_slots + len(instruction) + limit)
        if decoder is None:
            raise ValueError(f"read_back: {limit} tokens after the memory do not fit the reasoner's window")
        rows.append(decoder.generate(instruction, kv, max_new_tokens=limit, stop_ids=tuple(stops)).tokens)
    return rows


def require_read_back(memory_model, who: str) -> None:
    """Refuse, naming `who`, a memory that records no reconstruction instruction: nothing can be read back from it."""
    if not memory_model.config.reconstruction_instruction:
        raise ValueError(
            f"{who}: this memory records no reconstruction instruction, so nothing can be read back from it (use a "
            "checkpoint trained to be read back, such as the shipped one)"
        )


def readback_decoders(memory_model, **decoder_kwargs):
    """A `memsplice.engine.DecoderPool` for `read_back_ids(..., decoders=)`: the memory's reasoner, reading back at
    most as many tokens as the memory reads in one call (`max_memory_tokens`)."""
    from ..engine import DecoderPool

    return DecoderPool(
        memory_model.reasoner,
        max_new_tokens=memory_model.config.max_memory_tokens,
        min_len=64,
        **decoder_kwargs,
    )


def read_back(memory_model, memory: MemoryKV, max_tokens: int | Sequence[int], *, decoders=None) -> list[str]:
    """`read_back_ids`, decoded."""
    tok = memory_model.reasoner.require_tokenizer()
    return [tok.decode(ids) for ids in read_back_ids(memory_model, memory, max_tokens, decoders=decoders)]


RECALL_HEADER = "What you remember from earlier in this conversation:"
"""The line in front of read-back text in a chat's system message (`with_recalled`, placement "system")."""

RECALL_FRAME = "Here is the conversation so far:\n\n{recalled}\n\n{message}"
"""A chat's last user message with read-back text in front of it (`with_recalled`, placement "message"): the eval
reader's framing of history."""

RECALL_PLACEMENTS = ("message", "system")
"""Where `with_recalled` gives read-back text to the reasoner. "message": in the chat's last user message, in
front of what the user wrote (`RECALL_FRAME`); "system": in its system message, after `RECALL_HEADER`. Reader-only,
with a chat's own turns in front (`scripts/online/reader_context.py --chat`), the system message is read far worse
(`online/reader-chat-layouts-cpu.json`)."""


def with_recalled(messages: list[dict], recalled: str | None, placement: str = "message") -> list[dict]:
    """Chat `messages` with read-back text given to the reasoner where `placement` says (`RECALL_PLACEMENTS`). In
    the system message it is appended to the first one, or is a system message of its own in front when there is
    none. A copy; `messages` is not changed, and nothing is added when `recalled` is empty."""
    if placement not in RECALL_PLACEMENTS:
        raise ValueError(
            f"read-back placement must be one of {', '.join(RECALL_PLACEMENTS)} (got {placement!r})"
        )
    if not recalled:
        return list(messages)
    if placement == "message":
        last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)
        if last is None:
            raise ValueError(
                "read-back placement 'message' needs a user message to put the read-back text in"
            )
        framed = RECALL_FRAME.format(recalled=recalled, message=messages[last]["content"])
        return [*messages[:last], {**messages[last], "content": framed}, *messages[last + 1 :]]
    note = f"{RECALL_HEADER}\n{recalled}"
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]
