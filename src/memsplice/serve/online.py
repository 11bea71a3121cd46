"""The online learner the server's `OnlineWorker` drives: `memsplice.online.OnlineLearner` behind the worker's
interface (`update(samples, replay) -> metrics`, `state_dict()`, plus `forget(scope)` and `persist()`).

What a queued sample is: one memory write of a scope, as `training_sample` builds it on the inference worker when
the write happens: the turns' text, the token ids of the scope's history before the write (`context`, what the
next-token objective writes into memory), and the token ids of the written turns with the conversation's turn
template applied (`query`: the turns up to a final assistant turn; `response`: that assistant turn, when there is
one). A chat exchange is therefore exactly the interaction `OnlineLearner.observe_exchange` would record. Samples are
tokenized when they are written, so the online thread never touches the tokenizer.

Guarantees:
- Training runs on the learner's own copy of the memory weights; serving weights change only when the worker swaps
  `state_dict()` in as one inference-worker job, so a request sees the old weights or the new ones, never a mix.
- Replay and EWC are the learner's own (`OnlineConfig.replay_per_update`, `ewc_weight`, `anchor_interval`): its
  reservoir is the replay, so `update` ignores the store replay the worker may pass (`keeps_replay` tells the
  server not to fetch or keep one).
- Fallback inputs of served requests (the serving memory's fallback log) reach the learner's fallback queue with
  their scope, as do those of its own training passes.
- `forget(scope)` drops the scope's interactions from the learner's buffer, replay reservoir, fallback queue and held writes;
  followed by `persist()`, the saved state holds none of them either.
- `persist()` writes the learner's state (its memory, optimizer, EWC anchor and Fisher, reservoir, counters) to
  `state_dir` atomically (a sibling temporary directory renamed into place); `build_online_learner` resumes it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import fields
from pathlib import Path

import torch

from ..atomic import atomic_directory
from ..memory.model import MemoryModel
from ..online import (
    Interaction,
    OnlineConfig,
    OnlineLearner,
    default_guard,
    default_rehearsal,
    ensure_consolidation,
    ensure_guard,
    ensure_rehearsal,
)
from ..online.loop import STATE_NAME
from .scope_memory import weights_digest

logger = logging.getLogger(__name__)


def training_sample(
    turns: list[tuple[str, str]], context: list[int], turn_ids: list[tuple[str, list[int]]]
) -> dict:
    """The queued payload of one memory write: `turns` (role, text), the history token ids before the write
    (`context`) and each written turn's token ids (`turn_ids`, as `ScopeMemory.turn_token_ids` gives them)."""
    assert len(turn_ids) == len(turns), f"{len(turns)} turns were written but {len(turn_ids)} were found"
    answered = len(turn_ids) > 0 and turn_ids[-1][0] == "assistant"
    asked = turn_ids[:-1] if answered else turn_ids
    return {
        "turns": [{"role": r, "text": x} for r, x in turns],
        "context": list(context),
        "query": [i for _, ids in asked for i in ids],
        "response": list(turn_ids[-1][1]) if answered else [],
    }


def interaction_from_sample(sample: dict) -> Interaction | None:
    """The `Interaction` of a queued sample (with its "scope"), or None for a sample without token ids."""
    query, response = sample.get("query"), sample.get("response")
    if not isinstance(query, list) or not isinstance(response, list) or not (query or response):
        return None
    return Interaction(
        id=-1,
        context=[int(i) for i in sample.get("context") or []],
        query=[int(i) for i in query],
        response=[int(i) for i in response],
        scope=sample.get("scope"),
    )


class ServerOnlineLearner:
    """`OnlineLearner` behind the `OnlineWorker` interface. Called only from the online worker's thread."""

    keeps_replay = True
    """The learner replays from its own reservoir: the worker should neither fetch nor keep store replay."""

    def __init__(self, learner: OnlineLearner, state_dir: str | os.PathLike | None = None):
        self.learner = learner
        self.state_dir = Path(state_dir) if state_dir is not None else None

    @property
    def memory(self) -> MemoryModel:
        """The learner's own copy of the memory (never the one serving requests)."""
        return self.learner.memory

    def update(self, samples: list[dict], replay: list[dict]) -> dict[str, float]:
        """One `OnlineLearner` update on `samples` (replay comes from the learner's reservoir, not `replay`)."""
        items = [it for it in map(interaction_from_sample, samples) if it is not None]
        skipped = len(samples) - len(items)
        if skipped:
            logger.warning("online update: %d queued samples carry no token ids and were skipped", skipped)
        if not items:
            return {"skipped": float(skipped)}
        stats, refreshed = self.learner.observe_batch(items)
        return {
            "loss": stats.loss,
            **{f"loss_{name}": value for name, value in stats.parts.items()},
            "grad_norm": stats.grad_norm,
            "replayed": float(stats.replayed),
            "fallbacks": float(stats.fallbacks),
            "anchor_refreshed": float(refreshed),
            "skipped": float(skipped),
            **({"epsilon": stats.epsilon} if stats.epsilon is not None else {}),
        }

    def state_dict(self) -> dict:
        """A copy of the trained weights (the serving model loads it while training goes on)."""
        return {k: v.detach().clone() for k, v in self.learner.memory.state_dict().items()}

    def forget(self, scope: str) -> int:
        """Drop `scope`'s interactions and fallback inputs from the learner; returns how many."""
        return self.learner.forget(scope)

    def status(self) -> dict:
        """What the learner holds now, for `GET /v1/memory/training`."""
        learner = self.learner
        return {
            "updates": learner.updates,
            "interactions": learner.steps,
            "replay_items": len(learner.reservoir),
            "fallback_inputs": len(learner.fallbacks),
            "anchor_refreshes": learner.anchor.refreshes,
            **(
                {}
                if learner.guard is None
                else {"guard_checks": len(learner.guard.events), "guard_rollbacks": learner.guard.rollbacks}
            ),
            **({} if learner.consolidation is None else {"held_writes": len(learner.consolidation)}),
        }

    def persist(self) -> None:
        """Save the learner's state to `state_dir` atomically (nothing when it has none)."""
        if self.state_dir is None:
            return
        with atomic_directory(self.state_dir) as tmp:
            self.learner.save(tmp)


def copy_memory(memory: MemoryModel) -> MemoryModel:
    """A separate `MemoryModel` on the same (frozen) reasoner with the same weights, and its own fallback log."""
    clone = MemoryModel(type(memory.config).from_dict(memory.config.to_dict()), memory.reasoner)
    load_weights(clone, memory.state_dict())
    clone.eval()
    return clone


def load_weights(memory: MemoryModel, state_dict: dict) -> None:
    """Load `state_dict` into `memory`, untying the encoder's embedding first when the weights carry their own."""
    if "encoder.token_embedding" in state_dict and memory.encoder.embedding_tied:
        memory.encoder.untie_embedding()
    memory.load_state_dict(state_dict, strict=False)


def apply_settings(learner: OnlineLearner, config: OnlineConfig) -> None:
    """Make a resumed learner follow the server's current settings (learning rate, EWC, replay, batching)."""
    old = learner.config
    changed = [f.name for f in fields(OnlineConfig) if getattr(old, f.name) != getattr(config, f.name)]
    if not changed:
        return
    if (old.privacy is None) != (config.privacy is None):
        raise ValueError(
            "the saved online learner was trained with other privacy settings; remove its state directory to "
            "start the learner afresh"
        )
    logger.info("online learner: settings changed since its state was saved: %s", ", ".join(changed))
    learner.config = config
    for group in learner.optimizer.param_groups:
        group["lr"], group["weight_decay"] = config.lr, config.weight_decay
    learner.anchor.weight, learner.anchor.decay = config.ewc_weight, config.fisher_decay
    learner.buffer.batch_size = config.batch_size
    learner.reservoir.capacity = config.replay_capacity
    del learner.reservoir.items[config.replay_capacity :]
    ensure_rehearsal(learner)
    ensure_consolidation(learner)
    ensure_guard(learner, config.guard_tolerance)


def build_online_learner(memory: MemoryModel, config) -> ServerOnlineLearner:
    """The online learner for the serving `memory` under `config` (a `ServeConfig`): resumed from
    `config.online_dir` when it holds a saved state, else new, on a copy of the serving weights."""
    online_config = config.online_config()
    state_dir = config.online_dir
    if (state_dir / STATE_NAME).is_file():
        learner = OnlineLearner.load(state_dir, reasoner=memory.reasoner)
        apply_settings(learner, online_config)
        if weights_digest(learner.memory) != weights_digest(memory):
            # The process stopped between saving the served weights and the learner's state: the served
            # weights are what the stored latents were written with, so training continues from them.
            logger.warning("online learner: its saved weights differ from the served ones; taking the served")
            with torch.no_grad():
                load_weights(learner.memory, memory.state_dict())
        logger.info("online learner resumed from %s after %d updates", state_dir, learner.updates)
    else:
        rehearsal = default_rehearsal(memory) if online_config.rehearsal_per_update else None
        own = copy_memory(memory)
        tolerance = online_config.guard_tolerance
        guard = default_guard(own, tolerance) if tolerance is not None else None
        learner = OnlineLearner(own, online_config, rehearsal=rehearsal, guard=guard)
    memory.fallback_log.subscribe(learner.fallbacks)  # fallbacks of served requests are trained on too
    return ServerOnlineLearner(learner, state_dir)
