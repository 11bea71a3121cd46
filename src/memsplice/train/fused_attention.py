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

`split_gated_causal_attention` computes the same attention for the same layout without the padded dimension: the
text's causal attention over itself in the flash kernel at the native head dim, the memory columns as a small
score matrix with log(g) added, the two merged by their log-sum-exps (the fast reader's `reader_attention: split`).

Guarantee: inside `fused_memory_attention(reasoner)`, a forward pass with `memory_gate_bias` computes what the core
gated attention computes for that layout (tests/train/test_fused_attention.py checks logits and gradients against
it); a forward pass without memory is the stock attention, unchanged. Callers must only use it for the layout above.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..compat import attention_registries, base_attention_function, set_attention_implementation
from ..inject.attention import GATED_PREFIX

FUSED_NAME = "memsplice_fused_training"
EXTRA_DIMS = 8
GATE_FLOOR = -1e4
"""log g below this counts as a closed slot (a finite stand-in for -inf, so no 0 * inf reaches the gradients)."""
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


def gated_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gate_bias: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """query (B, Hq, T, D); key, value (B, H, M+T, D) with memory first; gate_bias (B, M) log g per slot.

    Returns (B, Hq, T, D): text token i attends to every memory slot (its score raised by log g) and to text tokens
    <= i, in one SDPA call with no mask tensor (see the module docstring)."""
    b, hq, t, d = query.shape
    hk, s = key.shape[1], key.shape[2]
    bias = gate_bias.clamp(min=GATE_FLOOR).to(query.dtype) / scale  # (B, M)
    key_extra = torch.cat([bias, bias.new_zeros(b, t)], dim=1)  # (B, M+T)
    q = torch.cat([query, query.new_ones(b, hq, t, 1), query.new_zeros(b, hq, t, EXTRA_DIMS - 1)], dim=-1)
    k = torch.cat(
        [key, key_extra[:, None, :, None].expand(b, hk, s, 1), key.new_zeros(b, hk, s, EXTRA_DIMS - 1)],
        dim=-1,
    )  # (B, H, M+T, D+8)
    v = F.pad(value, (0, EXTRA_DIMS))
    rep = hq // hk
    out = F.scaled_dot_product_attention(
        q,
        _repeat_kv(k, rep),
        _repeat_kv(v, rep),
        attn_mask=causal_lower_right(t, s),
        dropout_p=dropout,
        scale=scale,
    )  # (B, Hq, T, D+8)
    return out[..., :d]


class _CausalFlash(torch.autograd.Function):
    """Causal self-attention of (B, H, T, D) q/k/v through the flash kernel, returning its log-sum-exp (B, H, T) too,
    with a gradient for both (K/V may have fewer heads than q: grouped-query attention).

    The kernel's backward takes each row's D_i = dO_i . O_i from the output it is handed. A loss that also depends
    on lse_i adds g_i * p_ij to every score's gradient, which is the same as lowering D_i by g_i = dL/d lse_i; so the
    backward hands the kernel O_i - (g_i / |dO_i|^2) dO_i instead of O_i (rows with dO_i = 0 get no shift: for the
    merged attention below g_i is then 0 too), computed in units of the row's largest |dO_i| so that it neither
    underflows nor overflows. dV does not read O, so nothing else changes."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        t = q.shape[2]
        if q.is_cuda:
            out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = (
                torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
            )
            ctx.kernel_args = (cum_q, cum_k, max_q, max_k, seed, offset)
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, True, scale=scale
            )
            ctx.kernel_args = None
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse[..., :t]

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if grad_lse is not None:
            # in units of each row's largest |dO| (gradients of a token-averaged loss are tiny: |dO|^2 taken as it
            # is underflows float32, and the shift then drops the log-sum-exp's gradient)
            go = grad_out.float()
            top = go.abs().amax(-1, keepdim=True)
            unit = go / torch.where(top > 0, top, 1.0)
            norm2 = unit.square().sum(-1, keepdim=True)  # >= 1 where top > 0
            shift = torch.where(top > 0, grad_lse.float()[..., None] / (top * norm2.clamp(min=1.0)), 0.0)
            out = (out.float() - shift * unit).to(out.dtype)
        if ctx.kernel_args is not None:
            cum_q, cum_k, max_q, max_k, seed, offset = ctx.kernel_args
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                grad_out,
                q,
                k,
                v,
                out,
                lse,
                cum_q,
                cum_k,
                max_q,
                max_k,
                0.0,
                True,
                seed,
                offset,
                scale=ctx.scale,
            )
        else:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out, q, k, v, out, lse, 0.0, True, scale=ctx.scale
            )
        return dq, dk, dv, None


def split_gated_causal_attention(
    query: torch.Tensor,
    text_keys: torch.Tensor,
    text_values: torch.Tensor,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    gate_bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`gated_causal_attention` computed in two parts and merged: the same result, at the native head dim.

    query (B, Hq, T, D); text keys/values (B, H, T, D); memory keys/values (B, H, M, D); gate_bias (B, M) log g.
    The text attends to itself causally in the flash kernel at head dim D with grouped K/V read in place (no padded
    key dimension, no repeated K/V, no concatenated cache); the M memory columns, with log g added to their scores,
    are a small score matrix of their own. The two softmaxes are merged by their log-sum-exps, and the text part's
    log-sum-exp carries its gradient back through the kernel (`_CausalFlash`)."""
    b, hq, t, d = query.shape
    hk = memory_keys.shape[1]
    rep = hq // hk
    text_out, text_lse = _CausalFlash.apply(query, text_keys, text_values, scale)  # (B, Hq, T, D), (B, Hq, T)
    # float32 throughout, as the flash kernel keeps its scores: a bf16 score of a sharp memory column is off by
    # up to half a unit, which moves that column's softmax weight by tens of percent (and made training diverge)
    grouped = query.float().reshape(b, hk, rep * t, d)  # heads h*rep .. h*rep+rep-1 read K/V head h
    scores = torch.matmul(grouped, memory_keys.float().transpose(-1, -2)) * scale
    scores = scores + gate_bias.clamp(min=GATE_FLOOR).float()[:, None, None, :]  # (B, H, rep*T, M)
    memory_lse = torch.logsumexp(scores, dim=-1).view(b, hq, t)
    memory_out = torch.matmul(torch.softmax(scores, dim=-1), memory_values.float())
    lse = torch.logaddexp(text_lse, memory_lse)
    out = (text_lse - lse).exp()[..., None] * text_out.float() + (memory_lse - lse).exp()[
        ..., None
    ] * memory_out.view(b, hq, t, d)
    return out.to(query.dtype)


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
