"""Builders for formation tests: a small corpus on disk, a tiny training config, a tiny reasoner saved to a folder."""

from __future__ import annotations

import random

from memsplice.train import TrainConfig

WORDS = [
    "ada",
    "lives",
    "in",
    "lisbon",
    "and",
    "works",
    "as",
    "a",
    "carpenter",
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "memory",
    "slots",
    "are",
    "spliced",
    "into",
    "the",
    "cache",
    "of",
    "a",
    "frozen",
    "reasoner",
    "numbers",
    "like",
    "1234",
    "appear",
    "in",
    "facts",
]


def write_corpus(root, paragraphs: int = 400, seed: int = 0):
    """A corpus directory in the shared/data layout: tinyshakespeare blocks and a gutenberg book."""
    rng = random.Random(seed)
    for folder, name in (("tinyshakespeare", "input.txt"), ("gutenberg-nltk", "book.txt")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(paragraphs)]
        (root / folder / name).write_text("\n\n".join(paras))
    return root


def tiny_config(corpus, output, **sections) -> TrainConfig:
    base = {
        "memory": dict(
            num_slots=4,
            max_memory_tokens=48,
            encoder_layers=2,
            encoder_width=32,
            encoder_heads=2,
            embed_warmup_updates=1000,
        ),
        "data": dict(
            root=str(corpus),
            sources=["tinyshakespeare", "gutenberg-nltk"],
            lengths=[8, 16],
            tokens_per_step=64,
            synthetic_fraction=0.25,
            instruction="<|im_start|>assistant\n",
            cache_dir=str(output) + "-cache",
        ),
        "objectives": dict(
            reconstruction=1.0,
            continuation=0.2,
            denoising=0.2,
            infonce=0.1,
            continuation_length=6,
            aux_rows=4,
        ),
        "optim": dict(lr=3e-3, warmup_steps=2),
        "run": dict(
            steps=6,
            output_dir=str(output),
            device="cpu",
            eval_every=3,
            eval_passages=4,
            eval_lengths=[8, 16],
            log_every=1,
            save_every_steps=0,
            save_every_minutes=60.0,
        ),
    }
    for name, values in sections.items():
        base[name] = {**base[name], **values}
    return TrainConfig.from_dict(base)


def save_tiny_reasoner(directory):
    """A tiny random reasoner as a transformers folder (weights + tokenizer), loadable with --reasoner DIR."""
    from tiny import tiny_reasoner

    reasoner = tiny_reasoner("llama")
    reasoner.model.config._attn_implementation = "sdpa"
    reasoner.model.save_pretrained(directory)
    reasoner.tokenizer.save_pretrained(directory)
    return directory
