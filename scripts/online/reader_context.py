"""What the reader needs around a recalled chunk: the same question over the evidence chunk's text in several
framings, on the eval's synthetic test split. Reader only (no memory): the chunk's own text stands in for its
verbatim read-back.

    python scripts/online/reader_context.py [--lengths 16384 32768 65536] [--seeds 0 1 2 3] [--examples 4]
        [--split test|train] [--window-tokens 256] [--dtype bfloat16] [--record NAME]

Histories, for each question (the evidence turn being the last turn the question names, and its chunk the 32-token
chunk of the conversation memory that holds it):
- `evidence`: the evidence turn as the oracle gives it (session header line, then the turn);
- `chunk`: the chunk's text alone (what `latent-readback` read before session headers were read back with it);
- `header_chunk`: the session header as memory holds it ("system: [Session 3, ...]"), then the chunk's text (what
  `ConversationMemory.read_back` now gives, `ConversationConfig.readback_context_role`);
- `header_turn`: that header, then the evidence turn alone (the chunk without the tail of an earlier turn it may
  start with).
With `--window-tokens N` also, for `latent-readback+window`, the last N tokens of the conversation as the window
renders them: after `chunk` (`chunk_window`, what `latent-readback+window` read before session headers were read
back), after `header_chunk` (`header_chunk_window`), and before `header_chunk` (`window_header_chunk`, what it reads
now). With `--layouts` also other prompt layouts for the window beside `header_chunk` (the eval's template puts any
history in the user message; these move the window or the recalled text elsewhere):
- `question_twice`: as `window_header_chunk`, with the question also in front of the history;
- `window_in_system`: the window in the system message, `header_chunk` as the history;
- `window_earlier_turn`: the window as an earlier user turn (answered "Noted."), `header_chunk` as the history of
  the last one;
- `recalled_in_system`: `header_chunk` in the system message as chat and the server give read-back text
  (`memory.readback.with_recalled`), the window as the history;
- `recalled_in_system_alone`: the same without the window (no history).
"""

import argparse
import json
from dataclasses import dataclass

from memsplice.bench.record import provenance, save_result
from memsplice.eval.metrics import score_answer
from memsplice.eval.reader import PromptTemplate, Reader, render_history, render_session_header, render_turn
from memsplice.eval.systems.context import recent_window
from memsplice.eval.tasks import TaskArgs, get_task
from memsplice.memory.readback import with_recalled
from memsplice.online.bootstrap import episode_examples
from memsplice.reasoner import load_reasoner


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536], help="history tokens")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--examples", type=int, default=4, help="conversations per length and seed")
    p.add_argument("--split", choices=["test", "train"], default="test", help="the synthetic task's split")
    p.add_argument("--chunk-tokens", type=int, default=32)
    p.add_argument("--window-tokens", type=int, default=0, help="also the window variants (0: not)")
    p.add_argument(
        "--layouts", action="store_true", help="also the other prompt layouts (needs --window-tokens)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--record", default=None, help="save as benchmarks/results/NAME.json with provenance")
    args = p.parse_args()
    if args.layouts and not args.window_tokens:
        p.error("--layouts needs --window-tokens")
    reasoner = load_reasoner(None, device=args.device, dtype=args.dtype)
    started = provenance(reasoner.device)
    tok = reasoner.require_tokenizer()
    reader = Reader(reasoner)
    names = ["evidence", "chunk", "header_chunk", "header_turn"]
    if args.window_tokens:
        names += ["chunk_window", "header_chunk_window", "window_header_chunk"]
    if args.layouts:
        names += list(LAYOUTS)
    plain = PromptTemplate()
    rows = []
    for length in args.lengths:
        for seed in args.seeds:
            task = TaskArgs(
                examples=args.examples, lengths=(length,), seed=seed, split=args.split, values="pools"
            )
            episodes = get_task("synthetic")(task, reader.count_tokens)
            examples = episode_examples(episodes, reasoner, args.chunk_tokens)
            for episode, example in zip(episodes, examples, strict=True):
                window = ""
                if args.window_tokens:
                    window = render_history(
                        recent_window(episode.turns, args.window_tokens, reader.count_tokens)[1]
                    )
                questions = [q for q in episode.questions if q.answer]
                for q, positives in zip(questions, example.positives, strict=True):
                    evidence = episode.turns_by_id(q.evidence)
                    turn = evidence[-1]
                    chunk = tok.decode(example.chunks[positives[-1]]).strip()
                    header = f"system: {render_session_header(turn)}"
                    histories = {
                        "evidence": render_history(evidence),
                        "chunk": chunk,
                        "header_chunk": f"{header}\n{chunk}",
                        "header_turn": f"{header}\n{render_turn(turn)}",
                        "chunk_window": f"{chunk}\n{window}",
                        "header_chunk_window": f"{header}\n{chunk}\n{window}",
                        "window_header_chunk": f"{window}\n{header}\n{chunk}",
                    }
                    row = {"length": length, "seed": seed, "question": q.question, "answer": q.answer}
                    for name in names:
                        if name in LAYOUTS:
                            reader.template, history = LAYOUTS[name](plain, window, f"{header}\n{chunk}")
                        else:
                            reader.template, history = plain, histories[name]
                        prediction = reader.read(q.question, history).text
                        row[name] = score_answer(prediction, q.answer, aliases=q.aliases).contains
                        row[f"{name}_prediction"] = prediction
                    rows.append(row)
            done = [r for r in rows if r["length"] == length and r["seed"] == seed]
            print(length, seed, summarize(done, names), flush=True)
    out = {
        "split": args.split,
        "chunk_tokens": args.chunk_tokens,
        "window_tokens": args.window_tokens,
        "layouts": bool(args.layouts),
        "by_length": {str(n): summarize([r for r in rows if r["length"] == n], names) for n in args.lengths},
        "all": summarize(rows, names),
        "rows": rows,
    }
    if args.record:
        print(f"saved {save_result(args.record, {**out, **started}, device=reasoner.device)}")
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))
    return 0


@dataclass(frozen=True)
class Messages(PromptTemplate):
    """The eval's template with a note added to its system message, messages put before its user turn, or recalled
    text given as chat and the server give it (`with_recalled`)."""

    system_note: str = ""
    before: tuple = ()
    recalled: str | None = None

    def messages(self, question: str, history: str | None) -> list[dict[str, str]]:
        system, user = super().messages(question, history)
        if self.system_note:
            system = {**system, "content": f"{system['content']}\n\n{self.system_note}"}
        return with_recalled([system, *self.before, user], self.recalled)


LAYOUTS = {
    "question_twice": lambda t, w, r: (
        Messages(with_history=f"Question: {{question}}\n\n{t.with_history}"),
        f"{w}\n{r}",
    ),
    "window_in_system": lambda t, w, r: (
        Messages(system_note=f"The most recent part of the conversation:\n{w}"),
        r,
    ),
    "window_earlier_turn": lambda t, w, r: (
        Messages(
            before=(
                {"role": "user", "content": f"Here is the most recent part of our conversation:\n\n{w}"},
                {"role": "assistant", "content": "Noted."},
            )
        ),
        r,
    ),
    "recalled_in_system": lambda t, w, r: (Messages(recalled=r), w),
    "recalled_in_system_alone": lambda t, w, r: (Messages(recalled=r), None),
}
"""Prompt layout name -> (template, history) from (the eval's template, window text, recalled text)."""


def summarize(rows: list[dict], names: list[str]) -> dict:
    n = max(len(rows), 1)
    return {"questions": len(rows), **{name: sum(r[name] for r in rows) / n for name in names}}


if __name__ == "__main__":
    raise SystemExit(main())
