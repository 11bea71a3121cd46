"""Latent KV injection: operators that turn latents into per-layer K/V, and the splice into the reasoner."""

from . import prepend_embed, prepend_kv  # noqa: F401  (importing registers the operators)
from .attention import enable_gated_attention
from .compose import concat_slots
from .memory_kv import MemoryKV
from .operator import InjectionOperator
from .registry import OPERATORS, get_operator, register_operator
from .splice import forward_with_memory, generate_with_memory, hidden_states_with_memory, splice_masks

__all__ = [
    "OPERATORS",
    "InjectionOperator",
    "MemoryKV",
    "concat_slots",
    "enable_gated_attention",
    "forward_with_memory",
    "generate_with_memory",
    "hidden_states_with_memory",
    "get_operator",
    "register_operator",
    "splice_masks",
]
