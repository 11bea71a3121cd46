"""`PositionedKVCache`: a preallocated KV cache whose write positions are a tensor the caller owns.

transformers' own `StaticCache` keeps its write offset inside the cache and its `update` signature has moved between
5.x releases (5.17 passes `cache_kwargs` with `cache_position`, 5.23 passes nothing). This cache does not depend on
either: each layer writes the incoming keys and values at the cache indices held in `cache.write_positions`, a (T,)
long tensor that the caller fills before every forward pass. Because the tensor is updated in place, a forward pass
captured in a CUDA graph keeps writing where the caller points it on every replay.

Guarantees:
- One buffer for every layer's keys and values, (2, L, B, H, max_len, D), allocated once; each layer's keys and values
  are views into it and `update` never reallocates (static addresses). Memory K/V for all layers therefore load with
  one copy (`write_prefix`), not one launch per layer.
- Cache index == RoPE position: the caller writes memory K/V at 0..M-1 and text at its own positions.
- `update` returns the full buffers; what a query may see is decided only by the caller's 4-D attention mask.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class PositionedLayer(CacheLayerMixin):
    """One layer's preallocated keys and values, written at the owning cache's `write_positions`."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: PositionedKVCache, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self._owner = owner
        self.keys, self.values = keys, values  # (B, H, max_len, D)
        self.is_initialized = True
        self.max_cache_len = keys.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        pass  # allocated at construction

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        positions = self._owner.write_positions  # (T,)
        self.keys.index_copy_(2, positions, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, positions, value_states.to(self.values.dtype))
        return self.keys, self.values

    # The sizes below are what mask builders would ask for; the engine always passes a ready 4-D mask instead.
    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self._owner.length

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return self.max_cache_len

    def get_max_length(self, *args, **kwargs) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        self.keys.zero_()
        self.values.zero_()


class PositionedKVCache(Cache):
    """Preallocated per-layer K/V for batch `batch_size` and `max_len` positions."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.storage = torch.zeros(
            2, num_layers, batch_size, num_kv_heads, max_len, head_dim, dtype=dtype, device=device
        )
        """Every layer's keys (storage[0, l]) and values (storage[1, l])."""
        layers = [PositionedLayer(self, self.storage[0, i], self.storage[1, i]) for i in range(num_layers)]
        super().__init__(layers=layers)
        self.max_len = max_len
        self.write_positions = torch.zeros(1, dtype=torch.long, device=device)
        """(T,) cache indices the next forward pass writes to; set by the caller."""
        self.length = 0
        """Host-side count of positions in use (informational; attention visibility comes from the mask)."""

    @classmethod
    def for_reasoner(cls, reasoner, max_len: int, batch_size: int = 1) -> PositionedKVCache:
        s = reasoner.shapes
        return cls(
            s.num_layers, batch_size, s.num_kv_heads, max_len, s.head_dim, reasoner.dtype, reasoner.device
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0, *args, **kwargs) -> int:
        return self.length

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return self.max_len

    def write_prefix(self, stacked: torch.Tensor) -> None:
        """Copy memory K/V (2, L, B, H, M, D), as `MemoryKV.stacked` gives it, into positions 0..M-1: one copy."""
        if stacked.dim() != 6 or stacked.shape[0] != 2:
            raise ValueError(
                f"write_prefix takes (2, L, B, H, M, D) keys and values, got {tuple(stacked.shape)}"
            )
        m = stacked.shape[4]
        if m > self.max_len:
            raise ValueError(f"{m} memory slots do not fit a cache of {self.max_len} positions")
        if stacked.shape[1] != len(self.layers):
            raise ValueError(f"memory has {stacked.shape[1]} layers, the cache {len(self.layers)}")
        want = self.storage.shape[2:4] + self.storage.shape[5:]
        got = stacked.shape[2:4] + stacked.shape[5:]
        if got != want:
            raise ValueError(
                f"memory K/V rows, heads and head size {tuple(got)} do not match the cache's {tuple(want)}"
            )
        self.storage[:, :, :, :, :m].copy_(stacked)

    def nbytes(self) -> int:
        return self.storage.nbytes
