"""`TranscriptStore`: the history of one memory scope (a user, an agent) as spans, with usage and eviction.

A span is one turn, or one piece of a turn too long for a single encoder call, with its token ids and access
statistics. Spans are *live* (part of what memory is built from) or *archived* (evicted from the encoder's input;
kept, never deleted). The store caps the live spans at `max_live_tokens`; when a write goes over the cap, the
least-recently-used spans move to the archive.

"Used" means: memory built from the span received attention from the reasoner's queries (`mark_used`, fed by the
attention probe in `memsplice.conversation.probe`). Without that signal a span's last use is its creation, so LRU
falls back to first-in-first-out. An optional salience score (attention mass weighted by how focused the attention
was, i.e. one minus its normalised entropy, as a moving average) protects the most salient fraction of live spans:
they are evicted only when no unprotected span is left.

Guarantees:
- Eviction never deletes a span; every eviction is appended to `eviction_log` and logged at INFO level.
- The spans written by the current step are evicted last, salience-protected spans just before them.
- `to_dict()` is plain JSON (ints, floats, strings, lists, dicts); `from_dict(to_dict())` restores an equal store.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

logger = logging.getLogger(__name__)

TOKEN_CAP = "token_cap"
SLOT_BUDGET = "slot_budget"
FORMAT = "memsplice.transcript/1"


@dataclass
class Span:
    """One turn (or one piece of a long turn) of the transcript."""

    id: int
    turn: int
    """Index of the turn this span belongs to (a long turn is split into several spans)."""
    role: str
    text: str
    """The span's text as the encoder read it (without the turn template)."""
    token_ids: list[int]
    """Token ids the encoder reads for this span (the turn template applied)."""
    created: int
    """Store step at which the span was written."""
    last_used: int
    """Store step of the most recent read whose attention reached memory built from this span."""
    uses: int = 0
    """Reads that counted as a use."""
    attention: float = 0.0
    """Accumulated attention mass received (summed over reads)."""
    salience: float = 0.0
    """Moving average of focused attention (mass times one minus normalised entropy)."""
    archived: bool = False
    archived_at: int | None = None
    archive_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class EvictionRecord:
    """Why and when a span left the encoder's input."""

    step: int
    span_id: int
    turn: int
    tokens: int
    last_used: int
    uses: int
    salience: float
    reason: str
    """"token_cap" (live tokens over `max_live_tokens`) or "slot_budget" (memory could not be compressed further)."""
    protected: bool
    """True when the span was salience-protected and evicted only because nothing unprotected was left."""


@dataclass
class TranscriptStore:
    max_live_tokens: int = 65536
    """Most tokens of live spans; above it, least-recently-used spans are archived."""
    protect_fraction: float = 0.1
    """Fraction of live spans (the most salient, with salience > 0) protected from eviction; 0 disables it."""
    salience_decay: float = 0.9
    """Weight of the old salience in the moving average at each read that reaches the span."""
    eviction_log_size: int = 10000
    """Eviction records kept (oldest dropped first)."""
    spans: dict[int, Span] = field(default_factory=dict)
    step: int = 0
    """Number of writes so far; reads are stamped with the current step."""
    next_id: int = 0
    eviction_log: deque[EvictionRecord] = field(default_factory=deque)

    def __post_init__(self):
        if not isinstance(self.max_live_tokens, int) or self.max_live_tokens <= 0:
            raise ValueError(
                f"TranscriptStore.max_live_tokens must be a positive integer (got {self.max_live_tokens!r})"
            )
        if not 0.0 <= self.protect_fraction < 1.0:
            raise ValueError(
                f"TranscriptStore.protect_fraction must be in [0, 1) (got {self.protect_fraction!r})"
            )
        if not 0.0 <= self.salience_decay < 1.0:
            raise ValueError(
                f"TranscriptStore.salience_decay must be in [0, 1) (got {self.salience_decay!r})"
            )
        self.eviction_log = deque(self.eviction_log, maxlen=self.eviction_log_size)

    # -- writing ---------------------------------------------------------------------------------------------
    def begin_step(self) -> int:
        """Start a write; spans added until the next call carry this step."""
        self.step += 1
        return self.step

    def add(self, role: str, text: str, token_ids: list[int], turn: int) -> Span:
        if not token_ids:
            raise ValueError("a span needs at least one token")
        span = Span(
            id=self.next_id,
            turn=turn,
            role=role,
            text=text,
            token_ids=list(token_ids),
            created=self.step,
            last_used=self.step,
        )
        self.spans[span.id] = span
        self.next_id += 1
        return span

    # -- views -----------------------------------------------------------------------------------------------
    def __getitem__(self, span_id: int) -> Span:
        return self.spans[span_id]

    def live(self) -> list[Span]:
        return [s for s in self.spans.values() if not s.archived]

    def archived(self) -> list[Span]:
        return [s for s in self.spans.values() if s.archived]

    @property
    def live_tokens(self) -> int:
        return sum(s.num_tokens for s in self.spans.values() if not s.archived)

    @property
    def archived_tokens(self) -> int:
        return sum(s.num_tokens for s in self.spans.values() if s.archived)

    # -- usage -----------------------------------------------------------------------------------------------
    def mark_used(self, span_id: int, mass: float, focus: float | None = None, used: bool = True) -> None:
        """Record a read whose attention gave `mass` to memory built from this span.

        focus: one minus the normalised entropy of that attention (1 = all on one slot); feeds the salience.
        used: whether the read counts as a use (refreshes the LRU clock).
        """
        span = self.spans[span_id]
        span.attention += float(mass)
        if focus is not None:
            span.salience = (
                self.salience_decay * span.salience + (1.0 - self.salience_decay) * float(mass) * focus
            )
        if used:
            span.uses += 1
            span.last_used = self.step

    def protected_ids(self) -> set[int]:
        """Live spans protected from eviction by their salience."""
        if self.protect_fraction <= 0:
            return set()
        live = [s for s in self.live() if s.salience > 0]
        n = int(self.protect_fraction * len(self.live()))
        live.sort(key=lambda s: (-s.salience, -s.id))
        return {s.id for s in live[:n]}

    def eviction_order(self, candidates: Iterable[Span] | None = None) -> list[Span]:
        """Live spans in the order they would be evicted: older writes before this step's, unprotected before
        protected, then least recently used first (ties: oldest span first)."""
        protected = self.protected_ids()
        spans = self.live() if candidates is None else [s for s in candidates if not s.archived]
        return sorted(spans, key=lambda s: (s.created == self.step, s.id in protected, s.last_used, s.id))

    # -- eviction --------------------------------------------------------------------------------------------
    def archive(self, span_id: int, reason: str, protected: bool = False) -> EvictionRecord:
        span = self.spans[span_id]
        if span.archived:
            raise ValueError(f"span {span_id} is already archived")
        span.archived, span.archived_at, span.archive_reason = True, self.step, reason
        record = EvictionRecord(
            step=self.step,
            span_id=span.id,
            turn=span.turn,
            tokens=span.num_tokens,
            last_used=span.last_used,
            uses=span.uses,
            salience=span.salience,
            reason=reason,
            protected=protected,
        )
        self.eviction_log.append(record)
        logger.info(
            "evicted span %d (turn %d, %d tokens, last used at step %d, %d uses, salience %.3g%s): %s",
            span.id,
            span.turn,
            span.num_tokens,
            span.last_used,
            span.uses,
            span.salience,
            ", protected" if protected else "",
            reason,
        )
        return record

    def evict_over_cap(self) -> list[EvictionRecord]:
        """Archive least-recently-used spans until live tokens fit `max_live_tokens`."""
        excess = self.live_tokens - self.max_live_tokens
        if excess <= 0:
            return []
        protected = self.protected_ids()
        records = []
        for span in self.eviction_order():
            if excess <= 0:
                break
            records.append(self.archive(span.id, TOKEN_CAP, protected=span.id in protected))
            excess -= span.num_tokens
        return records

    # -- persistence -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "max_live_tokens": self.max_live_tokens,
            "protect_fraction": self.protect_fraction,
            "salience_decay": self.salience_decay,
            "eviction_log_size": self.eviction_log_size,
            "step": self.step,
            "next_id": self.next_id,
            "spans": [asdict(s) for s in self.spans.values()],
            "eviction_log": [asdict(r) for r in self.eviction_log],
        }

    @classmethod
    def from_dict(cls, data: dict) -> TranscriptStore:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(
                f"not a transcript store: expected format {FORMAT!r}, got "
                f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}"
            )
        try:
            spans = {int(s["id"]): Span(**s) for s in data["spans"]}
            log = [EvictionRecord(**r) for r in data["eviction_log"]]
            store = cls(
                max_live_tokens=data["max_live_tokens"],
                protect_fraction=data["protect_fraction"],
                salience_decay=data["salience_decay"],
                eviction_log_size=data["eviction_log_size"],
                spans=spans,
                step=int(data["step"]),
                next_id=int(data["next_id"]),
                eviction_log=deque(log),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"transcript store data is incomplete or malformed: {e}") from e
        if spans and store.next_id <= max(spans):
            raise ValueError("transcript store data is inconsistent: next_id is not above every span id")
        return store
