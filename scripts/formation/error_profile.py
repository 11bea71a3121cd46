"""Where does the encoder's memory lose tokens? The reconstruction misses of a checkpoint, broken down.

On the held-out passages `memsplice bench fidelity` scores (same instruction, same windows; `--split train` cuts
the same number of windows from the training text instead), the reasoner reads
[memory][instruction] P teacher-forced and each token of P is a hit or a miss (as in the bench). The misses are
broken down by:
- position in the passage, in bins of one slot's share (length / slots tokens): does the read-back degrade along
  the passage, or inside each slot's span?
- offset inside a slot's span (position mod length / slots);
- how frequent the token is in the training corpora (bins of its unigram count): are rare tokens what is lost?
- whether the reasoner without memory predicts the token (the floor): does the memory carry the tokens the
  language prior cannot guess?

    PYTHONPATH=src python scripts/formation/error_profile.py [--lengths 128 512] [--passages 128]
        [--checkpoint DIR] [--device cpu] [--record NAME]

Saves benchmarks/results/formation/error-profile-RECORD.json (command, commit, device, date).
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

from memsplice import MemoryModel, load_reasoner
from memsplice.bench.fidelity import heldout_setup
from memsplice.bench.record import save_result
from memsplice.checkpoints import default_checkpoint_dir
from memsplice.train.config import DataArgs
from memsplice.train.data import corpus_tokens, heldout_passages
from memsplice.train.evaluate import reconstruction_hits

FREQ_EDGES = (0, 10, 100, 1_000, 10_000, 100_000, math.inf)


def _rate(hits: torch.Tensor, where: torch.Tensor) -> dict:
    n = int(where.sum())
    return {"tokens": n, "accuracy": round(float(hits[where].float().mean()), 4) if n else None}


def profile(
    hits: torch.Tensor, floor_hits: torch.Tensor, passages: torch.Tensor, counts: torch.Tensor, slots: int
):
    """The breakdown of `hits` (N, T) for passages (N, T); `floor_hits` the no-memory hits, `counts` (V,) unigram
    counts of the training corpora."""
    n, t = passages.shape
    span = max(1, t // slots)
    pos = torch.arange(t).expand(n, t)
    out = {
        "accuracy": round(float(hits.float().mean()), 4),
        "floor_accuracy": round(float(floor_hits.float().mean()), 4),
        "by_slot_span": [_rate(hits, pos // span == j) for j in range(math.ceil(t / span))],
        "by_offset_in_span": [_rate(hits, pos % span == k) for k in range(span)],
        "by_floor": {
            "floor_right": _rate(hits, floor_hits),
            "floor_wrong": _rate(hits, ~floor_hits),
        },
    }
    freq = counts[passages]
    out["by_train_count"] = {
        f"[{lo}, {hi})": _rate(hits, (freq >= lo) & (freq < hi)) for lo, hi in itertools.pairwise(FREQ_EDGES)
    }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="memory (default: the shipped one)")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512], help="passage lengths in tokens")
    p.add_argument(
        "--passages", type=int, default=128, help="held-out passages per length (bench fidelity's)"
    )
    p.add_argument(
        "--split",
        choices=("heldout", "train"),
        default="heldout",
        help="cut the passages from the held-out text (the bench's) or from the training text: the gap between "
        "the two says how much of what is lost is the encoder not generalising",
    )
    p.add_argument("--batch-rows", type=int, default=16)
    p.add_argument("--data", default=None, metavar="DIR", help="corpus directory (default: $MEMSPLICE_DATA)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--record", default=None, metavar="NAME", help="save as formation/error-profile-NAME.json")
    args = p.parse_args(argv)

    path = args.checkpoint or default_checkpoint_dir()
    reasoner = load_reasoner(device=args.device)
    memory = MemoryModel.from_pretrained(path, reasoner=reasoner).eval().requires_grad_(False)
    tok = reasoner.require_tokenizer()
    sources, _, instruction, heldout = heldout_setup(memory, tok, args.data)
    train = corpus_tokens(tok, DataArgs(root=args.data, sources=sources), "train")
    counts = torch.bincount(
        torch.as_tensor(train).long().flatten(), minlength=reasoner.shapes.vocab_size
    ).cpu()
    instruction = instruction.to(reasoner.device)
    report = {
        "checkpoint": str(path),
        "sources": sources,
        "split": args.split,
        "passages_per_length": args.passages,
        "lengths": {},
    }
    for n in args.lengths:
        passages = heldout_passages(train if args.split == "train" else heldout, n, args.passages)
        hits, floor = (
            reconstruction_hits(reasoner, m, passages, instruction, args.batch_rows) for m in (memory, None)
        )
        result = profile(hits, floor, passages, counts, memory.config.num_slots)
        report["lengths"][str(n)] = result
        print(n, {k: result[k] for k in ("accuracy", "floor_accuracy", "by_floor")}, flush=True)
    if args.record:
        print(
            f"saved {save_result(f'formation/error-profile-{args.record}', report, device=reasoner.device)}"
        )


if __name__ == "__main__":
    main()
