"""`MemoryConfig`: the memory's architecture, saved as JSON beside its safetensors.

Run arguments (training, evaluation) live in their own dataclasses; this holds only what defines the weights and
how they are read. Every field is validated in `__post_init__`, and an error names the bad field.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

CONFIG_NAME = "memsplice_config.json"


@dataclass
class MemoryConfig:
    num_slots: int = 16
    """M: latent slots the encoder emits, i.e. memory positions spliced into the reasoner's cache."""
    max_memory_tokens: int = 512
    """L_m: the most tokens the encoder reads in one call (longer input must be chunked or evicted first)."""
    chunk_tokens: int | None = None
    """Tokens of a conversation per memory (one encoder call into M slots) that the memory was trained to be read
    at; `ConversationMemory` chunks at this size unless told otherwise (None: `max_memory_tokens`)."""
    encoder_layers: int = 4
    """Depth of the memory transformer."""
    encoder_width: int = 384
    """Width of the memory transformer (its input and output are projected from/to the reasoner's width)."""
    encoder_heads: int = 6
    """Attention heads of the memory transformer; must divide `encoder_width`."""
    encoder_mlp_ratio: float = 2.75
    """Hidden width of the encoder's SwiGLU MLP, as a multiple of `encoder_width`."""
    dropout: float = 0.0
    """Dropout inside the encoder (training only)."""
    encoder_type: str = "transformer"
    """"transformer": the zero-pretrained MemoryEncoder. "causal_pool": no encoder weights at all; the latents are
    the reasoner's own final hidden states of the input, mean-pooled over M contiguous chunks (a baseline)."""
    encoder_init: str = "random"
    """"random": zero-pretrained. "reasoner": encoder blocks start as copies of the reasoner's first layers (needs
    encoder_width, encoder_heads and encoder_mlp_ratio equal to the reasoner's; an ablation of the language prior)."""
    encoder_reasoner_states: bool = False
    """transformer only: the encoder also reads the frozen reasoner's hidden states of its input (every layer,
    RMS-normalised, mixed by learned softmax weights) through a projection added to its token inputs that starts at
    zero. The encoder's weights stay zero-pretrained; what it reads is the reasoner's own view of the passage, the
    representation its queries come from when it reads the memory back. Costs one reasoner forward per write."""
    slot_attention: str = "global"
    """transformer only: what each slot may attend to in every encoder layer. "global": all tokens and slots.
    "chunk": slot j reads only the j-th of M contiguous chunks of the input's tokens (the chunking of the causal-pool
    baseline) and all slots, so each slot is made responsible for one span of the passage; tokens still read
    everything. Asks whether the encoder's loss along a long passage comes from how it shares its slots out."""
    operator: str = "prepend_kv"
    """Injection operator: "prepend_kv", "layer_concat" or "prepend_embed" (see memsplice.inject)."""
    target_layers: list[int] | None = None
    """layer_concat only: reasoner layers that receive memory (default: the lower half)."""
    kv_init: str = "reasoner"
    """prepend_kv / layer_concat: "reasoner" starts the projections as the reasoner's own k/v projections; "sink"
    starts every slot as the K/V the reasoner computes for its first (BOS) token, with the reasoner's projections
    scaled by `kv_init_scale` on top, so an untrained memory is nearly harmless; "random": small random values."""
    kv_init_scale: float = 0.1
    """kv_init="sink" only: scale of the reasoner's k/v projections added to the sink K/V."""
    gate_init_bias: float = 2.0
    """Initial bias of the gate W_g; sigmoid(2) = 0.88, so fresh memory starts mostly open."""
    address_dim: int | None = None
    """Width of the address head that lets a question pick which chunk memories to read (`memory.address`);
    None: no address head (chunks can still be picked by the reasoner's attention)."""
    address_recency_margin: float = 0.0
    """Address-head scores within this margin of the best count as a tie, broken in favour of the later chunk
    (`memory.address.rank_chunks`); in the head's score units, so chosen for a trained head (on train-split
    histories: `scripts/online/address_recall.py --split train --recency-margins ...`); 0: by score alone."""
    address_extra_margin: float | None = None
    """When a question may read several chunks (`select_chunks` > 1), read a chunk after the first only if its
    address-head score is within this margin of the best: two chunks when the head is unsure, one when it is sure
    (`memory.address.top_chunks`). In the head's score units; None: always read `select_chunks`."""
    max_latent_norm: float = 1000.0
    """Safety bound: a row with a slot whose L2 norm exceeds this (or any non-finite value) is not injected."""
    latent_norm_clip: float | None = None
    """Privacy option: rescale each slot to at most this L2 norm before injection (None: no clipping)."""
    refine_steps: int = 0
    """Write-time refinement (`memory.refine`): Adam steps on the latents against reading the passage back after
    `reconstruction_instruction`, starting from the encoder's output, for every write made without autograd
    (training writes keep the encoder's latents, so that their gradient reaches it); 0: the encoder's latents."""
    refine_lr: float = 0.1
    """Learning rate of write-time refinement (0.1 reaches in 50 steps what 0.03 needs 200 for at 32x on the shipped
    checkpoint, benchmarks/results/formation/fidelity-refine-32x-lr*.json)."""
    reconstruction_instruction: str | None = None
    """The instruction after which the reasoner regenerates a passage from its memory (recorded by `memsplice
    train`; checkpoints written before this field took it from `extra["instruction"]`, where training recorded it);
    write-time refinement needs it."""
    embed_warmup_updates: int = 1000
    """N: the token embedding stays tied to (and frozen as) the reasoner's for this many optimizer updates."""
    reasoner_name: str | None = None
    """Recorded on save: which reasoner this memory was trained for."""
    reasoner_fingerprint: str | None = None
    """Recorded on save: float32 weight hash of that reasoner; loading onto another reasoner is refused."""
    reasoner_hidden_size: int | None = None
    reasoner_vocab_size: int | None = None
    extra: dict = field(default_factory=dict)
    """Free-form notes (e.g. the training command); never read by the model."""

    def __post_init__(self):
        from ..inject.registry import OPERATORS

        # checkpoints older than the field: training recorded the instruction in `extra`
        if self.reconstruction_instruction is None and isinstance(self.extra, dict):
            self.reconstruction_instruction = self.extra.get("instruction")

        def need(cond: bool, name: str, msg: str):
            if not cond:
                raise ValueError(f"MemoryConfig.{name}: {msg} (got {getattr(self, name)!r})")

        for name in ("num_slots", "max_memory_tokens", "encoder_layers", "encoder_width", "encoder_heads"):
            need(
                isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                name,
                "must be a positive integer",
            )
        need(
            self.chunk_tokens is None
            or (isinstance(self.chunk_tokens, int) and 0 < self.chunk_tokens <= self.max_memory_tokens),
            "chunk_tokens",
            f"must be None or a positive integer of at most max_memory_tokens={self.max_memory_tokens}",
        )
        need(
            self.encoder_width % self.encoder_heads == 0,
            "encoder_width",
            "must be divisible by encoder_heads",
        )
        need((self.encoder_width // self.encoder_heads) % 2 == 0, "encoder_heads", "head width must be even")
        need(self.encoder_mlp_ratio > 0, "encoder_mlp_ratio", "must be positive")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.operator in OPERATORS, "operator", f"must be one of {sorted(OPERATORS)}")
        need(
            self.kv_init in ("reasoner", "random", "sink"),
            "kv_init",
            'must be "reasoner", "random" or "sink"',
        )
        need(self.kv_init_scale > 0, "kv_init_scale", "must be positive")
        need(
            self.encoder_type in ("transformer", "causal_pool"),
            "encoder_type",
            'must be "transformer" or "causal_pool"',
        )
        need(self.encoder_init in ("random", "reasoner"), "encoder_init", 'must be "random" or "reasoner"')
        need(
            self.slot_attention in ("global", "chunk"),
            "slot_attention",
            'must be "global" or "chunk"',
        )
        need(
            self.slot_attention == "global" or self.encoder_type == "transformer",
            "slot_attention",
            '"chunk" needs encoder_type="transformer"',
        )
        need(
            not self.encoder_reasoner_states or self.encoder_type == "transformer",
            "encoder_reasoner_states",
            'needs encoder_type="transformer"',
        )
        need(
            self.address_dim is None or (isinstance(self.address_dim, int) and self.address_dim > 0),
            "address_dim",
            "must be None or a positive integer",
        )
        need(
            isinstance(self.address_recency_margin, int | float) and self.address_recency_margin >= 0,
            "address_recency_margin",
            "must be a non-negative number",
        )
        need(
            self.address_extra_margin is None
            or (
                isinstance(self.address_extra_margin, int | float)
                and not isinstance(self.address_extra_margin, bool)
                and self.address_extra_margin >= 0
            ),
            "address_extra_margin",
            "must be None or a non-negative number",
        )
        need(self.max_latent_norm > 0, "max_latent_norm", "must be positive")
        need(
            isinstance(self.refine_steps, int) and self.refine_steps >= 0,
            "refine_steps",
            "must be a non-negative integer",
        )
        need(self.refine_lr > 0, "refine_lr", "must be positive")
        need(
            self.latent_norm_clip is None or self.latent_norm_clip > 0,
            "latent_norm_clip",
            "must be positive or None",
        )
        need(
            isinstance(self.embed_warmup_updates, int) and self.embed_warmup_updates >= 0,
            "embed_warmup_updates",
            "must be a non-negative integer",
        )
        if self.target_layers is not None:
            need(
                all(isinstance(i, int) for i in self.target_layers) and len(self.target_layers) > 0,
                "target_layers",
                "must be a non-empty list of layer indices",
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MemoryConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MemoryConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        """Write `CONFIG_NAME` in `directory` atomically: a reader sees the old file or the new one, never half."""
        path = Path(directory) / CONFIG_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> MemoryConfig:
        path = Path(directory) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{directory} is not a memsplice checkpoint: {CONFIG_NAME} is missing"
            ) from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        return cls.from_dict(data)
