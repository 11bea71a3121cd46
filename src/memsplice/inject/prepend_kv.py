"""Token prepend (`prepend_kv`) and layer-specific concatenation (`layer_concat`).

`prepend_kv`: M memory positions whose keys and values in every layer are learned projections of the latents:
k_l = rope(rmsnorm(z) A_l + a_l), v_l = rmsnorm(z) B_l + b_l, rotated at positions 0..M-1.
`layer_concat`: the same projections for chosen target layers only; the other layers see no memory.

Initialisation ("kv_init"): "sink" starts a_l, b_l as the K/V the reasoner computes for its first token (BOS) at layer
l, and A_l, B_l as `kv_init_scale` times the "reasoner" projections, so that every slot of an untrained memory reads
like a copy of the sequence start (which a causal LM has learned to treat as harmless) instead of as random tokens
that pull attention away from the text; "reasoner" starts A_l, B_l as the reasoner's own k/v projections of layer l composed with
that layer's input norm weight, so an untrained latent already acts like a residual-stream state read by every layer;
"random" starts them at small random values.
"""

from __future__ import annotations

import torch
from torch import nn

from .operator import InjectionOperator
from .registry import register_operator
from .rope import memory_positions, rotate_keys


def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@register_operator("prepend_kv")
class PrependKV(InjectionOperator):
    def __init__(self, config, reasoner):
        super().__init__(config, reasoner)
        s = self.shapes
        layers = self.target_layers_from(config)
        self._layers = layers
        n, d, w = len(layers), s.hidden_size, s.kv_width
        self.key_weight = nn.Parameter(torch.empty(n, d, w))  # (Lt, d, H*D)
        self.value_weight = nn.Parameter(torch.empty(n, d, w))
        self.key_bias = nn.Parameter(torch.zeros(n, w))
        self.value_bias = nn.Parameter(torch.zeros(n, w))
        self.reset_parameters(config.kv_init, reasoner, sink_scale=getattr(config, "kv_init_scale", 0.1))

    def target_layers_from(self, config) -> list[int]:
        return list(range(self.shapes.num_layers))

    def target_layers(self) -> list[int]:
        return self._layers

    @torch.no_grad()
    def reset_parameters(self, kv_init: str, reasoner, sink_scale: float = 0.1) -> None:
        if kv_init == "random":
            nn.init.normal_(self.key_weight, std=self.shapes.hidden_size**-0.5)
            nn.init.normal_(self.value_weight, std=self.shapes.hidden_size**-0.5)
            return
        for i, layer_idx in enumerate(self._layers):
            block = reasoner.decoder.layers[layer_idx]
            attn = block.self_attn
            norm_w = getattr(block.input_layernorm, "weight", None)
            scale = norm_w.float() if norm_w is not None else 1.0
            # x_normed @ diag(scale) @ W^T  ==  rmsnorm_with_weight(x) @ W^T
            self.key_weight[i].copy_((attn.k_proj.weight.float() * scale).T)
            self.value_weight[i].copy_((attn.v_proj.weight.float() * scale).T)
            if getattr(attn.k_proj, "bias", None) is not None:
                self.key_bias[i].copy_(attn.k_proj.bias.float())
            if getattr(attn.v_proj, "bias", None) is not None:
                self.value_bias[i].copy_(attn.v_proj.bias.float())
        if kv_init == "sink":
            self.key_weight.mul_(sink_scale)
            self.value_weight.mul_(sink_scale)
            for i, (k, v) in enumerate(self._sink_kv(reasoner)):
                self.key_bias[i].copy_(k)
                self.value_bias[i].copy_(v)

    def _sink_kv(self, reasoner) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per target layer, the reasoner's own (pre-RoPE = position 0) key and value of its first token, (H*D,)."""
        from transformers import DynamicCache

        from ..compat import cache_layer_tensors

        tok = reasoner.tokenizer
        bos = getattr(tok, "bos_token_id", None) if tok is not None else None
        if bos is None:
            bos = getattr(reasoner.model.config, "bos_token_id", None)
        bos = 0 if bos is None else int(bos)
        cache = DynamicCache()
        reasoner.decoder(
            input_ids=torch.tensor([[bos]], device=reasoner.device), past_key_values=cache, use_cache=True
        )
        pairs = cache_layer_tensors(cache)  # (1, H, 1, D) per layer; RoPE at position 0 is the identity
        return [(pairs[j][0].reshape(-1).float(), pairs[j][1].reshape(-1).float()) for j in self._layers]

    def forward(self, latents, reasoner):
        s = self.shapes
        b, m, _ = latents.shape
        dtype = reasoner.dtype
        z = _rms(latents.float())  # (B, M, d)
        k = (
            torch.einsum("bmd,ldw->lbmw", z, self.key_weight) + self.key_bias[:, None, None]
        )  # (Lt, B, M, H*D)
        v = torch.einsum("bmd,ldw->lbmw", z, self.value_weight) + self.value_bias[:, None, None]
        k = k.view(-1, b, m, s.num_kv_heads, s.head_dim).transpose(2, 3)  # (Lt, B, H, M, D)
        v = v.view(-1, b, m, s.num_kv_heads, s.head_dim).transpose(2, 3)
        pos = memory_positions(b, m, latents.device)
        cos, sin = reasoner.rotary_cos_sin(pos, like=k)
        # Every target layer is rotated and cast at once (a few ops, not a few per layer); the per-layer tensors
        # are views of the result, so the backward pass stacks their gradients once.
        k = rotate_keys(k, cos, sin).to(dtype).unbind(0)
        v = v.to(dtype).unbind(0)
        if self._layers == list(range(s.num_layers)):
            return list(k), list(v)
        keys = [
            torch.zeros(b, s.num_kv_heads, m, s.head_dim, dtype=dtype, device=latents.device)
        ] * s.num_layers
        values = list(keys)
        for i, layer_idx in enumerate(self._layers):
            keys[layer_idx] = k[i]
            values[layer_idx] = v[i]
        return keys, values


@register_operator("layer_concat")
class LayerConcat(PrependKV):
    """Latents projected into the keys and values of `config.target_layers` only (default: the lower half)."""

    def target_layers_from(self, config) -> list[int]:
        n = self.shapes.num_layers
        layers = list(config.target_layers) if config.target_layers else list(range(max(1, n // 2)))
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"target_layers {bad} are outside the reasoner's {n} layers")
        return sorted(set(layers))
