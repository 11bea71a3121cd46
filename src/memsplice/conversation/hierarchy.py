"""The hierarchy that keeps a growing conversation's memory within a slot budget, and its composition.

Sealed chunks sit in *nodes*, oldest first. A new sealed chunk enters as a level-0 node at full resolution (all M
slots). When the slots in use exceed the budget, two adjacent nodes merge into one node of the next level and every
chunk in it halves its quota (never below `min_slots`), keeping the slots `select_slots` ranks highest. Merges pick
the oldest adjacent pair of equal level, lowest level first (a binary counter: a node of level l covers about 2^l
chunks at M / 2^l slots each, so the memory grows like M log2(chunks) until the per-chunk floor is reached); the
newest `keep_full` sealed nodes and the open chunk are never compressed. What the hierarchy cannot fit is reported
back so the caller can evict.

Composition (`compose`) lays the kept slots of every chunk side by side, oldest chunk first, and rotates all keys
by S - M (S slots in all): each kept slot then sits at exactly the distance from the text it had when its chunk
was encoded alone, which is what `memsplice.inject.concat_slots` does for whole chunks (and equals it when every
chunk is at full resolution).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..inject.compose import shift_keys
from ..inject.memory_kv import MemoryKV
from .chunks import Chunk, select_slots


@dataclass
class Node:
    level: int
    chunk_ids: list[int] = field(default_factory=list)


def halved(quota: int, min_slots: int) -> int:
    return max(min_slots, quota // 2)


@dataclass
class Hierarchy:
    num_slots: int
    """M: slots per chunk at full resolution."""
    min_slots: int = 1
    """Fewest slots a chunk keeps while it is in memory."""
    keep_full: int = 2
    """Newest sealed nodes never compressed."""
    nodes: list[Node] = field(default_factory=list)

    def add_sealed(self, chunk_id: int) -> None:
        self.nodes.append(Node(level=0, chunk_ids=[chunk_id]))

    def remove_chunk(self, chunk_id: int) -> None:
        for node in self.nodes:
            if chunk_id in node.chunk_ids:
                node.chunk_ids.remove(chunk_id)
        self.nodes = [n for n in self.nodes if n.chunk_ids]

    def chunk_order(self) -> list[int]:
        return [c for n in self.nodes for c in n.chunk_ids]

    def _gain(self, node: Node, chunks: dict[int, Chunk]) -> int:
        return sum(chunks[c].quota - halved(chunks[c].quota, self.min_slots) for c in node.chunk_ids)

    def next_merge(self, chunks: dict[int, Chunk]) -> int | None:
        """Index i of the pair (nodes[i], nodes[i+1]) to merge next, or None when no merge frees a slot."""
        last = len(self.nodes) - self.keep_full  # nodes[last:] stay at full resolution
        best, best_key = None, None
        for i in range(max(0, last - 1)):
            a, b = self.nodes[i], self.nodes[i + 1]
            if self._gain(a, chunks) + self._gain(b, chunks) <= 0:
                continue
            key = (a.level != b.level, max(a.level, b.level), i)
            if best_key is None or key < best_key:
                best, best_key = i, key
        return best

    def merge(self, i: int, chunks: dict[int, Chunk]) -> Node:
        a, b = self.nodes[i], self.nodes[i + 1]
        node = Node(level=max(a.level, b.level) + 1, chunk_ids=a.chunk_ids + b.chunk_ids)
        for c in node.chunk_ids:
            chunks[c].quota = halved(chunks[c].quota, self.min_slots)
        self.nodes[i : i + 2] = [node]
        return node

    def compress(self, chunks: dict[int, Chunk], budget: int, extra: int = 0) -> int:
        """Merge until the quotas of all chunks plus `extra` (the open chunk) fit `budget`; returns merges done."""
        merges = 0
        while sum(chunks[c].quota for c in self.chunk_order()) + extra > budget:
            i = self.next_merge(chunks)
            if i is None:
                break
            self.merge(i, chunks)
            merges += 1
        return merges

    def to_dict(self) -> list[dict]:
        return [{"level": n.level, "chunk_ids": list(n.chunk_ids)} for n in self.nodes]

    def load_nodes(self, nodes: list[dict]) -> None:
        self.nodes = [Node(level=int(n["level"]), chunk_ids=[int(c) for c in n["chunk_ids"]]) for n in nodes]


def compose(
    chunks: list[Chunk], reasoner, select_by: str = "gate", *, full_resolution: bool = False
) -> tuple[MemoryKV | None, list[tuple[int, int]]]:
    """Kept slots of `chunks` (oldest first) as one memory of batch 1, and per slot its (chunk id, slot index).

    full_resolution: every slot of every chunk, whatever the hierarchy's compression left in its quota.
    Chunks that are not live (their latents fell back) are left out. Returns (None, []) when nothing is live.
    """
    parts, layout = [], []
    for chunk in chunks:
        quota = chunk.kv.num_slots if full_resolution and chunk.kv is not None else chunk.quota
        if not chunk.live or quota <= 0:
            continue
        idx = select_slots(chunk, quota, by=select_by)
        parts.append((chunk.kv, idx))
        layout.extend((chunk.id, i) for i in idx)
    if not parts:
        return None, []
    first = parts[0][0]
    m, total = first.num_slots, len(layout)
    keys, values = [], []
    for layer in range(first.num_layers):
        k = torch.cat([kv.keys[layer][:, :, idx] for kv, idx in parts], dim=2)  # (1, H, S, D)
        keys.append(shift_keys(k, total - m, reasoner))
        values.append(torch.cat([kv.values[layer][:, :, idx] for kv, idx in parts], dim=2))
    bias = torch.cat([kv.gate_bias[:, :, idx] for kv, idx in parts], dim=2)  # (1, L, S)
    live = torch.ones(1, dtype=torch.bool, device=first.live.device)
    return MemoryKV(keys, values, bias, live), layout
