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
- `header_chunk_distractor`: `header_chunk` and, in conversation order, a hard distractor under its own session
  header (`memsplice.reading.train.hard_distractor`: the turn outside the evidence that shares the most capitalised
  words with the question, the same person most often), standing in for a second chunk read back
  (`--select-chunks 2`) that does not hold the answer.
With `--window-tokens N` also, for `latent-readback+window`, the last N tokens of the conversation as the window
renders them: after `chunk` (`chunk_window`, what `latent-readback+window` read before session headers were read
back), after `header_chunk` (`header_chunk_window`), and before `header_chunk` (`window_header_chunk`, what it reads
now), and before `header_chunk_distractor` (`window_header_chunk_distractor`). With `--layouts` also other prompt
layouts for the window beside `header_chunk` (the eval's template puts any history in the user message; these move
the window or the recalled text elsewhere):
- `question_twice`: as `window_header_chunk`, with the question also in front of the history;
- `window_in_system`: the window in the system message, `header_chunk` as the history;
- `window_as_messages`: the window's turns as chat messages before the user turn (`chat_messages`), `header_chunk`
  as the history;
- `window_earlier_turn`: the window as an earlier user turn (answered "Noted."), `header_chunk` as the history of
  the last one;
- `recalled_in_system`: `header_chunk` in the system message (`memory.readback.with_recalled` placement
  "system"), the window as the history;
- `recalled_in_system_alone`: the same without the window (no history).
With `--chat` (needs `--perspective user` and `--window-tokens`), the prompt as `memsplice chat --window` builds
it: chat's system prompt, the window's turns as user and assistant messages, the bare question as the last user
message, the recalled text (`header_chunk`) under `RECALL_HEADER`:
- `chat_window`: no recalled text (what the window alone answers);
- `chat_recalled_in_system`: recalled text in the system message (`with_recalled` placement "system", what chat
  and the server did first);
- `chat_recalled_in_user`: recalled text in the last user message, in front of the question;
- `chat_recalled_before_question`: recalled text as a system message of its own right before the question;
- `chat_recalled_as_history`: recalled text in the last user message framed as the eval frames history, in front
  of the question (`with_recalled` placement "message", what chat and the server do now);
- `chat_recalled_in_system_alone`, `chat_recalled_in_user_alone`, `chat_recalled_as_history_alone`: those without
  the window;
- `chat_memory_system_*`: with the eval's system prompt less its "a few words" instruction (`MEMORY_SYSTEM`).
`--only NAME ...` keeps just those histories and layouts. `--reading-prefix DIR` puts a trained reading prefix
(`memsplice.reading`) in front of every prompt.
"""

import argparse
import json
from dataclasses import dataclass

from memsplice.bench.record import provenance, save_result
from memsplice.cli.chat import DEFAULT_SYSTEM
from memsplice.eval.metrics import score_answer
from memsplice.eval.reader import PromptTemplate, Reader, render_history, render_session_header, render_turn
from memsplice.eval.systems.context import recent_window
from memsplice.eval.tasks import TaskArgs, get_task
from memsplice.memory.readback import RECALL_HEADER, with_recalled
from memsplice.online.bootstrap import episode_examples
from memsplice.reading.train import hard_distractor
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
    p.add_argument("--perspective", choices=["others", "user"], default="others", help="the synthetic task's")
    p.add_argument(
        "--chat",
        action="store_true",
        help="also the chat layouts (needs --perspective user, --window-tokens)",
    )
    p.add_argument("--only", nargs="+", default=None, help="just these histories and layouts")
    p.add_argument(
        "--reading-prefix",
        default=None,
        metavar="DIR",
        help="a trained reading prefix in front of every prompt (a directory, or shipped)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--record", default=None, help="save as benchmarks/results/NAME.json with provenance")
    args = p.parse_args()
    if args.layouts and not args.window_tokens:
        p.error("--layouts needs --window-tokens")
    if args.chat and (args.perspective != "user" or not args.window_tokens):
        p.error("--chat needs --perspective user and --window-tokens")
    reasoner = load_reasoner(None, device=args.device, dtype=args.dtype)
    started = provenance(reasoner.device)
    tok = reasoner.require_tokenizer()
    prefix = None
    if args.reading_prefix:
        from memsplice.checkpoints import load_reading_prefix

        prefix = load_reading_prefix(reasoner, args.reading_prefix)
    reader = Reader(reasoner, prefix=prefix)
    names = ["evidence", "chunk", "header_chunk", "header_turn", "header_chunk_distractor"]
    if args.window_tokens:
        names += [
            "chunk_window",
            "header_chunk_window",
            "window_header_chunk",
            "window_header_chunk_distractor",
        ]
    if args.layouts:
        names += list(LAYOUTS)
    if args.chat:
        names += list(CHAT_LAYOUTS)
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            p.error(f"--only: not among the histories and layouts asked for: {', '.join(unknown)}")
        names = [n for n in names if n in args.only]
    plain = PromptTemplate()
    rows = []
    for length in args.lengths:
        for seed in args.seeds:
            task = TaskArgs(
                examples=args.examples,
                lengths=(length,),
                seed=seed,
                split=args.split,
                values="pools",
                perspective=args.perspective,
            )
            episodes = get_task("synthetic")(task, reader.count_tokens)
            examples = episode_examples(episodes, reasoner, args.chunk_tokens)
            for episode, example in zip(episodes, examples, strict=True):
                window, window_messages = "", ()
                if args.window_tokens:
                    recent = recent_window(episode.turns, args.window_tokens, reader.count_tokens)[1]
                    window = render_history(recent)
                    window_messages = chat_messages(recent, episode.turns[0].speaker)
                questions = [q for q in episode.questions if q.answer]
                for q, positives in zip(questions, example.positives, strict=True):
                    evidence = episode.turns_by_id(q.evidence)
                    turn = evidence[-1]
                    chunk = tok.decode(example.chunks[positives[-1]]).strip()
                    header = f"system: {render_session_header(turn)}"
                    recalled = f"{header}\n{chunk}"
                    other = hard_distractor(episode.turns, q.question, set(q.evidence))
                    if other is not None:
                        extra = f"system: {render_session_header(other)}\n{render_turn(other)}"
                        first = index_of(episode.turns, other) < index_of(episode.turns, turn)
                        recalled_two = f"{extra}\n{recalled}" if first else f"{recalled}\n{extra}"
                    else:
                        recalled_two = recalled
                    histories = {
                        "evidence": render_history(evidence),
                        "chunk": chunk,
                        "header_chunk": f"{header}\n{chunk}",
                        "header_turn": f"{header}\n{render_turn(turn)}",
                        "chunk_window": f"{chunk}\n{window}",
                        "header_chunk_window": f"{header}\n{chunk}\n{window}",
                        "window_header_chunk": f"{window}\n{header}\n{chunk}",
                        "header_chunk_distractor": recalled_two,
                        "window_header_chunk_distractor": f"{window}\n{recalled_two}",
                    }
                    row = {"length": length, "seed": seed, "question": q.question, "answer": q.answer}
                    for name in names:
                        if name in LAYOUTS:
                            reader.template, history = LAYOUTS[name](
                                plain, window, f"{header}\n{chunk}", window_messages
                            )
                        elif name in CHAT_LAYOUTS:
                            where, with_window, system = CHAT_LAYOUTS[name]
                            reader.template = ChatLayout(
                                where=where, with_window=with_window, window=window_messages, system=system
                            )
                            history = f"{header}\n{chunk}"
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
        "chat": bool(args.chat),
        "perspective": args.perspective,
        "reading_prefix": args.reading_prefix,
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
    text given in the system message (`with_recalled` placement "system")."""

    system_note: str = ""
    before: tuple = ()
    recalled: str | None = None

    def messages(self, question: str, history: str | None) -> list[dict[str, str]]:
        system, user = super().messages(question, history)
        if self.system_note:
            system = {**system, "content": f"{system['content']}\n\n{self.system_note}"}
        return with_recalled([system, *self.before, user], self.recalled, "system")


LAYOUTS = {
    "question_twice": lambda t, w, r, m: (
        Messages(with_history=f"Question: {{question}}\n\n{t.with_history}"),
        f"{w}\n{r}",
    ),
    "window_in_system": lambda t, w, r, m: (
        Messages(system_note=f"The most recent part of the conversation:\n{w}"),
        r,
    ),
    "window_as_messages": lambda t, w, r, m: (Messages(before=m), r),
    "window_earlier_turn": lambda t, w, r, m: (
        Messages(
            before=(
                {"role": "user", "content": f"Here is the most recent part of our conversation:\n\n{w}"},
                {"role": "assistant", "content": "Noted."},
            )
        ),
        r,
    ),
    "recalled_in_system": lambda t, w, r, m: (Messages(recalled=r), w),
    "recalled_in_system_alone": lambda t, w, r, m: (Messages(recalled=r), None),
}
"""Prompt layout name -> (template, history) from (the eval's template, window text, recalled text, window
messages)."""


def chat_messages(turns, first_speaker: str) -> tuple:
    """`turns` as chat messages: a user's chat as it is; two named speakers as user (the one who spoke first in the
    conversation) and assistant, each turn's text after its speaker's name."""
    if all(t.speaker in ("user", "assistant") for t in turns):
        return tuple({"role": t.speaker, "content": t.text} for t in turns)
    return tuple(
        {"role": "user" if t.speaker == first_speaker else "assistant", "content": render_turn(t)}
        for t in turns
    )


CHAT_SYSTEM = DEFAULT_SYSTEM
"""`memsplice chat`'s default system prompt."""

MEMORY_SYSTEM = "You are a helpful assistant with a long memory of past conversations."
"""The eval's system prompt without its instruction to answer in a few words."""

CHAT_LAYOUTS = {
    "chat_window": ("none", True, CHAT_SYSTEM),
    "chat_recalled_in_system": ("system", True, CHAT_SYSTEM),
    "chat_recalled_in_user": ("user", True, CHAT_SYSTEM),
    "chat_recalled_before_question": ("before_question", True, CHAT_SYSTEM),
    "chat_recalled_in_system_alone": ("system", False, CHAT_SYSTEM),
    "chat_recalled_in_user_alone": ("user", False, CHAT_SYSTEM),
    "chat_recalled_as_history": ("history", True, CHAT_SYSTEM),
    "chat_recalled_as_history_alone": ("history", False, CHAT_SYSTEM),
    "chat_memory_system_as_history": ("history", True, MEMORY_SYSTEM),
    "chat_memory_system_before_question": ("before_question", True, MEMORY_SYSTEM),
    "chat_memory_system_in_system": ("system", True, MEMORY_SYSTEM),
}
"""Chat layout name -> (where the recalled text goes, whether the window's messages are in front, system prompt).
"history" puts it in the last user message as the eval's template puts history (`with_recalled`'s placement
"message", `RECALL_FRAME`), in front of the bare message; "system" is `with_recalled`'s placement "system"."""


@dataclass(frozen=True)
class ChatLayout(PromptTemplate):
    """A live chat's prompt: chat's system prompt, the window's turns as messages, the bare question; the recalled
    text (passed as `history`) placed by `layout`."""

    where: str = "system"
    with_window: bool = True
    window: tuple = ()
    system: str = CHAT_SYSTEM

    def messages(self, question: str, history: str | None) -> list[dict[str, str]]:
        where = self.where
        before = [dict(m) for m in self.window] if self.with_window else []
        system = {"role": "system", "content": self.system}
        user = {"role": "user", "content": question}
        note = f"{RECALL_HEADER}\n{history}"
        if where == "system":
            return with_recalled([system, *before, user], history, "system")
        if where == "user":
            return [system, *before, {"role": "user", "content": f"{note}\n\n{question}"}]
        if where == "history":
            return with_recalled([system, *before, user], history, "message")
        if where == "before_question":
            return [system, *before, {"role": "system", "content": note}, user]
        return [system, *before, user]


def index_of(turns, turn) -> int:
    return next(i for i, t in enumerate(turns) if t.id == turn.id)


def summarize(rows: list[dict], names: list[str]) -> dict:
    n = max(len(rows), 1)
    return {"questions": len(rows), **{name: sum(r[name] for r in rows) / n for name in names}}


if __name__ == "__main__":
    raise SystemExit(main())
