"""`ScopeMemory`: the memory of one scope (a user, an agent), as the server reads, writes and persists it.

It is a thin adapter around `memsplice.conversation.ConversationMemory`: turns go into the conversation's
transcript, live spans are encoded chunk by chunk into latent slots (older chunks compressed within a slot budget,
least-recently-used spans evicted beyond a token cap), and a read composes the kept slots into one `MemoryKV`.
The adapter adds what a server needs on top: a copy of the memory per request, read statistics, per-slot and
per-span views for the inspector, and a state the store can hold.

Guarantees (the conversation memory's own, plus):
- `memory_kv()` returns a `MemoryKV` whose tensors belong to this call alone (cloned from the scope's composed
  memory), so nothing a request splices is shared with another request or scope.
- Latents computed by other memory weights than the ones serving now (after an online update) are never used: the
  conversation memory re-encodes stale chunks before a read or a write.
- `to_state()` / `from_state()` round-trip: a restart resumes with the same latents (no encoder call when the
  weights are the ones that wrote them).
- Every method that may run the encoder (`add_turns`, `memory_kv`, `to_state`, `from_state`, `stats`, `slots`)
  is meant for the server's inference worker.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time

import torch

from ..conversation import ConversationConfig, ConversationMemory
from ..inject.memory_kv import MemoryKV
from ..memory.model import MemoryModel
from ..online.loop import history_ids

logger = logging.getLogger(__name__)

KIND = "conversation"
STATE_VERSION = 1


def weights_digest(memory: MemoryModel) -> str:
    """sha256 of the memory's weights (what latents depend on), 16 hex characters, for display and exports."""
    h = hashlib.sha256()
    for name, tensor in sorted(memory.memory_state_dict().items()):
        h.update(name.encode())
        h.update(tensor.float().numpy().tobytes() if tensor.is_floating_point() else tensor.numpy().tobytes())
    return h.hexdigest()[:16]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


class ScopeMemory:
    """The conversation memory of one scope, bound to the serving `MemoryModel`."""

    kind = KIND

    def __init__(
        self,
        scope: str,
        memory: MemoryModel,
        config: ConversationConfig | None = None,
        conversation: ConversationMemory | None = None,
    ):
        self.scope = scope
        self.memory = memory
        if conversation is None:
            config = ConversationConfig(**{**(config.to_dict() if config else {}), "scope": scope})
            conversation = ConversationMemory(memory, config)
        self.conversation = conversation
        self.reads = 0
        self.last_read: float | None = None

    # -- writing ---------------------------------------------------------------------------------------------
    def add_turns(self, turns: list[tuple[str, str]]) -> dict:
        """Append (role, text) turns; returns write statistics with the tokens of each turn."""
        stats = [self.conversation.add_turn(role, text) for role, text in turns]
        return {
            "added": len(turns),
            "tokens": [s.tokens for s in stats],
            "evicted": sum(s.evicted for s in stats),
            "encoded_tokens": sum(s.encoded_tokens for s in stats),
            "refreshed": any(s.refreshed for s in stats),
            "fallback": bool(stats and stats[-1].fallback),
            "slots": self.conversation.num_slots,
            "write_ms": round(1000 * sum(s.seconds for s in stats), 2),
        }

    def recent_token_ids(self, max_tokens: int) -> list[int]:
        """The most recent live transcript tokens (at most `max_tokens`, most recent last): the history an online
        training sample is written from. Take it before the sample's turns are added."""
        return history_ids(self.conversation, max_tokens)

    def turn_token_ids(self, first_turn: int) -> list[tuple[str, list[int]]]:
        """(role, token ids with the turn template applied) of every turn from `first_turn` on, in order; a turn
        split into several spans is joined again."""
        turns: dict[int, tuple[str, list[int]]] = {}
        for span in sorted(self.conversation.store.spans.values(), key=lambda s: s.id):
            if span.turn >= first_turn:
                turns.setdefault(span.turn, (span.role, []))[1].extend(span.token_ids)
        return [turns[t] for t in sorted(turns)]

    # -- reading ---------------------------------------------------------------------------------------------
    def memory_kv(self, question: str | None = None) -> MemoryKV | None:
        """A `MemoryKV` (batch 1) for one request, or None when nothing live is in memory: the chunks the address
        head picks for `question` when the scope's conversation is configured to select them
        (`ConversationConfig.select_chunks`), else the whole memory.

        Chunks whose latents failed the safety check were left out when they were written (and a fallback event
        was recorded under this scope), so a scope whose memory fell back entirely reads as the bare reasoner.
        """
        kv = self.conversation.read(question)
        self.reads += 1
        self.last_read = time.time()
        if kv is None:
            return None
        return MemoryKV(
            [k.clone() for k in kv.keys],
            [v.clone() for v in kv.values],
            kv.gate_bias.clone(),
            kv.live.clone(),
        )

    def recall(self, question: str, prompt_ids: list[int], decoders=None) -> str | None:
        """The text read back from the chunk memories `question` picks (`ConversationMemory.recall`, as many as the
        conversation's `select_chunks`, default 1), one per line; None when nothing live is written."""
        if not self.conversation.turns:
            return None
        text = self.conversation.recall(question, prompt_ids=prompt_ids, decoders=decoders)
        self.reads += 1
        self.last_read = time.time()
        return text

    def probe(self, input_ids: torch.Tensor, query_mask: torch.Tensor) -> None:
        """Record which spans the reasoner's attention used (the spans' LRU clock); no-op unless tracking is on."""
        self.conversation.probe(input_ids, query_mask=query_mask)

    @property
    def turns(self) -> int:
        return self.conversation.turns

    def stats(self) -> dict:
        s = self.conversation.stats()
        gates = [x["gate"] for x in self.slots() if x["gate"] is not None]
        return {
            "kind": self.kind,
            "scope": self.scope,
            "turns": s["turns"],
            "slots": s["slots"],
            "slot_budget": s["slot_budget"],
            "slots_per_chunk": self.memory.config.num_slots,
            "chunks": s["chunks"],
            "chunk_tokens": self.conversation.chunk_tokens,
            "live_spans": s["spans_live"],
            "archived_spans": s["spans_archived"],
            "live_tokens": s["live_tokens"],
            "max_live_tokens": self.conversation.config.max_live_tokens,
            "evictions": s["evictions"],
            "fallback_chunks": s["fallback_chunks"],
            "kv_bytes": s["kv_bytes"],
            "stored_bytes": s["stored_bytes"],
            "track_attention": self.conversation.config.track_attention,
            "reads": self.reads,
            "last_read": self.last_read,
            "gate": {"mean": sum(gates) / len(gates), "min": min(gates), "max": max(gates)}
            if gates
            else None,
        }

    def slots(self) -> list[dict]:
        """Per slot of the composed memory: its chunk, gate value, latent norm and the turns it was encoded from."""
        conv = self.conversation
        out = []
        for i, (chunk_id, slot) in enumerate(conv.slot_sources()):
            chunk = conv.chunks[chunk_id]
            out.append(
                {
                    "slot": i,
                    "chunk": chunk_id,
                    "chunk_slot": slot,
                    "gate": _finite(float(chunk.gate[slot])) if chunk.gate is not None else None,
                    "norm": _finite(float(chunk.latents[slot].norm())) if chunk.latents is not None else None,
                    "turns": sorted({conv.store[s].turn for s in chunk.span_ids}),
                }
            )
        return out

    def span_states(self) -> dict[int, dict]:
        """LRU state by turn number: live (resident) or archived (evicted, and why), last use (write step), uses."""
        store = self.conversation.store
        out: dict[int, dict] = {}
        for span in store.spans.values():
            st = out.setdefault(
                span.turn,
                {
                    "resident": True,
                    "last_used_step": span.last_used,
                    "uses": 0,
                    "evicted_because": None,
                    "salience": 0.0,
                },
            )
            st["resident"] = st["resident"] and not span.archived
            st["last_used_step"] = max(st["last_used_step"], span.last_used)
            st["uses"] += span.uses
            st["salience"] = max(st["salience"], span.salience)
            if span.archived:
                st["evicted_because"] = span.archive_reason
        for st in out.values():
            st["steps_since_use"] = store.step - st["last_used_step"]
        return out

    # -- persistence -----------------------------------------------------------------------------------------
    def to_state(self) -> tuple[str, dict, bytes | None]:
        """(kind, JSON-able state, tensor bytes or None): the conversation memory's own plain-JSON state."""
        state = {
            "state_version": STATE_VERSION,
            "conversation": self.conversation.to_dict(),
            "reads": self.reads,
            "last_read": self.last_read,
        }
        return self.kind, state, None

    @classmethod
    def from_state(
        cls, scope: str, memory: MemoryModel, kind: str, state: dict, tensors: bytes | None = None
    ) -> ScopeMemory:
        if kind != KIND:
            raise ValueError(f"scope {scope!r} holds memory of kind {kind!r}; this server reads {KIND!r}")
        if not isinstance(state, dict) or state.get("state_version") != STATE_VERSION:
            raise ValueError(
                f"scope {scope!r}: unknown state version "
                f"{state.get('state_version') if isinstance(state, dict) else None!r}"
            )
        data = state.get("conversation")
        if (
            isinstance(data, dict)
            and isinstance(data.get("config"), dict)
            and data["config"].get("scope") != scope
        ):
            # an import into another scope: fallback events, also those of restoring, must name the new scope
            data = {**data, "config": {**data["config"], "scope": scope}}
        conversation = ConversationMemory.from_dict(data, memory)
        self = cls(scope, memory, conversation=conversation)
        self.reads, self.last_read = int(state.get("reads", 0)), state.get("last_read")
        return self
