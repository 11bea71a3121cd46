"""`ScopeMemory`: the memory of one scope (a user, an agent), as the server reads, writes and persists it.

What the memory holds: the scope's most recent transcript that fits in `window_tokens` tokens, rendered as
"role: text" lines and read by the memory encoder (`MemoryModel.write`) into M latent slots. Older turns are
evicted oldest first (the store keeps the full transcript). The latents are computed when turns are written, not
when memory is read, and persisted with the state; a read projects them into a fresh `MemoryKV`.

Guarantees:
- `memory_kv()` builds a new `MemoryKV` from this scope's own latents on every call (caches are mutated in place by
  a forward pass, so nothing spliced is ever shared between requests or scopes).
- Latents computed by other memory weights than the ones serving now (after an online update or a checkpoint
  change) are never used: the state records the weights' digest, and a stale state is re-encoded from its turns.
- `to_state()` / `from_state()` round-trip exactly (JSON plus safetensors bytes), so a restart resumes with the
  same latents.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..inject.memory_kv import MemoryKV
from ..memory.model import MemoryModel, pad_rows

logger = logging.getLogger(__name__)

KIND = "recent_window"
STATE_VERSION = 1


def weights_digest(memory: MemoryModel) -> str:
    """sha256 of the memory's weights (what latents depend on), 16 hex characters."""
    h = hashlib.sha256()
    for name, tensor in sorted(memory.memory_state_dict().items()):
        h.update(name.encode())
        h.update(tensor.float().numpy().tobytes() if tensor.is_floating_point() else tensor.numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Turn:
    seq: int
    role: str
    text: str
    tokens: int
    """Tokens of the rendered line "role: text\\n"."""
    time: float = field(default_factory=time.time)
    last_read: float | None = None
    """When a request last spliced memory that held this turn (the LRU state the inspector shows)."""


class ScopeMemory:
    """The recent-transcript memory of one scope, bound to the serving `MemoryModel`."""

    kind = KIND

    def __init__(self, scope: str, memory: MemoryModel, window_tokens: int | None = None):
        self.scope = scope
        self.memory = memory
        limit = memory.config.max_memory_tokens
        self.window_tokens = min(window_tokens or limit, limit)
        self.turns: list[Turn] = []
        """Resident turns, oldest first."""
        self.evicted = 0
        """Turns evicted so far (they stay in the store's transcript)."""
        self.latents: torch.Tensor | None = None
        """(1, M, d) float32 on the CPU, or None when nothing was written."""
        self.gate: list[float] = []
        """Per-slot gate values g = sigmoid(W_g z) of the current latents."""
        self.slot_norms: list[float] = []
        self.weights: str | None = None
        """Digest of the memory weights that computed `latents`."""
        self.last_read: float | None = None
        self.reads = 0
        self.writes = 0

    # -- writing ---------------------------------------------------------------------------------------------
    def _render(self, role: str, text: str) -> list[int]:
        tok = self.memory.reasoner.require_tokenizer()
        return tok(f"{role}: {text}\n", add_special_tokens=False)["input_ids"]

    def add_turns(self, turns: list[tuple[str, str]], first_seq: int, weights: str) -> dict:
        """Append (role, text) turns (transcript numbers first_seq, ...), evict what no longer fits, re-encode.

        Runs the memory encoder: call it from the inference worker. Returns write statistics.
        """
        new = [
            Turn(first_seq + i, role, text, len(self._render(role, text)))
            for i, (role, text) in enumerate(turns)
        ]
        self.turns.extend(new)
        evicted = self._evict()
        self._encode(weights)
        self.writes += 1
        return {
            "added": len(turns),
            "tokens": [t.tokens for t in new],
            "evicted": evicted,
            "resident_turns": len(self.turns),
            "resident_tokens": self.resident_tokens,
        }

    def _evict(self) -> int:
        evicted = 0
        # Keep the newest turns that fit; the newest turn always stays (it is truncated from the left if too long).
        while len(self.turns) > 1 and self.resident_tokens > self.window_tokens:
            self.turns.pop(0)
            evicted += 1
        self.evicted += evicted
        return evicted

    @property
    def resident_tokens(self) -> int:
        return sum(t.tokens for t in self.turns)

    def window_ids(self) -> list[int]:
        """Token ids the encoder reads: the resident turns, cut to the newest `window_tokens` tokens."""
        ids: list[int] = []
        for t in self.turns:
            ids.extend(self._render(t.role, t.text))
        return ids[-self.window_tokens :]

    def _encode(self, weights: str) -> None:
        ids = self.window_ids()
        if not ids:
            self.latents, self.gate, self.slot_norms, self.weights = None, [], [], weights
            return
        device = self.memory.reasoner.device
        input_ids, mask = pad_rows([ids], pad_id=0, device=device)
        with torch.inference_mode():
            latents = self.memory.encode(input_ids, mask).float()  # (1, M, d)
            gate = self.memory.gate_values(latents)[0]
        self.latents = latents.cpu()
        # Non-finite values are kept out of the JSON state (the safety check refuses such latents at read time).
        self.gate = [x if math.isfinite(x) else None for x in gate.tolist()]
        self.slot_norms = [x if math.isfinite(x) else None for x in latents[0].norm(dim=-1).tolist()]
        self.weights = weights

    def refresh(self, weights: str) -> bool:
        """Re-encode when the latents came from other weights; True when it did (inference worker only)."""
        if self.turns and self.weights != weights:
            self._encode(weights)
            return True
        return False

    # -- reading ---------------------------------------------------------------------------------------------
    def memory_kv(self) -> MemoryKV | None:
        """A fresh `MemoryKV` (batch 1) from this scope's latents, or None when the scope has no memory yet.

        The safety check runs here: a non-finite or oversized latent gives a MemoryKV whose row is not live, and a
        fallback event is recorded in the memory's FallbackLog under this scope.
        """
        if self.latents is None:
            return None
        self.last_read = time.time()
        self.reads += 1
        for t in self.turns:
            t.last_read = self.last_read
        with torch.inference_mode():
            return self.memory.inject(self.latents.to(self.memory.reasoner.device), scope=self.scope).kv

    def stats(self) -> dict:
        g = [x for x in self.gate if x is not None]
        return {
            "kind": self.kind,
            "scope": self.scope,
            "slots": self.memory.config.num_slots,
            "window_tokens": self.window_tokens,
            "resident_turns": len(self.turns),
            "resident_tokens": self.resident_tokens,
            "evicted_turns": self.evicted,
            "first_resident_seq": self.turns[0].seq if self.turns else None,
            "written": self.latents is not None,
            "weights": self.weights,
            "reads": self.reads,
            "writes": self.writes,
            "last_read": self.last_read,
            "gate": {"mean": sum(g) / len(g), "min": min(g), "max": max(g)} if g else None,
        }

    def slots(self) -> list[dict]:
        return [
            {"slot": i, "gate": g, "norm": n}
            for i, (g, n) in enumerate(zip(self.gate, self.slot_norms, strict=True))
        ]

    def span_states(self) -> dict[int, dict]:
        """LRU state of resident spans by transcript number: {"resident": True, "last_read": time or None}."""
        return {t.seq: {"resident": True, "last_read": t.last_read} for t in self.turns}

    # -- persistence -----------------------------------------------------------------------------------------
    def to_state(self) -> tuple[str, dict, bytes | None]:
        """(kind, JSON-able state, safetensors bytes of the latents or None)."""
        state = {
            "state_version": STATE_VERSION,
            "window_tokens": self.window_tokens,
            "evicted": self.evicted,
            "turns": [asdict(t) for t in self.turns],
            "gate": self.gate,
            "slot_norms": self.slot_norms,
            "weights": self.weights,
            "last_read": self.last_read,
            "reads": self.reads,
            "writes": self.writes,
        }
        tensors = None if self.latents is None else save_tensors({"latents": self.latents.contiguous()})
        return self.kind, state, tensors

    @classmethod
    def from_state(
        cls,
        scope: str,
        memory: MemoryModel,
        kind: str,
        state: dict,
        tensors: bytes | None,
        window_tokens: int | None = None,
    ) -> ScopeMemory:
        if kind != KIND:
            raise ValueError(
                f"scope {scope!r} holds memory of kind {kind!r}, which this server does not read"
            )
        if state.get("state_version") != STATE_VERSION:
            raise ValueError(f"scope {scope!r}: unknown state version {state.get('state_version')!r}")
        self = cls(scope, memory, window_tokens or state.get("window_tokens"))
        self.turns = [Turn(**t) for t in state.get("turns", [])]
        self.evicted = int(state.get("evicted", 0))
        self.gate, self.slot_norms = list(state.get("gate", [])), list(state.get("slot_norms", []))
        self.weights, self.last_read = state.get("weights"), state.get("last_read")
        self.reads, self.writes = int(state.get("reads", 0)), int(state.get("writes", 0))
        if tensors is not None:
            latents = load_tensors(bytes(tensors))["latents"]
            m, d = memory.config.num_slots, memory.reasoner.shapes.hidden_size
            if tuple(latents.shape) != (1, m, d):
                # Another memory shape: the turns are kept, the latents are recomputed on first use.
                self.weights = None
            else:
                self.latents = latents.float()
        if self.window_tokens != state.get("window_tokens"):
            self._evict()
            self.weights = None
        return self
