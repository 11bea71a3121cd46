"""Fused gated attention for training: memory, gate and causal mask without a mask tensor.

The core's gated attention (`memsplice.inject.attention`) adds `log g` to the memory columns of a materialised
float mask (B, 1, T, M+T) in every layer. That is exact for any layout, but a float mask that carries a gradient
keeps SDPA off its fastest kernels. Training batches have a fixed layout: every row's memory is live, the text is
unpadded, and text token i sees all M memory slots and text tokens <= i. For that layout this module computes the
same attention with no mask tensor at all:

- the mask is the lower-right-aligned causal mask of a (T, M+T) score matrix (`causal_lower_right`), which SDPA
  runs in the flash or memory-efficient kernel;
- the gate becomes one extra key dimension: queries get a constant 1 there, memory keys get log(g) / scale and text
  keys 0, so every score gains exactly log(g) on memory columns (gradients reach the gate through the keys). Head
  dims are zero-padded by `EXTRA_DIMS` so they stay a multiple of 8.

`gated_causal_attention(..., layout="square")` computes the same attention another way: M query rows of zeros go in
front of the text's, so the score matrix is square (M+T, M+T) and the mask is the plain causal one; text row M+i
sees the M memory keys and text keys <= i, as before, and the M extra rows are dropped. The grouped K/V heads go to
SDPA as they are (`enable_gqa`), and cuDNN is asked for first (flash, which the lower-right call gets, rounds the
72-wide heads up to 96). Timed alone on an H200 at a formation step's shapes it took 1.20-1.29 ms a layer against
1.63-1.64 ms for the lower-right call (benchmarks/results/formation/attention-kernels-h200*.json); compiled in the
fast reader, whose default it is (`run.reader_attention`), a training step took 99.9 against 124.4 ms at 256-token
passages (formation/profile-attention-h200-256.json).

Guarantee: inside `fused_memory_attention(reasoner)`, a forward pass with `memory_gate_bias` computes what the core
gated attention computes for that layout (tests/train/test_fused_attention.py checks logits and gradients against
it); a forward pass without memory is the stock attention, unchanged. Callers must only use it for the layout above.
Both layouts of `gated_causal_attention` compute the same values and gradients (the same tests).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from ..compat import attention_registries, base_attention_function, set_attention_implementation
from ..inject.attention import GATED_PREFIX

FUSED_NAME = "memsplice_fused_training"
EXTRA_DIMS = 8
GATE_FLOOR = -1e4
"""log g below this counts as a closed slot (a finite stand-in for -inf, so no 0 * inf reaches the gradients)."""
LAYOUTS = ("lower_right", "square")
SQUARE_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
"""The square layout's SDPA backends in order of preference (the first that accepts the inputs runs)."""
_registered = False


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def fused_gated_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    memory_gate_bias: torch.Tensor | None = None,
    **kwargs,
):
    """query (B, Hq, T, D); key, value (B, H, M+T, D) with memory first; memory_gate_bias (B, L, M)."""
    if memory_gate_bias is None:
        return base_attention_function("sdpa")(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    t, s = query.shape[2], key.shape[2]
    assert memory_gate_bias.shape[-1] == s - t, "fused attention needs the memory at the front of the cache"
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = gated_causal_attention(
        query,
        key,
        value,
        memory_gate_bias[:, module.layer_idx],
        scale,
        dropout=dropout if module.training else 0.0,
    )
    return out.transpose(1, 2).contiguous(), None


def gate_folded(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, gate_bias: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v with the gate folded into one extra key dimension and the head dim padded by `EXTRA_DIMS`:
    (B, Hq, T, D+8), (B, H, M+T, D+8), (B, H, M+T, D+8). q . k * scale is then the score plus log g on memory keys."""
    b, hq, t, _ = query.shape
    hk, s = key.shape[1], key.shape[2]
    bias = gate_bias.clamp(min=GATE_FLOOR).to(query.dtype) / scale  # (B, M)
    key_extra = torch.cat([bias, bias.new_zeros(b, t)], dim=1)  # (B, M+T)
    q = torch.cat([query, query.new_ones(b, hq, t, 1), query.new_zeros(b, hq, t, EXTRA_DIMS - 1)], dim=-1)
    k = torch.cat(
        [key, key_extra[:, None, :, None].expand(b, hk, s, 1), key.new_zeros(b, hk, s, EXTRA_DIMS - 1)],
        dim=-1,
    )
    return q, k, F.pad(value, (0, EXTRA_DIMS))


def gated_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gate_bias: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
    layout: str = "lower_right",
) -> torch.Tensor:
    """query (B, Hq, T, D); key, value (B, H, M+T, D) with memory first; gate_bias (B, M) log g per slot.

    Returns (B, Hq, T, D): text token i attends to every memory slot (its score raised by log g) and to text tokens
    <= i, in one SDPA call with no mask tensor. `layout`: "lower_right" (the (T, M+T) score matrix under its
    lower-right causal mask, K/V repeated per query head) or "square" (zero query rows in front, the plain causal
    mask, grouped K/V as they are, cuDNN first); see the module docstring."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown attention layout {layout!r}: one of {', '.join(LAYOUTS)}")
    b, hq, t, d = query.shape
    s = key.shape[2]
    q, k, v = gate_folded(query, key, value, gate_bias, scale)
    if layout == "square":
        m = s - t
        q = torch.cat([q.new_zeros(b, hq, m, d + EXTRA_DIMS), q], dim=2)  # (B, Hq, M+T, D+8)
        with sdpa_kernel(SQUARE_BACKENDS, set_priority=True):
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=True
            )
        return out[:, :, m:, :d]
    rep = hq // key.shape[1]
    out = F.scaled_dot_product_attention(
        q,
        _repeat_kv(k, rep),
        _repeat_kv(v, rep),
        attn_mask=causal_lower_right(t, s),
        dropout_p=dropout,
        scale=scale,
    )  # (B, Hq, T, D+8)
    return out[..., :d]


def register_fused_attention() -> str:
    global _registered
    if not _registered:
        functions, masks = attention_registries()
        functions.register(FUSED_NAME, fused_gated_attention)
        masks.register(FUSED_NAME, masks["sdpa"])  # built by the model, never read by the fused kernel
        _registered = True
    return FUSED_NAME


@contextlib.contextmanager
def fused_memory_attention(reasoner, enabled: bool = True):
    """Within this block the reasoner's attention is the fused training attention (when `enabled`)."""
    model = reasoner.model
    before = model.config._attn_implementation
    if not enabled:
        yield
        return
    if before != f"{GATED_PREFIX}sdpa":
        raise ValueError(
            f"fused training attention wraps sdpa; the reasoner uses {before!r} "
            "(load it with attn_implementation='sdpa' or set run.fused_attention: false)"
        )
    set_attention_implementation(model, register_fused_attention())
    try:
        yield
    finally:
        set_attention_implementation(model, before)
