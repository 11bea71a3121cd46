"""Recall@k of a memory's address head on the eval's synthetic *test* split (never trained on): within each
conversation, the share of questions whose evidence chunk is among the k chunks the head ranks first.

    python scripts/online/address_recall.py CHECKPOINT [--chunk-tokens N] [--lengths 1024 2048 4096]
        [--examples 4] [--seed 0] [--values pools open] [--split test] [--perspective others|user]
        [--recency-margins 0 0.5 1] [--cache DIR] [--record NAME]

Chunks are ranked as `ConversationMemory.address` ranks them: by score, near-ties (within the checkpoint's
`address_recency_margin`) to the later chunk. `--recency-margins` reports each margin given instead (under
"by_margin", the first also at the top); choose a head's margin with `--split train` (the split it was trained on,
whose conversations the test split never shares), then measure it on the test split.

By default the conversations are the 12 (4 per length, 1k/2k/4k tokens, 72 questions) that `memsplice eval --task
synthetic --examples 4 --lengths 1k,2k,4k` asks, with pool values and with made-up values; with `--lengths 16384
32768 65536` (and `--seed 0` / `1`) those of `memsplice bench online --part recall` at long histories. Each length
is reported on its own under "lengths", all of them together at the top.

Encoding a 64k-token conversation is most of the time (minutes on a CPU), and the latents depend only on the
encoder and the chunk size, not on the head: with `--cache DIR` each conversation's latents are kept there (bf16,
one file per split, values, perspective, chunk size, length and seed, under a digest of the encoder's weights) and
read back on the next run, so that heads trained on the same encoder are compared in seconds.
"""

import argparse
import json
from pathlib import Path

import torch

from memsplice.bench.record import provenance, save_result
from memsplice.checkpoints import load_memory
from memsplice.conversation.memory import weights_signature
from memsplice.eval.reader import Reader
from memsplice.eval.tasks import TaskArgs, get_task
from memsplice.online.address import AddressExample, address_examples, recall_at
from memsplice.online.bootstrap import episode_examples
from memsplice.reasoner import load_reasoner


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--chunk-tokens", type=int, default=None, help="default: the checkpoint's chunk_tokens")
    p.add_argument("--device", default=None)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="history tokens")
    p.add_argument("--examples", type=int, default=4, help="conversations per length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--values", nargs="+", choices=["pools", "open"], default=["pools", "open"])
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument(
        "--perspective",
        choices=["others", "user"],
        default="others",
        help="the synthetic task's perspective (\"user\": a user's chat, half the facts the user's own)",
    )
    p.add_argument(
        "--recency-margins",
        type=float,
        nargs="+",
        default=None,
        help="address-head score margins for the recency tie-break (default: the checkpoint's)",
    )
    p.add_argument(
        "--cache", default=None, help="keep and reuse each conversation's latents in this directory"
    )
    p.add_argument("--record", default=None, help="save as benchmarks/results/NAME.json with provenance")
    args = p.parse_args()
    reasoner = load_reasoner(None, device=args.device)
    started = provenance(reasoner.device)
    memory = load_memory(reasoner, args.checkpoint)
    chunk = args.chunk_tokens or memory.config.chunk_tokens or memory.config.max_memory_tokens
    margins = args.recency_margins or [memory.config.address_recency_margin]
    cache = None if args.cache is None else Path(args.cache) / encoder_digest(memory)  # hashed once
    out = {"checkpoint": args.checkpoint, "chunk_tokens": chunk, "split": args.split, "seed": args.seed}
    out["perspective"] = args.perspective
    out["recency_margins"] = margins
    for values in args.values:
        by_length = {}
        for length in args.lengths:
            task = TaskArgs(
                examples=args.examples,
                lengths=(length,),
                seed=args.seed,
                split=args.split,
                facts=6,
                values=values,
                perspective=args.perspective,
            )
            key = f"{args.split}-{values}-{args.perspective}-c{chunk}-{length}-s{args.seed}"

            def encode(task=task):
                episodes = get_task("synthetic")(task, Reader(reasoner).count_tokens)
                return address_examples(memory, episode_examples(episodes, reasoner, chunk))

            by_length[length] = cached(cache, key, encode)
        every = [e for examples in by_length.values() for e in examples]
        by_margin = {}
        for margin in margins:
            found = recall_at(memory, every, recency_margin=margin)
            found["lengths"] = {
                str(n): recall_at(memory, examples, recency_margin=margin)
                for n, examples in by_length.items()
            }
            by_margin[str(margin)] = found
        out[values] = dict(by_margin[str(margins[0])])
        if len(margins) > 1:
            out[values]["by_margin"] = by_margin
    if args.record:
        print(f"saved {save_result(args.record, {**out, **started}, device=reasoner.device)}")
    print(json.dumps(out, indent=2))
    return 0


def encoder_digest(memory) -> str:
    """A short digest of every memory weight but the address head's: what the latents depend on
    (`weights_signature`, which identifies a saved conversation's latents the same way)."""
    return weights_signature(memory)[:16]


def cached(directory: Path | None, key: str, encode) -> list[AddressExample]:
    """`encode()`'s examples, read from `directory` (one encoder's: `--cache` / `encoder_digest`) when an earlier run
    saved them there."""
    if directory is None:
        return encode()
    path = directory / f"{key}.pt"
    if path.is_file():
        rows = torch.load(path)
        return [AddressExample(r["chunks"].float(), r["queries"].float(), r["positives"]) for r in rows]
    examples = encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "chunks": e.chunk_latents.bfloat16(),
            "queries": e.query_latents.bfloat16(),
            "positives": e.positives,
        }
        for e in examples
    ]
    atomic_save(rows, path)
    return examples


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
