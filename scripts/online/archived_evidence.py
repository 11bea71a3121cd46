"""How many test questions have their evidence in spans the transcript's token cap archives before they are asked:
the synthetic test split's conversations written into memory as the eval writes them (session headers as turns of
their own, `conversation.ConversationConfig.turn_template`), with every question asked after the whole history, so
that no span has been used yet: the transcript's own store (`conversation.transcript.TranscriptStore`) replays the
writes and its cap (`max_live_tokens`) archives the oldest spans first. A turn counts as archived when any of its
spans is (memory cuts a turn longer than a chunk into several). Tokenizer only; no memory is written.

With `--slot-budget N` the turns are written, one `add_turn` at a time as `memsplice chat` writes them, into a real
`ConversationMemory` of the shipped checkpoint (unrefined: which spans go depends on the budget, not on the
latents) with that slot budget, which also archives spans when the hierarchy cannot compress its chunks into it.
256 is `ConversationConfig`'s default, what chat and the server used before a chat that picks chunks by the address
head was given none.

    python scripts/online/archived_evidence.py [--lengths 16384 32768 65536] [--seeds 0 1 2 3 4 5 6 7]
        [--max-live-tokens 65536] [--chunk-tokens 32] [--slot-budget N] [--record NAME]
"""

import argparse
import json

from memsplice.bench.record import provenance, save_result
from memsplice.conversation import ConversationConfig, ConversationMemory
from memsplice.conversation.transcript import TranscriptStore
from memsplice.eval.reader import Reader, memory_turn_sources, memory_turns
from memsplice.eval.tasks import TaskArgs, get_task
from memsplice.reasoner import load_reasoner


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536], help="history tokens")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--examples", type=int, default=4, help="conversations per length and seed")
    p.add_argument("--max-live-tokens", type=int, default=ConversationConfig.max_live_tokens)
    p.add_argument("--chunk-tokens", type=int, default=32, help="the conversation's chunk size (span length)")
    p.add_argument(
        "--slot-budget", type=int, default=None, help="write a real conversation memory with this slot budget"
    )
    p.add_argument("--record", default=None, help="save as benchmarks/results/NAME.json with provenance")
    args = p.parse_args()
    reasoner = load_reasoner(None, dtype="bfloat16" if args.slot_budget else None)
    memory = None
    if args.slot_budget:
        from memsplice.checkpoints import load_memory

        memory = load_memory(reasoner, None)
        memory.set_refine_steps(0)
    started = provenance(reasoner.device)
    tok = reasoner.require_tokenizer()
    count = Reader(reasoner).count_tokens
    by_length = {}
    for length in args.lengths:
        row = {"questions": 0, "evidence_archived": 0, "turns": 0, "turns_archived": 0, "memory_tokens": []}
        for seed in args.seeds:
            task = TaskArgs(
                examples=args.examples, lengths=(length,), seed=seed, split="test", values="pools"
            )
            for episode in get_task("synthetic")(task, count):
                if memory is None:
                    archived, turns, tokens = replay_cap(
                        episode, tok, args.chunk_tokens, args.max_live_tokens
                    )
                else:
                    archived, turns, tokens = replay_budget(
                        episode, memory, args.chunk_tokens, args.slot_budget, args.max_live_tokens
                    )
                questions = [q for q in episode.questions if q.answer]
                row["questions"] += len(questions)
                row["evidence_archived"] += sum(bool(set(q.evidence) & archived) for q in questions)
                row["turns"] += turns
                row["turns_archived"] += len(archived)
                row["memory_tokens"].append(tokens)
        by_length[str(length)] = row
        print(length, {k: v for k, v in row.items() if k != "memory_tokens"}, flush=True)
    out = {
        "max_live_tokens": args.max_live_tokens,
        "slot_budget": args.slot_budget,
        "seeds": args.seeds,
        "by_length": by_length,
    }
    if args.record:
        print(f"saved {save_result(args.record, {**out, **started}, device=reasoner.device)}")
    print(json.dumps({n: {k: v for k, v in r.items() if k != "memory_tokens"} for n, r in by_length.items()}))
    return 0


def replay_cap(episode, tok, chunk_tokens: int, max_live_tokens: int) -> tuple[set, int, int]:
    """Write `episode` into a `TranscriptStore` as `ConversationMemory` writes it (one step per turn, a turn cut into
    spans of at most `chunk_tokens`, the cap applied after each turn): the ids of the turns with a span archived,
    the number of turns written, and their tokens."""
    store = TranscriptStore(max_live_tokens=max_live_tokens)
    template = ConversationConfig.turn_template
    turn_of_span, tokens = {}, 0
    pairs = memory_turns(episode.turns)
    for index, ((role, text), source) in enumerate(
        zip(pairs, memory_turn_sources(episode.turns), strict=True)
    ):
        store.begin_step()
        ids = tok(template.format(role=role, text=text), add_special_tokens=False)["input_ids"]
        tokens += len(ids)
        for i in range(0, len(ids), chunk_tokens):
            turn_of_span[store.add(role, text, ids[i : i + chunk_tokens], index).id] = source
        store.evict_over_cap()
    return {turn_of_span[s.id] for s in store.spans.values() if s.archived}, len(pairs), tokens


def replay_budget(
    episode, memory, chunk_tokens: int, slot_budget: int, max_live_tokens: int
) -> tuple[set, int, int]:
    """Write `episode` into a `ConversationMemory` with `slot_budget`, one turn at a time: the ids of the turns with a
    span archived (by the budget or the cap), the number of turns written, and their tokens."""
    config = ConversationConfig(
        chunk_tokens=chunk_tokens, slot_budget=slot_budget, max_live_tokens=max_live_tokens
    )
    conv = ConversationMemory(memory, config)
    pairs, sources = memory_turns(episode.turns), memory_turn_sources(episode.turns)
    tokens = sum(conv.add_turn(role, text).tokens for role, text in pairs)
    return {sources[s.turn] for s in conv.store.spans.values() if s.archived}, len(pairs), tokens


if __name__ == "__main__":
    raise SystemExit(main())
