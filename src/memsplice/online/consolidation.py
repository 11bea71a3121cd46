"""Write consolidation: hold what the memory writes for past interactions, whatever they said.

EWC pulls the weights towards one past state and the skill guard holds a canary of one kind of question; measured
on the stability stream, neither held facts told early in a stream that never repeats them (`README`, "Stability").
Write consolidation constrains the function instead of the weights. Because the reasoner is frozen, what it can
answer from a memory depends only on the K/V and gate the memory wrote: a memory that still writes, for an old
history, the K/V it wrote then still answers from it what it answered then, whatever kind of fact it holds.

So a `WriteConsolidation` keeps, for a uniform sample of past interactions (algorithm R, `capacity` of them), the
memory input (the last `context_tokens` of the history) and the gated K/V the memory wrote for it right after the
update that saw it. Every update adds, for `per_update` of them, the relative squared error between what the memory
writes for that input now and what it wrote then (keys and values, over every layer, divided by the stored K/V's
squared norm), plus the squared error of the gate. This is dark experience replay (Buzzega et al., 2020, "Dark
Experience for General Continual Learning") with the memory's write as the stored output; the targets are never
refreshed, so the drift it resists does not accumulate the way a refreshed anchor lets it.

Cost: one extra encoder pass (with autograd) over `per_update` short inputs per update, and the stored K/V: for
SmolLM2-135M with 16 slots, 2 x 30 layers x 3 heads x 16 slots x 64 = 184k numbers per item (368 KB in bf16), so the
default 256 items hold 94 MB on the memory's device. Targets are users' data written by earlier weights: not
available with the privacy options (the learner refuses the combination). `forget(scope)` drops a scope's targets.
A skill guard's rollback (`OnlineLearner.roll_back`) restores the weights but keeps the writes held since the last
anchor refresh: they are what the rolled-back weights wrote for those histories, a target as good as any other.

Measured on the stability stream (H200, README "Stability"): with weight 1000 on top of EWC and replay, facts told
early held within 2% (asked in the eval reader's prompt; +26% asked bare) over 6,556 updates, where EWC and replay
alone lost 38.5%.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..memory.model import MemoryModel, pad_rows
from .buffer import Interaction, ReplayReservoir, random_state, restore_random


@dataclass
class WriteTarget:
    id: int
    """The interaction's id in the learner."""
    scope: str | None
    input_ids: list[int]
    """What the memory was written from."""
    kv: torch.Tensor
    """(2, L, H, M, D): the keys and values written then, in the reasoner's dtype."""
    gate: torch.Tensor
    """(L, M) float32: the gate written then (exp of the log-gate)."""


class WriteConsolidation:
    """A reservoir of (memory input, K/V written then) with the consolidation loss; see the module docstring."""

    def __init__(self, capacity: int, max_tokens: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"write consolidation needs capacity >= 1 (got {capacity})")
        if max_tokens < 1:
            raise ValueError(f"write consolidation needs max_tokens >= 1 (got {max_tokens})")
        self.max_tokens = max_tokens
        self.reservoir = ReplayReservoir(capacity, seed=seed)
        """Algorithm R over the held `WriteTarget`s (its `forget(scope)` works on them as on interactions)."""

    @property
    def targets(self) -> list[WriteTarget]:
        return self.reservoir.items

    @property
    def capacity(self) -> int:
        return self.reservoir.capacity

    @property
    def seen(self) -> int:
        return self.reservoir.seen

    def __len__(self) -> int:
        return len(self.targets)

    # -- recording -------------------------------------------------------------------------------------------
    def offer(self, memory: MemoryModel, items: list[Interaction]) -> int:
        """Offer `items` to the reservoir (algorithm R), with the memory they are written into now (no autograd, no
        refinement) as their targets. Returns how many were kept."""
        items = [it for it in items if it.context]
        if not items:
            return 0
        inputs = [it.context[-self.max_tokens :] for it in items]
        with torch.no_grad():
            kv, gate, live = self._write(memory, inputs)
        kept = 0
        for k, it in enumerate(items):
            if bool(live[k]):  # a write the safety check refused is no target to hold
                target = WriteTarget(it.id, it.scope, inputs[k], kv[:, :, k].clone(), gate[k].clone())
                kept += self.reservoir.add(target)
        return kept

    # -- the loss --------------------------------------------------------------------------------------------
    def sample(self, k: int, rng: random.Random) -> list[WriteTarget]:
        return rng.sample(self.targets, min(k, len(self.targets)))

    def loss(self, memory: MemoryModel, targets: list[WriteTarget]) -> torch.Tensor | None:
        """Mean over `targets` of |kv - kv*|^2 / |kv*|^2 + mean (g - g*)^2, written now with autograd; None when
        nothing can be compared (no targets, or every write fell back)."""
        if not targets:
            return None
        kv, gate, live = self._write(memory, [t.input_ids for t in targets])
        if not bool(live.any()):
            return None
        stored = torch.stack([t.kv for t in targets], dim=2).to(kv.device)  # (2, L, B, H, M, D)
        stored_gate = torch.stack([t.gate for t in targets]).to(gate.device)  # (B, L, M)
        dims = (0, 1, 3, 4, 5)
        err = (kv.float() - stored.float()).pow(2).sum(dims) / stored.float().pow(2).sum(dims).clamp_min(1e-6)
        gate_err = (gate - stored_gate).pow(2).mean((1, 2))
        per_item = (err + gate_err)[live]
        return per_item.mean()

    def _write(self, memory: MemoryModel, inputs: list[list[int]]):
        """(kv (2, L, B, H, M, D), gate (B, L, M) float32, live (B,)) of one unrefined write of `inputs`."""
        ids, mask = pad_rows(inputs, pad_id=0, device=memory.reasoner.device)
        written = memory.write(ids, mask, refine_steps=0)
        m = written.kv
        kv = m.stacked(
            m.keys[0].dtype, m.keys[0].device
        )  # same dtype and device: still on the autograd graph
        return kv, torch.exp(m.gate_bias.float()), m.live

    # -- scopes and persistence ------------------------------------------------------------------------------
    def forget(self, scope: str) -> int:
        """Drop the targets of `scope`; returns how many (`seen` is kept: `ReplayReservoir.forget`)."""
        return self.reservoir.forget(scope)

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "max_tokens": self.max_tokens,
            "seen": self.seen,
            "rng": random_state(self.reservoir.rng),
            "items": [{"id": t.id, "scope": t.scope, "input_ids": t.input_ids} for t in self.targets],
            "kv": [t.kv for t in self.targets],
            "gate": [t.gate for t in self.targets],
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["capacity"]) != self.capacity or int(state["max_tokens"]) != self.max_tokens:
            raise ValueError(
                "write consolidation state was saved with capacity "
                f"{state['capacity']} and max_tokens {state['max_tokens']}, this learner has "
                f"{self.capacity} and {self.max_tokens}"
            )
        items, kvs, gates = state["items"], state["kv"], state["gate"]
        if not (len(items) == len(kvs) == len(gates)):
            raise ValueError("write consolidation state: items, kv and gate lists differ in length")
        self.reservoir.seen = int(state["seen"])
        restore_random(self.reservoir.rng, state["rng"])
        self.reservoir.items = [
            WriteTarget(int(d["id"]), d["scope"], list(d["input_ids"]), kv, gate.float())
            for d, kv, gate in zip(items, kvs, gates, strict=True)
        ]


def ensure_consolidation(learner) -> None:
    """Give `learner` the write consolidation its config asks for: a new, empty store when
    `consolidation_weight` > 0 and it has none (e.g. a learner resumed under new settings), none when the weight is
    0, and the store trimmed to `consolidation_capacity` when that shrank."""
    cfg = learner.config
    if cfg.consolidation_weight <= 0:
        learner.consolidation = None
        return
    if cfg.privacy is not None:
        raise ValueError(
            "write consolidation is not available with privacy (see OnlineConfig.consolidation_weight)"
        )
    held = learner.consolidation
    if held is None:
        learner.consolidation = WriteConsolidation(
            cfg.consolidation_capacity,
            min(cfg.context_tokens, learner.memory.config.max_memory_tokens),
            seed=cfg.seed + 3,
        )
        return
    held.reservoir.capacity = cfg.consolidation_capacity
    del held.reservoir.items[cfg.consolidation_capacity :]
