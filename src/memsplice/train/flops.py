"""FLOP counting for formation steps, and model FLOPs utilisation (MFU) against the card's dense bf16 rate.

What is counted (matrix multiplies and attention scores; norms, activations and softmax are ignored, as usual):
- frozen reasoner: the forward pass over the text, and the activation gradient (no weight gradient: the reasoner
  is frozen), i.e. 2x the forward FLOPs for its linear layers and 2x for attention (dQ, dK, dV, dP);
- LM head at target positions only: forward, and its activation gradient;
- memory encoder and injection projections: forward and backward (activation and weight gradients): 3x forward;
- the reasoner's own forward pass over the passage, without gradient, where the encoder reads it (the causal-pool
  baseline, `MemoryConfig.encoder_reasoner_states`).
A multiply-add counts as 2 FLOPs. Attention counts each query against the keys it can see (causal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peak (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_BF16 = {
    "H200": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100 NVL": 835.0e12,
    "H100": 989.4e12,  # SXM (HBM3)
    "A100": 312.0e12,
    "L40S": 362.0e12,
    "A10G": 125.0e12,
}


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when unknown (e.g. a CPU)."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return None


@dataclass(frozen=True)
class ReasonerCost:
    linear_per_token: float
    """Forward FLOPs of all decoder linear layers for one token."""
    attn_per_query_key: float
    """Forward FLOPs of QK^T and PV for one (query, key) pair, summed over layers."""
    head_per_token: float
    """Forward FLOPs of the LM head for one target position."""

    @classmethod
    def from_reasoner(cls, reasoner) -> ReasonerCost:
        s = reasoner.shapes
        linear = 0
        for layer in reasoner.decoder.layers:
            linear += sum(
                2 * m.in_features * m.out_features for m in layer.modules() if isinstance(m, torch.nn.Linear)
            )
        return cls(linear, 2 * 2 * s.num_heads * s.head_dim * s.num_layers, 2 * s.hidden_size * s.vocab_size)


def _causal_pairs(queries: int, prefix: int) -> float:
    """(query, key) pairs when `queries` tokens follow `prefix` always-visible keys, causally."""
    return queries * prefix + queries * (queries + 1) / 2


def reasoner_read_flops(cost: ReasonerCost, rows: int, memory_slots: int, text: int, targets: int) -> float:
    """Forward + activation gradient of the reasoner reading `text` tokens after M slots, `targets` scored."""
    forward = rows * (
        text * cost.linear_per_token
        + _causal_pairs(text, memory_slots) * cost.attn_per_query_key
        + targets * cost.head_per_token
    )
    return 2.0 * forward


def encoder_flops(memory_model, rows: int, tokens: int) -> float:
    """Forward + backward of the memory encoder over `tokens` (+M slots) and of the injection projections."""
    cfg = memory_model.config
    params_linear = sum(
        2 * m.in_features * m.out_features
        for m in memory_model.encoder.modules()
        if isinstance(m, torch.nn.Linear)
    )
    s_len = tokens + cfg.num_slots
    forward = 0.0
    if cfg.encoder_type == "transformer":
        enc = memory_model.encoder
        in_out = 2 * enc.in_proj.in_features * enc.in_proj.out_features
        if enc.state_proj is not None:  # per token, like in_proj
            in_out += 2 * enc.state_proj.in_features * enc.state_proj.out_features
        out = 2 * enc.out_proj.in_features * enc.out_proj.out_features
        blocks = params_linear - in_out - out
        forward += rows * (tokens * in_out + s_len * blocks + cfg.num_slots * out)
        forward += rows * 2 * 2 * cfg.encoder_width * s_len * s_len * cfg.encoder_layers  # full attention
    op = memory_model.operator
    kv = 2 * sum(
        p.numel() for n, p in op.named_parameters() if n.endswith("weight")
    )  # 2 * d * (H*D) per layer
    forward += rows * cfg.num_slots * kv
    return 3.0 * forward
