"""Passages for memory formation: tokenized corpora, synthetic text, and batches drawn by step.

Guarantees:
- Training text comes only from the "train" side of `memsplice.data.split_of`; evaluation passages only from the
  "heldout" side, so no held-out passage is ever trained on (tests/train/test_data.py checks the two never share a
  document).
- Every batch is a pure function of (seed, step, rank): the data position of a run is its step, so a resumed run
  draws exactly the batches an uninterrupted run would have drawn, and each rank draws different rows.
- All rows of a step share one passage length (no padding in the reasoner's input); the length is drawn from
  `DataArgs.lengths` under the curriculum, identically on every rank.
- Tokenized corpora are cached as .npy files keyed by the sources, split, size cap and the tokenizer's vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import DIALOGUE_SOURCES, DOCUMENT_SOURCES, data_root, iter_dialogues, iter_documents
from .config import DataArgs, ObjectiveArgs

logger = logging.getLogger(__name__)

# Purposes mixed into the per-step seed so that different draws of one step are independent.
_LENGTH, _RECON, _SYNTH, _CONT, _DENOISE, _PAIRS, _EVAL = range(7)


def _render_dialogue(turns) -> str:
    return "\n".join(f"{speaker}: {text.strip()}" for speaker, text in turns)


def _texts(args: DataArgs, split: str):
    root = data_root(args.root)
    docs = [s for s in args.sources if s in DOCUMENT_SOURCES]
    dialogues = [s for s in args.sources if s in DIALOGUE_SOURCES]
    unknown = sorted(set(args.sources) - set(DOCUMENT_SOURCES) - set(DIALOGUE_SOURCES))
    if unknown:
        raise ValueError(
            f"data.sources: unknown corpora {unknown}; known: {list(DOCUMENT_SOURCES + DIALOGUE_SOURCES)}"
        )
    for doc in iter_documents(root, sources=docs, split=split):
        yield doc.text
    for dialogue in iter_dialogues(root, sources=dialogues, split=split):
        yield _render_dialogue(dialogue.turns)


def tokenizer_key(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), separators=(",", ":"))
    return hashlib.sha256(vocab.encode()).hexdigest()[:16]


def corpus_tokens(tokenizer, args: DataArgs, split: str, cache: bool = True) -> np.ndarray:
    """All text of `split` ("train" or "heldout") as one int32 token stream, documents joined by a blank line."""
    from ..reasoner.loading import cache_root

    cap = args.max_corpus_tokens if split == "train" else None
    root = data_root(args.root)
    sizes = sorted(
        (str(p.relative_to(root)), p.stat().st_size)
        for s in args.sources
        if (root / s).is_dir()
        for p in (root / s).rglob("*")
        if p.is_file()
    )
    key = hashlib.sha256(
        json.dumps([sorted(args.sources), split, cap, tokenizer_key(tokenizer), sizes]).encode()
    )
    path = Path(args.cache_dir or cache_root() / "corpora") / f"{split}-{key.hexdigest()[:20]}.npy"
    if cache and path.is_file():
        return np.load(path)
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    pieces, total, batch = [], 0, []

    def flush():
        nonlocal total
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids + separator, dtype=np.int32))
            total += len(ids) + len(separator)
        batch.clear()

    for text in _texts(args, split):
        batch.append(text)
        if len(batch) >= 256:
            flush()
            if cap is not None and total >= cap:
                break
    if batch and (cap is None or total < cap):
        flush()
    if not pieces:
        raise FileNotFoundError(f"no {split} text found for sources {args.sources} under {root}")
    stream = np.concatenate(pieces)
    if cap is not None:
        stream = stream[:cap]
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{np.random.randint(1 << 30)}.npy")
        np.save(tmp, stream)
        tmp.replace(path)
    return stream


# -- synthetic text --------------------------------------------------------------------------------------------
_NAMES = [
    "Ada",
    "Bruno",
    "Chiara",
    "Dmitri",
    "Esme",
    "Farid",
    "Greta",
    "Hiro",
    "Imani",
    "Jonas",
    "Keiko",
    "Lars",
    "Mira",
    "Nadim",
    "Olga",
    "Pavel",
    "Quinn",
    "Rosa",
    "Sami",
    "Tomas",
    "Uma",
    "Viktor",
    "Wen",
    "Yara",
    "Zane",
]
_PLACES = [
    "Lisbon",
    "Oslo",
    "Nairobi",
    "Lima",
    "Kyoto",
    "Tbilisi",
    "Quito",
    "Hanoi",
    "Dakar",
    "Perth",
    "Bergen",
    "Porto",
    "Cusco",
    "Sapporo",
    "Tallinn",
    "Accra",
    "Leeds",
    "Graz",
    "Izmir",
    "Salta",
]
_JOBS = [
    "carpenter",
    "nurse",
    "pilot",
    "chemist",
    "baker",
    "lawyer",
    "teacher",
    "welder",
    "violinist",
    "botanist",
    "editor",
    "plumber",
    "surgeon",
    "farmer",
    "architect",
    "librarian",
]
_THINGS = [
    "a red bicycle",
    "two cats",
    "a blue kettle",
    "an old radio",
    "seven books",
    "a green scarf",
    "a broken clock",
    "three plants",
    "a silver ring",
    "a wooden chair",
]
_TEMPLATES = [
    "{name} lives in {place} and works as a {job}.",
    "{name} was born in {year} in {place}.",
    "The code for {name}'s locker is {code}.",
    "{name} owns {thing} and keeps it in {place}.",
    "On {day} {name} met {name2} at {time}.",
    "{name}'s phone number ends in {code}.",
    "{name} paid {amount} dollars for {thing}.",
    "{name} moved from {place} to {place2} in {year}.",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def fact_text(rng: np.random.Generator, sentences: int) -> str:
    """Templated sentences about made-up people, places and numbers (content no prior can predict)."""
    out = []
    for _ in range(sentences):
        t = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        out.append(
            t.format(
                name=_NAMES[rng.integers(len(_NAMES))],
                name2=_NAMES[rng.integers(len(_NAMES))],
                place=_PLACES[rng.integers(len(_PLACES))],
                place2=_PLACES[rng.integers(len(_PLACES))],
                job=_JOBS[rng.integers(len(_JOBS))],
                thing=_THINGS[rng.integers(len(_THINGS))],
                year=int(rng.integers(1900, 2030)),
                code=int(rng.integers(1000, 99999)),
                day=_DAYS[rng.integers(7)],
                time=f"{int(rng.integers(1, 13))}:{int(rng.integers(0, 60)):02d}",
                amount=int(rng.integers(2, 5000)),
            )
        )
    return " ".join(out)


def fact_tokens(tokenizer, seed: int, min_tokens: int) -> np.ndarray:
    """A stream of at least `min_tokens` tokens of templated facts."""
    rng = np.random.default_rng([seed, 0xFAC7])
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    pieces, total = [], 0
    while total < min_tokens:
        texts = [fact_text(rng, 8) for _ in range(64)]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids + space, dtype=np.int32))
            total += len(pieces[-1])
    return np.concatenate(pieces)


# -- batches ---------------------------------------------------------------------------------------------------
@dataclass
class PairBatch:
    """InfoNCE pairs: a query span and the passage it was taken from."""

    query: torch.Tensor
    """(B, Tq) token ids, right-padded."""
    query_mask: torch.Tensor
    """(B, Tq)."""
    passage: torch.Tensor
    """(B, T) token ids."""


@dataclass
class DenoiseBatch:
    """A passage and its corrupted copy (what the encoder sees)."""

    passage: torch.Tensor
    """(B, T) the original passage: the reasoner's target."""
    corrupted: torch.Tensor
    """(B, Tc) the encoder's input, right-padded (spans dropped make rows shorter)."""
    corrupted_mask: torch.Tensor
    """(B, Tc)."""


def _windows(stream: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    return stream[starts[:, None] + np.arange(length)[None, :]]


class PassageSource:
    """Draws training batches from the train stream (plus synthetic text) as a pure function of the step."""

    def __init__(
        self,
        train_tokens: np.ndarray,
        args: DataArgs,
        objectives: ObjectiveArgs,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        fact_stream: np.ndarray | None = None,
        mask_token_id: int = 0,
    ):
        if len(train_tokens) < 2 * max(args.lengths) + objectives.continuation_length + 1:
            raise ValueError(
                f"the training corpus has only {len(train_tokens)} tokens; it needs more than "
                f"{2 * max(args.lengths) + objectives.continuation_length} for passages of "
                f"{max(args.lengths)} tokens"
            )
        self.stream = train_tokens
        self.args, self.objectives = args, objectives
        self.seed, self.rank, self.world_size = seed, rank, world_size
        counts = np.bincount(train_tokens, minlength=int(train_tokens.max()) + 1).astype(np.float64)
        self.unigram = counts / counts.sum()
        self.facts = fact_stream
        self.mask_token_id = mask_token_id
        if "facts" in args.synthetic_kinds and args.synthetic_fraction > 0 and fact_stream is None:
            raise ValueError("synthetic 'facts' text needs a fact stream (see fact_tokens)")

    def _rng(self, step: int, purpose: int, per_rank: bool = True) -> np.random.Generator:
        return np.random.default_rng([self.seed, step, self.rank if per_rank else 0, purpose])

    # -- lengths ------------------------------------------------------------------------------------------------
    def max_length_at(self, step: int) -> int:
        a = self.args
        top = max(a.lengths)
        if a.curriculum_steps <= 0 or step >= a.curriculum_steps:
            return top
        return int(a.curriculum_start + (top - a.curriculum_start) * step / a.curriculum_steps)

    def length_at(self, step: int) -> int:
        """The passage length of `step` (the same on every rank)."""
        a = self.args
        cap = self.max_length_at(step)
        lengths = np.asarray(a.lengths)
        weights = np.asarray(
            a.length_weights if a.length_weights is not None else [1.0] * len(lengths), float
        )
        allowed = lengths <= cap
        if not allowed.any() or weights[allowed].sum() == 0:
            return int(lengths.min())
        p = np.where(allowed, weights, 0.0)
        return int(self._rng(step, _LENGTH, per_rank=False).choice(lengths, p=p / p.sum()))

    def rows_for(self, length: int) -> int:
        """Rows of this rank for a reconstruction batch of `length`-token passages."""
        total = max(self.world_size, self.args.tokens_per_step // length)
        return max(1, total // self.world_size)

    # -- passages -----------------------------------------------------------------------------------------------
    def _real(self, rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
        starts = rng.integers(0, len(self.stream) - length, size=rows)
        return _windows(self.stream, starts, length)

    def passages(self, step: int, rows: int, length: int, purpose: int = _RECON) -> torch.Tensor:
        """(rows, length) token ids: corpus windows, a `synthetic_fraction` of them replaced by synthetic text."""
        rng = self._rng(step, purpose)
        out = self._real(rng, rows, length)
        a = self.args
        if a.synthetic_fraction > 0:
            synth = np.flatnonzero(rng.random(rows) < a.synthetic_fraction)
            for i in synth:
                kind = a.synthetic_kinds[int(rng.integers(len(a.synthetic_kinds)))]
                if kind == "shuffled":
                    out[i] = rng.choice(len(self.unigram), size=length, p=self.unigram)
                else:
                    start = int(rng.integers(0, len(self.facts) - length))
                    out[i] = self.facts[start : start + length]
        return torch.from_numpy(out.astype(np.int64))

    def reconstruction(self, step: int) -> torch.Tensor:
        length = self.length_at(step)
        return self.passages(step, self.rows_for(length), length)

    def continuation(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, T), following (B, Tf)): consecutive windows of the train stream."""
        length = self.length_at(step)
        follow = self.objectives.continuation_length
        rows = max(1, self.objectives.aux_rows // self.world_size)
        window = _windows(
            self.stream,
            self._rng(step, _CONT).integers(0, len(self.stream) - length - follow, rows),
            length + follow,
        )
        window = torch.from_numpy(window.astype(np.int64))
        return window[:, :length], window[:, length:]

    def denoising(self, step: int) -> DenoiseBatch:
        length = self.length_at(step)
        rows = max(1, self.objectives.aux_rows // self.world_size)
        passage = self.passages(step, rows, length, purpose=_DENOISE)
        rng = self._rng(step, _DENOISE + 100)
        o = self.objectives
        corrupted = []
        for row in passage.tolist():
            keep, out, i = [True] * length, [], 0
            budget = max(1, round(o.denoise_ratio * length))
            while budget > 0:
                span = min(budget, int(rng.geometric(1.0 / o.denoise_span)))
                start = int(rng.integers(0, length - span + 1))
                for j in range(start, start + span):
                    keep[j] = False
                budget -= span
            drop = rng.random(length) < o.denoise_drop
            while i < length:
                if keep[i]:
                    out.append(row[i])
                    i += 1
                    continue
                j = i
                while j < length and not keep[j]:
                    j += 1
                if not drop[i]:
                    out.append(self.mask_token_id)  # one mask token per span, like T5 sentinels
                i = j
            corrupted.append(out or [self.mask_token_id])
        width = max(len(r) for r in corrupted)
        ids = torch.zeros(rows, width, dtype=torch.long)
        mask = torch.zeros(rows, width, dtype=torch.long)
        for r, seq in enumerate(corrupted):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        return DenoiseBatch(passage, ids, mask)

    def pairs(self, step: int) -> PairBatch:
        """Query spans cut from passages; row i's query comes from row i's passage (the others are negatives)."""
        length = self.length_at(step)
        rows = max(2, self.objectives.aux_rows // self.world_size)
        passage = self.passages(step, rows, length, purpose=_PAIRS)
        rng = self._rng(step, _PAIRS + 100)
        lo, hi = self.objectives.infonce_query_length
        hi = min(hi, length)
        lo = min(lo, hi)
        sizes = rng.integers(lo, hi + 1, size=rows)
        query = torch.zeros(rows, int(sizes.max()), dtype=torch.long)
        mask = torch.zeros_like(query)
        for r, n in enumerate(sizes.tolist()):
            start = int(rng.integers(0, length - n + 1))
            query[r, :n] = passage[r, start : start + n]
            mask[r, :n] = 1
        return PairBatch(query, mask, passage)


def heldout_passages(heldout_tokens: np.ndarray, length: int, count: int, seed: int = 1234) -> torch.Tensor:
    """(count, length) fixed evaluation passages from the held-out stream, spread evenly over it."""
    if len(heldout_tokens) < length + 1:
        raise ValueError(
            f"the held-out corpus has {len(heldout_tokens)} tokens, fewer than one passage of {length}"
        )
    rng = np.random.default_rng([seed, length, _EVAL])
    span = (len(heldout_tokens) - length) / count
    starts = (np.arange(count) * span + rng.random(count) * span).astype(np.int64)
    return torch.from_numpy(_windows(heldout_tokens, starts, length).astype(np.int64))
