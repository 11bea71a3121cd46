"""A plain KV-cache engine for timed greedy decoding: a preallocated cache and CUDA-graph replay of each step."""

from .greedy import DecodeResult, GreedyDecoder, loaded_slots
from .pool import DecoderPool, plain_greedy
from .static_cache import PositionedKVCache

__all__ = [
    "DecodeResult",
    "DecoderPool",
    "GreedyDecoder",
    "PositionedKVCache",
    "loaded_slots",
    "plain_greedy",
]
