"""`ConversationMemory`: the memory of one whole, growing conversation, updated incrementally after each turn.

    conv = ConversationMemory(memory, ConversationConfig(slot_budget=256))
    stats = conv.add_turn("user", "I moved to Lisbon last spring.")    # WriteStats(seconds, tokens, slots, ...)
    kv = conv.memory_kv()                                               # MemoryKV (batch 1) or None
    out = generate_with_memory(memory.reasoner, ids, mask, kv, max_new_tokens=32)
    conv.probe(ids_with_answer, query_mask=answer_positions)            # optional: attention -> span usage
    kv = conv.address("Where does Ada live?", top_chunks=2)             # only the chunks the question picks
    kv = conv.read("Where does Ada live?")                              # address() or memory_kv(), as configured
    texts = conv.read_back("Where does Ada live?", top_chunks=1)        # the picked chunks regenerated as text
    conv.add_turns([("user", "..."), ("assistant", "...")])             # several turns, one write
    state = conv.to_dict(); conv = ConversationMemory.from_dict(state, memory)

How it works: turns go into a `TranscriptStore` as spans; live spans are packed, in order, into chunks of at most
`chunk_tokens` tokens; each chunk is encoded into M slots; a `Hierarchy` compresses older chunks (fewer slots each)
to stay within `slot_budget`; `memory_kv()` composes the kept slots of all chunks into one memory.

Guarantees:
- A write re-encodes only the open chunk and chunks that lost spans to eviction (never the whole history), except
  when the memory's weights changed since the chunks were encoded (online learning): then every chunk is
  re-encoded once, with the new weights, and `WriteStats.refreshed` says so.
- After every write: live tokens <= `max_live_tokens`, slots in use <= `slot_budget` (when set), every live span sits in
  exactly one chunk, and evicted spans are archived (with a log record), never deleted.
- `to_dict()` is plain JSON; `from_dict(d, memory)` rebuilds the same memory: from the stored latents when the
  memory weights are the ones that wrote them (no encoder call), else by re-encoding the live spans.
- All methods are safe to call from several threads (one lock per conversation).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from ..inject.memory_kv import MemoryKV
from .chunks import Chunk, address_source, encode_chunks, head_version, reinject_chunk, weights_version
from .hierarchy import Hierarchy, compose
from .probe import MemoryAttention, memory_attention
from .transcript import SLOT_BUDGET, TranscriptStore

logger = logging.getLogger(__name__)

FORMAT = "memsplice.conversation/1"
SLOT_SELECTION = ("gate", "attention")


@dataclass
class ConversationConfig:
    chunk_tokens: int | None = None
    """Tokens per chunk, i.e. per encoder call (default: the memory's `chunk_tokens`, the size it was trained to be
    read at, else its `max_memory_tokens`, which is also the maximum)."""
    slot_budget: int | None = 256
    """Most memory slots in use (the KV the reasoner reads); older chunks are compressed to stay within it. None: no
    budget, nothing is compressed or evicted for slots (only `max_live_tokens` bounds the memory). For a conversation
    read by the address head (`select_chunks`, `read_back`, `recall`), which never composes the whole memory: a
    budget sized for composing it evicts chunks the head could pick (at 16k tokens of history, 256 slots keep
    the last quarter). `read()` without a question then reads nothing, and `memory_kv()` composes every chunk."""
    max_live_tokens: int = 65536
    """Most transcript tokens memory is built from; least-recently-used spans beyond it go to the archive."""
    min_slots_per_chunk: int = 1
    """Fewest slots a compressed chunk keeps; when even that does not fit, least-recently-used chunks are evicted."""
    keep_full_chunks: int = 2
    """Newest sealed chunks never compressed (the open chunk never is either)."""
    slot_selection: str = "gate"
    """Which slots a compressed chunk keeps: "gate" (highest gate value) or "attention" (most attention received,
    from the probe; the gate until the probe has run)."""
    turn_template: str = "{role}: {text}\n"
    """How a turn is written into the encoder's input."""
    track_attention: bool = False
    """Let `probe()` measure the reasoner's attention to memory and update span usage (costs one forward pass)."""
    probe_layers: list[int] | None = None
    """Reasoner layers the probe reads (default: the last)."""
    use_threshold: float = 0.5
    """A chunk's spans count as used by a read when the chunk got at least this fraction of the attention that a
    uniform spread over all slots would give it."""
    protect_fraction: float = 0.1
    """Fraction of live spans protected from eviction by salience (0: off). Salience needs the probe."""
    salience_decay: float = 0.9
    """Moving-average weight of the old salience at each probed read."""
    attention_decay: float = 0.8
    """Moving-average weight of the old per-slot attention at each probed read."""
    select_chunks: int | None = None
    """Read policy of `read(question)`: with an address head, splice only the `select_chunks` chunk memories the
    question picks (`address`); None, or a memory without an address head: every chunk (`memory_kv`)."""
    encode_batch: int = 16
    """Chunks encoded per encoder call when several need it (refresh, restore)."""
    readback_context_role: str | None = "system"
    """`read_back` puts in front of a chunk's text the latest turn of this role written before the chunk (a session
    header with its date, as the eval writes them), itself read back from the chunk memory that holds it, so that a
    chunk read on its own keeps its session's context. Only a whole turn of at most `readback_context_tokens`
    tokens that is still live qualifies; a chunk that holds a turn of this role itself gets none. None: each chunk's
    text alone."""
    readback_context_tokens: int = 32
    """Longest turn (in tokens, as written) that `read_back` puts in front of a chunk as its context."""
    scope: str | None = None
    """Name of the memory scope (user, agent), attached to fallback events."""

    def __post_init__(self):
        def need(cond: bool, name: str, msg: str):
            if not cond:
                raise ValueError(f"ConversationConfig.{name}: {msg} (got {getattr(self, name)!r})")

        def positive_int(name):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive integer")

        if self.chunk_tokens is not None:
            positive_int("chunk_tokens")
        if self.slot_budget is not None:
            positive_int("slot_budget")
        for name in (
            "max_live_tokens",
            "min_slots_per_chunk",
            "encode_batch",
            "readback_context_tokens",
        ):
            positive_int(name)
        if self.select_chunks is not None:
            positive_int("select_chunks")
        role = self.readback_context_role
        need(
            role is None or (isinstance(role, str) and role != ""),
            "readback_context_role",
            "must be a role or None",
        )
        need(
            isinstance(self.keep_full_chunks, int) and self.keep_full_chunks >= 0,
            "keep_full_chunks",
            "must be a non-negative integer",
        )
        need(self.slot_selection in SLOT_SELECTION, "slot_selection", f"must be one of {SLOT_SELECTION}")
        need("{text}" in self.turn_template, "turn_template", "must contain {text}")
        try:
            self.turn_template.format(role="user", text="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"ConversationConfig.turn_template: may only use {{role}} and {{text}} ({e})"
            ) from None
        need(self.use_threshold >= 0.0, "use_threshold", "must be non-negative")
        need(0.0 <= self.protect_fraction < 1.0, "protect_fraction", "must be in [0, 1)")
        for name in ("salience_decay", "attention_decay"):
            need(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ConversationConfig:
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"unknown ConversationConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


@dataclass
class WriteStats:
    """What one `add_turn` cost and changed."""

    seconds: float
    """Wall time of the write (tokenize, evict, encode, compress)."""
    tokens: int
    """Tokens of the turn (after the template)."""
    slots: int
    """Memory slots in use after the write."""
    encoded_tokens: int = 0
    """Tokens the encoder read for this write (the open chunk, plus chunks rebuilt after eviction or a refresh)."""
    encoder_calls: int = 0
    spans: int = 0
    """Spans the turn became (a turn longer than a chunk is split)."""
    evicted: int = 0
    """Spans moved to the archive by this write."""
    merges: int = 0
    """Hierarchy merges done by this write."""
    refreshed: bool = False
    """True when every chunk was re-encoded because the memory's weights had changed."""
    fallback: bool = False
    """True when some chunk's latents failed the safety check (that chunk is left out of memory)."""


def _tensor_to_b64(t: torch.Tensor) -> dict:
    arr = t.detach().float().cpu().contiguous().numpy().astype("<f4")
    return {"shape": list(arr.shape), "dtype": "float32", "data": base64.b64encode(arr.tobytes()).decode()}


def _tensor_from_b64(d: dict) -> torch.Tensor:
    arr = np.frombuffer(base64.b64decode(d["data"]), dtype="<f4").reshape(d["shape"])
    return torch.from_numpy(arr.copy())


def _mass_per_chunk(
    sources: list[tuple[int, int]], slot_mass: list[float]
) -> tuple[dict[int, float], dict[int, int]]:
    """Attention mass per chunk id (summed over its slots) and how many slots each chunk has, from per-slot mass."""
    mass: dict[int, float] = {}
    slots: dict[int, int] = {}
    for (chunk_id, _), w in zip(sources, slot_mass, strict=False):
        mass[chunk_id] = mass.get(chunk_id, 0.0) + w
        slots[chunk_id] = slots.get(chunk_id, 0) + 1
    return mass, slots


def picks_by_address(memory, *, read_back: bool, select_chunks: int | None) -> bool:
    """Whether a chat over `memory` picks chunk memories by its address head: it has one, and the chat reads memory
    back (`recall`) or reads only `select_chunks` chunks (`read`). Such a chat never reads the whole memory, so its
    conversation needs no slot budget (`ConversationConfig.slot_budget` None)."""
    return memory.address is not None and (read_back or select_chunks is not None)


def weights_signature(memory) -> str:
    """sha256 of the memory's weights as stored, but the address head's: identifies which weights wrote a set of
    latents (the head only reads them, so a saved conversation keeps its latents when only the head changed)."""
    h = hashlib.sha256()
    for name, tensor in sorted(memory.memory_state_dict().items()):
        if name.startswith("address."):
            continue
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(
            tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        )
    return h.hexdigest()


class ConversationMemory:
    def __init__(self, memory, config: ConversationConfig | None = None):
        self.memory = memory
        self.config = config or ConversationConfig()
        mcfg = memory.config
        cfg = self.config
        self.chunk_tokens = cfg.chunk_tokens or mcfg.chunk_tokens or mcfg.max_memory_tokens
        if self.chunk_tokens > mcfg.max_memory_tokens:
            raise ValueError(
                f"ConversationConfig.chunk_tokens: {self.chunk_tokens} is more than the memory reads in "
                f"one call (max_memory_tokens={mcfg.max_memory_tokens})"
            )
        need_slots = (cfg.keep_full_chunks + 2) * mcfg.num_slots
        if cfg.slot_budget is not None and cfg.slot_budget < need_slots:
            raise ValueError(
                f"ConversationConfig.slot_budget: must hold the open chunk, the {cfg.keep_full_chunks} "
                f"newest sealed chunks (keep_full_chunks) and one more, at {mcfg.num_slots} slots each: "
                f"at least {need_slots}, got {cfg.slot_budget}"
            )
        if cfg.max_live_tokens < self.chunk_tokens:
            raise ValueError(
                f"ConversationConfig.max_live_tokens: must be at least one chunk ({self.chunk_tokens} "
                f"tokens), got {cfg.max_live_tokens}"
            )
        if cfg.min_slots_per_chunk > mcfg.num_slots:
            raise ValueError(
                f"ConversationConfig.min_slots_per_chunk: at most the memory's {mcfg.num_slots} slots"
            )
        self.store = TranscriptStore(
            max_live_tokens=cfg.max_live_tokens,
            protect_fraction=cfg.protect_fraction,
            salience_decay=cfg.salience_decay,
        )
        self.hierarchy = Hierarchy(
            num_slots=mcfg.num_slots, min_slots=cfg.min_slots_per_chunk, keep_full=cfg.keep_full_chunks
        )
        self.chunks: dict[int, Chunk] = {}
        self.open_chunk: Chunk | None = None
        self.turns = 0
        self._next_chunk = 0
        self._composed: tuple[MemoryKV | None, list[tuple[int, int]]] | None = None
        self._lock = threading.RLock()
        self._signature: tuple[tuple, str] | None = None
        self._keys_cache: tuple[tuple, list[torch.Tensor], torch.Tensor] | None = None
        self.write_seconds: list[float] = []

    # -- text ------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.memory.reasoner.require_tokenizer()

    def _pad_id(self) -> int:
        tok = self.memory.reasoner.tokenizer
        if tok is None:
            return 0
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    # -- writing ---------------------------------------------------------------------------------------------
    def add_turn(self, role: str, text: str) -> WriteStats:
        """Append one turn to the transcript and update memory incrementally."""
        return self.add_turns([(role, text)])

    def add_turns(self, turns: Sequence[tuple[str, str]]) -> WriteStats:
        """Append (role, text) turns in order and update memory once for all of them.

        The turns land in the same chunks as with one `add_turn` per turn, and those chunks are encoded together,
        in batches of `encode_batch`, instead of the open chunk once per turn; the hierarchy fits the slot budget
        once, at the end, so which older chunks it merges can differ from turn-by-turn writes. For a backlog (a
        session that arrives at once, an imported conversation) and for write-time refinement, whose steps cost
        about the same for a batch of chunks as for one. Stats are those of the one write."""
        rendered = []
        for role, text in turns:
            if not isinstance(role, str) or not role.strip():
                raise ValueError(f"add_turn: role must be a non-empty string, got {role!r}")
            if not isinstance(text, str):
                raise ValueError(f"add_turn: text must be a string, got {type(text).__name__}")
            line = self.config.turn_template.format(role=role, text=text)
            ids = list(self.tokenizer(line, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ValueError(
                    "add_turn: the turn has no tokens once rendered; check ConversationConfig.turn_template"
                )
            rendered.append((role, line, ids))
        return self._write(rendered)

    def add_turn_ids(self, role: str, text: str, token_ids: list[int]) -> WriteStats:
        """`add_turn` for a turn already rendered and tokenized: `text` is what `token_ids` encode (kept in the
        archive, and re-tokenized if the conversation is later restored onto another reasoner)."""
        if not token_ids:
            raise ValueError("add_turn_ids: token_ids is empty")
        return self._write([(role, text, list(token_ids))])

    def _write(self, turns: list[tuple[str, str, list[int]]]) -> WriteStats:
        """Place rendered, tokenized turns (role, text, ids) as spans, evict over the cap, encode what changed and fit
        the slot budget: one write."""
        if not turns:
            raise ValueError("add_turns: no turns to write")
        t0 = time.perf_counter()
        with self._lock, torch.no_grad():
            stats = WriteStats(seconds=0.0, tokens=sum(len(ids) for _, _, ids in turns), slots=0)
            stats.refreshed, calls, tokens = self._refresh_if_stale()
            evicted = []
            for role, text, token_ids in turns:
                self.store.begin_step()
                turn = self.turns
                self.turns += 1
                pieces = [
                    token_ids[i : i + self.chunk_tokens] for i in range(0, len(token_ids), self.chunk_tokens)
                ]
                for piece in pieces:
                    piece_text = text if len(pieces) == 1 else self._decode(piece)
                    span = self.store.add(role, piece_text, piece, turn)
                    self._append_span(span.id, span.num_tokens)
                stats.spans += len(pieces)
                for record in self.store.evict_over_cap():
                    self._remove_span(record.span_id)
                    evicted.append(record)
            dirty = [c for c in self._all_chunks() if c.dirty]
            if dirty:
                tokens += encode_chunks(
                    self.memory,
                    dirty,
                    self.store,
                    batch_size=self.config.encode_batch,
                    scope=self.config.scope,
                    pad_id=self._pad_id(),
                )
                calls += -(-len(dirty) // self.config.encode_batch)
            stats.merges, dropped = self._fit_budget()
            stats.evicted = len(evicted) + dropped
            stats.encoded_tokens, stats.encoder_calls = tokens, calls
            stats.fallback = any(not c.live for c in self._all_chunks())
            self._composed = None
            stats.slots = self.num_slots
            stats.seconds = time.perf_counter() - t0
            self.write_seconds.append(stats.seconds)
        return stats

    def _decode(self, ids: list[int]) -> str:
        tok = self.memory.reasoner.tokenizer
        return tok.decode(ids) if tok is not None else ""

    def _all_chunks(self) -> list[Chunk]:
        """Chunks oldest first, the open chunk last."""
        order = [self.chunks[c] for c in self.hierarchy.chunk_order()]
        return order + ([self.open_chunk] if self.open_chunk is not None else [])

    def _new_chunk(self) -> Chunk:
        chunk = Chunk(id=self._next_chunk)
        self._next_chunk += 1
        self.chunks[chunk.id] = chunk
        return chunk

    def _append_span(self, span_id: int, n_tokens: int) -> None:
        chunk = self.open_chunk
        if chunk is not None and chunk.tokens + n_tokens > self.chunk_tokens:
            self._seal_open()
            chunk = None
        if chunk is None:
            chunk = self.open_chunk = self._new_chunk()
        chunk.span_ids.append(span_id)
        chunk.tokens += n_tokens
        chunk.dirty = True

    def _seal_open(self) -> None:
        chunk = self.open_chunk
        if chunk is None:
            return
        chunk.sealed = True
        self.hierarchy.add_sealed(chunk.id)
        self.open_chunk = None

    def _chunk_of(self, span_id: int) -> Chunk | None:
        for chunk in self._all_chunks():
            if span_id in chunk.span_ids:
                return chunk
        return None

    def _remove_span(self, span_id: int) -> None:
        chunk = self._chunk_of(span_id)
        assert chunk is not None, f"live span {span_id} is in no chunk"
        chunk.span_ids.remove(span_id)
        chunk.tokens -= self.store[span_id].num_tokens
        chunk.dirty = True
        if not chunk.span_ids:
            self._drop_chunk(chunk)

    def _drop_chunk(self, chunk: Chunk) -> None:
        if chunk is self.open_chunk:
            self.open_chunk = None
        else:
            self.hierarchy.remove_chunk(chunk.id)
        del self.chunks[chunk.id]

    def _fit_budget(self) -> tuple[int, int]:
        """Compress, then evict whole least-recently-used chunks, until the slots fit the budget (none: nothing)."""
        budget = self.config.slot_budget
        if budget is None:
            return 0, 0
        open_slots = self.open_chunk.quota if self.open_chunk is not None else 0
        merges = self.hierarchy.compress(self.chunks, budget, extra=open_slots)
        dropped = 0
        protected = self.store.protected_ids()
        while self._quota_total() > budget:
            sealed = self.hierarchy.chunk_order()[: max(0, len(self.hierarchy.chunk_order()) - 1)]
            if not sealed:
                break
            victim = min(sealed, key=lambda c: self._chunk_eviction_key(self.chunks[c], protected))
            chunk = self.chunks[victim]
            for span_id in list(chunk.span_ids):
                self.store.archive(span_id, SLOT_BUDGET, protected=span_id in protected)
                dropped += 1
            self._drop_chunk(chunk)
            merges += self.hierarchy.compress(self.chunks, budget, extra=open_slots)
        assert self._quota_total() <= budget or len(self.hierarchy.nodes) <= 1, "slot budget not met"
        return merges, dropped

    def _chunk_eviction_key(self, chunk: Chunk, protected: set[int]) -> tuple:
        spans = [self.store[s] for s in chunk.span_ids]
        return (any(s.id in protected for s in spans), max(s.last_used for s in spans), chunk.id)

    def _quota_total(self) -> int:
        return sum(c.quota for c in self._all_chunks())

    # -- online learning -------------------------------------------------------------------------------------
    def _refresh_if_stale(self) -> tuple[bool, int, int]:
        chunks = [c for c in self._all_chunks() if c.span_ids]
        version = weights_version(self.memory)
        stale = [c for c in chunks if c.encoded_with != version and not c.dirty]
        if not stale:
            return False, 0, 0
        tokens = encode_chunks(
            self.memory,
            stale,
            self.store,
            batch_size=self.config.encode_batch,
            scope=self.config.scope,
            pad_id=self._pad_id(),
        )
        self._composed = None
        return True, -(-len(stale) // self.config.encode_batch), tokens

    def refresh(self) -> int:
        """Re-encode every chunk if the memory's weights changed since it was encoded; returns tokens read."""
        with self._lock, torch.no_grad():
            return self._refresh_if_stale()[2]

    # -- reading ---------------------------------------------------------------------------------------------
    def memory_kv(self) -> MemoryKV | None:
        """The whole conversation's memory (batch 1), or None when nothing live has been written."""
        with self._lock:
            self._refresh_if_stale()
            if self._composed is None:
                self._composed = compose(self._all_chunks(), self.memory.reasoner, self.config.slot_selection)
            return self._composed[0]

    def slot_sources(self) -> list[tuple[int, int]]:
        """For each slot of `memory_kv()`: (chunk id, slot index within that chunk)."""
        with self._lock:
            self.memory_kv()
            return list(self._composed[1])

    def slot_spans(self) -> list[list[int]]:
        """For each slot of `memory_kv()`: the ids of the spans its chunk was encoded from."""
        return [list(self.chunks[c].span_ids) for c, _ in self.slot_sources()]

    @property
    def num_slots(self) -> int:
        return sum(c.quota for c in self._all_chunks() if c.live)

    # -- usage from attention ----------------------------------------------------------------------------------
    def record_attention(
        self, slot_mass, *, focus: float | None = None, slot_sources: list[tuple[int, int]] | None = None
    ) -> list[int]:
        """Update span usage from the attention each memory slot received in one read; returns the used span ids.

        slot_mass: (S,) attention weight per slot of the memory that was read. slot_sources: that memory's
        `slot_sources()` (default: the current memory's; pass it when the memory may have changed since the read).
        focus: one minus the normalised entropy of the read's attention within memory (feeds salience).
        """
        mass = torch.as_tensor(slot_mass, dtype=torch.float32).flatten().cpu()
        with self._lock:
            sources = self.slot_sources() if slot_sources is None else list(slot_sources)
            if mass.numel() != len(sources):
                raise ValueError(
                    f"record_attention: got {mass.numel()} slot weights for a memory of {len(sources)} slots"
                )
            if not sources:
                return []
            weights = mass.tolist()
            per_chunk, slots_of = _mass_per_chunk(sources, weights)
            for (chunk_id, slot), w in zip(sources, weights, strict=False):
                chunk = self.chunks.get(chunk_id)
                if chunk is not None and chunk.gate is not None:
                    if not chunk.slot_attention:
                        chunk.slot_attention = [0.0] * chunk.gate.shape[0]
                    a = self.config.attention_decay
                    chunk.slot_attention[slot] = a * chunk.slot_attention[slot] + (1 - a) * w
            total = sum(per_chunk.values())
            used: list[int] = []
            for chunk_id, chunk_mass in per_chunk.items():
                chunk = self.chunks.get(chunk_id)
                if chunk is None:
                    continue
                uniform = total * slots_of[chunk_id] / len(sources)
                is_used = total > 0 and chunk_mass >= self.config.use_threshold * uniform
                for span_id in chunk.span_ids:
                    span = self.store[span_id]
                    share = chunk_mass * span.num_tokens / max(chunk.tokens, 1)
                    self.store.mark_used(span_id, share, focus=focus, used=is_used)
                    if is_used:
                        used.append(span_id)
            return used

    def _read_attention(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        query_mask: torch.Tensor | None = None,
        layers: list[int] | None = None,
    ) -> tuple[MemoryAttention, list[tuple[int, int]]] | None:
        """The attention `input_ids` give to the whole memory, and that memory's slot sources (None: empty)."""
        kv = self.memory_kv()
        if kv is None:
            return None
        sources = list(self._composed[1])
        reading = memory_attention(
            self.memory.reasoner,
            kv,
            input_ids,
            attention_mask,
            layers=layers or self.config.probe_layers,
            query_mask=query_mask,
        )
        return reading, sources

    def probe(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        query_mask: torch.Tensor | None = None,
        record: bool = True,
    ) -> MemoryAttention | None:
        """Measure the attention `input_ids` (batch 1, e.g. question + answer) give to memory, and record it.

        Needs `ConversationConfig.track_attention`; returns None when it is off or memory is empty.
        """
        if not self.config.track_attention:
            return None
        with self._lock:
            read = self._read_attention(input_ids, attention_mask, query_mask=query_mask)
            if read is None:
                return None
            reading, sources = read
            if record:
                self.record_attention(
                    reading.slot_mass[0], focus=float(reading.focus[0]), slot_sources=sources
                )
            return reading

    def select(
        self, input_ids: torch.Tensor, top_chunks: int = 1, *, layers: list[int] | None = None
    ) -> MemoryKV | None:
        """The memory of the `top_chunks` chunks that `input_ids` (batch 1, e.g. the question's prompt) attend to
        most, composed on their own in conversation order; None when nothing live has been written.

        The ranking is the probe's mean attention per slot of each chunk, read with the whole memory in front (one
        extra forward pass over the prompt); usage statistics are not recorded. Each chunk keeps the slots it has
        in the whole memory, so a selected memory is never larger than the full one.
        """
        with self._lock:
            chosen = self._attended_chunks(input_ids, top_chunks, layers)
            if not chosen:
                return None
            return compose(chosen, self.memory.reasoner, self.config.slot_selection)[0]

    def _attended_chunks(
        self, input_ids: torch.Tensor, top_chunks: int, layers: list[int] | None
    ) -> list[Chunk]:
        """The `top_chunks` chunks `input_ids` give the most attention per slot, in conversation order."""
        if top_chunks < 1:
            raise ValueError(f"top_chunks must be >= 1 (got {top_chunks})")
        read = self._read_attention(input_ids, layers=layers)
        if read is None:
            return []
        reading, sources = read
        mass, count = _mass_per_chunk(sources, reading.slot_mass[0].float().tolist())
        ranked = sorted(mass, key=lambda c: mass[c] / count[c], reverse=True)[:top_chunks]
        return [c for c in self._all_chunks() if c.id in ranked]

    def read(self, question: str | None = None) -> MemoryKV | None:
        """The memory a reply to `question` reads, by `ConversationConfig.select_chunks`: the chunks the address
        head picks for it, or (no question, no head, or select_chunks None) the whole memory; with no slot budget
        and no question, nothing (None)."""
        if question and self.config.select_chunks and self.memory.address is not None:
            return self.address(question, self.config.select_chunks)
        if self.config.slot_budget is None and not question:
            return None
        return self.memory_kv()

    def address(self, question: str, top_chunks: int = 1) -> MemoryKV | None:
        """The memory of the `top_chunks` chunks the memory's address head (`memory.address`) scores highest for
        `question` (near-ties, within `MemoryConfig.address_recency_margin`, going to the later chunk), each at full
        resolution, composed in conversation order; None when nothing live is written.

        The question is encoded as a user turn (one short encoder call); the chunks are scored from the latents they
        already hold, so nothing of the history is re-read. The spans of the picked chunks count as used (for
        least-recently-used eviction)."""
        with self._lock:
            chosen = self._address_chunks(question, top_chunks)
            if not chosen:
                return None
            return compose(chosen, self.memory.reasoner, self.config.slot_selection, full_resolution=True)[0]

    def read_back(
        self,
        question: str | None = None,
        top_chunks: int = 1,
        *,
        input_ids: torch.Tensor | None = None,
        decoders=None,
    ) -> list[str]:
        """The text the reasoner regenerates from the memory of each of `top_chunks` chunks (`memory.readback`), in
        conversation order; [] when nothing live is written. The chunks are the ones the address head picks for
        `question` (as `address`), or, given `input_ids` instead (a prompt, batch 1), the ones that prompt attends to
        most (as `select`).

        Only the chunks' memories are read, never the transcript: each chunk's K/V, after the memory's reconstruction
        instruction, for at most as many tokens as the chunk was written from. The text is as faithful as the chunk
        memory: verbatim for chunks refined at write time (`MemoryConfig.refine_steps`), lossy without. The cost is
        decoding the picked chunks: one batch of `top_chunks` rows through `generate()`, or, given `decoders` (a
        `memsplice.engine.DecoderPool`), one chunk after another on the engine.

        A chunk's text starts with its context (`ConversationConfig.readback_context_role`): the session header it
        falls under, read back from the memory of the chunk that holds the header, up to the header's end, and cut
        at the header's token positions. That is one more, shorter, read per picked chunk of another session; a
        context already in front of the previous picked chunk is not repeated."""
        from ..memory.readback import read_back_ids

        if (question is None) == (input_ids is None):
            raise ValueError("read_back: give a question (address head) or input_ids (attention), not both")
        with self._lock:
            if question is not None:
                chosen = self._address_chunks(question, top_chunks)
            else:
                chosen = self._attended_chunks(input_ids, top_chunks, None)
            if not chosen:
                return []
            contexts = [self._readback_context(c) for c in chosen]
            shown, rows = set(), list(chosen)
            for i, ctx in enumerate(contexts):
                if ctx is None or ctx[1] in shown:
                    contexts[i] = None
                    continue
                shown.add(ctx[1])
                if ctx[0] not in rows:
                    rows.append(ctx[0])
            limits = [c.tokens for c in rows]
            for ctx in contexts:  # a context row is read only as far as the header's end
                if ctx is not None and ctx[0] not in chosen:
                    limits[rows.index(ctx[0])] = ctx[3]
            ids = read_back_ids(
                self.memory, MemoryKV.cat_rows([c.kv for c in rows]), limits, decoders=decoders
            )
            texts = []
            for i, ctx in enumerate(contexts):
                head = "" if ctx is None else self._decode(ids[rows.index(ctx[0])][ctx[2] : ctx[3]])
                texts.append(head + self._decode(ids[i]))
            return texts

    def recall(
        self,
        question: str,
        top_chunks: int | None = None,
        *,
        prompt_ids: Sequence[int] | torch.Tensor | None = None,
        decoders=None,
        select_by: str = "auto",
    ) -> str | None:
        """What a chat gives the reasoner from memory read back (`read_back`): the text of the `top_chunks` chunks
        `question` picks (None: `ConversationConfig.select_chunks`, else 1), one chunk per line, None when nothing
        was read back (or nothing is written yet). `select_by`: "address" (the address head), "attention" (the
        attention of `prompt_ids`, the prompt the answer will be decoded after, which is then required) or "auto"
        (the address head when the memory has one)."""
        if select_by not in ("auto", "address", "attention"):
            raise ValueError(
                f'recall: select_by must be "auto", "address" or "attention" (got {select_by!r})'
            )
        if not self.turns:
            return None
        if top_chunks is None:
            top_chunks = self.config.select_chunks or 1
        if select_by == "address" or (select_by == "auto" and self.memory.address is not None):
            texts = self.read_back(question, top_chunks, decoders=decoders)
        elif prompt_ids is None:
            raise ValueError("recall: chunks picked by a prompt's attention need prompt_ids")
        else:
            ids = torch.as_tensor(prompt_ids, device=self.memory.reasoner.device).reshape(1, -1)
            texts = self.read_back(input_ids=ids, top_chunks=top_chunks, decoders=decoders)
        return "\n".join(t.strip() for t in texts if t.strip()) or None

    def _readback_context(self, chunk: Chunk) -> tuple[Chunk, int, int, int] | None:
        """(chunk holding it, span id, start, end token position in that chunk) of the context turn `read_back`
        puts in front of `chunk` (`ConversationConfig.readback_context_role`); None when there is none: no role
        set, the chunk holds a turn of that role itself, or the latest one before it is too long, a piece of a
        longer turn, archived or in a chunk that fell back."""
        role = self.config.readback_context_role
        if role is None or not chunk.span_ids:
            return None
        if any(self.store[s].role == role for s in chunk.span_ids):
            return None
        first = min(chunk.span_ids)
        span = next(
            (
                self.store[s]
                for s in range(first - 1, -1, -1)
                if s in self.store.spans and self.store[s].role == role
            ),
            None,
        )
        if span is None or span.archived or span.num_tokens > self.config.readback_context_tokens:
            return None
        pieces = [s for s in (span.id - 1, span.id + 1) if s in self.store.spans]
        if any(self.store[s].turn == span.turn for s in pieces):
            return None
        holder = self._chunk_of(span.id)
        if holder is None or not holder.live:
            return None
        start = 0
        for s in holder.span_ids:
            if s == span.id:
                break
            start += self.store[s].num_tokens
        return holder, span.id, start, start + span.num_tokens

    def _address_chunks(self, question: str, top_chunks: int) -> list[Chunk]:
        """The live chunks the address head picks for `question`, in conversation order; marks their spans used."""
        from ..memory.address import top_chunks as best

        head = self.memory.address
        if head is None:
            raise ValueError(
                "this memory has no address head: train one with `python -m memsplice.online.address`, or pick "
                "chunks by attention with select()"
            )
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"address: question must be a non-empty string, got {question!r}")
        with torch.no_grad():
            self._refresh_if_stale()
            live = [c for c in self._all_chunks() if c.live and c.latents is not None]
            if not live:
                return []
            text = self.config.turn_template.format(role="user", text=question)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ids[-self.memory.config.max_memory_tokens :]
            with self.memory.evaluating():
                query = self.memory.encode(torch.tensor([ids]))
            keys = self._address_keys(head, live, query.device)
            scores = head.score(head.queries(query), keys)[0]
            cfg = self.memory.config
            picked = best(scores, top_chunks, cfg.address_recency_margin, cfg.address_extra_margin)
            chosen = [live[i] for i in picked]
            for chunk in chosen:
                for span_id in chunk.span_ids:
                    self.store.mark_used(span_id, 1.0 / len(chosen), used=True)
            return chosen

    def _address_keys(self, head, live: list[Chunk], device) -> torch.Tensor:
        """The address head's keys of `live` chunks' latents, (C, M, dim); computed again only when a chunk was
        re-encoded, the chunks changed, or a memory weight or the head did (questions between two writes share
        them)."""
        version = (weights_version(self.memory), head_version(self.memory))
        cached = self._keys_cache
        if (
            cached is not None
            and cached[0] == version
            and len(cached[1]) == len(live)
            and all(a is address_source(c) for a, c in zip(cached[1], live, strict=True))
        ):
            return cached[2]
        sources = [address_source(c) for c in live]
        keys = head.keys(torch.stack(sources).to(device))
        self._keys_cache = (version, sources, keys)
        return keys

    # -- inspection ------------------------------------------------------------------------------------------
    def _stored_parts(self) -> tuple[int, int]:
        """(latent bytes, transcript bytes): what the conversation keeps, float32 latents and text with token ids."""
        latent_bytes = sum(
            t.numel() * 4 for c in self._all_chunks() for t in (c.latents, c.address_latents) if t is not None
        )
        transcript_bytes = sum(len(s.text.encode()) + 4 * s.num_tokens for s in self.store.spans.values())
        return latent_bytes, transcript_bytes

    def stored_bytes(self) -> int:
        """`stats()["stored_bytes"]` without composing the memory (which `stats` does for its K/V bytes)."""
        with self._lock:
            return sum(self._stored_parts())

    def stats(self) -> dict:
        with self._lock:
            kv = self.memory_kv()
            chunks = self._all_chunks()
            levels: dict[str, int] = {}
            for node in self.hierarchy.nodes:
                levels[str(node.level)] = levels.get(str(node.level), 0) + 1
            latent_bytes, transcript_bytes = self._stored_parts()
            kv_bytes = kv.nbytes() if kv is not None else 0
            return {
                "turns": self.turns,
                "slots": self.num_slots,
                "slot_budget": self.config.slot_budget,
                "chunks": len(chunks),
                "nodes": len(self.hierarchy.nodes),
                "node_levels": levels,
                "spans_live": len(self.store.live()),
                "spans_archived": len(self.store.archived()),
                "live_tokens": self.store.live_tokens,
                "archived_tokens": self.store.archived_tokens,
                "evictions": len(self.store.eviction_log),
                "fallback_chunks": sum(1 for c in chunks if c.kv is not None and not c.live),
                "kv_bytes": kv_bytes,
                "latent_bytes": latent_bytes,
                "transcript_bytes": transcript_bytes,
                "stored_bytes": latent_bytes + transcript_bytes,
                "mean_write_seconds": (sum(self.write_seconds) / len(self.write_seconds))
                if self.write_seconds
                else 0.0,
            }

    def transcript(self, include_archived: bool = True) -> list[dict]:
        """The turns written so far (spans of one turn joined), oldest first, with whether they are live."""
        turns: dict[int, dict] = {}
        for span in sorted(self.store.spans.values(), key=lambda s: s.id):
            if span.archived and not include_archived:
                continue
            t = turns.setdefault(span.turn, {"turn": span.turn, "role": span.role, "text": "", "live": True})
            t["text"] += span.text
            t["live"] = t["live"] and not span.archived
        return list(turns.values())

    # -- persistence -----------------------------------------------------------------------------------------
    def _weights_signature(self) -> str:
        version = weights_version(self.memory)
        if self._signature is None or self._signature[0] != version:
            self._signature = (version, weights_signature(self.memory))
        return self._signature[1]

    def to_dict(self) -> dict:
        """Plain-JSON state: config, transcript, chunks (with latents) and hierarchy."""
        with self._lock:
            self._refresh_if_stale()
            chunks = []
            for chunk in self._all_chunks():
                chunks.append(
                    {
                        "id": chunk.id,
                        "span_ids": list(chunk.span_ids),
                        "tokens": chunk.tokens,
                        "sealed": chunk.sealed,
                        "quota": chunk.quota,
                        "slot_attention": list(chunk.slot_attention),
                        "latents": None if chunk.latents is None else _tensor_to_b64(chunk.latents),
                        "address_latents": None
                        if chunk.address_latents is None
                        else _tensor_to_b64(chunk.address_latents),
                    }
                )
            return {
                "format": FORMAT,
                "config": self.config.to_dict(),
                "turns": self.turns,
                "next_chunk": self._next_chunk,
                "memory": {
                    "signature": self._weights_signature(),
                    "num_slots": self.memory.config.num_slots,
                    "reasoner_fingerprint": self.memory.config.reasoner_fingerprint,
                },
                "transcript": self.store.to_dict(),
                "chunks": chunks,
                "open_chunk": None if self.open_chunk is None else self.open_chunk.id,
                "nodes": self.hierarchy.to_dict(),
                "write_seconds": list(self.write_seconds[-1000:]),
            }

    @classmethod
    def from_dict(cls, data: dict, memory) -> ConversationMemory:
        """Rebuild a conversation memory saved by `to_dict` onto `memory`."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a conversation memory: expected format {FORMAT!r}")
        try:
            conv = cls(memory, ConversationConfig.from_dict(data["config"]))
            conv.store = TranscriptStore.from_dict(data["transcript"])
            conv.turns = int(data["turns"])
            conv._next_chunk = int(data["next_chunk"])
            saved = data["memory"]
            chunk_rows = data["chunks"]
            open_id = data["open_chunk"]
            nodes = data["nodes"]
            conv.write_seconds = [float(s) for s in data.get("write_seconds", [])]
        except (KeyError, TypeError) as e:
            raise ValueError(f"conversation memory data is incomplete or malformed: {e}") from e
        same_reasoner = saved.get("reasoner_fingerprint") == memory.config.reasoner_fingerprint
        same_weights = same_reasoner and saved.get("signature") == conv._weights_signature()
        if not same_reasoner:
            # Token ids belong to the reasoner's tokenizer: re-tokenize the live spans from their text.
            logger.warning(
                "conversation memory was written for another reasoner; re-tokenizing its transcript"
            )
            for span in conv.store.live():
                span.token_ids = conv.tokenizer(span.text, add_special_tokens=False)["input_ids"] or [
                    conv._pad_id()
                ]
        for row in chunk_rows:
            chunk = Chunk(
                id=int(row["id"]),
                span_ids=[int(s) for s in row["span_ids"]],
                tokens=int(row["tokens"]),
                sealed=bool(row["sealed"]),
                quota=int(row["quota"]),
                slot_attention=[float(a) for a in row["slot_attention"]],
            )
            if not same_reasoner:
                chunk.tokens = sum(conv.store[s].num_tokens for s in chunk.span_ids)
            missing = [s for s in chunk.span_ids if s not in conv.store.spans or conv.store[s].archived]
            if missing:
                raise ValueError(
                    f"conversation memory data is inconsistent: chunk {chunk.id} holds spans "
                    f"{missing[:5]} that are not live"
                )
            conv.chunks[chunk.id] = chunk
            if (
                same_weights
                and row["latents"] is not None
                and saved.get("num_slots") == memory.config.num_slots
            ):
                chunk.latents = _tensor_from_b64(row["latents"]).to(memory.reasoner.device)
                if row.get("address_latents") is not None:
                    chunk.address_latents = _tensor_from_b64(row["address_latents"]).to(
                        memory.reasoner.device
                    )
                reinject_chunk(memory, chunk, scope=conv.config.scope)
                chunk.encoded_with = weights_version(memory)
            else:
                chunk.dirty = True
        conv.hierarchy.load_nodes(nodes)
        if open_id is not None:
            conv.open_chunk = conv.chunks[int(open_id)]
        placed = conv.hierarchy.chunk_order() + ([open_id] if open_id is not None else [])
        if sorted(placed) != sorted(conv.chunks):
            raise ValueError("conversation memory data is inconsistent: hierarchy and chunks disagree")
        dirty = [c for c in conv._all_chunks() if c.dirty]
        if dirty:
            logger.info(
                "re-encoding %d chunks (memory weights differ from the ones that wrote them)", len(dirty)
            )
            with torch.no_grad():
                encode_chunks(
                    memory,
                    dirty,
                    conv.store,
                    batch_size=conv.config.encode_batch,
                    scope=conv.config.scope,
                    pad_id=conv._pad_id(),
                )
                conv._fit_budget()
        return conv

    def __repr__(self) -> str:
        return (
            f"ConversationMemory(turns={self.turns}, slots={self.num_slots}/{self.config.slot_budget}, "
            f"chunks={len(self.chunks)}, live_spans={len(self.store.live())})"
        )
