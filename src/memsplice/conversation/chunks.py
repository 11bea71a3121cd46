"""Chunks: consecutive live spans that one encoder call turns into M memory slots.

A conversation's memory is a sequence of chunks, oldest first. Each chunk holds at most `chunk_tokens` tokens
(never more than the encoder's `max_memory_tokens`); the newest chunk is *open* and grows with every turn, older
ones are *sealed*. Writing a turn re-encodes only the chunks whose spans changed (the open chunk, and any chunk that
lost spans to eviction), so the cost of a write does not grow with the length of the conversation.

Every chunk keeps its full encoder output (latents, gate and K/V of all M slots, batch 1) and a `quota`: how many of
its slots the composed memory uses (M at full resolution, fewer once the hierarchy has compressed it). Which slots
are kept is decided by `select_slots` from the gate (the memory's own estimate of a slot's worth) or from the
attention the slots received.

Guarantees: `encode_chunks` runs without autograd, in batches, and leaves every chunk it was given with a fresh
encoding of exactly its current spans; a chunk whose latents fell back (safety check) is marked not live.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..inject.memory_kv import MemoryKV
from ..memory.model import pad_rows
from .transcript import TranscriptStore


@dataclass
class Chunk:
    id: int
    span_ids: list[int] = field(default_factory=list)
    tokens: int = 0
    """Tokens of the chunk's spans (the encoder's input length)."""
    sealed: bool = False
    quota: int = 0
    """Slots of this chunk the composed memory uses (0 until first encoded)."""
    latents: torch.Tensor | None = None
    """(M, d) float32: the latents of the current spans (the encoder's output, refined when the memory refines)."""
    address_latents: torch.Tensor | None = None
    """(M, d) float32: the encoder's output before refinement, which the address head scores; None when the latents
    were not refined (then the head scores `latents`)."""
    gate: torch.Tensor | None = None
    """(M,) gate values of the slots."""
    kv: MemoryKV | None = None
    """All M slots as memory of batch 1, keys rotated at positions 0..M-1."""
    slot_attention: list[float] = field(default_factory=list)
    """Per slot, a moving average of the attention mass it received (empty until the probe runs)."""
    dirty: bool = True
    """True when the spans changed since the last encoding."""
    encoded_with: tuple | None = None
    """The memory weights' version when encoded (see `weights_version`)."""
    _live_of: tuple[MemoryKV, bool] | None = field(default=None, repr=False, compare=False)
    """`live` of the K/V it was read from: read once per K/V, not at every call (on a GPU each read is a sync, and a
    write asks every chunk)."""

    @property
    def live(self) -> bool:
        if self.kv is None:
            return False
        if self._live_of is None or self._live_of[0] is not self.kv:
            self._live_of = (self.kv, bool(self.kv.live.all()))
        return self._live_of[1]

    def set_kv(self, kv: MemoryKV, live: bool) -> None:
        """Store freshly written K/V with its liveness already read (e.g. one read for a whole batch)."""
        self.kv = kv
        self._live_of = (kv, live)


def weights_version(memory) -> tuple:
    """The version of the weights a chunk's latents depend on: changes whenever such a memory parameter is updated in
    place (optimizer step) or replaced (embedding untied). The address head's are left out: it only reads latents,
    so training it or swapping in another leaves every written chunk as it is (see `head_version`)."""
    head = {id(p) for p in _head_params(memory)}
    return tuple((id(p), p._version) for p in memory.parameters() if id(p) not in head)


def head_version(memory) -> tuple:
    """The version of the address head's parameters (() without a head): what the head's keys of a chunk depend on,
    besides the chunk's latents."""
    return tuple((id(p), p._version) for p in _head_params(memory))


def _head_params(memory) -> list:
    return list(memory.address.parameters()) if memory.address is not None else []


def _placements(turn_ids: list[list[int]], chunk_tokens: int):
    """(turn index, chunk index, piece) for every piece of every turn, as `ConversationMemory` places them: a turn
    longer than a chunk is cut into pieces of `chunk_tokens`, and the open chunk is sealed when the next piece would
    overflow it."""
    if chunk_tokens < 1:
        raise ValueError(f"pack_turns: chunk_tokens must be >= 1 (got {chunk_tokens})")
    chunk, filled = -1, chunk_tokens
    for turn, ids in enumerate(turn_ids):
        for start in range(0, len(ids), chunk_tokens):
            piece = list(ids[start : start + chunk_tokens])
            if chunk < 0 or filled + len(piece) > chunk_tokens:
                chunk, filled = chunk + 1, 0
            filled += len(piece)
            yield turn, chunk, piece


def pack_turns(turn_ids: list[list[int]], chunk_tokens: int) -> list[list[int]]:
    """The input ids of each chunk that `ConversationMemory.add_turn_ids` builds from these turns, oldest first (no
    eviction). Offline training uses it to write memory exactly as a conversation does."""
    chunks: list[list[int]] = []
    for _, chunk, piece in _placements(turn_ids, chunk_tokens):
        if chunk == len(chunks):
            chunks.append([])
        chunks[chunk].extend(piece)
    return chunks


def turn_chunks(turn_ids: list[list[int]], chunk_tokens: int) -> list[list[int]]:
    """For each turn, the indices of the chunks of `pack_turns(turn_ids, chunk_tokens)` that hold its pieces."""
    owners: list[list[int]] = [[] for _ in turn_ids]
    for turn, chunk, _ in _placements(turn_ids, chunk_tokens):
        if chunk not in owners[turn]:
            owners[turn].append(chunk)
    return owners


def chunk_input(chunk: Chunk, store: TranscriptStore) -> list[int]:
    ids: list[int] = []
    for span_id in chunk.span_ids:
        ids.extend(store[span_id].token_ids)
    return ids


@torch.no_grad()
def encode_chunks(
    memory,
    chunks: list[Chunk],
    store: TranscriptStore,
    *,
    batch_size: int = 16,
    scope: str | None = None,
    pad_id: int = 0,
) -> int:
    """Encode `chunks` (all must hold spans) with `memory`; returns the number of tokens read."""
    version = weights_version(memory)
    tokens = 0
    with memory.evaluating():  # dropout off: what is stored must not depend on the noise of one call
        for start in range(0, len(chunks), batch_size):
            tokens += _encode_group(memory, chunks[start : start + batch_size], store, scope, pad_id, version)
    return tokens


def _encode_group(
    memory, group: list[Chunk], store: TranscriptStore, scope, pad_id: int, version: tuple
) -> int:
    rows = [chunk_input(c, store) for c in group]
    assert all(rows), "an empty chunk cannot be encoded"
    ids, mask = pad_rows(rows, pad_id=pad_id, device=memory.reasoner.device)
    written = memory.write(ids, mask, scope=scope)
    live = written.kv.live.tolist()  # one host read for the group
    for row, chunk in enumerate(group):
        chunk.latents = written.latents[row].detach().float()
        chunk.address_latents = None if written.encoded is None else written.encoded[row].detach().float()
        chunk.gate = written.gate[row].detach().float()
        chunk.set_kv(written.kv.index_rows([row]), bool(live[row]))
        chunk.dirty = False
        chunk.encoded_with = version
        if not chunk.quota:
            chunk.quota = memory.config.num_slots
    return sum(len(r) for r in rows)


@torch.no_grad()
def reinject_chunk(memory, chunk: Chunk, scope: str | None = None) -> None:
    """Rebuild a chunk's gate and K/V from its stored latents (no encoder call): exact under the same weights."""
    assert chunk.latents is not None
    written = memory.inject(chunk.latents[None].to(memory.reasoner.device), scope=scope)
    chunk.gate = written.gate[0].detach().float()
    chunk.kv = written.kv
    chunk.dirty = False


def address_source(chunk: Chunk) -> torch.Tensor:
    """The latents the address head scores for `chunk`: the encoder's, before any refinement."""
    assert chunk.latents is not None
    return chunk.latents if chunk.address_latents is None else chunk.address_latents


def select_slots(chunk: Chunk, quota: int, by: str = "gate") -> list[int]:
    """Indices (ascending) of the `quota` slots of `chunk` to keep: highest gate, or highest received attention
    (falling back to the gate while no attention was recorded). Ties go to the lower index."""
    assert chunk.gate is not None
    m = chunk.gate.shape[0]
    if quota >= m:
        return list(range(m))
    score = chunk.gate.detach().float().cpu()
    if by == "attention" and chunk.slot_attention:
        # Attention decides; the gate only breaks ties between slots that received the same attention.
        score = torch.tensor(chunk.slot_attention, dtype=torch.float32) + 1e-6 * score
    order = sorted(range(m), key=lambda i: (-float(score[i]), i))
    return sorted(order[:quota])
