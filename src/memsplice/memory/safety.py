"""The safety fallback: a latent that is non-finite or too large never reaches the reasoner's cache.

`check_latents` decides per batch row; the memory model then runs such rows as the bare reasoner and records one
`FallbackEvent` per row in a `FallbackLog` (reason, norm, bound, scope, time). The log counts events by reason,
keeps the most recent ones, can append them to a JSON-lines file, and hands each event to subscribers (the online
loop queues them so later updates can learn from the inputs that produced them).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

NON_FINITE = "non_finite"
NORM_EXCEEDED = "norm_exceeded"
NON_FINITE_KV = "non_finite_kv"


@dataclass(frozen=True)
class FallbackEvent:
    reason: str
    """"non_finite" (NaN/inf in the latent), "norm_exceeded" (a slot above the bound), "non_finite_kv"."""
    norm: float
    """Largest slot L2 norm of the row (inf or nan when non-finite)."""
    bound: float
    scope: str | None
    """The memory scope (user, agent) whose memory fell back, when known."""
    row: int
    """Batch row of the call."""
    time: float = field(default_factory=time.time)
    detail: dict = field(default_factory=dict)
    """Anything that lets the event be replayed for training, e.g. the memory input's token ids."""

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("norm", "bound"):  # JSON has no inf/nan
            if d[k] != d[k] or d[k] in (float("inf"), float("-inf")):
                d[k] = str(d[k])
        return d


def check_latents(
    latents: torch.Tensor, max_norm: float
) -> tuple[torch.Tensor, list[str | None], torch.Tensor]:
    """latents (B, M, d) -> (ok (B,) bool, reason per row or None, max slot norm per row (B,))."""
    with torch.no_grad():
        lat = latents.detach().float()
        finite = torch.isfinite(lat).flatten(1).all(dim=1)
        norms = lat.norm(dim=-1).amax(dim=-1)  # (B,)
        too_big = norms > max_norm
        ok = finite & ~too_big
        reasons = [
            None if o else (NON_FINITE if not f else NORM_EXCEEDED)
            for o, f in zip(ok.tolist(), finite.tolist(), strict=True)
        ]
    return ok, reasons, norms


class FallbackLog:
    """Thread-safe record of fallback events."""

    def __init__(self, keep: int = 1000, path: str | Path | None = None):
        self._lock = threading.Lock()
        self.events: deque[FallbackEvent] = deque(maxlen=keep)
        self.counts: Counter[str] = Counter()
        self.path = Path(path) if path else None
        self._subscribers: list[Callable[[FallbackEvent], None]] = []

    def subscribe(self, callback: Callable[[FallbackEvent], None]) -> None:
        self._subscribers.append(callback)

    def record(self, event: FallbackEvent) -> None:
        with self._lock:
            self.events.append(event)
            self.counts[event.reason] += 1
            if self.path:
                with open(self.path, "a") as f:
                    f.write(json.dumps(event.to_dict()) + "\n")
        logger.warning(
            "memory fallback: %s (norm %.3g, bound %.3g, scope %s, row %d)",
            event.reason,
            event.norm,
            event.bound,
            event.scope,
            event.row,
        )
        for callback in list(self._subscribers):
            callback(event)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def forget(self, scope: str) -> int:
        """Drop the kept events of `scope` (their detail may hold its inputs); returns how many. Counts stay."""
        with self._lock:
            kept = [e for e in self.events if e.scope != scope]
            dropped = len(self.events) - len(kept)
            self.events.clear()
            self.events.extend(kept)
        return dropped

    def recent(self, n: int = 50, scope: str | None = None) -> list[FallbackEvent]:
        with self._lock:
            events = [e for e in self.events if scope is None or e.scope == scope]
        return events[-n:]
