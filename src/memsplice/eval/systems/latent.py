"""memsplice's own systems: conversation memory spliced into the reasoner's KV cache.

- `latent`: every turn goes into a `ConversationMemory`; the question alone is in the prompt, the memory K/V in
  front of it.
- `latent+window`: the most recent turns that fit `SystemArgs.window_tokens` stay as exact text in the prompt; turns
  that fall out of the window go into the memory, which sits in front.

Session headers are written into memory as turns of their own ("[Session 3, 1:56 pm on 8 May, 2023]"), so memory
receives the same dates the text systems see. The memory model is `SystemArgs.checkpoint`, else the checkpoint
shipped for the reasoner (`memsplice.checkpoints`), else an untrained `MemoryModel` with the default config (its
scores are a floor, not a result).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ...inject.compose import concat_slots
from ..reader import Answer, render_session_header
from ..tasks.base import Question, Turn
from .base import System, register_system, text_bytes
from .context import recent_window

logger = logging.getLogger(__name__)


def memory_checkpoint(runtime) -> Path | None:
    """The checkpoint the latent systems use: --checkpoint, else the one shipped for this reasoner, else None."""
    from ...checkpoints import checkpoint_for

    return runtime.args.checkpoint or checkpoint_for(runtime.reasoner)


def load_memory_model(runtime):
    """The run's memory model (one per run), in eval mode; an untrained one is seeded by `SystemArgs.seed`."""
    from ...checkpoints import load_memory

    def build():
        checkpoint = memory_checkpoint(runtime)
        if checkpoint is None:
            logger.warning(
                "no memory checkpoint: the latent systems use an untrained memory; expect floor-level "
                "scores (pass --checkpoint DIR)"
            )
            torch.manual_seed(runtime.args.seed)
        return load_memory(runtime.reasoner, checkpoint).eval()

    return runtime.shared("memory_model", build)


def new_conversation(runtime):
    model = load_memory_model(runtime)
    try:
        from ...conversation import ConversationConfig, ConversationMemory
    except ImportError:
        return ChunkedConversation(model)
    overrides = {} if runtime.args.slot_budget is None else {"slot_budget": runtime.args.slot_budget}
    return ConversationMemory(model, ConversationConfig(**overrides))


@dataclass
class ChunkWrite:
    seconds: float
    tokens: int
    slots: int


class ChunkedConversation:
    """`ConversationMemory`'s interface over plain chunks, for builds without `memsplice.conversation`.

    Turns ("role: text\n") are packed in order into chunks of at most `max_memory_tokens` tokens; a chunk is written
    with `MemoryModel.write` when it is full (and the open one when memory is read), and all chunks are composed
    along the slot axis with `concat_slots`. Nothing is ever compressed or evicted.
    """

    def __init__(self, memory):
        self.memory = memory
        self.chunk_tokens = memory.config.max_memory_tokens
        self.sealed: list = []  # MemoryKV per full chunk
        self.open: list[int] = []
        self.turns = 0
        self._text_bytes = 0
        self._composed = None
        self._dirty = False

    def _write(self, ids: list[int]):
        tensor = torch.tensor([ids], device=self.memory.reasoner.device)
        with torch.no_grad():
            return self.memory.write(tensor).kv

    def add_turn(self, role: str, text: str) -> ChunkWrite:
        t0 = time.perf_counter()
        rendered = f"{role}: {text}\n"
        ids = self.memory.reasoner.require_tokenizer()(rendered, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), self.chunk_tokens):
            piece = ids[i : i + self.chunk_tokens]
            if len(self.open) + len(piece) > self.chunk_tokens:
                self.sealed.append(self._write(self.open))
                self.open = []
            self.open.extend(piece)
        self.turns += 1
        self._text_bytes += len(rendered.encode())
        self._dirty = True
        return ChunkWrite(time.perf_counter() - t0, len(ids), self.num_slots)

    @property
    def num_slots(self) -> int:
        return self.memory.config.num_slots * (len(self.sealed) + bool(self.open))

    def memory_kv(self):
        if self._dirty:
            parts = self.sealed + ([self._write(self.open)] if self.open else [])
            self._composed = concat_slots(parts, self.memory.reasoner) if parts else None
            self._dirty = False
        return self._composed

    def stats(self) -> dict:
        chunks = len(self.sealed) + bool(self.open)
        latent_bytes = chunks * self.memory.config.num_slots * self.memory.reasoner.shapes.hidden_size * 4
        return {"turns": self.turns, "slots": self.num_slots, "stored_bytes": latent_bytes + self._text_bytes}


class _LatentBase(System):
    def __init__(self, runtime):
        super().__init__(runtime)
        self.conversation = None
        self._last_session = None

    def reset(self) -> None:
        super().reset()
        self.conversation = new_conversation(self.runtime)
        self._last_session = None

    def _write(self, turn: Turn) -> None:
        if self.conversation is None:
            self.reset()
        if turn.session != self._last_session:
            self.conversation.add_turn("system", render_session_header(turn))
            self._last_session = turn.session
        self.conversation.add_turn(turn.speaker, turn.text)

    def _finish_writes(self) -> None:
        """Compose the memory now, so that the cost lands in the write time and not in the first answer's."""
        self.conversation.memory_kv()

    def _memory_bytes(self) -> int:
        if self.conversation is None:
            return 0
        return int(self.conversation.stats()["stored_bytes"])


@register_system(
    "latent", help="conversation memory injected into the KV cache; the question alone in the prompt"
)
class LatentMemory(_LatentBase):
    def ingest(self, turns: Sequence[Turn]) -> None:
        for turn in turns:
            self._write(turn)
        self._finish_writes()

    def answer(self, question: Question) -> Answer:
        memory = self.conversation.memory_kv() if self.conversation is not None else None
        return self.read_turns(question, [], memory=memory)

    def stored_bytes(self) -> int:
        return self._memory_bytes()


@register_system("latent+window", help="the recent window as exact text, latent memory for everything older")
class LatentPlusWindow(_LatentBase):
    def reset(self) -> None:
        super().reset()
        self.window: list[Turn] = []

    def ingest(self, turns: Sequence[Turn]) -> None:
        if self.conversation is None:
            self.reset()
        self.window.extend(turns)
        older, self.window = recent_window(self.window, self.args.window_tokens, self.reader.count_tokens)
        for turn in older:
            self._write(turn)
        if self.conversation.turns:
            self._finish_writes()

    def answer(self, question: Question) -> Answer:
        memory = (
            self.conversation.memory_kv()
            if self.conversation is not None and self.conversation.turns
            else None
        )
        return self.read_turns(question, self.window, memory=memory)

    def stored_bytes(self) -> int:
        return self._memory_bytes() + text_bytes(getattr(self, "window", []))
