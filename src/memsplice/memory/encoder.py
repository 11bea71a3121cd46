"""The zero-pretrained memory transformer: token ids in, M latent slots of the reasoner's width out.

Architecture: a bidirectional pre-norm transformer over [tokens; slots]. Tokens get learned absolute positions
(the encoder reads at most `max_memory_tokens`), slots are learned queries; every layer lets slots read all tokens
and each other, and tokens read each other and the slots. The slot outputs, projected to the reasoner's width,
are the latents z (B, M, d).

Initialisation is random everywhere except the token embedding, which starts *tied* to the reasoner's embedding
matrix: while tied it is the reasoner's tensor itself (no copy, no gradient). `untie_embedding()` turns it into a
trainable float32 copy; the training loop does that after `embed_warmup_updates` optimizer updates.

With `MemoryConfig.encoder_reasoner_states` the encoder also reads the frozen reasoner's hidden states of its input
(`reasoner_states`): every layer's states are RMS-normalised, mixed by learned softmax weights and projected into
the token inputs by a matrix that starts at zero, so adding the channel to a trained encoder changes nothing until
training gives it a use (`add_reasoner_states`). The states are computed without gradient: the reasoner stays frozen.

With `MemoryConfig.slot_attention="chunk"` slot j attends, in every layer, only to the j-th of M contiguous chunks of
the input's tokens (`slot_spans`, the chunking of the causal-pool baseline) and to the slots; tokens still read
everything, so a slot sees the rest of the passage through its own chunk's token states.

Two variants serve as baselines, chosen by `MemoryConfig.encoder_type` / `encoder_init` through `build_encoder`:
- `encoder_init="reasoner"` starts the blocks as copies of the reasoner's first layers (the language-prior
  ablation). The copy is as close as the architectures allow: the encoder is bidirectional and has learned absolute
  positions instead of RoPE, and attention biases (Qwen2) are not carried over.
- `encoder_type="causal_pool"` (`CausalPoolEncoder`) has no weights: its latents are the reasoner's own final
  hidden states of the input, mean-pooled over M contiguous chunks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def checked_memory_mask(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_tokens: int
) -> torch.Tensor:
    """The attention mask of a memory input (all ones when None), after refusing input longer than the encoder reads."""
    t = input_ids.shape[1]
    if t > max_tokens:
        raise ValueError(
            f"memory input has {t} tokens; the encoder reads at most {max_tokens} "
            "(max_memory_tokens): chunk or evict first"
        )
    return torch.ones_like(input_ids) if attention_mask is None else attention_mask


@torch.no_grad()
def reasoner_states(reasoner, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(L+1, B, T, d): the reasoner's hidden states of the input (its embeddings, then every layer's output), read
    as ordinary text, in the reasoner's dtype."""
    out = reasoner.decoder(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True
    )
    return torch.stack(out.hidden_states)


def slot_spans(attention_mask: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(B, M, T) bool: slot j's chunk of each row's n real tokens, counted in order whatever the padding: tokens
    [floor(j*n/M), floor((j+1)*n/M)), at least one token (a row shorter than M shares tokens between slots; a row
    without tokens gives its slots none)."""
    real = attention_mask.bool()
    rank = real.long().cumsum(1) - 1  # (B, T): index among the row's real tokens
    n = real.long().sum(1, keepdim=True)  # (B, 1)
    j = torch.arange(num_slots, device=real.device)[None]  # (1, M)
    start = j * n // num_slots  # (B, M)
    end = torch.maximum((j + 1) * n // num_slots, start + 1)
    r = rank[:, None, :]
    return real[:, None, :] & (r >= start[..., None]) & (r < end[..., None])


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.attn_norm = RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.mlp_norm = RMSNorm(width)
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # x (B, S, w); key_mask (B, 1, 1 or S, S) bool, True where a key may be attended
        b, s, w = x.shape
        q, k, v = (
            self.qkv(self.attn_norm(x)).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        )
        drop = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=drop)  # (B, h, S, w/h)
        x = x + F.dropout(self.out(a.transpose(1, 2).reshape(b, s, w)), drop, self.training)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + F.dropout(self.down(F.silu(gate) * up), drop, self.training)


class MemoryEncoder(nn.Module):
    def __init__(self, config, reasoner_embedding: torch.Tensor, reasoner_layers: int | None = None):
        super().__init__()
        vocab, d = reasoner_embedding.shape
        w = config.encoder_width
        self.num_slots = config.num_slots
        self.max_tokens = config.max_memory_tokens
        self.vocab_size = vocab
        self.slot_attention = config.slot_attention
        # While tied, the embedding is the reasoner's own tensor, held outside the module's parameters.
        self.__dict__["_tied_embedding"] = reasoner_embedding
        self.token_embedding: nn.Parameter | None = None
        self.in_proj = nn.Linear(d, w, bias=False)
        self.position = nn.Parameter(torch.randn(config.max_memory_tokens, w) * 0.02)
        self.slots = nn.Parameter(torch.randn(config.num_slots, w) * 0.02)
        self.blocks = nn.ModuleList(
            EncoderBlock(w, config.encoder_heads, int(config.encoder_mlp_ratio * w), config.dropout)
            for _ in range(config.encoder_layers)
        )
        self.final_norm = RMSNorm(w)
        self.out_proj = nn.Linear(w, d, bias=False)
        self.apply(self._init_linear)
        self.state_mix: nn.Parameter | None = None
        self.state_proj: nn.Linear | None = None
        if getattr(config, "encoder_reasoner_states", False):
            if reasoner_layers is None:
                raise ValueError("an encoder that reads the reasoner's states needs its number of layers")
            self.add_reasoner_states(reasoner_layers)

    @property
    def reads_reasoner_states(self) -> bool:
        return self.state_proj is not None

    @torch.no_grad()
    def add_reasoner_states(self, reasoner_layers: int) -> None:
        """Give the encoder its reasoner-state input: mixing weights over the reasoner's L+1 hidden states (equal at
        first) and a projection into the token inputs that starts at zero, so the latents are unchanged."""
        if self.state_proj is not None:
            raise ValueError("the encoder already reads the reasoner's states")
        ref = self.in_proj.weight
        self.state_mix = nn.Parameter(torch.zeros(reasoner_layers + 1, device=ref.device, dtype=ref.dtype))
        self.state_proj = nn.Linear(self.in_proj.in_features, self.in_proj.out_features, bias=False)
        self.state_proj.to(device=ref.device, dtype=ref.dtype).weight.zero_()

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

    # -- growth ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def add_blocks(self, count: int) -> None:
        """Append `count` blocks that start as the identity (their attention output and MLP down projections are
        zero), so the grown encoder computes exactly what it did; training then gives them a function. Used to ask
        whether a trained encoder is limited by its depth (`scripts/formation/grow_encoder.py`)."""
        if count < 1:
            raise ValueError(f"add at least one block, not {count}")
        first = self.blocks[0]
        ref = first.out.weight
        for _ in range(count):
            block = EncoderBlock(first.out.in_features, first.heads, first.down.in_features, first.dropout)
            block.apply(self._init_linear)
            block.out.weight.zero_()
            block.down.weight.zero_()
            self.blocks.append(block.to(device=ref.device, dtype=ref.dtype))

    @torch.no_grad()
    def widen(self, width: int, mlp_width: int) -> None:
        """Widen the residual stream to `width` and the MLP to `mlp_width` so that the encoder computes what it did (up
        to rounding), to ask whether a trained encoder is limited by its width (`scripts/formation/grow_encoder.py
        --width`).

        Head width stays; the new heads and the new MLP units are random. Everything that
        writes the new stream dimensions starts at zero (input projections, positions, slots, attention output and
        MLP down projection rows), and so does every path from a new head or MLP unit into the old dimensions, so the
        new dimensions hold zeros until training moves them; what reads them is random, so they get a gradient.
        RMSNorm gains are scaled by sqrt(old / new), so the zero-padded stream is normalised as before except for
        the norms' eps, now added to a mean over more dimensions: on the shipped checkpoint the latents move by
        1.7e-4 (to width 512) and 4.7e-4 (to 576) of their norm, below bf16 rounding."""
        first = self.blocks[0]
        w, head_w = first.out.in_features, first.out.in_features // first.heads
        hidden = first.down.in_features
        if width <= w or width % head_w:
            raise ValueError(f"widen to a multiple of the head width {head_w} above {w}, not {width}")
        if mlp_width < hidden:
            raise ValueError(f"the MLP cannot narrow from {hidden} to {mlp_width}")
        new_hidden = mlp_width
        ref = first.out.weight
        gain = (w / width) ** 0.5

        def grown(old: nn.Linear, rows: int, cols: int, keep_rows, keep_cols, zero_rows=(), zero_cols=()):
            lin = nn.Linear(cols, rows, bias=False)
            self._init_linear(lin)
            lin = lin.to(device=ref.device, dtype=ref.dtype)
            for r0, (a, b) in enumerate(keep_rows):
                lin.weight[a:b, keep_cols[0] : keep_cols[1]] = old.weight[
                    r0 * (b - a) : (r0 + 1) * (b - a), :
                ]
            for a, b in zero_rows:
                lin.weight[a:b] = 0
            for a, b in zero_cols:
                lin.weight[:, a:b] = 0
            return lin

        def norm(old: RMSNorm) -> RMSNorm:
            n = RMSNorm(width, old.eps).to(device=ref.device, dtype=ref.dtype)
            n.weight.fill_(gain)
            n.weight[:w] = old.weight * gain
            return n

        for block in self.blocks:
            block.qkv = grown(
                block.qkv, 3 * width, width, [(i * width, i * width + w) for i in range(3)], (0, w)
            )
            block.out = grown(
                block.out, width, width, [(0, w)], (0, w), zero_rows=[(w, width)], zero_cols=[(w, width)]
            )
            block.gate_up = grown(
                block.gate_up, 2 * new_hidden, width, [(0, hidden), (new_hidden, new_hidden + hidden)], (0, w)
            )
            block.down = grown(
                block.down,
                width,
                new_hidden,
                [(0, w)],
                (0, hidden),
                zero_rows=[(w, width)],
                zero_cols=[(hidden, new_hidden)],
            )
            block.attn_norm, block.mlp_norm = norm(block.attn_norm), norm(block.mlp_norm)
            block.heads = width // head_w
        d = self.in_proj.in_features
        self.in_proj = grown(self.in_proj, width, d, [(0, w)], (0, d), zero_rows=[(w, width)])
        if self.state_proj is not None:
            self.state_proj = grown(self.state_proj, width, d, [(0, w)], (0, d), zero_rows=[(w, width)])
        self.position = nn.Parameter(F.pad(self.position.data, (0, width - w)))
        self.slots = nn.Parameter(F.pad(self.slots.data, (0, width - w)))
        self.final_norm = norm(self.final_norm)
        out = nn.Linear(width, self.out_proj.out_features, bias=False)
        self._init_linear(out)
        out = out.to(device=ref.device, dtype=ref.dtype)
        out.weight[:, :w] = self.out_proj.weight
        self.out_proj = out

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) with T <= max_memory_tokens, attention_mask (B, T) -> latents (B, M, d) in float32.
        `states` (L+1, B, T, d): the reasoner's hidden states of the input (`reasoner_states`), needed exactly when
        the encoder reads them."""
        b, t = input_ids.shape
        attention_mask = checked_memory_mask(input_ids, attention_mask, self.max_tokens)
        weight = self.embedding_weight()
        dtype = self.in_proj.weight.dtype
        tokens = self.in_proj(F.embedding(input_ids, weight).to(dtype)) + self.position[:t]  # (B, T, w)
        if self.state_proj is not None:
            if (
                states is None
                or states.shape[1:3] != input_ids.shape
                or states.shape[0] != len(self.state_mix)
            ):
                raise ValueError(
                    f"this encoder reads the reasoner's {len(self.state_mix)} hidden states of its input "
                    f"(L+1, B, T, d); got {None if states is None else tuple(states.shape)}"
                )
            s = states.float()
            s = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)
            mixed = torch.einsum("l,lbtd->btd", torch.softmax(self.state_mix.float(), 0), s)
            tokens = tokens + self.state_proj(mixed.to(dtype))
        elif states is not None:
            raise ValueError("this encoder does not read the reasoner's states")
        slots = self.slots.expand(b, -1, -1)  # (B, M, w)
        x = torch.cat([tokens, slots], dim=1)  # (B, T+M, w)
        keep = torch.cat(
            [attention_mask.bool(), torch.ones(b, self.num_slots, dtype=torch.bool, device=x.device)], 1
        )
        key_mask = keep[:, None, None, :]  # (B, 1, 1, T+M): every query reads every real key
        if self.slot_attention == "chunk":
            slot_rows = torch.cat(
                [
                    slot_spans(attention_mask, self.num_slots),
                    torch.ones(b, self.num_slots, self.num_slots, dtype=torch.bool, device=x.device),
                ],
                2,
            )  # (B, M, T+M): slot j reads its chunk and the slots
            key_mask = torch.cat([keep[:, None, :].expand(b, t, -1), slot_rows], 1)[:, None]  # (B, 1, S, S)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.out_proj(self.final_norm(x[:, t:]))  # (B, M, d)

    @torch.no_grad()
    def init_from_reasoner(self, reasoner) -> None:
        """Copy the reasoner's first `len(self.blocks)` layers into the blocks (see the module docstring).

        The encoder must have the reasoner's width, query heads and MLP width; in/out projections start as the
        identity and the final norm as the reasoner's.
        """
        s = reasoner.shapes
        w = self.in_proj.out_features
        block = self.blocks[0]
        hidden = block.down.in_features
        layers = reasoner.decoder.layers
        problems = []
        if w != s.hidden_size:
            problems.append(f"encoder_width={w} must equal the reasoner's hidden size {s.hidden_size}")
        if block.heads != s.num_heads or w // block.heads != s.head_dim:
            problems.append(
                f"encoder_heads={block.heads} must equal the reasoner's {s.num_heads} query heads"
            )
        mlp = getattr(layers[0], "mlp", None)
        if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            problems.append(f"{s.model_type} layers have no gated MLP to copy")
        elif hidden != mlp.gate_proj.out_features:
            problems.append(
                f"encoder MLP width {hidden} must equal the reasoner's {mlp.gate_proj.out_features} "
                f"(encoder_mlp_ratio={mlp.gate_proj.out_features / w!r})"
            )
        if len(self.blocks) > len(layers):
            problems.append(f"encoder_layers={len(self.blocks)} exceeds the reasoner's {len(layers)} layers")
        if problems:
            raise ValueError(
                "encoder_init='reasoner' needs an encoder shaped like the reasoner: " + "; ".join(problems)
            )
        rep = s.num_heads // s.num_kv_heads
        for mine, theirs in zip(self.blocks, layers, strict=False):
            attn = theirs.self_attn
            k = attn.k_proj.weight.float().view(s.num_kv_heads, s.head_dim, -1).repeat_interleave(rep, 0)
            v = attn.v_proj.weight.float().view(s.num_kv_heads, s.head_dim, -1).repeat_interleave(rep, 0)
            mine.qkv.weight.copy_(torch.cat([attn.q_proj.weight.float(), k.reshape(w, -1), v.reshape(w, -1)]))
            mine.out.weight.copy_(attn.o_proj.weight.float())
            mine.gate_up.weight.copy_(
                torch.cat([theirs.mlp.gate_proj.weight.float(), theirs.mlp.up_proj.weight.float()])
            )
            mine.down.weight.copy_(theirs.mlp.down_proj.weight.float())
            mine.attn_norm.weight.copy_(theirs.input_layernorm.weight.float())
            mine.mlp_norm.weight.copy_(theirs.post_attention_layernorm.weight.float())
        self.in_proj.weight.copy_(torch.eye(w))
        self.out_proj.weight.copy_(torch.eye(w))
        norm = getattr(reasoner.decoder, "norm", None)
        if norm is not None and getattr(norm, "weight", None) is not None:
            self.final_norm.weight.copy_(norm.weight.float())


class CausalPoolEncoder(nn.Module):
    """Latents from the reasoner's own causal hidden states: no trainable weights (a baseline, not a memory).

    The reasoner reads the input as ordinary text; its final hidden states (B, T, d) are mean-pooled over M
    contiguous chunks of each row's tokens (a row shorter than M repeats tokens) into latents (B, M, d).
    """

    def __init__(self, config, reasoner):
        super().__init__()
        self.num_slots = config.num_slots
        self.max_tokens = config.max_memory_tokens
        self.vocab_size = reasoner.shapes.vocab_size
        self.__dict__["reasoner"] = reasoner
        self.token_embedding = None

    @property
    def embedding_tied(self) -> bool:
        return True

    def embedding_weight(self) -> torch.Tensor:
        return self.reasoner.embedding_weight

    def untie_embedding(self):
        raise ValueError(
            "the causal-pool encoder reads through the frozen reasoner; it has no embedding to untie"
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        attention_mask = checked_memory_mask(input_ids, attention_mask, self.max_tokens)
        if bool((attention_mask[:, 1:].long() > attention_mask[:, :-1].long()).any()):
            raise ValueError("the causal-pool encoder needs right-padded input (ones, then zeros)")
        with torch.no_grad():
            hidden = self.reasoner.decoder(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state  # (B, T, d)
        weights = slot_spans(attention_mask, self.num_slots).float()  # (B, M, T)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)
        return torch.bmm(weights, hidden.float())  # (B, M, d)


def build_encoder(config, reasoner) -> nn.Module:
    """The encoder `config` asks for, bound to `reasoner` (see the module docstring)."""
    if config.encoder_type == "causal_pool":
        return CausalPoolEncoder(config, reasoner)
    encoder = MemoryEncoder(config, reasoner.embedding_weight, reasoner.shapes.num_layers)
    if config.encoder_init == "reasoner":
        encoder.init_from_reasoner(reasoner)
    return encoder
