"""memsplice's own systems: conversation memory spliced into the reasoner's KV cache.

- `latent`: every turn goes into a `ConversationMemory`; the question alone is in the prompt, the memory K/V in
  front of it.
- `latent+window`: the most recent turns that fit `SystemArgs.window_tokens` stay as exact text in the prompt; turns
  that fall out of the window go into the memory, which sits in front.
- `latent-select`, `latent-select+window`: only the chunk memories the question picks are spliced in.
- `latent-readback`, `latent-readback+window`: the chunk memories the question picks are read back as text by the
  reasoner (from the memory alone) and the question is asked over that text.

Session headers are written into memory as turns of their own ("[Session 3, 1:56 pm on 8 May, 2023]"), so memory
receives the same dates the text systems see. The memory model is `SystemArgs.checkpoint`, else the checkpoint
shipped for the reasoner (`memsplice.checkpoints`), else an untrained `MemoryModel` with the default config (its
scores are a floor, not a result).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ...inject.memory_kv import MemoryKV
from ..reader import Answer, memory_turns, render_history
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
        model = load_memory(runtime.reasoner, checkpoint).eval()
        model.set_refine_steps(runtime.args.refine_steps)
        model.set_recency_margin(runtime.args.recency_margin)
        model.set_extra_margin(runtime.args.extra_margin)
        return model

    return runtime.shared("memory_model", build)


def new_conversation(runtime, *, keep_every_chunk: bool = False):
    """A fresh conversation memory set up as `runtime.args` say. `keep_every_chunk`: no slot budget (for read paths
    that never compose the whole memory, so that no chunk is evicted to fit one)."""
    from ...conversation import ConversationConfig, ConversationMemory

    model = load_memory_model(runtime)
    overrides = {
        k: getattr(runtime.args, k)
        for k in ("slot_budget", "chunk_tokens", "encode_batch")
        if getattr(runtime.args, k) is not None
    }
    if keep_every_chunk:
        overrides["slot_budget"] = None
    return ConversationMemory(
        model, ConversationConfig(**overrides, readback_context_role=runtime.args.readback_context)
    )


class _LatentBase(System):
    splices_memory = True

    def __init__(self, runtime):
        super().__init__(runtime)
        self.conversation = None
        self._last_session = None

    def reset(self) -> None:
        super().reset()
        self.conversation = self._new_conversation()
        self._last_session = None

    def _new_conversation(self):
        return new_conversation(self.runtime)

    def _write(self, turns: Sequence[Turn]) -> None:
        if self.conversation is None:
            self.reset()
        pairs = memory_turns(turns, self._last_session)
        step = self.args.write_turns
        for start in range(0, len(pairs), step):
            self.conversation.add_turns(pairs[start : start + step])
        if turns:
            self._last_session = turns[-1].session

    def _finish_writes(self) -> None:
        """Compose the whole memory now, if answers read it, so that the cost lands in the write time and not in the
        first answer's."""
        if self.conversation.turns and self._reads_whole_memory():
            self.conversation.memory_kv()

    def _reads_whole_memory(self) -> bool:
        return True

    def evicted_spans(self) -> int:
        return 0 if self.conversation is None else len(self.conversation.store.archived())

    def _memory_bytes(self) -> int:
        if self.conversation is None:
            return 0
        return self.conversation.stored_bytes()


@register_system(
    "latent", help="conversation memory injected into the KV cache; the question alone in the prompt"
)
class LatentMemory(_LatentBase):
    def ingest(self, turns: Sequence[Turn]) -> None:
        self._write(turns)
        self._finish_writes()

    def answer(self, question: Question) -> Answer:
        memory = self.conversation.memory_kv() if self.conversation is not None else None
        return self.read_turns(question, [], memory=memory)

    def stored_bytes(self) -> int:
        return self._memory_bytes()


class _PicksChunks(_LatentBase):
    """What the selecting systems share: only `SystemArgs.select_chunks` chunk memories are read per question, ranked
    (`SystemArgs.select_by`) by the memory's address head, which scores each chunk's stored latents against the
    question's own latents (one short encoder call), or by the attention the question's prompt gives them with the
    whole memory in front (one extra forward pass). Either cost is counted in the time to first token.

    With the address head the whole memory is never composed, so the conversation has no slot budget
    (`SystemArgs.slot_budget` is not applied): a budget sized for splicing the whole memory (1/16 of the history's
    KV) would evict chunks the head could pick, most of them at short histories (at 1k tokens of history, 29 of 48
    spans). What the answer reads is the picked chunks at full resolution, whatever the budget."""

    def _new_conversation(self):
        return new_conversation(self.runtime, keep_every_chunk=self._select_by() == "address")

    def _select_by(self) -> str:
        """`SystemArgs.select_by`, with auto = the address head when the checkpoint has one, else attention."""
        has_head = load_memory_model(self.runtime).address is not None
        if self.args.select_by == "address" and not has_head:
            raise ValueError(
                f"{self.name} --select-by address: the memory checkpoint has no address head (train one with "
                "python -m memsplice.online.address)"
            )
        if self.args.select_by == "auto":
            return "address" if has_head else "attention"
        return self.args.select_by

    def _reads_whole_memory(self) -> bool:
        return self._select_by() == "attention"  # the attention probe reads it; the address head does not

    def _selected_memory(self, question: Question, window: Sequence[Turn]) -> tuple[MemoryKV | None, float]:
        """The chunk memories `question` picks, and the seconds picking took. The attention probe reads the prompt
        the answer will have (question plus `window` as text)."""
        if self.conversation is None or not self.conversation.turns:
            return None, 0.0
        t0 = time.perf_counter()
        if self._select_by() == "address":
            memory = self.conversation.address(question.question, self.args.select_chunks)
        else:
            memory = self.conversation.select(self._probe_prompt(question, window), self.args.select_chunks)
        return memory, time.perf_counter() - t0

    def _probe_prompt(self, question: Question, window: Sequence[Turn]) -> torch.Tensor:
        """(1, T) ids of the prompt the answer will have (question plus `window` as text): what the attention probe
        reads to rank chunks."""
        history = render_history(window) if window else None
        return torch.tensor(
            [self.reader.prompt_ids(question.question, history)], device=self.reader.reasoner.device
        )


@register_system(
    "latent-select",
    help="conversation memory, but only the chunk memories the question picks (address head or attention) are "
    "injected",
)
class LatentSelect(_PicksChunks, LatentMemory):
    """`latent` with a read-time selection (`_PicksChunks`): only the picked chunk memories are spliced in front of
    the question, at full resolution."""

    def answer(self, question: Question) -> Answer:
        memory, seconds = self._selected_memory(question, [])
        return self.read_turns(question, [], memory=memory, retrieval_s=seconds)


class _ReadsBack(_PicksChunks):
    """A read path for memories that hold more than the reasoner answers from them: the `select_chunks` chunk
    memories the question picks (ranked as `_PicksChunks` ranks them) are each read back after the memory's
    reconstruction instruction (`ConversationMemory.read_back`), greedily, for at most the chunk's token count; their
    text, in conversation order, is history in an ordinary prompt. The transcript is never consulted: the text
    comes out of the latents, as faithful as they are (verbatim when refined at write time, `--refine-steps`).
    Picking and decoding the chunks count as retrieval time; the KV at answer time is the prompt's. A memory that
    records no reconstruction instruction (an untrained one) reads nothing back, with a warning."""

    splices_memory = False

    def _readback_decoders(self):
        """One engine pool per run for read-back (chunks up to the memory's input size), set up as the reader's."""
        from ...memory.readback import readback_decoders

        def build():
            return readback_decoders(load_memory_model(self.runtime), cuda_graphs=self.reader.cuda_graphs)

        return self.runtime.shared("readback_decoders", build)

    def _read_back(self, question: Question, window: Sequence[Turn] = ()) -> tuple[str | None, float]:
        if self.conversation is None or not self.conversation.turns:
            return None, 0.0
        if not load_memory_model(self.runtime).config.reconstruction_instruction:
            if not getattr(self, "_warned_no_instruction", False):
                logger.warning(
                    "%s: the memory records no reconstruction instruction, so nothing can be read back from it "
                    "(answers get no history)",
                    self.name,
                )
                self._warned_no_instruction = True
            return None, 0.0
        t0 = time.perf_counter()
        by = self._select_by()
        recalled = self.conversation.recall(
            question.question,
            self.args.select_chunks,
            prompt_ids=self._probe_prompt(question, window) if by == "attention" else None,
            decoders=self._readback_decoders(),
            select_by=by,
        )
        return recalled, time.perf_counter() - t0


@register_system(
    "latent-readback",
    help="conversation memory read back as text: the chunk memories the question picks (address head or attention) "
    "are regenerated by the reasoner from memory alone, and the question is asked over that text",
)
class LatentReadback(_ReadsBack, LatentMemory):
    """`latent`, read back (`_ReadsBack`): the picked chunks' read-back text is the prompt's only history."""

    def answer(self, question: Question) -> Answer:
        history, seconds = self._read_back(question)
        return self.reader.read(question.question, history, retrieval_s=seconds)


@register_system(
    "latent-oracle",
    help="memory written from only the question's evidence turns (the latent counterpart of oracle: reading a "
    "fact out of memory without having to find it among the rest)",
)
class LatentOracle(_LatentBase):
    """A diagnostic, not a memory one could deploy (it is given the evidence ids): each question gets a fresh
    conversation memory of its evidence turns alone, written as `latent` writes, and the question alone in the
    prompt. Next to `latent` it separates the two ways latent recall fails: not carrying a fact through memory at
    all (low here too), or not finding it among many chunk memories (high here, low for `latent`). The per-question
    write is counted in the answer's retrieval time."""

    def answer(self, question: Question) -> Answer:
        t0 = time.perf_counter()
        wanted = set(question.evidence)
        self.conversation = new_conversation(self.runtime)
        self._last_session = None
        self._write([t for t in self.turns if t.id in wanted])
        memory = self.conversation.memory_kv() if self.conversation.turns else None
        return self.read_turns(question, [], memory=memory, retrieval_s=time.perf_counter() - t0)

    def stored_bytes(self) -> int:
        return text_bytes(self.turns)


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
        self._write(older)
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


@register_system(
    "latent-select+window",
    help="the recent window as exact text, and of the latent memory of everything older only the chunk memories "
    "the question picks (as latent-select)",
)
class LatentSelectPlusWindow(_PicksChunks, LatentPlusWindow):
    """`latent+window` reading its memory as `latent-select` does (`_PicksChunks`): the window stays exact text, and
    only the chunk memories the question picks are spliced in front of it."""

    def answer(self, question: Question) -> Answer:
        memory, seconds = self._selected_memory(question, self.window)
        return self.read_turns(question, self.window, memory=memory, retrieval_s=seconds)


@register_system(
    "latent-readback+window",
    help="the recent window as exact text, and after it the chunk memories of everything older that the question "
    "picks, read back as text (as latent-readback)",
)
class LatentReadbackPlusWindow(_ReadsBack, LatentPlusWindow):
    """`latent+window` reading its memory as `latent-readback` does: the window's turns, then the read-back text of
    the picked chunks (each under the session header read back with it), as the prompt's history. Read-back goes
    last, nearest the question: on the 288 synthetic test questions at 16k-64k the reader answers 73.6% over the
    window then the evidence chunk under its header, 56.2% the other way round and 62.8% with the chunk alone before
    the window (`scripts/online/reader_context.py --window-tokens 256`, `online/reader-context-cpu.json`; on 144
    train-split questions 69.4 / 53.5 / 56.3%, `online/reader-context-train-cpu.json`)."""

    def answer(self, question: Question) -> Answer:
        recalled, seconds = self._read_back(question, self.window)
        window = render_history(self.window) if self.window else None
        history = "\n".join(h for h in (window, recalled) if h) or None
        return self.reader.read(question.question, history, retrieval_s=seconds)
