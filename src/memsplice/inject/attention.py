"""Gated attention: the reasoner's own attention plus an additive `log g` bias on the logits of memory positions.

memsplice registers, through transformers' public `AttentionInterface` and `AttentionMaskInterface`, an attention
function named `memsplice_<base>` that wraps the stock `<base>` ("sdpa" or "eager"). Called without the keyword
`memory_gate_bias` it *is* the stock function (same call, same arguments), so a reasoner with no memory computes
exactly what it computed before. Called with `memory_gate_bias` (B, L, M), it adds `bias[:, layer]` to the logits
of the first M key positions (the memory, which always sits at the front of the cache):
softmax weights become proportional to g * exp(q.k), so g -> 0 (bias -inf) removes a slot exactly.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

from ..compat import attention_registries, base_attention_function, set_attention_implementation

GATED_PREFIX = "memsplice_"
# generate() refuses model kwargs it does not know, so during generation the gate travels in a context variable
# (local to the thread and asyncio task that set it). Can go when generate() forwards custom model kwargs.
_ACTIVE_GATE: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "memsplice_gate", default=None
)
SUPPORTED_BASES = ("sdpa", "eager")
_registered: set[str] = set()


def additive_mask(
    attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor
) -> torch.Tensor:
    """The attention mask as an additive float tensor (B|1, 1, q, kv) in the query's dtype.

    None stands for a plain causal mask whose last query row sees every key (the convention of stock attention
    when the mask builder skips materialising a mask).
    """
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if attention_mask is None:
        rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        visible = torch.arange(kv_len, device=query.device)[None, :] <= rows  # (q, kv)
        attention_mask = visible[None, None]
    if attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        neg = torch.full((), float("-inf"), dtype=query.dtype, device=query.device)
        return torch.where(attention_mask, zero, neg)
    return attention_mask[..., :kv_len].to(query.dtype)


def apply_memory_gate(mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Add `bias` (B, M) to the first M key columns of an additive mask (B|1, 1, q, kv) -> (B, 1, q, kv)."""
    num_slots = bias.shape[-1]
    mask = mask.expand(bias.shape[0], -1, -1, -1)
    memory = mask[..., :num_slots] + bias[:, None, None, :].to(mask.dtype)
    mask = torch.cat([memory, mask[..., num_slots:]], dim=-1)
    # A query row that sees no key at all (a padding row in front of a memory-less row) would give NaN under
    # softmax and leak NaN into later layers through 0 * NaN; such rows are never read, so let them see everything.
    dead = torch.isneginf(mask).all(dim=-1, keepdim=True)
    return mask.masked_fill(dead, 0.0)


def gated_mask(
    attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """`apply_memory_gate(additive_mask(attention_mask, query, key), bias)`: the mask of one gated attention layer.

    For a boolean mask (what the stock mask builders give) the gate is padded to the keys and put in place by one
    `where` (two ops instead of five plus two constants), since every layer pays this in every forward pass. Equal
    values (where the definition adds 0 to 0 this keeps the gate's own zero, whose sign softmax does not see); the
    gate's gradient is summed over queries in another order."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return apply_memory_gate(additive_mask(attention_mask, query, key), bias)
    gate = F.pad(
        bias.to(query.dtype), (0, key.shape[-2] - bias.shape[-1])
    )  # (B, kv): log g on memory, 0 on text
    mask = torch.where(attention_mask, gate[:, None, None, :], float("-inf"))  # (B, 1, q, kv)
    dead = torch.isneginf(mask).all(dim=-1, keepdim=True)  # see apply_memory_gate
    return mask.masked_fill(dead, 0.0)


def _make_gated(base_name: str):
    base = base_attention_function(base_name)

    def gated_attention(module, query, key, value, attention_mask, *args, memory_gate_bias=None, **kwargs):
        if memory_gate_bias is None:
            memory_gate_bias = _ACTIVE_GATE.get()
        if memory_gate_bias is None:
            return base(module, query, key, value, attention_mask, *args, **kwargs)
        mask = gated_mask(attention_mask, query, key, memory_gate_bias[:, module.layer_idx])
        return base(module, query, key, value, mask, *args, **kwargs)

    gated_attention.__name__ = f"{GATED_PREFIX}{base_name}_attention"
    return gated_attention


def gated_name(base_name: str) -> str:
    return f"{GATED_PREFIX}{base_name}"


def register_gated_attention(base_name: str) -> str:
    """Register `memsplice_<base_name>` once per process; returns the registered name."""
    if base_name not in SUPPORTED_BASES:
        from ..reasoner.shapes import UnsupportedReasonerError

        raise UnsupportedReasonerError(
            f"attention implementation {base_name!r} cannot take a per-key bias; load the reasoner with "
            f"attn_implementation in {SUPPORTED_BASES}"
        )
    name = gated_name(base_name)
    if name not in _registered:
        functions, masks = attention_registries()
        functions.register(name, _make_gated(base_name))
        masks.register(name, masks[base_name])
        _registered.add(name)
    return name


def enable_gated_attention(model: torch.nn.Module) -> str:
    """Route `model`'s attention through the gated wrapper of its current implementation (idempotent)."""
    current = model.config._attn_implementation or "sdpa"
    if current.startswith(GATED_PREFIX):
        return current
    name = register_gated_attention(current)
    set_attention_implementation(model, name)
    return name


@contextlib.contextmanager
def active_memory_gate(gate_bias: torch.Tensor):
    """Within this block, gated attention applies `gate_bias` (B, L, M) when no explicit keyword is passed."""
    token = _ACTIVE_GATE.set(gate_bias)
    try:
        yield
    finally:
        _ACTIVE_GATE.reset(token)
