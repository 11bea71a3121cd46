"""`MemoryKV`: memory in the form the reasoner reads it, ready to splice in front of any input.

Layout and position convention (documented once, tested in tests/inject):
- Memory occupies the first M positions of every layer's cache: keys and values (B, H, M, D), keys already rotated
  (RoPE) as if the memory were M tokens at positions 0..M-1. This is exactly what the reasoner's own cache looks like
  after reading M tokens, which is why K/V the reasoner computed for a text X can be spliced in losslessly.
- The text that follows has positions M, M+1, ... in rows whose memory is live, and 0, 1, ... in rows whose memory
  is not (fallback or closed): such rows see their memory columns masked out in the 2-D attention mask, so they are
  computed exactly like a left-padded row of the bare reasoner. During `generate()` the same positions follow from
  transformers' rule position = cumsum(2-D mask) - 1, so a forward pass and generation agree.
- `gate_bias` (B, L, M) is added to the attention logits of memory positions in layer l: log g for a live slot,
  -inf where a layer holds no memory (layer_concat) or a row fell back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..compat import cache_from_tensors


@dataclass
class MemoryKV:
    keys: list[torch.Tensor]
    """Per layer (B, H, M, D), post-RoPE, in the reasoner's dtype."""
    values: list[torch.Tensor]
    """Per layer (B, H, M, D)."""
    gate_bias: torch.Tensor
    """(B, L, M) additive log-gate on memory logits."""
    live: torch.Tensor
    """(B,) bool: rows whose memory is injected; other rows run as the bare reasoner."""
    _stacked: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if len(self.keys) != len(self.values) or not self.keys:
            raise ValueError("MemoryKV needs one (keys, values) pair per layer")
        b, _, m, _ = self.keys[0].shape
        if self.gate_bias.shape != (b, len(self.keys), m):
            raise ValueError(
                f"gate_bias has shape {tuple(self.gate_bias.shape)}, expected {(b, len(self.keys), m)}"
            )
        if self.live.shape != (b,):
            raise ValueError(f"live has shape {tuple(self.live.shape)}, expected ({b},)")

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def num_slots(self) -> int:
        return self.keys[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def any_live(self) -> bool:
        return bool(self.live.any())

    def nbytes(self) -> int:
        """Bytes of K/V this memory adds to the cache."""
        return sum(
            k.numel() * k.element_size() + v.numel() * v.element_size()
            for k, v in zip(self.keys, self.values, strict=True)
        )

    def stacked(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Keys and values of every layer as one (2, L, B, H, M, D) tensor, made once per dtype and device and kept:
        a memory written once is read by many requests, and a preallocated cache loads it with a single copy.
        (A MemoryKV is not changed after it is made; every method here returns a new one.)"""
        key = (dtype, torch.device(device))
        if key not in self._stacked:
            self._stacked[key] = torch.stack([torch.stack(self.keys), torch.stack(self.values)]).to(
                device=key[1], dtype=dtype
            )
        return self._stacked[key]

    def to_cache(self):
        """A fresh `DynamicCache` holding the memory. A forward pass appends to (mutates) its cache, so every call
        gets its own: reusing one cache across calls would make the second call see the first call's tokens."""
        return cache_from_tensors(self.keys, self.values)

    def mask_prefix(self, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """(B, M) 2-D attention mask columns for the memory: ones for live rows, zeros for the others."""
        return self.live[:, None].expand(-1, self.num_slots).to(dtype)

    def index_rows(self, index: torch.Tensor | list[int]) -> MemoryKV:
        index = torch.as_tensor(index, device=self.live.device)
        return MemoryKV(
            [k[index] for k in self.keys],
            [v[index] for v in self.values],
            self.gate_bias[index],
            self.live[index],
        )

    def repeat_rows(self, n: int) -> MemoryKV:
        """Each row repeated n times in place (row order a, a, b, b), as generate() expands its inputs."""
        if n == 1:
            return self
        return self.index_rows(torch.arange(self.batch_size, device=self.live.device).repeat_interleave(n))

    @classmethod
    def cat_rows(cls, memories: list[MemoryKV]) -> MemoryKV:
        """Stack several memories of equal M along the batch."""
        slots = {m.num_slots for m in memories}
        if len(slots) != 1:
            raise ValueError(f"memories with different slot counts {sorted(slots)} cannot share a batch")
        layers = range(memories[0].num_layers)
        return cls(
            [torch.cat([m.keys[i] for m in memories]) for i in layers],
            [torch.cat([m.values[i] for m in memories]) for i in layers],
            torch.cat([m.gate_bias for m in memories]),
            torch.cat([m.live for m in memories]),
        )

    @classmethod
    def from_reasoner_cache(cls, cache, live: torch.Tensor | None = None) -> MemoryKV:
        """Wrap K/V the reasoner itself computed (e.g. for a text X) as memory with an open gate (bias 0)."""
        from ..compat import cache_layer_tensors

        pairs = cache_layer_tensors(cache)
        keys = [k for k, _ in pairs]
        b, _, m, _ = keys[0].shape
        bias = torch.zeros(b, len(keys), m, dtype=keys[0].dtype, device=keys[0].device)
        live = torch.ones(b, dtype=torch.bool, device=keys[0].device) if live is None else live
        return cls(keys, [v for _, v in pairs], bias, live)
