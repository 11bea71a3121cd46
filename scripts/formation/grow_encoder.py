"""Grow a trained memory's encoder without changing what it writes, to ask what limits it.

- `--add-blocks N`: N blocks on top of the trained ones with their attention output and MLP down projections at
  zero (is it the encoder's depth?);
- `--reasoner-states`: a second input channel, the frozen reasoner's hidden states of the passage mixed over its
  layers, through a projection that starts at zero (is it what the encoder reads: token embeddings alone, with
  no view of the representation the reasoner's queries come from?);
- `--width W`: a wider residual stream, more heads of the same width and a wider MLP, whose new dimensions start
  at zero (is it the encoder's width: its slots carry `encoder_width` numbers each, the latents live in a subspace
  of that rank?);
- `--slot-attention chunk`: not a growth but a change of what the slots read (`MemoryConfig.slot_attention`): slot j
  attends only to the j-th chunk of the passage's tokens (is it how the encoder shares its slots out along a long
  passage?). This changes the latents; the change is reported and training has to adapt the encoder.

A growth alone keeps the latents the original wrote (the script checks this on a few passages before saving):
exactly for blocks and the state channel, to within the norms' eps for width (refused above 1e-3 of the latents'
norm; the shipped checkpoint moves by 1.7e-4 to width 512 and 4.7e-4 to 576); the check is made before a change of
slot attention.
`memsplice train --init-from OUTPUT` then trains it like any exported memory; `scripts/gpu/formation.sh growth`
trains it side by side with the ungrown memory on the same data, seed and schedule.

    PYTHONPATH=src python scripts/formation/grow_encoder.py [--add-blocks 4] [--reasoner-states] [--width 512] \
        [--slot-attention chunk] --output runs/grown
        [--checkpoint DIR (default: the shipped memory)] [--reasoner SRC] [--device cpu]
"""

from __future__ import annotations

import argparse
import json

import torch

from memsplice import MemoryModel, load_reasoner
from memsplice.checkpoints import default_checkpoint_dir

TOLERANCE = 1e-3
"""Largest relative change of the latents a growth may make (bf16 rounds at 3.9e-3)."""


def grow(
    memory: MemoryModel,
    blocks: int,
    *,
    states: bool = False,
    width: int | None = None,
    slot_attention: str | None = None,
    check_rows: int = 2,
    seed: int = 0,
) -> tuple[float, float]:
    """Grow `memory` in place by `blocks` blocks, with `states` the reasoner-state input, with `width` a wider
    stream, then set its `slot_attention`; returns the change of the latents on random input relative to their
    norm made by the growth (0.0 when exact) and the change after the slot attention too."""
    gen = torch.Generator().manual_seed(seed)
    t = min(64, memory.config.max_memory_tokens)
    ids = torch.randint(0, memory.encoder.vocab_size, (check_rows, t), generator=gen)
    with torch.no_grad():
        before = memory.encode(ids)
        if blocks:
            memory.grow_encoder(blocks)
        if states:
            memory.read_reasoner_states()
        if width:
            memory.widen_encoder(width)
        grown = after = memory.encode(ids)
        if slot_attention:
            memory.set_slot_attention(slot_attention)
            after = memory.encode(ids)
    return float((grown - before).norm() / before.norm()), float((after - before).norm() / before.norm())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint", default=None, metavar="DIR", help="memory to grow (default: the shipped one)"
    )
    p.add_argument("--add-blocks", type=int, default=0, help="encoder blocks to append")
    p.add_argument(
        "--reasoner-states",
        action="store_true",
        help="add the reasoner-state input channel (MemoryConfig.encoder_reasoner_states)",
    )
    p.add_argument(
        "--width", type=int, default=None, help="widen the encoder's residual stream to this width"
    )
    p.add_argument(
        "--slot-attention",
        choices=("global", "chunk"),
        default=None,
        help="set what the slots attend to (MemoryConfig.slot_attention); changes the latents",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="where the grown memory is written")
    p.add_argument("--reasoner", default=None, metavar="SRC", help="the reasoner (default: the memory's own)")
    p.add_argument("--device", default="cpu", help="where the growth runs (default: cpu)")
    args = p.parse_args(argv)
    if args.add_blocks < 0 or not (
        args.add_blocks or args.reasoner_states or args.width or args.slot_attention
    ):
        p.error(
            "grow by --add-blocks N (N >= 1), --reasoner-states, --width W, change --slot-attention, or several"
        )

    path = args.checkpoint or default_checkpoint_dir()
    reasoner = load_reasoner(args.reasoner, device=args.device, dtype="float32")
    memory = MemoryModel.from_pretrained(path, reasoner=reasoner)
    depth, width = memory.config.encoder_layers, memory.config.encoder_width
    diff, changed = grow(
        memory,
        args.add_blocks,
        states=args.reasoner_states,
        width=args.width,
        slot_attention=args.slot_attention,
    )
    if diff > TOLERANCE:
        raise SystemExit(
            f"the grown encoder changed the latents by {diff:.2e} of their norm; nothing written"
        )
    memory.save_pretrained(args.output)
    n = sum(p.numel() for p in memory.parameters())
    print(
        json.dumps(
            {
                "checkpoint": str(path),
                "output": args.output,
                "encoder_layers": [depth, memory.config.encoder_layers],
                "encoder_width": [width, memory.config.encoder_width],
                "encoder_reasoner_states": memory.config.encoder_reasoner_states,
                "slot_attention": memory.config.slot_attention,
                "parameters": n,
                "latent_relative_diff": diff,
                "latent_relative_diff_with_slot_attention": changed,
            }
        )
    )


if __name__ == "__main__":
    main()
