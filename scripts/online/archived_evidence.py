"""How many test questions have their evidence in spans the transcript's token cap archives before they are asked:
the synthetic test split's conversations written into memory as the eval writes them (session headers as turns of
their own, `conversation.ConversationConfig.turn_template`), with every question asked after the whole history, so
that no span has been used yet and the cap (`max_live_tokens`) archives the oldest first (counted here in whole turns:
memory cuts a turn longer than a chunk into several spans). Tokenizer only; no memory is written.

    python scripts/online/archived_evidence.py [--lengths 16384 32768 65536] [--seeds 0 1 2 3 4 5 6 7]
        [--max-live-tokens 65536] [--record NAME]
"""

import argparse
import json

from memsplice.bench.record import provenance, save_result
from memsplice.conversation import ConversationConfig
from memsplice.eval.reader import Reader, memory_turn_sources, memory_turns
from memsplice.eval.tasks import TaskArgs, get_task
from memsplice.reasoner import load_reasoner


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536], help="history tokens")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--examples", type=int, default=4, help="conversations per length and seed")
    p.add_argument("--max-live-tokens", type=int, default=ConversationConfig.max_live_tokens)
    p.add_argument("--record", default=None, help="save as benchmarks/results/NAME.json with provenance")
    args = p.parse_args()
    reasoner = load_reasoner(None)
    started = provenance(reasoner.device)
    tok = reasoner.require_tokenizer()
    count = Reader(reasoner).count_tokens
    template = ConversationConfig.turn_template
    by_length = {}
    for length in args.lengths:
        row = {"questions": 0, "evidence_archived": 0, "turns": 0, "turns_archived": 0, "memory_tokens": []}
        for seed in args.seeds:
            task = TaskArgs(
                examples=args.examples, lengths=(length,), seed=seed, split="test", values="pools"
            )
            for episode in get_task("synthetic")(task, count):
                pairs = memory_turns(episode.turns)
                sources = memory_turn_sources(episode.turns)
                sizes = [
                    len(tok(template.format(role=r, text=t), add_special_tokens=False)["input_ids"])
                    for r, t in pairs
                ]
                excess, archived = sum(sizes) - args.max_live_tokens, set()
                for size, source in zip(sizes, sources, strict=True):
                    if excess <= 0:
                        break
                    excess -= size
                    archived.add(source)
                questions = [q for q in episode.questions if q.answer]
                row["questions"] += len(questions)
                row["evidence_archived"] += sum(bool(set(q.evidence) & archived) for q in questions)
                row["turns"] += len(pairs)
                row["turns_archived"] += len(archived)
                row["memory_tokens"].append(sum(sizes))
        by_length[str(length)] = row
        print(length, {k: v for k, v in row.items() if k != "memory_tokens"}, flush=True)
    out = {"max_live_tokens": args.max_live_tokens, "seeds": args.seeds, "by_length": by_length}
    if args.record:
        print(f"saved {save_result(args.record, {**out, **started}, device=reasoner.device)}")
    print(json.dumps({n: {k: v for k, v in r.items() if k != "memory_tokens"} for n, r in by_length.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
