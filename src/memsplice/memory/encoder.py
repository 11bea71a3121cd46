"""The zero-pretrained memory transformer: token ids in, M latent slots of the reasoner's width out.

Architecture: a bidirectional pre-norm transformer over [tokens; slots]. Tokens get learned absolute positions
(the encoder reads at most `max_memory_tokens`), slots are learned queries; every layer lets slots read all tokens
and each other, and tokens read each other and the slots. The slot outputs, projected to the reasoner's width,
are the latents z (B, M, d).

Initialisation is random everywhere except the token embedding, which starts *tied* to the reasoner's embedding
matrix: while tied it is the reasoner's tensor itself (no copy, no gradient). `untie_embedding()` turns it into a
trainable float32 copy; the training loop does that after `embed_warmup_updates` optimizer updates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.attn_norm = RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        hidden = int(mlp_ratio * width)
        self.mlp_norm = RMSNorm(width)
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # x (B, S, w); key_mask (B, 1, 1, S) bool, True where a key may be attended
        b, s, w = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=drop)  # (B, h, S, w/h)
        x = x + F.dropout(self.out(a.transpose(1, 2).reshape(b, s, w)), drop, self.training)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + F.dropout(self.down(F.silu(gate) * up), drop, self.training)


class MemoryEncoder(nn.Module):
    def __init__(self, config, reasoner_embedding: torch.Tensor):
        super().__init__()
        vocab, d = reasoner_embedding.shape
        w = config.encoder_width
        self.num_slots = config.num_slots
        self.max_tokens = config.max_memory_tokens
        self.vocab_size = vocab
        # While tied, the embedding is the reasoner's own tensor, held outside the module's parameters.
        self.__dict__["_tied_embedding"] = reasoner_embedding
        self.token_embedding: nn.Parameter | None = None
        self.in_proj = nn.Linear(d, w, bias=False)
        self.position = nn.Parameter(torch.randn(config.max_memory_tokens, w) * 0.02)
        self.slots = nn.Parameter(torch.randn(config.num_slots, w) * 0.02)
        self.blocks = nn.ModuleList(
            EncoderBlock(w, config.encoder_heads, config.encoder_mlp_ratio, config.dropout)
            for _ in range(config.encoder_layers)
        )
        self.final_norm = RMSNorm(w)
        self.out_proj = nn.Linear(w, d, bias=False)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features**-0.5)

    # -- the tied embedding ----------------------------------------------------------------------------------
    @property
    def embedding_tied(self) -> bool:
        return self.token_embedding is None

    def embedding_weight(self) -> torch.Tensor:
        return self._tied_embedding if self.token_embedding is None else self.token_embedding

    def untie_embedding(self) -> nn.Parameter:
        """Replace the tied (frozen) reasoner embedding by a trainable float32 copy; returns the new parameter."""
        if self.token_embedding is None:
            self.token_embedding = nn.Parameter(self._tied_embedding.detach().float().clone())
        return self.token_embedding

    def retie_embedding(self, reasoner_embedding: torch.Tensor) -> None:
        self.__dict__["_tied_embedding"] = reasoner_embedding
        self.token_embedding = None

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) with T <= max_memory_tokens, attention_mask (B, T) -> latents (B, M, d) in float32."""
        b, t = input_ids.shape
        if t > self.max_tokens:
            raise ValueError(f"memory input has {t} tokens; the encoder reads at most {self.max_tokens} "
                             "(max_memory_tokens): chunk or evict first")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        weight = self.embedding_weight()
        dtype = self.in_proj.weight.dtype
        tokens = self.in_proj(F.embedding(input_ids, weight).to(dtype)) + self.position[:t]  # (B, T, w)
        slots = self.slots.expand(b, -1, -1)  # (B, M, w)
        x = torch.cat([tokens, slots], dim=1)  # (B, T+M, w)
        keep = torch.cat([attention_mask.bool(), torch.ones(b, self.num_slots, dtype=torch.bool, device=x.device)], 1)
        key_mask = keep[:, None, None, :]  # (B, 1, 1, T+M)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.out_proj(self.final_norm(x[:, t:]))  # (B, M, d)
