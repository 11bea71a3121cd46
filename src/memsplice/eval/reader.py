"""The one way every system asks the reasoner a question: the same prompt template, the same greedy decoding.

A system decides only *what* the reasoner sees: history text in the prompt (window, full, retrieved turns, evidence
turns, or none) and/or memory K/V in front of it. `Reader.read` renders the prompt with `PromptTemplate`, decodes
greedily for at most `GenerationSettings.max_new_tokens` tokens with the timed `GreedyDecoder`, and returns the
answer text with its costs. Decoders are kept per cache size (`DecoderPool`: powers of two up to the reasoner's
window) so that short prompts do not pay for attention over a long, mostly empty cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..engine import DecoderPool, GreedyDecoder, loaded_slots
from ..inject.memory_kv import MemoryKV
from .tasks.base import Turn

logger = logging.getLogger(__name__)

MIN_CACHE = 256


@dataclass(frozen=True)
class PromptTemplate:
    """How history and question become the reasoner's chat prompt."""

    system: str = (
        "You are a helpful assistant with a long memory of past conversations. "
        "Answer the question in a few words."
    )
    """The system message of every prompt."""
    with_history: str = "Here is the conversation so far:\n\n{history}\n\nQuestion: {question}\nShort answer:"
    """The user message when history text is in context."""
    without_history: str = "Question: {question}\nShort answer:"
    """The user message when no history text is in context (none, latent)."""

    def messages(self, question: str, history: str | None) -> list[dict[str, str]]:
        user = (
            self.with_history.format(history=history, question=question)
            if history
            else self.without_history.format(question=question)
        )
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


def render_turn(turn: Turn) -> str:
    return f"{turn.speaker}: {turn.text}"


def render_session_header(turn: Turn) -> str:
    return f"[Session {turn.session}{', ' + turn.date if turn.date else ''}]"


def memory_turns(turns: Sequence[Turn], session: int | None = None) -> list[tuple[str, str]]:
    """(role, text) pairs as the latent systems write `turns` into a conversation memory: a "system" turn with the
    session header wherever a session starts, `session` being the session of the last turn already written."""
    return [(role, text) for role, text, _ in _memory_entries(turns, session)]


def memory_turn_sources(turns: Sequence[Turn], session: int | None = None) -> list[str | None]:
    """For each pair of `memory_turns(turns, session)`, the id of the turn it renders (None for a session header)."""
    return [source for _, _, source in _memory_entries(turns, session)]


def _memory_entries(turns: Sequence[Turn], session: int | None):
    for turn in turns:
        if turn.session != session:
            yield "system", render_session_header(turn), None
            session = turn.session
        yield turn.speaker, turn.text, turn.id


def render_history(turns: Sequence[Turn]) -> str:
    """Turns in order, one per line, with a header line wherever a session starts."""
    lines: list[str] = []
    session = None
    for turn in turns:
        if turn.session != session:
            if lines:
                lines.append("")
            lines.append(render_session_header(turn))
            session = turn.session
        lines.append(render_turn(turn))
    return "\n".join(lines)


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings shared by every system under test."""

    max_new_tokens: int = 24
    """Greedy decoding stops at the end-of-turn token or after this many tokens."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"GenerationSettings.max_new_tokens must be >= 1 (got {self.max_new_tokens})")


@dataclass
class AnswerCosts:
    """What answering one question cost (the same fields for every system)."""

    fits: bool = True
    """False when the prompt did not fit the reasoner's window (the answer is then n/a)."""
    prompt_tokens: int = 0
    """Tokens prefilled for this question (template + history text in context + question)."""
    context_tokens: int = 0
    """Of which history text in context."""
    memory_slots: int = 0
    """Memory positions spliced in front of the prompt."""
    kv_bytes: int = 0
    """KV-cache bytes in use at the end of the answer (memory + prompt + generated), or, when the prompt did not
    fit, what it would have needed."""
    ttft_s: float = 0.0
    """Time to first token: retrieval (if any) + memory load + prefill + first token."""
    retrieval_s: float = 0.0
    """Of which choosing what goes into context (BM25 or embedding search)."""
    decode_s_per_token: float | None = None
    """Mean time per decoded token after the first (None when only one token was decoded)."""
    new_tokens: int = 0
    cuda_graphs: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Answer:
    text: str
    costs: AnswerCosts


class Reader:
    """Prompt + greedy decode for every system: `read(question, history_text, memory) -> Answer`."""

    def __init__(
        self,
        reasoner,
        template: PromptTemplate | None = None,
        settings: GenerationSettings | None = None,
        *,
        cuda_graphs: bool | None = None,
        prefix=None,
    ):
        self.reasoner = reasoner
        self.prefix = prefix
        """A `memsplice.reading.ReadingPrefix` in front of every prompt that splices no memory (None: none)."""
        self.template = template or PromptTemplate()
        self.settings = settings or GenerationSettings()
        self.cuda_graphs = cuda_graphs
        tok = reasoner.require_tokenizer()
        pad = getattr(tok, "pad_token_id", None)
        self.stop_ids = tuple(sorted({*reasoner.eos_ids, *([pad] if pad is not None else [])}))
        s = reasoner.shapes
        self.kv_bytes_per_position = s.num_layers * 2 * s.kv_width * reasoner.dtype.itemsize
        self._decoders = DecoderPool(
            reasoner, max_new_tokens=self.settings.max_new_tokens, min_len=MIN_CACHE, cuda_graphs=cuda_graphs
        )
        self.window = self._decoders.window
        self._token_counts: dict[str, int] = {}

    # -- text ------------------------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Reasoner tokens of `text` (memoised: histories are counted turn by turn, many times)."""
        n = self._token_counts.get(text)
        if n is None:
            n = len(self.reasoner.tokenizer(text, add_special_tokens=False)["input_ids"])
            if len(self._token_counts) < 200_000:
                self._token_counts[text] = n
        return n

    def prompt_ids(self, question: str, history: str | None) -> list[int]:
        return self.reasoner.chat_ids(self.template.messages(question, history))

    def fits(self, prompt_tokens: int, memory_slots: int = 0) -> bool:
        return memory_slots + prompt_tokens + self.settings.max_new_tokens <= self.window

    def _decoder(self, needed: int) -> GreedyDecoder:
        decoder = self._decoders.decoder_for(needed)
        if decoder is None:  # read() checks fits() first
            raise ValueError(f"{needed} positions exceed the reasoner's window of {self.window}")
        return decoder

    # -- answering -------------------------------------------------------------------------------------------
    def read(
        self,
        question: str,
        history: str | None = None,
        memory: MemoryKV | None = None,
        *,
        retrieval_s: float = 0.0,
    ) -> Answer:
        ids = self.prompt_ids(question, history)
        context = self.count_tokens(history) if history else 0
        if self.prefix is not None:
            if loaded_slots(memory):
                raise ValueError(
                    "Reader: a reading prefix goes in front of prompts that splice no memory; this read splices "
                    f"{loaded_slots(memory)} memory slots"
                )
            with torch.no_grad():
                memory = self.prefix.memory_kv()
        slots = loaded_slots(memory)
        new = self.settings.max_new_tokens
        if not self.fits(len(ids), slots):
            return Answer(
                "",
                AnswerCosts(
                    fits=False,
                    prompt_tokens=len(ids),
                    context_tokens=context,
                    memory_slots=slots,
                    kv_bytes=(slots + len(ids) + new) * self.kv_bytes_per_position,
                    retrieval_s=retrieval_s,
                ),
            )
        result = self._decoder(slots + len(ids) + new).generate(
            ids, memory, max_new_tokens=new, stop_ids=self.stop_ids
        )
        text = self.reasoner.tokenizer.decode(result.tokens, skip_special_tokens=True).strip()
        return Answer(
            text,
            AnswerCosts(
                prompt_tokens=len(ids),
                context_tokens=context,
                memory_slots=result.memory_slots,
                kv_bytes=result.kv_positions * self.kv_bytes_per_position,
                ttft_s=retrieval_s + result.ttft_s,
                retrieval_s=retrieval_s,
                decode_s_per_token=result.decode_s_per_token,
                new_tokens=len(result.tokens),
                cuda_graphs=result.cuda_graphs,
            ),
        )
