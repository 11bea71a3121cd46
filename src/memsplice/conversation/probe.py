"""How much attention the reasoner's queries give to each memory slot: an optional probe, off the hot path.

Under SDPA the reasoner never materialises attention weights, so the probe recomputes them for a few layers: one
forward pass with memory in front (the same splice as `forward_with_memory`) leaves the full cache (memory keys,
then the text's keys, post-RoPE); forward pre-hooks on the probed layers' attention modules capture that layer's
input hidden states and rotary cos/sin. From those, the layer's own `q_proj` (and `q_norm` where the architecture
has one) gives the queries, and the softmax over [memory | text] keys with the causal mask and the memory gate
bias gives exactly the weights the reasoner used (tests compare against eager attention's `output_attentions`).

The reading is averaged over probed layers, query heads and the selected query positions (e.g. the answer's):
`slot_mass` (B, M) is the attention weight each memory slot received, `memory_share` (B,) their sum, and `focus`
(B,) one minus the normalised entropy of the attention within memory (1: all on one slot, 0: uniform).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inject.attention import apply_memory_gate
from ..inject.memory_kv import MemoryKV
from ..inject.rope import rotate_keys
from ..inject.splice import splice_masks


@dataclass
class MemoryAttention:
    slot_mass: torch.Tensor
    """(B, M) mean attention weight per memory slot (over layers, heads, selected queries)."""
    memory_share: torch.Tensor
    """(B,) total attention weight on memory."""
    focus: torch.Tensor
    """(B,) one minus the normalised entropy of the attention restricted to memory, averaged over queries."""
    layers: list[int]


def _queries(
    attn: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Post-RoPE queries (B, Hq, T, D) of one attention module for its input `hidden` (B, T, d)."""
    if not hasattr(attn, "q_proj"):
        raise NotImplementedError(
            f"the attention probe needs a q_proj projection; {type(attn).__name__} has none"
        )
    b, t, _ = hidden.shape
    q = attn.q_proj(hidden).view(b, t, -1, attn.head_dim)  # (B, T, Hq, D)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    return rotate_keys(q.transpose(1, 2), cos, sin)


@torch.no_grad()
def memory_attention(
    reasoner,
    memory: MemoryKV,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    layers: list[int] | None = None,
    query_mask: torch.Tensor | None = None,
) -> MemoryAttention:
    """Attention the text's queries give to `memory`'s slots (see module docstring).

    layers: reasoner layers to probe (default: the last). query_mask (B, T) bool: queries to average over
    (default: every real token). Rows whose memory is not live get zeros.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    n_layers = reasoner.shapes.num_layers
    layers = [n_layers - 1] if layers is None else sorted({int(i) % n_layers for i in layers})
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    query_mask = attention_mask.bool() if query_mask is None else query_mask.bool() & attention_mask.bool()
    b, t = input_ids.shape
    m = memory.num_slots
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def capture(layer_idx):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            captured[layer_idx] = (hidden, cos, sin)

        return hook

    handles = [
        reasoner.layer_attention(i).register_forward_pre_hook(capture(i), with_kwargs=True) for i in layers
    ]
    try:
        full_mask, positions = splice_masks(memory, attention_mask)
        cache = memory.to_cache()
        bias = memory.gate_bias.to(device=reasoner.device, dtype=reasoner.dtype)
        reasoner.decoder(
            input_ids=input_ids,
            attention_mask=full_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            memory_gate_bias=bias,
        )
    finally:
        for h in handles:
            h.remove()

    # Causal mask over [memory | text] keys: memory columns visible to live rows, text columns causal and unpadded.
    causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()  # (T, T)
    text_ok = causal[None] & attention_mask.bool()[:, None, :]  # (B, T, T)
    mem_ok = memory.live.to(input_ids.device)[:, None, None].expand(b, t, m)  # (B, T, M)
    visible = torch.cat([mem_ok, text_ok], dim=-1)[:, None]  # (B, 1, T, M+T)
    mass = torch.zeros(b, m, device=input_ids.device)
    focus = torch.zeros(b, device=input_ids.device)
    weight = query_mask.float()  # (B, T)
    count = weight.sum(-1).clamp(min=1.0)
    for layer_idx in layers:
        hidden, cos, sin = captured[layer_idx]
        attn = reasoner.layer_attention(layer_idx)
        q = _queries(attn, hidden, cos, sin).float()  # (B, Hq, T, D)
        keys = cache.layers[layer_idx].keys.float()  # (B, H, M+T, D)
        keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)  # (B, Hq, M+T, D)
        logits = q @ keys.transpose(-1, -2) * attn.scaling  # (B, Hq, T, M+T)
        additive = torch.zeros_like(visible, dtype=torch.float32).masked_fill(~visible, float("-inf"))
        additive = apply_memory_gate(additive, memory.gate_bias[:, layer_idx].float().to(logits.device))
        probs = torch.softmax(logits + additive, dim=-1)[..., :m]  # (B, Hq, T, M)
        per_query = probs.mean(1)  # (B, T, M)
        mass += (per_query * weight[..., None]).sum(1) / count[:, None]
        within = probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)
        entropy = -(within * within.clamp(min=1e-12).log()).sum(-1).mean(1)  # (B, T)
        norm = torch.log(torch.tensor(float(max(m, 2))))
        focus += ((1.0 - entropy / norm) * weight).sum(-1) / count
    mass /= len(layers)
    focus /= len(layers)
    live = memory.live.to(mass.device)
    mass = torch.where(live[:, None], mass, torch.zeros_like(mass))
    focus = torch.where(live, focus, torch.zeros_like(focus))
    return MemoryAttention(slot_mass=mass, memory_share=mass.sum(-1), focus=focus, layers=layers)
