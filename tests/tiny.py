"""Tiny random reasoners built from configs (no downloads), for fast CPU tests.

`tiny_reasoner("llama")` has GQA (4 query heads, 2 KV heads); "qwen2" has GQA and attention biases; "llama_mha"
has no GQA. `tiny_tokenizer()` is a real byte-level BPE trained in milliseconds on a few sentences, with a chat
template, so code paths that need text work without the real model.
"""

from __future__ import annotations

import functools

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from memsplice.reasoner import Reasoner

VOCAB = 384

_CORPUS = [
    "Ada Lovelace lives in Lisbon and works as a carpenter.",
    "The quick brown fox jumps over the lazy dog.",
    "user: What is the capital of France? assistant: Paris.",
    "Memory slots are spliced into the key-value cache of a frozen reasoner.",
    "Numbers like 1234 and dates like 2024-05-17 appear in facts.",
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", layers: int = 3):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        return LlamaConfig(**common, num_key_value_heads=2, head_dim=16, rope_theta=10000.0)
    if arch == "llama_mha":
        return LlamaConfig(**common, num_key_value_heads=4, head_dim=16)
    if arch == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=2)
    raise ValueError(arch)


def tiny_reasoner(arch: str = "llama", seed: int = 0, attn: str = "sdpa", layers: int = 3) -> Reasoner:
    torch.manual_seed(seed)
    config = tiny_config(arch, layers)
    config._attn_implementation = attn
    cls = Qwen2ForCausalLM if arch == "qwen2" else LlamaForCausalLM
    model = cls(config).float()
    # Random init puts tiny weights everywhere; scale up so logits differ visibly between inputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    return Reasoner(model, tiny_tokenizer(), name=f"tiny-{arch}-{seed}")
