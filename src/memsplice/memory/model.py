"""`MemoryModel`: encoder + gate + injection operator, bound to one frozen reasoner.

    memory = MemoryModel(MemoryConfig(), reasoner)          # or MemoryModel.from_pretrained(dir, reasoner=...)
    mem = memory.write_text(["Ada lives in Lisbon."])       # latents -> safety check -> gate -> per-layer K/V
    out = memory.generate(input_ids, attention_mask, memory=mem, max_new_tokens=20)

Guarantees:
- The reasoner is never a submodule: `parameters()`, `state_dict()` and checkpoints hold memory weights only.
- A row whose latents are non-finite or exceed `max_latent_norm` is not injected; it runs as the bare reasoner and
  a `FallbackEvent` is recorded in `self.fallback_log`.
- `save_pretrained` writes `memsplice_config.json` (with the reasoner's name and fingerprint) and safetensors;
  `from_pretrained` refuses a reasoner with another fingerprint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_directory
from ..inject.memory_kv import MemoryKV
from ..inject.registry import get_operator
from ..inject.splice import forward_with_memory, generate_with_memory
from .address import AddressHead
from .config import CONFIG_NAME, MemoryConfig
from .encoder import build_encoder, checked_memory_mask, reasoner_states
from .refine import refine_latents
from .safety import NON_FINITE_KV, FallbackEvent, FallbackLog, check_latents

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
EMBED_ROWS = "encoder.token_embedding.rows"
EMBED_VALUES = "encoder.token_embedding.values"


class ReasonerMismatchError(ValueError):
    """A memory checkpoint was trained for another reasoner."""


class CheckpointError(ValueError):
    """A memory checkpoint is missing, unreadable or does not match its config."""


@dataclass
class Memory:
    """What one write produced: the latents, the gate, and the K/V ready to splice."""

    latents: torch.Tensor
    """(B, M, d) float32."""
    gate: torch.Tensor
    """(B, M) gate values in [0, 1]."""
    kv: MemoryKV
    events: list[FallbackEvent] = field(default_factory=list)
    encoded: torch.Tensor | None = None
    """(B, M, d): the encoder's latents before write-time refinement; None when the write was not refined (then they
    are `latents`). What the address head was trained on, so chunk selection reads these."""

    @property
    def live(self) -> torch.Tensor:
        return self.kv.live


class MemoryModel(nn.Module):
    def __init__(self, config: MemoryConfig, reasoner, fallback_log: FallbackLog | None = None):
        super().__init__()
        s = reasoner.shapes
        for name, want in (("reasoner_hidden_size", s.hidden_size), ("reasoner_vocab_size", s.vocab_size)):
            got = getattr(config, name)
            if got is not None and got != want:
                raise ReasonerMismatchError(
                    f"this memory was built for a reasoner with {name}={got}; {reasoner.name} has {want}"
                )
        config.reasoner_name = config.reasoner_name or reasoner.name
        config.reasoner_fingerprint = config.reasoner_fingerprint or reasoner.fingerprint
        config.reasoner_hidden_size, config.reasoner_vocab_size = s.hidden_size, s.vocab_size
        self.config = config
        self.__dict__["reasoner"] = reasoner  # not a submodule: never trained, never saved
        self.encoder = build_encoder(config, reasoner)
        self.gate = nn.Linear(s.hidden_size, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, config.gate_init_bias)
        self.operator = get_operator(config.operator)(config, reasoner)
        self.address = AddressHead(s.hidden_size, config.address_dim) if config.address_dim else None
        self.fallback_log = fallback_log or FallbackLog()
        self.to(reasoner.device)

    def grow_encoder(self, blocks: int) -> None:
        """Append `blocks` identity-initialised encoder blocks (`MemoryEncoder.add_blocks`) and record the new depth
        in the config, so that `save_pretrained` writes a checkpoint that loads as the grown model."""
        if self.config.encoder_type != "transformer":
            raise ValueError(f"only a transformer encoder can grow, not {self.config.encoder_type!r}")
        self.encoder.add_blocks(blocks)
        self.config.encoder_layers = len(self.encoder.blocks)

    def widen_encoder(self, width: int) -> None:
        """Widen the encoder's residual stream to `width`, its MLP to the config's ratio of it (`MemoryEncoder.widen`:
        the latents do not change), and record the new width and head count in the config, so that
        `save_pretrained` writes a checkpoint that loads as the widened model."""
        if self.config.encoder_type != "transformer":
            raise ValueError(f"only a transformer encoder can widen, not {self.config.encoder_type!r}")
        self.encoder.widen(width, int(self.config.encoder_mlp_ratio * width))
        self.config.encoder_width = width
        self.config.encoder_heads = self.encoder.blocks[0].heads

    def read_reasoner_states(self) -> None:
        """Give the encoder the reasoner's hidden states of its input as a second input channel that starts at zero
        (`MemoryEncoder.add_reasoner_states`: the latents do not change until training uses it) and record it in
        the config, so that `save_pretrained` writes a checkpoint that loads as the extended model."""
        if self.config.encoder_type != "transformer":
            raise ValueError(
                f"only a transformer encoder reads the reasoner's states, not {self.config.encoder_type!r}"
            )
        self.encoder.add_reasoner_states(self.reasoner.shapes.num_layers)
        self.config.encoder_reasoner_states = True

    def set_slot_attention(self, mode: str) -> None:
        """Change what the encoder's slots attend to (`MemoryConfig.slot_attention`) and record it in the config.
        Unlike growth this changes the latents of a trained encoder: training has to adapt it."""
        if self.config.encoder_type != "transformer":
            raise ValueError(
                f"only a transformer encoder has slot attention, not {self.config.encoder_type!r}"
            )
        MemoryConfig.from_dict({**self.config.to_dict(), "slot_attention": mode})  # refuses an unknown mode
        self.config.slot_attention = mode
        self.encoder.slot_attention = mode

    # -- writing memory ----------------------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> latents (B, M, d)."""
        ids = input_ids.to(self.reasoner.device)
        mask = None if attention_mask is None else attention_mask.to(self.reasoner.device)
        if not self.config.encoder_reasoner_states:
            return self.encoder(ids, mask)
        mask = checked_memory_mask(ids, mask, self.config.max_memory_tokens)
        return self.encoder(ids, mask, reasoner_states(self.reasoner, ids, mask))

    def gate_values(self, latents: torch.Tensor) -> torch.Tensor:
        """g = sigmoid(W_g z): (B, M)."""
        return torch.sigmoid(self.gate(latents.float()).squeeze(-1))

    def write(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        scope: str | None = None,
        gate_override: float | torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        refine_steps: int | None = None,
    ) -> Memory:
        """Encode (or take `latents`), refine, check, gate and project into per-layer K/V.

        gate_override: force g (a float or (B, M) tensor) instead of the learned gate, e.g. 0.0 to close it.
        refine_steps: write-time refinement steps (`memory.refine`). None: `config.refine_steps` for a write made
        without autograd (serving, evaluation, conversation memory), and none for a write under autograd, whose
        gradient must reach the encoder (training); refined latents carry no gradient to the encoder.
        """
        z = self.encode(input_ids, attention_mask) if latents is None else latents.to(self.reasoner.device)
        if refine_steps is not None:
            steps = refine_steps
        else:
            steps = 0 if torch.is_grad_enabled() else self.config.refine_steps
        encoded = None
        if steps:
            encoded = z.detach()
            z, _ = refine_latents(
                self, input_ids, attention_mask, steps=steps, lr=self.config.refine_lr, latents=z
            )
        written = self.inject(z, scope=scope, gate_override=gate_override, memory_input=input_ids)
        written.encoded = encoded
        return written

    def inject(
        self,
        latents: torch.Tensor,
        *,
        scope: str | None = None,
        gate_override: float | torch.Tensor | None = None,
        memory_input: torch.Tensor | None = None,
    ) -> Memory:
        """Latents (B, M, d) -> `Memory`: safety check, optional norm clip, gate, operator."""
        cfg = self.config
        b, m, d = latents.shape
        if m != cfg.num_slots or d != self.reasoner.shapes.hidden_size:
            raise ValueError(
                f"latents must be (batch, {cfg.num_slots}, {self.reasoner.shapes.hidden_size}), "
                f"got {tuple(latents.shape)}"
            )
        if cfg.latent_norm_clip is not None:
            norms = latents.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
            latents = latents * (cfg.latent_norm_clip / norms).clamp(max=1.0).to(latents.dtype)
        ok, reasons, norms = check_latents(latents, cfg.max_latent_norm)
        # Bad rows are replaced by zeros before anything touches them, so NaN cannot reach the cache or gradients.
        safe = torch.where(ok[:, None, None], latents, torch.zeros_like(latents))
        if gate_override is None:
            gate_logit = self.gate(safe.float()).squeeze(-1)  # (B, M)
            gate = torch.sigmoid(gate_logit)
            log_gate = F.logsigmoid(gate_logit)
        else:
            gate = torch.as_tensor(gate_override, dtype=torch.float32, device=latents.device).expand(b, m)
            log_gate = torch.log(gate)  # log 0 = -inf closes a slot exactly
        keys, values = self.operator(safe, self.reasoner)
        # Every layer's K/V checked at once (checks layer by layer were several ops per layer).
        with torch.no_grad():
            kv_finite = torch.isfinite(torch.stack([*keys, *values], dim=1)).flatten(1).all(1)  # (B,)
        live = ok & kv_finite & (gate > 0).any(dim=1)
        # The host needs which rows' K/V are finite and whether every row is live: one read from the device.
        flags = torch.cat([kv_finite, live.all().reshape(1)]).tolist()
        kv_ok, all_live = flags[:b], flags[b]
        layer_mask = self.operator.layer_mask(latents.device)  # (L,)
        bias = log_gate[:, None, :].expand(b, len(keys), m)
        bias = bias.masked_fill(~layer_mask[None, :, None], float("-inf"))
        bias = bias.masked_fill(~live[:, None, None], float("-inf"))
        if not all_live:  # zero the K/V of dead rows: 0 attention weight times NaN is still NaN
            keep = live[:, None, None, None]
            keys = [torch.where(keep, k, torch.zeros_like(k)) for k in keys]
            values = [torch.where(keep, v, torch.zeros_like(v)) for v in values]
        events = []
        for row in range(b):
            reason = reasons[row] or (None if kv_ok[row] else NON_FINITE_KV)
            if reason is None:
                continue
            detail = {}
            if memory_input is not None:
                detail["input_ids"] = memory_input[row].tolist()
            event = FallbackEvent(
                reason=reason,
                norm=float(norms[row]),
                bound=cfg.max_latent_norm,
                scope=scope,
                row=row,
                detail=detail,
            )
            self.fallback_log.record(event)
            events.append(event)
        return Memory(latents=latents, gate=gate, kv=MemoryKV(keys, values, bias, live), events=events)

    def write_text(self, texts: list[str], *, scope: str | None = None, **kwargs) -> Memory:
        """Tokenize `texts` with the reasoner's tokenizer (truncated to max_memory_tokens) and write them."""
        tok = self.reasoner.require_tokenizer()
        rows = [
            tok(t, add_special_tokens=False)["input_ids"][-self.config.max_memory_tokens :]
            or [tok.eos_token_id]
            for t in texts
        ]
        ids, mask = pad_rows(rows, pad_id=tok.pad_token_id or 0, device=self.reasoner.device)
        return self.write(ids, mask, scope=scope, **kwargs)

    # -- reading memory ----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        memory: Memory | MemoryKV | None = None,
        **kwargs,
    ):
        """The reasoner's forward with `memory` spliced in front (None: the bare reasoner)."""
        kv = memory.kv if isinstance(memory, Memory) else memory
        return forward_with_memory(self.reasoner, input_ids, attention_mask, kv, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        memory: Memory | MemoryKV | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        kv = memory.kv if isinstance(memory, Memory) else memory
        generate_kwargs.setdefault("pad_token_id", self._pad_id())
        return generate_with_memory(self.reasoner, input_ids, attention_mask, kv, **generate_kwargs)

    def _pad_id(self) -> int | None:
        tok = self.reasoner.tokenizer
        return (
            None if tok is None else (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        )

    def add_address_head(self, dim: int) -> AddressHead:
        """Give a memory without one a fresh (untrained) address head of width `dim`; recorded in the config."""
        if self.address is not None:
            raise ValueError(
                f"this memory already has an address head (address_dim={self.config.address_dim})"
            )
        self.config.address_dim = dim
        self.config.__post_init__()
        self.address = AddressHead(self.reasoner.shapes.hidden_size, dim).to(self.reasoner.device)
        return self.address

    def set_refine_steps(self, steps: int | None) -> None:
        """Make every write without autograd refine its latents `steps` times (`config.refine_steps`; None: keep the
        checkpoint's). What `--refine-steps` of chat, serve, eval and bench sets; refuses a negative count."""
        if steps is None:
            return
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"refine steps must be a whole number >= 0 (got {steps!r})")
        self.config.refine_steps = steps

    def set_recency_margin(self, margin: float | None) -> None:
        """Make the address head's near-ties, within `margin` of the best score, go to the later chunk
        (`config.address_recency_margin`; None: keep the checkpoint's; 0: by score alone). What `--recency-margin`
        of eval and bench sets; refuses a negative margin."""
        if margin is None:
            return
        if isinstance(margin, bool) or not isinstance(margin, int | float) or margin < 0:
            raise ValueError(f"recency margin must be a number >= 0 (got {margin!r})")
        self.config.address_recency_margin = float(margin)

    def set_extra_margin(self, margin: float | None) -> None:
        """Read a chunk after the first only when its address-head score is within `margin` of the best
        (`config.address_extra_margin`). What `--extra-chunk-margin` of eval and bench sets; None keeps the
        checkpoint's; refuses a negative margin."""
        if margin is None:
            return
        if isinstance(margin, bool) or not isinstance(margin, int | float) or margin < 0:
            raise ValueError(f"extra chunk margin must be a number >= 0 (got {margin!r})")
        self.config.address_extra_margin = float(margin)

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode (dropout off) for the block, then back to the mode the memory was in: for writes whose result
        is stored or compared, which must not depend on the noise of one call."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    # -- training helpers --------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- persistence -------------------------------------------------------------------------------------------
    def memory_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Memory weights only. An untied embedding is stored as the rows that differ from the reasoner's."""
        state = {k: v.detach() for k, v in self.state_dict().items() if k != "encoder.token_embedding"}
        if not self.encoder.embedding_tied:
            own = self.encoder.token_embedding.detach()
            base = self.reasoner.embedding_weight.detach().to(own.dtype)
            rows = (own != base).any(dim=1).nonzero().squeeze(1)
            state[EMBED_ROWS] = rows.to(torch.int64)
            state[EMBED_VALUES] = own[rows]
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        return {k: v.contiguous().cpu() for k, v in state.items()}

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        max_shard_bytes: int | None = None,
    ) -> Path:
        """Write config + safetensors atomically (a sibling temp dir renamed into place).

        dtype: store weights in this dtype (e.g. torch.bfloat16 to halve the size); masters stay float32.
        max_shard_bytes: split the weights into shards of at most this size (with a HF-style index file).
        """
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            self.config.save(tmp)
            state = self.memory_state_dict(dtype)
            meta = {
                "format": "pt",
                "memsplice": "memory",
                "reasoner_fingerprint": self.config.reasoner_fingerprint,
            }
            shards = _shard(state, max_shard_bytes)
            if len(shards) == 1:
                save_file(shards[0], tmp / WEIGHTS_NAME, metadata=meta)
            else:
                weight_map = {}
                for i, shard in enumerate(shards, 1):
                    name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                    save_file(shard, tmp / name, metadata=meta)
                    weight_map.update(dict.fromkeys(shard, name))
                (tmp / INDEX_NAME).write_text(
                    json.dumps({"metadata": meta, "weight_map": weight_map}, indent=1)
                )
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, reasoner, strict_reasoner: bool = True, **overrides
    ) -> MemoryModel:
        """Load a memory checkpoint onto `reasoner`; refuses a reasoner with another fingerprint.

        overrides: config fields to change at load time that do not alter weights (e.g. max_latent_norm).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"no memory checkpoint directory at {directory}")
        config = MemoryConfig.load(directory)
        if (
            strict_reasoner
            and config.reasoner_fingerprint
            and config.reasoner_fingerprint != reasoner.fingerprint
        ):
            raise ReasonerMismatchError(
                f"{directory} was trained for reasoner {config.reasoner_name!r} "
                f"(fingerprint {config.reasoner_fingerprint[:12]}), but the reasoner given is {reasoner.name!r} "
                f"(fingerprint {reasoner.fingerprint[:12]}). Load the reasoner it was trained for, or train a memory "
                "for this one."
            )
        weight_fields = {
            "num_slots",
            "max_memory_tokens",
            "encoder_layers",
            "encoder_width",
            "encoder_heads",
            "encoder_mlp_ratio",
            "operator",
            "target_layers",
            "encoder_type",
            "address_dim",
        }
        if bad := sorted(set(overrides) & weight_fields):
            raise ValueError(f"cannot override {bad} at load time: they define the weights")
        for k, v in overrides.items():
            setattr(config, k, v)
        config.__post_init__()
        state = _read_weights(directory)
        model = cls(config, reasoner)
        rows, values = state.pop(EMBED_ROWS, None), state.pop(EMBED_VALUES, None)
        if rows is not None:
            emb = model.encoder.untie_embedding()
            with torch.no_grad():
                emb[rows.to(emb.device)] = values.to(emb)
        own = model.state_dict()
        own.pop("encoder.token_embedding", None)
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(
                f"{directory} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise CheckpointError(
                    f"{directory}: {k} has shape {tuple(v.shape)}, config wants {tuple(own[k].shape)}"
                )
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
        return model


def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards, current, size = [], {}, 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += n
    if current:
        shards.append(current)
    return shards


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    try:
        if (directory / INDEX_NAME).is_file():
            index = json.loads((directory / INDEX_NAME).read_text())
            state = {}
            for name in sorted(set(index["weight_map"].values())):
                state.update(load_file(directory / name))
            return state
        if not (directory / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        return load_file(directory / WEIGHTS_NAME)
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"cannot read memory weights in {directory}: {e}") from e


def pad_rows(
    rows: list[list[int]], pad_id: int, device, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (or left-pad) token id lists into (B, T) ids and mask."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids.to(device), mask.to(device)
