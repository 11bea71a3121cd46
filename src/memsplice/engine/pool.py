"""`DecoderPool`: one `GreedyDecoder` per cache size for one reasoner, each made on first use.

A decode step attends over the decoder's whole cache (masked positions included), so a short request should not run
in a cache sized for the longest one. The pool rounds what a request needs (live memory slots + prompt + new tokens)
up to a power of two, at least `min_len` and at most the reasoner's window, and keeps one decoder per size, with
its CUDA graphs, for every later request of that size.

Guarantees:
- `decoder_for(positions)` returns a decoder with at least `positions` cache positions, or None when `positions`
  exceeds the window (the caller decides what a request that does not fit gets).
- Decoders are made lazily, once per size, and reused. A pool and its decoders hold mutable buffers: use them from
  one thread at a time (the server's inference worker, the eval's `Reader`, one chat session).
"""

from __future__ import annotations

from .greedy import GreedyDecoder

DEFAULT_WINDOW = 2048
"""Window of a reasoner whose config names no maximum position."""

_NEUTRAL_GENERATION = {
    "num_beams": (None, 1),
    "penalty_alpha": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1, 1.0),
    "watermarking_config": (None,),
    "dola_layers": (None,),
}


def plain_greedy(reasoner) -> bool:
    """Whether transformers' greedy `generate()` of this reasoner is plain argmax decoding, i.e. its generation
    config sets nothing (repetition penalty, banned or forced tokens, beams, ...) that changes greedy tokens and
    that `GreedyDecoder` does not apply. Only then does the engine decode what eager greedy generation decodes."""
    config = getattr(reasoner.model, "generation_config", None)
    if config is None:
        return True
    return all(getattr(config, name, None) in neutral for name, neutral in _NEUTRAL_GENERATION.items())


class DecoderPool:
    """`GreedyDecoder`s of one reasoner by cache size (powers of two from `min_len` up to the window).

    max_new_tokens: the most tokens one request may decode (each decoder's output buffer).
    window: the most positions a request may use (default: the reasoner's maximum position, else 2048).
    decoder_kwargs: passed to every `GreedyDecoder` (cuda_graphs, compile_decode, compile_mode, ...).
    """

    def __init__(
        self,
        reasoner,
        *,
        max_new_tokens: int,
        min_len: int = 256,
        window: int | None = None,
        **decoder_kwargs,
    ):
        if max_new_tokens < 1 or min_len < 2:
            raise ValueError("DecoderPool needs max_new_tokens >= 1 and min_len >= 2")
        self.reasoner = reasoner
        self.max_new_tokens = int(max_new_tokens)
        self.min_len = int(min_len)
        self.window = int(window or reasoner.shapes.max_positions or DEFAULT_WINDOW)
        self.decoder_kwargs = decoder_kwargs
        self.decoders: dict[int, GreedyDecoder] = {}
        """The decoders made so far, by cache size."""

    def size_for(self, positions: int) -> int | None:
        """The cache size a request of `positions` positions runs in (None: it exceeds the window)."""
        if positions > self.window:
            return None
        return min(max(self.min_len, 1 << (max(positions, 1) - 1).bit_length()), self.window)

    def decoder_for(self, positions: int) -> GreedyDecoder | None:
        """The decoder for a request of `positions` positions (made on first use), or None if it does not fit."""
        size = self.size_for(positions)
        if size is None:
            return None
        if size not in self.decoders:
            self.decoders[size] = GreedyDecoder(
                self.reasoner, size, max_new_tokens=self.max_new_tokens, **self.decoder_kwargs
            )
        return self.decoders[size]
