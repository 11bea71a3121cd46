"""The online loop (Algorithm 1): answer with memory, deliver, and keep training the memory on its own traces.

    learner = OnlineLearner(memory, OnlineConfig(batch_size=4, anchor_interval=64))
    conv = ConversationMemory(memory, ConversationConfig())
    result = learner.step(conv, "Where did I say my sister lives?")      # lines 2-8 of Algorithm 1
    result.response, result.update                                       # the answer; UpdateStats when one ran

For each interaction step t (`step`): the memory is written from the transcript T_<t (the conversation memory,
updated incrementally), gated and injected; the reasoner generates y_t for x_t; y_t is delivered; x_t and y_t are
appended to the transcript and (x_t, y_t, the history) to the buffer B. When B holds `batch_size` interactions the
memory is updated once (`update`) and B is cleared; every `anchor_interval` steps the EWC anchor is refreshed
(phi' <- phi) and the Fisher information re-estimated. `observe` does the same for a trace produced elsewhere (a
server, a benchmark stream), without generating; `observe_batch` takes a whole batch gathered elsewhere (a server's
training queue) and updates on it at once.

One update minimises, over the buffer plus `replay_per_update` interactions drawn from the replay reservoir:
  next-token  (`train.objectives.continuation`): memory of the history -> the reasoner predicts x_t y_t;
  denoising   (`train.objectives.denoising`): the encoder reads x_t y_t with spans masked or dropped, the reasoner
              restores it, so the memory learns to store what the conversation says;
  InfoNCE     (`train.objectives.infonce`, weight lambda_c): pooled latents of x_t and y_t are pulled together;
  EWC         (`ElasticAnchor`, weight lambda_ewc): (lambda/2) sum F (phi - phi')^2 towards the slow anchor;
  rehearsal   (`online.rehearsal`, optional): the answer loss of questions read from memories of their evidence,
              so that the skill of answering from memory is trained on even when the stream never asks;
  consolidation (`online.consolidation`, optional, weight lambda_w): the relative error between what the memory
              writes now for a sample of past histories and what it wrote for them then, so old memories keep
              reading the same;
plus, for memory inputs that failed the safety check (queued from the fallback log), denoising on that input and a
hinge on latent norms above half the safety bound, so the encoder learns to stay within it.

With a skill guard (`online.guard`, `OnlineConfig.guard_tolerance`), each anchor refresh is first a check: the memory
answers a fixed canary set from memory, and when its score fell more than the tolerance below the starting score,
the updates since the last refresh are rolled back to the anchor instead of becoming it.

Guarantees: the reasoner stays frozen (asserted after every update); the memory is in eval mode outside updates;
the learner's state (optimizer, anchor, Fisher, reservoir, buffer, counters, privacy accounting) is saved and
restored by `save` / `load`; a `ConversationMemory` using this memory re-encodes itself after an update (it notices
the new weights); `forget(scope)` removes every interaction and fallback input of a scope from the buffer, the replay
reservoir, the fallback queue and the held writes of write consolidation, so nothing of it is trained on afterwards (what earlier updates learned from it
stays in the weights). The learner's methods may be called from several threads: they serialise on one lock.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..memory.model import MemoryModel, pad_rows
from ..reasoner.identity import assert_frozen
from ..train.fast_reader import fast_reading, shared_reader
from ..train.objectives import ObjectiveResult, PairBatch, answer_groups, infonce
from .buffer import (
    FallbackQueue,
    Interaction,
    InteractionBuffer,
    ReplayReservoir,
    corrupt_spans,
    random_state,
    restore_random,
)
from .consolidation import WriteConsolidation, ensure_consolidation
from .ewc import ElasticAnchor
from .guard import SkillGuard
from .privacy import PrivacyAccountant, PrivacyConfig, private_gradients
from .rehearsal import RehearsalSet

logger = logging.getLogger(__name__)

STATE_NAME = "online_state.json"
TENSORS_NAME = "online_tensors.pt"
DEFAULT_INSTRUCTION = "<|im_start|>user\nRepeat the text.<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class OnlineConfig:
    batch_size: int = 4
    """|B|: interactions that trigger one update (Algorithm 1, line 7)."""
    lr: float = 5e-5
    """AdamW learning rate (the memory arrives trained; online steps are small corrections)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float = 1.0
    """Gradient norm clip of an update (without privacy; with privacy each sample is clipped instead)."""
    next_token_weight: float = 1.0
    """Weight of next-token prediction of x_t y_t from the memory of the history."""
    denoise_weight: float = 0.5
    """Weight of span denoising of x_t y_t."""
    objective_schedule: str = "all"
    """"all": next-token and denoising in every update; "alternate": one of the two per update, in turn (half the
    reasoner passes per update, for long streams on a budget). InfoNCE (encoder only) runs in every update."""
    contrastive_weight: float = 0.1
    """lambda_c: weight of InfoNCE on (query, answer) pairs (needs two or more interactions in an update)."""
    temperature: float = 0.05
    """InfoNCE temperature."""
    ewc_weight: float = 10.0
    """lambda_ewc: weight of the EWC penalty (the Fisher is normalised to mean 1)."""
    anchor_interval: int = 64
    """T_a: interaction steps between anchor refreshes (Algorithm 1, line 9)."""
    fisher_samples: int = 4
    """Interactions (from the replay reservoir) whose per-sample gradients estimate the Fisher at a refresh."""
    fisher_decay: float = 0.5
    """Weight of the old Fisher when a new estimate is added (online EWC)."""
    replay_capacity: int = 2048
    """Interactions kept in the replay reservoir (a uniform sample of all seen)."""
    replay_per_update: int = 4
    """Replayed interactions mixed into each update (0: no replay)."""
    fallback_capacity: int = 64
    """Fallback inputs kept waiting for training."""
    fallback_per_update: int = 1
    """Fallback inputs trained on per update."""
    fallback_norm_weight: float = 1.0
    """Weight of the hinge that pushes latent norms of fallback inputs below half the safety bound."""
    rehearsal_per_update: int = 0
    """Rehearsal items (questions answered from a memory of their evidence, `online.rehearsal`) whose answer loss
    each update adds, so that learning from the stream keeps the skill of answering from memory (0: off; needs a
    `RehearsalSet` given to the learner)."""
    rehearsal_weight: float = 1.0
    """Weight of the rehearsal answer loss."""
    consolidation_weight: float = 0.0
    """Write consolidation (`online.consolidation`): weight of the relative error between what the memory writes now
    for a sample of past interactions' histories and what it wrote for them right after it saw them (0: off)."""
    consolidation_capacity: int = 256
    """Past interactions whose writes are held (a uniform sample of all seen; each holds its K/V on the device)."""
    consolidation_per_update: int = 4
    """Held writes compared per update."""
    guard_tolerance: float | None = None
    """Skill guard (`online.guard`): at every anchor refresh, roll the memory back to the anchor when its canary
    score fell more than this share below the starting score (e.g. 0.01; None: no guard; needs a `SkillGuard` given
    to the learner)."""
    context_tokens: int = 256
    """Most history tokens the next-token objective writes into memory (capped by max_memory_tokens)."""
    target_tokens: int = 64
    """Most tokens of x_t y_t predicted (next-token) or restored (denoising)."""
    denoise_source: str = "interaction"
    """What span denoising restores: "interaction" (x_t y_t, what the conversation just added) or "context" (a
    random `target_tokens` window of the history the memory is written from)."""
    denoise_ratio: float = 0.15
    """Share of tokens corrupted for denoising."""
    denoise_span: float = 3.0
    """Mean corrupted span length (geometric)."""
    denoise_drop: float = 0.5
    """Probability that a corrupted span is dropped rather than replaced by one mask token."""
    instruction: str = DEFAULT_INSTRUCTION
    """What the reasoner reads between the memory and the text it restores (denoising), as in formation."""
    privacy: PrivacyConfig | None = None
    """Per-sample clipping with Gaussian noise and a latent norm bound (None: off)."""
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.privacy, dict):
            self.privacy = PrivacyConfig(**self.privacy)

        def need(cond: bool, name: str, msg: str):
            if not cond:
                raise ValueError(f"OnlineConfig.{name}: {msg} (got {getattr(self, name)!r})")

        for name in ("batch_size", "anchor_interval", "context_tokens", "target_tokens"):
            v = getattr(self, name)
            need(isinstance(v, int) and v > 0, name, "must be a positive integer")
        for name in (
            "fisher_samples",
            "replay_capacity",
            "replay_per_update",
            "fallback_capacity",
            "fallback_per_update",
            "rehearsal_per_update",
            "consolidation_per_update",
        ):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 0, name, "must be a non-negative integer")
        for name in ("lr", "max_grad_norm", "temperature"):
            need(getattr(self, name) > 0, name, "must be positive")
        for name in (
            "weight_decay",
            "next_token_weight",
            "denoise_weight",
            "contrastive_weight",
            "ewc_weight",
            "fallback_norm_weight",
            "rehearsal_weight",
            "consolidation_weight",
        ):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(
            isinstance(self.consolidation_capacity, int) and self.consolidation_capacity > 0,
            "consolidation_capacity",
            "must be a positive integer",
        )
        need(
            self.consolidation_weight == 0 or self.privacy is None,
            "consolidation_weight",
            "write consolidation holds K/V written from users' data, outside per-sample clipping and noise: "
            "it is not available with privacy (set it to 0 or drop privacy)",
        )
        need(
            self.next_token_weight + self.denoise_weight + self.contrastive_weight > 0,
            "next_token_weight",
            "at least one of next_token_weight, denoise_weight, contrastive_weight must be positive",
        )
        need(
            self.denoise_source in ("interaction", "context"),
            "denoise_source",
            'must be "interaction" or "context"',
        )
        need(
            self.objective_schedule in ("all", "alternate"),
            "objective_schedule",
            'must be "all" or "alternate"',
        )
        need(0.0 <= self.fisher_decay <= 1.0, "fisher_decay", "must be in [0, 1]")
        need(
            self.guard_tolerance is None or 0.0 <= self.guard_tolerance < 1.0,
            "guard_tolerance",
            "must be None or in [0, 1)",
        )
        need(0.0 < self.denoise_ratio < 1.0, "denoise_ratio", "must be in (0, 1)")
        need(self.denoise_span >= 1.0, "denoise_span", "must be >= 1")
        need(0.0 <= self.denoise_drop <= 1.0, "denoise_drop", "must be in [0, 1]")
        need(self.target_tokens >= 2, "target_tokens", "must be >= 2")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["privacy"] = None if self.privacy is None else self.privacy.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OnlineConfig:
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"unknown OnlineConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**d)


@dataclass
class ReadRows:
    """Rows of one objective that reads a memory: memory input -> [memory][prompt] -> target (teacher-forced)."""

    memory_inputs: list[list[int]]
    prompts: list[list[int]]
    targets: list[list[int]]


@dataclass
class UpdateStats:
    update: int
    """1-based index of this update."""
    loss: float
    parts: dict[str, float]
    """Each term of the loss (unweighted), e.g. {"next_token": 2.1, "denoising": 1.3, "ewc": 0.01}."""
    samples: int
    """New interactions in the update."""
    replayed: int
    fallbacks: int
    grad_norm: float
    seconds: float
    epsilon: float | None = None
    """Privacy spent so far (worst case over interactions), when privacy is on."""


@dataclass
class StepResult:
    response: str
    response_ids: list[int]
    slots: int
    """Memory slots the reasoner read."""
    gate: dict[str, float] | None
    """Mean, min and max gate over the slots read (None without live memory)."""
    answer_seconds: float
    write_seconds: float
    """Time to add x_t and y_t to the conversation memory."""
    update: UpdateStats | None = None
    anchor_refreshed: bool = False
    fallbacks: list[str] = field(default_factory=list)


class OnlineLearner:
    def __init__(
        self,
        memory: MemoryModel,
        config: OnlineConfig | None = None,
        rehearsal: RehearsalSet | None = None,
        guard: SkillGuard | None = None,
    ):
        self.memory = memory
        self.config = cfg = config or OnlineConfig()
        if cfg.rehearsal_per_update > 0 and rehearsal is None:
            raise ValueError(
                "OnlineConfig.rehearsal_per_update > 0 needs a rehearsal set: "
                "OnlineLearner(memory, config, rehearsal=rehearsal_from_synthetic(reasoner))"
            )
        self.rehearsal = rehearsal
        if cfg.guard_tolerance is not None and guard is None:
            raise ValueError(
                "OnlineConfig.guard_tolerance needs a skill guard: "
                "OnlineLearner(memory, config, guard=default_guard(memory, config.guard_tolerance))"
            )
        if guard is not None:
            if cfg.guard_tolerance is None:
                raise ValueError("a skill guard was given but OnlineConfig.guard_tolerance is None")
            guard.tolerance = cfg.guard_tolerance
        self.guard = guard
        self.reasoner = memory.reasoner
        if cfg.privacy is not None and cfg.privacy.latent_norm_clip is not None:
            memory.config.latent_norm_clip = cfg.privacy.latent_norm_clip
        self.buffer = InteractionBuffer(cfg.batch_size)
        self.reservoir = ReplayReservoir(cfg.replay_capacity, seed=cfg.seed)
        self.fallbacks = FallbackQueue(cfg.fallback_capacity)
        self.consolidation: WriteConsolidation | None = None
        ensure_consolidation(self)
        memory.fallback_log.subscribe(self.fallbacks)
        self.rng = random.Random(cfg.seed + 1)
        self.noise = torch.Generator().manual_seed(cfg.seed + 2)
        self.optimizer = self._build_optimizer()
        self.anchor = ElasticAnchor(memory, weight=cfg.ewc_weight, decay=cfg.fisher_decay)
        self.accountant = (
            PrivacyAccountant(cfg.privacy.noise_multiplier, cfg.privacy.delta)
            if cfg.privacy is not None
            else None
        )
        self.steps = 0
        self.updates = 0
        self.next_id = 0
        self.history: list[UpdateStats] = []
        tok = self.reasoner.tokenizer
        instruction = tok(cfg.instruction, add_special_tokens=False)["input_ids"] if tok is not None else [0]
        self.instruction_ids = list(instruction or [0])
        self.mask_id = (
            tok.unk_token_id
            if tok is not None and tok.unk_token_id is not None
            else (tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0)
        )
        self._lock = threading.RLock()
        memory.eval()
        if guard is not None:
            guard.start(memory)  # the reference: the canary score of the weights the learner starts from

    # -- Algorithm 1 -----------------------------------------------------------------------------------------
    def step(
        self,
        conversation,
        user_text: str,
        *,
        system: str | None = None,
        max_new_tokens: int = 64,
        **generate_kwargs,
    ) -> StepResult:
        """One interaction: answer `user_text` with the conversation's memory, deliver, record, maybe update."""
        if not isinstance(user_text, str) or not user_text.strip():
            raise ValueError("step: user_text must be a non-empty string")
        tok = self.reasoner.require_tokenizer()
        with self._lock:
            context = self.history_ids(conversation)
            kv = conversation.read(user_text)  # z_t, g_t, K/V from the transcript so far (as configured)
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": user_text}
            ]
            prompt = torch.tensor([self.reasoner.chat_ids(messages)], device=self.reasoner.device)
            t0 = time.perf_counter()
            generate_kwargs.setdefault("do_sample", False)
            out = self.memory.generate(prompt, memory=kv, max_new_tokens=max_new_tokens, **generate_kwargs)
            answer_s = time.perf_counter() - t0
            response_ids = out[0, prompt.shape[1] :].tolist()
            response = tok.decode(response_ids, skip_special_tokens=True).strip()
            if kv is not None and conversation.config.track_attention:
                full = torch.cat([prompt, out[:, prompt.shape[1] :]], dim=1)
                query_mask = torch.zeros_like(full, dtype=torch.bool)
                query_mask[:, prompt.shape[1] :] = True
                conversation.probe(full, query_mask=query_mask if query_mask.any() else None)
            w1 = conversation.add_turn("user", user_text)
            w2 = conversation.add_turn("assistant", response)
            update, refreshed = self.observe_exchange(conversation, user_text, response, context)
            gate = None
            if kv is not None:
                g = torch.exp(kv.gate_bias[0].float()).amax(0)  # (S,) per slot, over layers
                gate = {"mean": float(g.mean()), "min": float(g.min()), "max": float(g.max())}
            return StepResult(
                response=response,
                response_ids=response_ids,
                slots=0 if kv is None else kv.num_slots,
                gate=gate,
                answer_seconds=answer_s,
                write_seconds=w1.seconds + w2.seconds,
                update=update,
                anchor_refreshed=refreshed,
                fallbacks=["fallback"] if (w1.fallback or w2.fallback) else [],
            )

    def history_ids(self, conversation) -> list[int]:
        """The most recent live transcript tokens of `conversation` (at most `context_tokens`): the history an
        interaction's next-token objective writes into memory. Take it before the exchange is added."""
        return history_ids(
            conversation, min(self.config.context_tokens, self.memory.config.max_memory_tokens)
        )

    def observe_exchange(
        self, conversation, user_text: str, response: str, context: list[int]
    ) -> tuple[UpdateStats | None, bool]:
        """`observe` for an exchange answered elsewhere (e.g. by `memsplice chat`): `context` is
        `history_ids(conversation)` taken before the exchange was added to the conversation."""
        tok = self.reasoner.require_tokenizer()
        template = conversation.config.turn_template
        interaction = Interaction(
            id=-1,
            context=list(context),
            scope=conversation.config.scope,
            query=tok(template.format(role="user", text=user_text), add_special_tokens=False)["input_ids"],
            response=tok(template.format(role="assistant", text=response), add_special_tokens=False)[
                "input_ids"
            ],
        )
        return self.observe(interaction)

    def observe(self, interaction: Interaction) -> tuple[UpdateStats | None, bool]:
        """Record one interaction (Algorithm 1, line 6); update when the buffer holds a batch (lines 7-8); refresh
        the anchor every `anchor_interval` steps (lines 9-10). Returns (update stats or None, anchor refreshed)."""
        if not interaction.query and not interaction.response:
            raise ValueError("observe: an interaction needs query or response tokens")
        with self._lock:
            interaction.id = self.next_id
            self.next_id += 1
            self.steps += 1
            self.buffer.append(interaction)
            stats = self.update(self.buffer.drain()) if self.buffer.full else None
            refreshed = False
            if self.steps % self.config.anchor_interval == 0:
                refreshed = self.refresh_anchor()
            return stats, refreshed

    def observe_batch(self, items: list[Interaction]) -> tuple[UpdateStats, bool]:
        """Record `items` (a batch gathered elsewhere, e.g. a server's training queue) and update on them at once,
        bypassing the buffer; refresh the anchor when the step count passed a multiple of `anchor_interval`.
        Returns (update stats, anchor refreshed). Ids are assigned here, as `observe` does."""
        if not items:
            raise ValueError("observe_batch: no interactions given")
        for it in items:
            if not it.query and not it.response:
                raise ValueError("observe_batch: an interaction needs query or response tokens")
        with self._lock:
            for it in items:
                it.id = self.next_id
                self.next_id += 1
            before = self.steps
            self.steps += len(items)
            stats = self.update(items)
            interval = self.config.anchor_interval
            refreshed = self.steps // interval > before // interval and self.refresh_anchor()
            return stats, refreshed

    def forget(self, scope: str) -> int:
        """Drop every interaction and fallback input of `scope` (buffer, replay reservoir, fallback queue, held
        writes of write consolidation); returns how many. Waits for an update in flight."""
        with self._lock:
            held = 0 if self.consolidation is None else self.consolidation.forget(scope)
            return (
                self.buffer.forget(scope) + self.reservoir.forget(scope) + self.fallbacks.forget(scope) + held
            )

    # -- one update ------------------------------------------------------------------------------------------
    def update(self, items: list[Interaction]) -> UpdateStats:
        with self._lock:
            return self._update(items)

    def _update(self, items: list[Interaction]) -> UpdateStats:
        cfg = self.config
        t0 = time.perf_counter()
        replay = self.reservoir.sample(cfg.replay_per_update, exclude={it.id for it in items})
        fallback = self.fallbacks.pop(cfg.fallback_per_update)
        rows = items + replay
        self.memory.train()
        autocast = self._autocast()
        try:
            if not self.anchor.fisher and cfg.ewc_weight > 0:
                with autocast:
                    self._estimate_fisher(rows)
            params = self.memory.trainable_parameters()
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.privacy is None:
                with autocast:
                    loss, parts = self._batch_loss(rows, fallback, rehearse=True, consolidate=True)
                if loss.requires_grad:  # not when every row's memory fell back: nothing reaches the weights
                    loss.backward()
                # The EWC gradient goes straight into .grad (the same gradient a backward pass through
                # `anchor.penalty()` adds, without its graph of several ops per parameter).
                parts["ewc"] = self.anchor.accumulate_grad()
                total = loss.detach() + parts["ewc"]
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
            else:
                with autocast:
                    total, parts, grad_norm = self._private_step(rows, fallback, params)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.consolidation is not None:
                with autocast:
                    self.consolidation.offer(self.memory, items)  # what the memory writes for them now
        finally:
            self.memory.eval()
        for it in items:
            self.reservoir.add(it)
        self.updates += 1
        self._maybe_untie_embedding()
        assert_frozen(self.reasoner.model)
        # One device-to-host transfer for every number the stats report (each float() of a tensor would wait for
        # the device on its own).
        loss_value, grad_norm, parts = _host_floats(total, grad_norm, parts)
        stats = UpdateStats(
            update=self.updates,
            loss=loss_value,
            parts=parts,
            samples=len(items),
            replayed=len(replay),
            fallbacks=len(fallback),
            grad_norm=grad_norm,
            seconds=time.perf_counter() - t0,
            epsilon=self.accountant.epsilon() if self.accountant is not None else None,
        )
        self.history.append(stats)
        logger.debug("online update %d: loss %.4f %s", stats.update, stats.loss, parts)
        return stats

    def _autocast(self) -> torch.autocast:
        """bf16 matmuls in the encoder whenever the reasoner runs in bf16: on CUDA, and on CPUs, where bf16 matmuls ran
        3.8x faster than float32 ones (AVX512-BF16). Master weights and optimizer state stay float32. Updates and
        Fisher estimates (at the first update and at each anchor refresh) compute alike."""
        return torch.autocast(
            device_type=self.reasoner.device.type,
            dtype=torch.bfloat16,
            enabled=self.reasoner.dtype == torch.bfloat16,
        )

    def _private_step(self, rows, fallback, params):
        cfg = self.config
        losses = [lambda it=it: self._batch_loss([it], [], contrastive=False)[0] for it in rows]
        losses += [lambda ids=ids: self._batch_loss([], [ids], contrastive=False)[0] for ids in fallback]
        grads, clip = private_gradients(losses, params, cfg.privacy, generator=self.noise)
        fallback_ids = [-(self.fallbacks.received + i + 1) for i in range(len(fallback))]
        self.accountant.record([it.id for it in rows] + fallback_ids)
        self.optimizer.zero_grad(set_to_none=True)
        # The EWC pull is data-independent under privacy (identity Fisher): added after the noise, unclipped.
        ewc = self._l2_anchor_penalty()
        if ewc.requires_grad:
            ewc.backward()
        # Rehearsal items are public synthetic text, not users' data: their gradient is added unclipped, unnoised.
        rehearsed = self._rehearsal_loss()
        if rehearsed is not None:
            (cfg.rehearsal_weight * rehearsed).backward()
        for p, g in zip(params, grads, strict=True):
            p.grad = g.to(p.dtype) if p.grad is None else p.grad + g.to(p.dtype)
        grad_norm = float(torch.sqrt(sum(p.grad.float().pow(2).sum() for p in params if p.grad is not None)))
        parts = {
            "sample_loss": clip.mean_loss,
            "ewc": float(ewc.detach()),
            **({} if rehearsed is None else {"rehearsal": float(rehearsed.detach())}),
            "clipped": float(clip.clipped),
            "mean_sample_grad_norm": clip.mean_norm,
        }
        return clip.mean_loss + float(ewc.detach()), parts, grad_norm

    def _rehearsal_loss(self) -> torch.Tensor | None:
        """The answer loss of `rehearsal_per_update` rehearsal items, each question reading a memory written (with
        autograd) from its own evidence; None when rehearsal is off."""
        reads = self._rehearsal_rows()
        return None if reads is None else self._read({"rehearsal": reads})["rehearsal"].loss

    def _l2_anchor_penalty(self) -> torch.Tensor:
        total = torch.zeros((), device=self.reasoner.device)
        if self.config.ewc_weight == 0:
            return total
        for n, p in self.memory.named_parameters():
            a = self.anchor.anchor.get(n)
            if p.requires_grad and a is not None and a.shape == p.shape:
                total = total + (p.float() - a).pow(2).sum()
        return 0.5 * self.config.ewc_weight * total

    def _batch_loss(
        self,
        rows: list[Interaction],
        fallback: list[list[int]],
        contrastive: bool = True,
        rehearse: bool = False,
        consolidate: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted loss of one update over `rows` and `fallback` inputs (plus rehearsal items with `rehearse`,
        and write consolidation with `consolidate`),
        and its unweighted terms (detached 0-d tensors, left on the device). The objectives that read a memory
        (next-token, denoising, rehearsal) share one encoder call and one reasoner pass (`_read`)."""
        cfg = self.config
        device = self.reasoner.device
        total = torch.zeros((), device=device)
        parts: dict[str, torch.Tensor] = {}
        alternate = cfg.objective_schedule == "alternate" and contrastive  # per-sample losses keep both terms
        use_next = cfg.next_token_weight > 0 and not (
            alternate and self.updates % 2 == 1 and cfg.denoise_weight > 0
        )
        use_denoise = cfg.denoise_weight > 0 and not (alternate and self.updates % 2 == 0 and use_next)
        reads: dict[str, ReadRows] = {}
        if use_next and (next_rows := self._continuation_rows(rows)) is not None:
            reads["next_token"] = next_rows
        if cfg.denoise_source == "context":
            passages = []
            for it in rows:
                start = self.rng.randrange(0, max(1, len(it.context) - cfg.target_tokens + 1))
                passages.append(it.context[start : start + cfg.target_tokens])
        else:
            passages = [(it.query + it.response)[: cfg.target_tokens] for it in rows]
        passages += [ids[: cfg.target_tokens] for ids in fallback]
        if use_denoise and (denoise_rows := self._denoise_rows(passages)) is not None:
            reads["denoising"] = denoise_rows
        if rehearse and (rehearsal_rows := self._rehearsal_rows()) is not None:
            reads["rehearsal"] = rehearsal_rows
        weights = {
            "next_token": cfg.next_token_weight,
            "denoising": cfg.denoise_weight,
            "rehearsal": cfg.rehearsal_weight,
        }
        for name, result in self._read(reads).items():
            total = total + weights[name] * result.loss
            parts[name] = result.loss.detach()
        if contrastive and cfg.contrastive_weight > 0 and (batch := self._pair_batch(rows)) is not None:
            r = infonce(self.memory, batch, cfg.temperature)
            total = total + cfg.contrastive_weight * r.loss
            parts["infonce"] = r.loss.detach()
        if fallback and cfg.fallback_norm_weight > 0:
            ids, mask = pad_rows(
                [f[: self.memory.config.max_memory_tokens] for f in fallback], pad_id=0, device=device
            )
            norms = self.memory.encode(ids, mask).float().norm(dim=-1)  # (F, M)
            bound = 0.5 * self.memory.config.max_latent_norm
            hinge = torch.relu(norms - bound).div(bound).pow(2).mean()
            hinge = torch.nan_to_num(
                hinge, nan=0.0, posinf=0.0
            )  # non-finite latents carry no usable gradient
            total = total + cfg.fallback_norm_weight * hinge
            parts["fallback_norm"] = hinge.detach()
        if consolidate and self.consolidation is not None:
            held = self.consolidation.sample(cfg.consolidation_per_update, self.rng)
            if (drift := self.consolidation.loss(self.memory, held)) is not None:
                total = total + cfg.consolidation_weight * drift
                parts["consolidation"] = drift.detach()
        return total, parts

    def _read(self, reads: dict[str, ReadRows]) -> dict[str, ObjectiveResult]:
        """Each read objective's mean loss: every memory input encoded in one call (padded and masked), every
        [memory][prompt] -> target row in one reasoner pass (`answer_groups`)."""
        if not reads:
            return {}
        inputs = [m for r in reads.values() for m in r.memory_inputs]
        ids, mask = pad_rows(inputs, pad_id=0, device=self.reasoner.device)
        written = self.memory.write(ids, mask)
        prompts = [p for r in reads.values() for p in r.prompts]
        targets = [t for r in reads.values() for t in r.targets]
        sizes = [len(r.prompts) for r in reads.values()]
        # Rows of one length (one objective per update, as the alternate schedule gives) read through the fused
        # decoder functions of `FastReader`: the same values with ~12% fewer ops than the transformers modules; an
        # update of a few short rows is launch-bound on a GPU, and this made it 264 instead of 283 ms on an H200
        # (benchmarks/gpu-runs.md, 2026-11-30 14:45). torch.compile of these reads was no faster there.
        with fast_reading(shared_reader(self.reasoner)):
            results = answer_groups(self.memory, written.kv, prompts, targets, sizes)
        return dict(zip(reads, results, strict=True))

    def _continuation_rows(self, rows: list[Interaction]) -> ReadRows | None:
        """Next-token rows: memory of the last `context_tokens` of the history, then x_t y_t teacher-forced from its
        first token; contexts and targets are cut to the batch's shortest, so rows share lengths."""
        cfg = self.config
        rows = [it for it in rows if it.context and len(it.query) + len(it.response) >= 2]
        if not rows:
            return None
        tc = min(
            min(len(it.context) for it in rows), cfg.context_tokens, self.memory.config.max_memory_tokens
        )
        tf = min(min(len(it.query) + len(it.response) for it in rows), cfg.target_tokens + 1)
        following = [(it.query + it.response)[:tf] for it in rows]
        return ReadRows(
            [it.context[-tc:] for it in rows], [f[:1] for f in following], [f[1:] for f in following]
        )

    def _denoise_rows(self, passages: list[list[int]]) -> ReadRows | None:
        """Denoising rows: memory of the passage with spans corrupted, then the instruction, then the passage."""
        cfg = self.config
        passages = [p for p in passages if len(p) >= 2]
        if not passages:
            return None
        t = min(len(p) for p in passages)
        rows = [p[:t] for p in passages]
        corrupted = [
            corrupt_spans(r, self.rng, cfg.denoise_ratio, cfg.denoise_span, cfg.denoise_drop, self.mask_id)
            for r in rows
        ]
        return ReadRows(corrupted, [self.instruction_ids] * len(rows), rows)

    def _rehearsal_rows(self) -> ReadRows | None:
        """`rehearsal_per_update` rehearsal items: memory of the evidence, then the question, then the answer."""
        if self.rehearsal is None or self.config.rehearsal_per_update == 0:
            return None
        items = self.rehearsal.sample(self.config.rehearsal_per_update, self.rng)
        return ReadRows([it.memory for it in items], [it.prompt for it in items], [it.answer for it in items])

    def _pair_batch(self, rows: list[Interaction]) -> PairBatch | None:
        cfg = self.config
        rows = [it for it in rows if it.query and it.response]
        if len(rows) < 2:
            return None
        t = min(min(len(it.response) for it in rows), cfg.target_tokens)
        query, mask = pad_rows(
            [it.query[: cfg.target_tokens] for it in rows], pad_id=0, device=self.reasoner.device
        )
        passage = torch.tensor(
            [it.response[:t] for it in rows], dtype=torch.long, device=self.reasoner.device
        )
        return PairBatch(query, mask, passage)

    # -- consolidation ---------------------------------------------------------------------------------------
    def refresh_anchor(self) -> bool:
        """phi' <- phi, then add a Fisher estimate from interactions in the replay reservoir; returns True. With a
        skill guard whose check fails, phi <- phi' instead (`roll_back`) and returns False."""
        with self._lock:
            if self.guard is not None and not self.guard.check(self.memory, self.updates):
                self.roll_back()
                return False
            self.anchor.refresh()
            if self.config.ewc_weight > 0 and self.config.privacy is None:
                samples = self.reservoir.sample(self.config.fisher_samples)
                if samples:
                    self.memory.train()
                    try:
                        with self._autocast():
                            self._estimate_fisher(samples)
                    finally:
                        self.memory.eval()
            return True

    def roll_back(self) -> None:
        """Discard every update since the last anchor refresh: the weights go back to the anchor and the optimizer
        forgets the moments those updates built (it starts them afresh, as at the first update)."""
        with self._lock:
            self.anchor.restore()
            self.optimizer.state.clear()

    def _estimate_fisher(self, samples: list[Interaction]) -> int:
        if self.config.privacy is not None:
            return 0
        fns = [lambda it=it: self._batch_loss([it], [], contrastive=False)[0] for it in samples]
        return self.anchor.estimate_fisher(fns[: max(1, self.config.fisher_samples)])

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW with the encoder's own token embedding (once untied) in a second group, so that an optimizer
        state saved before or after the untying loads into a learner built the same way."""
        body = [
            p for n, p in self.memory.named_parameters() if p.requires_grad and n != "encoder.token_embedding"
        ]
        groups = [{"params": body}]
        if not self.memory.encoder.embedding_tied:
            groups.append({"params": [self.memory.encoder.token_embedding]})
        # foreach: a few multi-tensor ops per step instead of several ops per parameter (the default on CUDA too).
        return torch.optim.AdamW(
            groups, lr=self.config.lr, weight_decay=self.config.weight_decay, foreach=True
        )

    def _maybe_untie_embedding(self) -> None:
        enc = self.memory.encoder
        if enc.embedding_tied and self.updates >= self.memory.config.embed_warmup_updates:
            param = enc.untie_embedding()
            self.optimizer.add_param_group({"params": [param]})
            logger.info("untied the encoder's token embedding after %d updates", self.updates)

    # -- persistence -----------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Memory checkpoint (`memory/`) plus the learner's state, so `load` resumes where this stopped."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self.memory.save_pretrained(directory / "memory")
            tensors = {
                "optimizer": self.optimizer.state_dict(),
                "ewc": self.anchor.state_dict(),
                "noise": self.noise.get_state(),
                "consolidation": None if self.consolidation is None else self.consolidation.state_dict(),
            }
            torch.save(tensors, directory / TENSORS_NAME)
            state = {
                "config": self.config.to_dict(),
                "steps": self.steps,
                "updates": self.updates,
                "next_id": self.next_id,
                "buffer": [it.to_dict() for it in self.buffer.items],
                "reservoir": self.reservoir.to_dict(),
                "fallbacks": self.fallbacks.to_dict(),
                "rng": random_state(self.rng),
                "accountant": None if self.accountant is None else self.accountant.to_dict(),
                "rehearsal": None if self.rehearsal is None else self.rehearsal.to_dict(),
                "guard": None if self.guard is None else self.guard.to_dict(),
                "history": [asdict(h) for h in self.history[-1000:]],
            }
            (directory / STATE_NAME).write_text(json.dumps(state))
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, reasoner) -> OnlineLearner:
        directory = Path(directory)
        if not (directory / STATE_NAME).is_file():
            raise FileNotFoundError(f"{directory} holds no online learner state ({STATE_NAME} is missing)")
        state = json.loads((directory / STATE_NAME).read_text())
        memory = MemoryModel.from_pretrained(directory / "memory", reasoner=reasoner)
        rehearsal, guard = state.get("rehearsal"), state.get("guard")
        learner = cls(
            memory,
            OnlineConfig.from_dict(state["config"]),
            rehearsal=None if rehearsal is None else RehearsalSet.from_dict(rehearsal),
            guard=None if guard is None else SkillGuard.from_dict(guard),
        )
        tensors = torch.load(directory / TENSORS_NAME, map_location=reasoner.device, weights_only=True)
        learner.optimizer.load_state_dict(tensors["optimizer"])
        learner.anchor.load_state_dict(tensors["ewc"])
        # map_location moved the noise generator's state; generator states live on the CPU
        learner.noise.set_state(tensors["noise"].cpu())
        if learner.consolidation is not None:
            if tensors.get("consolidation") is None:
                raise ValueError(
                    f"{directory}: the config enables write consolidation but no held writes were saved"
                )
            learner.consolidation.load_state_dict(tensors["consolidation"])
        learner.steps, learner.updates, learner.next_id = state["steps"], state["updates"], state["next_id"]
        learner.buffer.items = [Interaction.from_dict(d) for d in state["buffer"]]
        learner.reservoir = ReplayReservoir.from_dict(state["reservoir"])
        learner.fallbacks.restore(state["fallbacks"])
        restore_random(learner.rng, state["rng"])
        if state["accountant"] is not None:
            learner.accountant = PrivacyAccountant.from_dict(state["accountant"])
        learner.history = [UpdateStats(**h) for h in state["history"]]
        return learner


def _host_floats(
    loss: torch.Tensor | float, grad_norm: torch.Tensor | float, parts: dict[str, torch.Tensor | float]
) -> tuple[float, float, dict[str, float]]:
    """`loss`, `grad_norm` and the values of `parts` as Python floats, read from the device in one transfer."""
    values = [loss, grad_norm, *parts.values()]
    tensors = [v.detach().float().reshape(()) for v in values if torch.is_tensor(v)]
    read = iter(torch.stack(tensors).tolist() if tensors else [])
    floats = [next(read) if torch.is_tensor(v) else float(v) for v in values]
    return floats[0], floats[1], dict(zip(parts, floats[2:], strict=True))


def history_ids(conversation, max_tokens: int) -> list[int]:
    """The most recent live transcript tokens of `conversation`, at most `max_tokens` (most recent last)."""
    ids: list[int] = []
    for span in sorted(conversation.store.live(), key=lambda s: s.id, reverse=True):
        ids[:0] = span.token_ids
        if len(ids) >= max_tokens:
            break
    return ids[-max_tokens:] if max_tokens > 0 else []
