"""End to end through `memsplice chat`'s own session (`cli.chat.ChatSession` with `read_back=True`): test
conversations of the synthetic task written into a chat's memory, then each question asked as a chat message, the
chunk memory it picks read back from memory and placed in the prompt as chat places it, beside the chat's recent
turns or without them. Scored as the eval scores (`score_answer(...).contains`).

    python scripts/online/chat_readback.py [--length 2048] [--seeds 0 1] [--examples 4] [--perspective user]
        [--window-tokens 256] [--placements message system] [--refine-steps 5] [--dtype bfloat16] [--record NAME]

The history is written as the eval writes it (session headers as turns of their own, `memory_turns`), in writes of
`--write-turns` turns, refined `--refine-steps` steps, and is the chat's transcript too (its recent window). Every
question is asked of the same memory: the exchange that `answer()` writes is undone before the next (the
conversation restored from `to_dict()`), so no question sees another's. The reader-only counterpart, with the
chunk's text in place of its read-back, is `reader_context.py --chat`.
"""

import argparse
import json

from memsplice.bench.record import provenance, save_result
from memsplice.checkpoints import load_memory
from memsplice.cli.chat import DEFAULT_SYSTEM, ChatSession
from memsplice.conversation import ConversationMemory
from memsplice.eval.metrics import score_answer
from memsplice.eval.reader import Reader, memory_turns
from memsplice.eval.tasks import TaskArgs, get_task
from memsplice.memory.readback import RECALL_PLACEMENTS
from memsplice.reasoner import load_reasoner


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=2048, help="history tokens")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--examples", type=int, default=4, help="conversations per seed")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--perspective", choices=["others", "user"], default="user")
    p.add_argument("--window-tokens", type=int, default=256, help="the chat's --window (also asked without)")
    p.add_argument("--placements", nargs="+", choices=RECALL_PLACEMENTS, default=list(RECALL_PLACEMENTS))
    p.add_argument("--refine-steps", type=int, default=5, help="write-time refinement of the history")
    p.add_argument("--write-turns", type=int, default=128, help="turns per write of the history")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--checkpoint", default=None, help="memory checkpoint (default: the shipped one)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--record", default=None, help="save as benchmarks/results/NAME.json with provenance")
    args = p.parse_args()
    reasoner = load_reasoner(None, device=args.device, dtype=args.dtype)
    started = provenance(reasoner.device)
    memory = load_memory(reasoner, args.checkpoint)
    if memory.address is None:
        p.error("the memory has no address head: chat's read-back would pick chunks by attention")
    count = Reader(reasoner).count_tokens
    windows = [args.window_tokens, 0] if args.window_tokens else [0]
    variants = [(w, placement) for w in windows for placement in args.placements]
    rows = []
    for seed in args.seeds:
        task = TaskArgs(
            examples=args.examples,
            lengths=(args.length,),
            seed=seed,
            split=args.split,
            values="pools",
            perspective=args.perspective,
        )
        for episode in get_task("synthetic")(task, count):
            session = ChatSession(reasoner, memory, DEFAULT_SYSTEM, read_back=True)
            pairs = memory_turns(episode.turns)
            memory.set_refine_steps(args.refine_steps)
            for start in range(0, len(pairs), args.write_turns):
                session.conversation.add_turns(pairs[start : start + args.write_turns])
            memory.set_refine_steps(0)  # the exchanges answer() writes are undone; no need to refine them
            session.turns = [{"role": role, "text": text} for role, text in pairs]
            saved, turns, first = session.conversation.to_dict(), list(session.turns), len(rows)
            for q in [q for q in episode.questions if q.answer]:
                row = {"seed": seed, "question": q.question, "answer": q.answer}
                for window, placement in variants:
                    session.window_tokens, session.read_back_placement = window, placement
                    text, status = session.answer(q.question, args.max_new_tokens, 0.0)
                    name = variant_name(window, placement)
                    row[name] = score_answer(text, q.answer, aliases=q.aliases).contains
                    row[f"{name}_prediction"] = text
                    row["recalled"] = status["recalled"]
                    session.conversation = ConversationMemory.from_dict(saved, memory)
                    session.turns = list(turns)
                rows.append(row)
            print(seed, summarize(rows[first:], variants), flush=True)
    out = {
        "length": args.length,
        "perspective": args.perspective,
        "split": args.split,
        "refine_steps": args.refine_steps,
        "window_tokens": args.window_tokens,
        "all": summarize(rows, variants),
        "rows": rows,
    }
    if args.record:
        print(f"saved {save_result(args.record, {**out, **started}, device=reasoner.device)}")
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))
    return 0


def variant_name(window: int, placement: str) -> str:
    return f"{placement}_window{window}" if window else f"{placement}_alone"


def summarize(rows: list[dict], variants: list[tuple[int, str]]) -> dict:
    n = max(len(rows), 1)
    names = [variant_name(w, p) for w, p in variants]
    return {"questions": len(rows), **{name: sum(r[name] for r in rows) / n for name in names}}


if __name__ == "__main__":
    raise SystemExit(main())
