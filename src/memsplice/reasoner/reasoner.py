"""The frozen reasoner: a Hugging Face causal LM that memsplice reads from but never changes.

Guarantees: after construction no parameter requires grad, the model is in eval mode, its attention runs through
memsplice's gated attention (identical to the stock implementation whenever no memory is passed), and its
`fingerprint` identifies its weights independently of dtype and device.
"""

from __future__ import annotations

import torch

from ..inject.attention import enable_gated_attention
from .identity import assert_frozen, fingerprint_weights, freeze, weights_digest
from .shapes import ReasonerShapes


class Reasoner:
    """A frozen causal LM with its tokenizer, shapes and identity."""

    def __init__(self, model, tokenizer=None, *, name: str | None = None, fingerprint: str | None = None):
        self.model = freeze(model)
        self.tokenizer = tokenizer
        self.shapes = ReasonerShapes.from_config(model.config)
        self.name = name or getattr(model.config, "_name_or_path", None) or model.config.model_type
        self.fingerprint = fingerprint or fingerprint_weights(model)
        enable_gated_attention(model)
        assert_frozen(self.model)
        self.derived: dict = {}
        """What callers build once from the frozen weights and share (e.g. `memsplice.train.fast_reader.shared_reader`'s
        fused copies); emptied by `to`, since it follows the weights' device and dtype."""

    # -- placement -------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Reasoner:
        self.model.to(device=device, dtype=dtype)
        self.derived.clear()
        return self

    # -- parts memory needs ----------------------------------------------------------------------------------
    @property
    def embedding_weight(self) -> torch.Tensor:
        """(V, d) input embedding matrix; the memory encoder's embedding starts as a copy of it."""
        return self.model.get_input_embeddings().weight

    @property
    def decoder(self) -> torch.nn.Module:
        """The decoder stack (`model.model` for Llama-like models): layers, norm, rotary embedding."""
        return self.model.get_decoder()

    def layer_attention(self, layer_idx: int) -> torch.nn.Module:
        return self.decoder.layers[layer_idx].self_attn

    def rotary_cos_sin(
        self, position_ids: torch.Tensor, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for `position_ids` (B, T) from the reasoner's own rotary embedding, in `like`'s dtype."""
        rotary = getattr(self.decoder, "rotary_emb", None)
        if rotary is None:
            raise NotImplementedError(f"{self.shapes.model_type} has no rotary embedding module")
        return rotary(like, position_ids)

    def weights_digest(self) -> str:
        return weights_digest(self.model)

    # -- text ------------------------------------------------------------------------------------------------
    def require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"reasoner {self.name!r} was loaded without a tokenizer; pass token ids instead")
        return self.tokenizer

    @property
    def eos_ids(self) -> list[int]:
        """Ids that end an answer, sorted: the tokenizer's eos, the generation config's (one id or a list), and the
        chat template's turn markers (`turn_marker_ids`): a reply that ends its turn or starts another is over."""
        tok = self.require_tokenizer()
        ids = {tok.eos_token_id, *turn_marker_ids(tok)}
        config_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
        return sorted(i for i in ids if i is not None)

    @property
    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn in the chat template (e.g. <|im_end|>), else the tokenizer's eos:
        what a training target ends with. Not the tokenizer's eos alone: a GGUF-loaded tokenizer's eos differs
        between transformers releases (<|im_start|> on some, <|im_end|> on others, for SmolLM2)."""
        tok = self.require_tokenizer()
        for name in END_OF_TURN_TOKENS:
            i = _token_id(tok, name)
            if i is not None:
                return i
        if tok.eos_token_id is None:
            raise ValueError(
                f"reasoner {self.name!r}: its tokenizer has neither an end-of-turn token nor an eos"
            )
        return tok.eos_token_id

    def chat_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` rendered with the reasoner's chat template (plain text if it has none)."""
        tok = self.require_tokenizer()
        if getattr(tok, "chat_template", None):
            out = tok.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True
            )
            ids = out["input_ids"] if hasattr(out, "keys") else out
            return list(ids)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant:"
        return tok(text, add_special_tokens=False)["input_ids"]

    def __repr__(self) -> str:
        s = self.shapes
        return (
            f"Reasoner({self.name!r}, layers={s.num_layers}, d={s.hidden_size}, heads={s.num_heads}/"
            f"{s.num_kv_heads}kv, head_dim={s.head_dim}, dtype={self.dtype}, device={self.device})"
        )


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>")
"""Chat-template tokens that close a turn (ChatML, Llama 3, Phi)."""
TURN_START_TOKENS = ("<|im_start|>", "<|start_header_id|>")
"""Chat-template tokens that open a turn."""


def _token_id(tokenizer, name: str) -> int | None:
    i = tokenizer.convert_tokens_to_ids(name)
    if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id:
        return i
    return None


def turn_marker_ids(tokenizer) -> set[int]:
    """Ids of the chat-template tokens that close or open a turn that `tokenizer` knows."""
    ids = (_token_id(tokenizer, name) for name in (*END_OF_TURN_TOKENS, *TURN_START_TOKENS))
    return {i for i in ids if i is not None}
