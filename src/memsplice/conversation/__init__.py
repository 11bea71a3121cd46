"""Memory of a whole, growing conversation: transcript spans, chunked hierarchical memory, attention-based usage."""

from .chunks import Chunk
from .hierarchy import Hierarchy, Node, compose
from .memory import ConversationConfig, ConversationMemory, WriteStats, picks_by_address, weights_signature
from .probe import MemoryAttention, memory_attention
from .transcript import EvictionRecord, Span, TranscriptStore

__all__ = [
    "Chunk",
    "ConversationConfig",
    "ConversationMemory",
    "EvictionRecord",
    "Hierarchy",
    "MemoryAttention",
    "Node",
    "Span",
    "TranscriptStore",
    "WriteStats",
    "compose",
    "memory_attention",
    "picks_by_address",
    "weights_signature",
]
