"""What the online loop learns from: interactions, the buffer that batches them, a replay reservoir, fallback inputs.

- `Interaction`: one step of the agent's trace, as token ids: the history the memory was written from (`context`),
  the user's input (`query`) and the delivered response (`response`).
- `InteractionBuffer`: the recent buffer B of Algorithm 1; drained into one update when it holds a batch.
- `ReplayReservoir`: a uniform sample of every interaction seen so far (Vitter's algorithm R), so an update mixes old
  interactions with new ones; its sampling uses its own seeded generator, so a restored run replays the same items.
- `corrupt_spans`: the T5-style corruption that span denoising trains on.
- `FallbackQueue`: memory inputs whose latents failed the safety check (taken from `FallbackLog` events); later
  updates train on them so the encoder learns to stay within bounds for such inputs.

Everything here is plain data with `to_dict` / `from_dict`, so the loop's state can be checkpointed as JSON. Each of
the three containers has `forget(scope)`, which drops every item of that scope (a deleted user's interactions and
fallback inputs are never trained on again).
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import asdict, dataclass, field


@dataclass
class Interaction:
    id: int
    """Unique and increasing within one learner (the privacy accountant counts participations by it)."""
    context: list[int]
    """Token ids of the history the memory was written from (most recent last); may be empty."""
    query: list[int]
    """Token ids of the user's input x_t."""
    response: list[int]
    """Token ids of the delivered response y_t."""
    scope: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Interaction:
        return cls(**d)


@dataclass
class InteractionBuffer:
    batch_size: int
    items: list[Interaction] = field(default_factory=list)

    def append(self, item: Interaction) -> None:
        self.items.append(item)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.batch_size

    def drain(self) -> list[Interaction]:
        items, self.items = self.items, []
        return items

    def forget(self, scope: str) -> int:
        """Drop the interactions of `scope`; returns how many."""
        kept = [it for it in self.items if it.scope != scope]
        dropped, self.items = len(self.items) - len(kept), kept
        return dropped

    def __len__(self) -> int:
        return len(self.items)


def random_state(rng: random.Random) -> list:
    """`rng`'s state as JSON-able lists (what `restore_random` takes back)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def restore_random(rng: random.Random, state: list) -> None:
    """Set `rng` to a state `random_state` returned."""
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


class ReplayReservoir:
    """A uniform random sample of at most `capacity` of all items ever offered (algorithm R)."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 0:
            raise ValueError(f"replay capacity must be >= 0 (got {capacity})")
        self.capacity = capacity
        self.items: list[Interaction] = []
        self.seen = 0
        self.rng = random.Random(seed)

    def add(self, item) -> bool:
        """Offer `item` (an `Interaction`, or anything with `id` and `scope`); returns whether it was kept."""
        self.seen += 1
        if self.capacity == 0:
            return False
        if len(self.items) < self.capacity:
            self.items.append(item)
            return True
        j = self.rng.randrange(self.seen)
        if j < self.capacity:
            self.items[j] = item
            return True
        return False

    def sample(self, k: int, exclude: set[int] | None = None) -> list[Interaction]:
        pool = [it for it in self.items if not exclude or it.id not in exclude]
        return self.rng.sample(pool, min(k, len(pool)))

    def forget(self, scope: str) -> int:
        """Drop the interactions of `scope`; returns how many. `seen` is kept, so the freed places fill up again
        at the rate of algorithm R (the rest of the sample stays uniform over what it was drawn from)."""
        kept = [it for it in self.items if it.scope != scope]
        dropped, self.items = len(self.items) - len(kept), kept
        return dropped

    def __len__(self) -> int:
        return len(self.items)

    def to_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "seen": self.seen,
            "items": [it.to_dict() for it in self.items],
            "rng": random_state(self.rng),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ReplayReservoir:
        r = cls(int(d["capacity"]))
        r.seen = int(d["seen"])
        r.items = [Interaction.from_dict(it) for it in d["items"]]
        restore_random(r.rng, d["rng"])
        return r


class FallbackQueue:
    """Memory inputs that fell back, waiting to be trained on, each with the scope it came from (None when
    unknown). Subscribe it to a `FallbackLog`; thread-safe."""

    def __init__(self, maxlen: int = 64):
        self.items: deque[list[int]] = deque(maxlen=maxlen)
        self.scopes: deque[str | None] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self.received = 0

    def __call__(self, event) -> None:
        ids = event.detail.get("input_ids") if event.detail else None
        if not ids:
            return
        with self._lock:
            self.items.append([int(i) for i in ids])
            self.scopes.append(getattr(event, "scope", None))
            self.received += 1

    def pop(self, k: int) -> list[list[int]]:
        with self._lock:
            n = min(k, len(self.items))
            out = [self.items.popleft() for _ in range(n)]
            for _ in range(n):
                self.scopes.popleft()
        return out

    def forget(self, scope: str) -> int:
        """Drop the inputs of `scope`; returns how many."""
        with self._lock:
            kept = [(s, ids) for s, ids in zip(self.scopes, self.items, strict=True) if s != scope]
            dropped = len(self.items) - len(kept)
            self.items.clear()
            self.scopes.clear()
            for s, ids in kept:
                self.scopes.append(s)
                self.items.append(ids)
        return dropped

    def __len__(self) -> int:
        return len(self.items)

    def to_dict(self) -> dict:
        with self._lock:
            return {
                "maxlen": self.items.maxlen,
                "received": self.received,
                "items": [list(i) for i in self.items],
                "scopes": list(self.scopes),
            }

    def restore(self, d: dict) -> None:
        """Replace the contents with those of `to_dict()` output, in place (subscriptions stay)."""
        items = d["items"]
        scopes = d.get("scopes") or [None] * len(items)  # states saved before scopes were kept
        with self._lock:
            self.items.clear()
            self.scopes.clear()
            for s, ids in zip(scopes, items, strict=True):
                self.scopes.append(s)
                self.items.append([int(i) for i in ids])
            self.received = int(d["received"])

    @classmethod
    def from_dict(cls, d: dict) -> FallbackQueue:
        q = cls(int(d["maxlen"]))
        q.restore(d)
        return q


def corrupt_spans(
    row: list[int], rng: random.Random, ratio: float, mean_span: float, drop: float, mask_id: int
) -> list[int]:
    """T5-style corruption: about `ratio` of the tokens in geometric spans, each span replaced by one `mask_id`
    or (with probability `drop`) dropped. At least one token is corrupted; never returns an empty row."""
    n = len(row)
    keep = [True] * n
    budget = max(1, round(ratio * n))
    while budget > 0:
        span = min(
            budget, n, 1 + int(rng.expovariate(1.0 / max(mean_span - 1.0, 1e-6))) if mean_span > 1 else 1
        )
        start = rng.randrange(0, n - span + 1)
        for j in range(start, start + span):
            keep[j] = False
        budget -= span
    out, i = [], 0
    while i < n:
        if keep[i]:
            out.append(row[i])
            i += 1
            continue
        while i < n and not keep[i]:
            i += 1
        if rng.random() >= drop:
            out.append(mask_id)
    return out or [mask_id]
