"""What a reading prefix does to replies that are not questions about memory: chat's prompt with read-back text, a
message from an ordinary conversation, greedy replies with and without the prefix in front.

    python scripts/online/prefix_replies.py [--prefix shipped] [--messages 24] [--max-new-tokens 96] [--record NAME]

In `memsplice chat --read-back` every message gets the chunk the address head picks read back in front of it,
whether or not the message asks about the past. Here the message is the opening turn of a held-out dialogue of the
dialogue corpora (`--data`, default `memsplice.data.data_root`; the synthetic task's filler comes from the other
split), and the recalled text the first two turns of another held-out dialogue, framed as chat frames it
(`with_recalled`, placement "message"). Reported, with and without the prefix: the reply's mean length in tokens,
the share that end before `--max-new-tokens`, and the share that repeat a 5-word run of the recalled text; the
replies themselves are kept in the record.
"""

import argparse
import json
from itertools import islice

import torch

from memsplice.bench.record import provenance, save_result
from memsplice.checkpoints import load_reading_prefix
from memsplice.cli.chat import DEFAULT_SYSTEM
from memsplice.data.corpora import iter_dialogues
from memsplice.engine import DecoderPool
from memsplice.memory.readback import with_recalled
from memsplice.reasoner import load_reasoner


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefix", default="shipped", help="a reading prefix directory, or shipped")
    p.add_argument("--messages", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--data", default=None, help="corpora directory (default: memsplice.data.data_root)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--record", default=None, help="save as benchmarks/results/NAME.json with provenance")
    args = p.parse_args()
    reasoner = load_reasoner(None, device=args.device, dtype=args.dtype)
    started = provenance(reasoner.device)
    prefix = load_reading_prefix(reasoner, args.prefix)
    with torch.no_grad():
        front = prefix.memory_kv()
    tok = reasoner.require_tokenizer()
    dialogues = list(islice(iter_dialogues(args.data, split="heldout"), 2 * args.messages))
    if len(dialogues) < 2 * args.messages:
        p.error(f"--messages: the corpora hold {len(dialogues)} held-out dialogues, fewer than twice that")
    pool = DecoderPool(reasoner, max_new_tokens=args.max_new_tokens)
    rows = []
    for i in range(args.messages):
        message = dialogues[i].turns[0][1]
        other = dialogues[args.messages + i].turns
        recalled = "\n".join(f"{'user' if s == 'A' else 'assistant'}: {t}" for s, t in other[:2])
        messages = with_recalled(
            [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": message}],
            recalled,
            "message",
        )
        ids = reasoner.chat_ids(messages)
        row = {"message": message, "recalled": recalled}
        for name, kv in (("without", None), ("with_prefix", front)):
            slots = 0 if kv is None else kv.num_slots
            decoder = pool.decoder_for(slots + len(ids) + args.max_new_tokens)
            out = decoder.generate(
                ids, kv, max_new_tokens=args.max_new_tokens, stop_ids=tuple(reasoner.eos_ids)
            )
            text = tok.decode(out.tokens, skip_special_tokens=True).strip()
            row[name] = {
                "reply": text,
                "tokens": len(out.tokens),
                "ended": len(out.tokens) < args.max_new_tokens,
                "repeats_recalled": repeats(text, recalled),
            }
        rows.append(row)
        print(i, {k: row[k]["tokens"] for k in ("without", "with_prefix")}, flush=True)
    summary = {
        name: {
            "mean_tokens": round(sum(r[name]["tokens"] for r in rows) / len(rows), 1),
            "ended": round(sum(r[name]["ended"] for r in rows) / len(rows), 3),
            "repeats_recalled": round(sum(r[name]["repeats_recalled"] for r in rows) / len(rows), 3),
        }
        for name in ("without", "with_prefix")
    }
    out = {
        "prefix": args.prefix,
        "messages": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "summary": summary,
    }
    if args.record:
        print(f"saved {save_result(args.record, {**out, 'rows': rows, **started}, device=reasoner.device)}")
    print(json.dumps(out, indent=2))
    return 0


def repeats(reply: str, recalled: str, n: int = 5) -> bool:
    """Whether `reply` contains a run of `n` words of `recalled` (case-insensitive)."""
    words = recalled.lower().split()
    text = " ".join(reply.lower().split())
    return any(" ".join(words[i : i + n]) in text for i in range(len(words) - n + 1))


if __name__ == "__main__":
    raise SystemExit(main())
