"""Composing several memories into one, along the slot axis.

Each memory's keys were rotated as if its slots sat at positions 0..M_i-1, right before a text starting at M_i: the
layout the encoder was trained for. Concatenated naively, the text would start at S = sum M_i and every chunk
would look farther away than in training. `concat_slots` therefore re-rotates each chunk's keys by S - M_i
(RoPE rotations compose: rotating a key at position p by delta gives the key at p + delta), so that every chunk
keeps the distance to the text it was trained at. Values carry no position and are concatenated as they are.
"""

from __future__ import annotations

import torch

from .memory_kv import MemoryKV
from .rope import rotate_keys


def shift_keys(keys: torch.Tensor, delta: int, reasoner) -> torch.Tensor:
    """Keys (B, H, M, D) moved `delta` positions later under the reasoner's RoPE."""
    if delta == 0:
        return keys
    # one rotation for every slot: cos/sin of a single position, broadcast over heads and slots
    pos = torch.full((keys.shape[0], 1), delta, dtype=torch.long, device=keys.device)
    cos, sin = reasoner.rotary_cos_sin(pos, like=keys.float())
    return rotate_keys(keys.float(), cos, sin).to(keys.dtype)


def concat_slots(memories: list[MemoryKV], reasoner) -> MemoryKV:
    """One memory holding all slots of `memories` (same batch size), each chunk kept right before the text.

    A row is live when any of its chunks is live; chunks that fell back keep their -inf gate and zero K/V.
    """
    if not memories:
        raise ValueError("concat_slots needs at least one memory")
    if len({m.batch_size for m in memories}) != 1:
        raise ValueError("memories to concatenate must have the same batch size")
    if len(memories) == 1:
        return memories[0]
    total = sum(m.num_slots for m in memories)
    layers = range(memories[0].num_layers)
    shifts = {total - m.num_slots for m in memories}
    if len(shifts) == 1:  # chunks of one size (the usual case): one rotation per layer over all their slots
        (shift,) = shifts
        keys = [shift_keys(torch.cat([m.keys[i] for m in memories], dim=2), shift, reasoner) for i in layers]
    else:
        keys = [
            torch.cat([shift_keys(m.keys[i], total - m.num_slots, reasoner) for m in memories], dim=2)
            for i in layers
        ]
    values = [torch.cat([m.values[i] for m in memories], dim=2) for i in layers]
    bias = torch.cat([m.gate_bias for m in memories], dim=2)
    live = torch.stack([m.live for m in memories]).any(0)
    return MemoryKV(keys, values, bias, live)


def concat_rows(memory: MemoryKV, reasoner) -> MemoryKV:
    """The rows of one memory side by side as a single row: `concat_slots` of its rows one by one, in a few
    operations per layer instead of a few per layer and row (chunks encoded as the rows of one batch)."""
    n = memory.batch_size
    if n == 1:
        return memory

    def side_by_side(t: torch.Tensor) -> torch.Tensor:  # (n, X, M, ...) -> (1, X, n * M, ...), row-major
        return t.transpose(0, 1).reshape(1, t.shape[1], n * t.shape[2], *t.shape[3:])

    shift = (n - 1) * memory.num_slots
    return MemoryKV(
        [shift_keys(side_by_side(k), shift, reasoner) for k in memory.keys],
        [side_by_side(v) for v in memory.values],
        side_by_side(memory.gate_bias),
        memory.live.any()[None],
    )
