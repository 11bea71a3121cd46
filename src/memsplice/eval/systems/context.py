"""Systems that put history text (or none) into the prompt: `none`, `window`, `full`, `oracle`.

- `none`: the question alone; what the reasoner knows without any memory.
- `window`: the most recent turns whose rendered text fits `SystemArgs.window_tokens`.
- `full`: the whole history, when the prompt fits the reasoner's window; otherwise the answer is n/a and its costs
  say how many KV bytes the whole history would have needed.
- `oracle`: only the question's evidence turns (an upper reference for any memory that must find them first).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..reader import Answer, render_session_header, render_turn
from ..tasks.base import Question, Turn
from .base import System, register_system, text_bytes


def recent_window(turns: Sequence[Turn], budget: int, count_tokens) -> tuple[list[Turn], list[Turn]]:
    """(older turns, most recent turns whose text fits `budget` tokens), splitting `turns` at one point.

    Each turn costs its rendered line, plus one session header for each session the window shows (as
    `render_history` writes them: the window's first turn always opens with one).
    """
    used = 0
    start = len(turns)
    for i in range(len(turns) - 1, -1, -1):
        cost = count_tokens(render_turn(turns[i])) + 1
        if start == len(turns) or turns[start].session != turns[i].session:
            cost += count_tokens(render_session_header(turns[i]))
        if used + cost > budget:
            break
        used += cost
        start = i
    return list(turns[:start]), list(turns[start:])


@register_system("none", help="the reasoner with the question alone")
class NoMemory(System):
    def answer(self, question: Question) -> Answer:
        return self.read_turns(question, [])

    def stored_bytes(self) -> int:
        return 0


@register_system("window", help="the most recent history that fits --window-tokens")
class RecentWindow(System):
    def answer(self, question: Question) -> Answer:
        _, recent = recent_window(self.turns, self.args.window_tokens, self.reader.count_tokens)
        return self.read_turns(question, recent)

    def stored_bytes(self) -> int:
        _, recent = recent_window(self.turns, self.args.window_tokens, self.reader.count_tokens)
        return text_bytes(recent)


@register_system("full", help="the whole history in context when it fits the reasoner's window (else n/a)")
class FullHistory(System):
    def answer(self, question: Question) -> Answer:
        return self.read_turns(question, self.turns)

    def stored_bytes(self) -> int:
        return text_bytes(self.turns)


@register_system("oracle", help="only the question's evidence turns in context")
class EvidenceOracle(System):
    def answer(self, question: Question) -> Answer:
        wanted = set(question.evidence)
        return self.read_turns(question, [t for t in self.turns if t.id in wanted])

    def stored_bytes(self) -> int:
        return text_bytes(self.turns)
