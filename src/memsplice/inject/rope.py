"""Rotary position embedding for keys memsplice writes itself.

Projected memory keys are treated like the reasoner's pre-RoPE keys and rotated with the reasoner's own rotary
module at memory positions 0..M-1, so the scores text queries give them depend on relative distance exactly as for
real tokens. The rotate-half convention (Llama, Qwen2, Mistral, Gemma) with optional partial rotary is supported;
`tests/inject/test_rope.py` checks it against the keys the reasoner caches itself.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """keys (..., B, H, M, D), e.g. (B, H, M, D) or (L, B, H, M, D) for several layers at once; cos/sin (B, M, R)
    with R <= D rotary dims (the rest pass through)."""
    cos, sin = cos[:, None].to(keys.dtype), sin[:, None].to(keys.dtype)
    rot = cos.shape[-1]
    k_rot, k_pass = keys[..., :rot], keys[..., rot:]
    k_rot = k_rot * cos + rotate_half(k_rot) * sin
    return torch.cat([k_rot, k_pass], dim=-1) if k_pass.shape[-1] else k_rot


def memory_positions(batch: int, num_slots: int, device: torch.device) -> torch.Tensor:
    """(B, M) position ids of memory slots: 0..M-1 in every row."""
    return torch.arange(num_slots, device=device)[None].expand(batch, -1)
