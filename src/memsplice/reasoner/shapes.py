"""Every shape memsplice needs, read from the reasoner's config; nothing about the reasoner is hard-coded.

Guarantees: GQA is described by `num_kv_heads` (the cache holds KV heads, not query heads); layers that differ from
plain global attention (sliding windows, KV sharing) are refused with a clear message instead of silently mis-spliced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


class UnsupportedReasonerError(ValueError):
    """The reasoner has a layout memsplice cannot splice memory into (yet)."""


@dataclass(frozen=True)
class ReasonerShapes:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    """Query heads per layer."""
    num_kv_heads: int
    """Key/value heads per layer: the head count of every cache tensor (fewer than `num_heads` under GQA)."""
    head_dim: int
    vocab_size: int
    max_positions: int
    layer_types: tuple[str, ...]

    @property
    def kv_width(self) -> int:
        """Width of one layer's keys (or values) for one token: H * D."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config) -> ReasonerShapes:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        layers = text.num_hidden_layers
        layer_types = tuple(getattr(text, "layer_types", None) or ["full_attention"] * layers)
        odd = sorted({t for t in layer_types if t != "full_attention"})
        if odd:
            raise UnsupportedReasonerError(
                f"{text.model_type} has {odd} layers; memsplice splices memory into global-attention layers only "
                "(a sliding-window layer would drop memory once the window moves past it)."
            )
        if getattr(text, "num_kv_shared_layers", 0):
            raise UnsupportedReasonerError(f"{text.model_type} shares KV between layers; not supported.")
        if heads % kv_heads:
            raise UnsupportedReasonerError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
        return cls(
            model_type=text.model_type,
            num_layers=layers,
            hidden_size=text.hidden_size,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=text.vocab_size,
            max_positions=getattr(text, "max_position_embeddings", 0) or 0,
            layer_types=layer_types,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d
