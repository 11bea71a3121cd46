"""Retrieval baselines: the top-k history turns for the question, in their original order, in context.

- `rag-bm25`: BM25 (the `bm25s` library; English stopwords, Snowball stemming when PyStemmer is installed) over
  the turns' text.
- `rag-dense`: cosine similarity of MiniLM sentence embeddings (`embedder.py`) of the turns and the question.

Indexing and embedding happen when turns are fed (timed as write cost); the search happens per question (timed as
`retrieval_s`, part of the time to first token). Retrieved turns are rendered exactly like the other systems' context.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from ..reader import Answer, render_turn
from ..tasks.base import Question, Turn
from .base import System, register_system, text_bytes


def _stemmer():
    try:
        import Stemmer
    except ImportError:
        return None
    return Stemmer.Stemmer("english")


class TurnRetrieval(System):
    """A system that puts the turns `search(question)` returns (indices into `self.turns`) in context, in their
    original order; the search is timed as retrieval."""

    def search(self, query: str) -> list[int]:
        raise NotImplementedError

    def answer(self, question: Question) -> Answer:
        t0 = time.perf_counter()
        picked = sorted(self.search(question.question))
        retrieval_s = time.perf_counter() - t0
        return self.read_turns(question, [self.turns[i] for i in picked], retrieval_s=retrieval_s)


@register_system("rag-bm25", help="BM25 over history turns (bm25s), top-k turns in context")
class BM25Retrieval(TurnRetrieval):
    def __init__(self, runtime):
        super().__init__(runtime)
        try:
            import bm25s
        except ImportError:
            raise ImportError("rag-bm25 needs bm25s: pip install 'memsplice[eval]'") from None
        self._bm25s = bm25s
        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
        self._stem = _stemmer()
        self._retriever = None

    def reset(self) -> None:
        super().reset()
        self._retriever = None

    def ingest(self, turns: Sequence[Turn]) -> None:
        bm25s = self._bm25s
        tokens = bm25s.tokenize(
            [render_turn(t) for t in self.turns], stopwords="en", stemmer=self._stem, show_progress=False
        )
        self._retriever = bm25s.BM25()
        self._retriever.index(tokens, show_progress=False)

    def search(self, query: str) -> list[int]:
        if self._retriever is None or not self.turns:
            return []
        k = min(self.args.top_k, len(self.turns))
        q = self._bm25s.tokenize(
            [query], stopwords="en", stemmer=self._stem, show_progress=False, return_ids=False
        )
        if not q[0]:
            return []
        # numpy top-k: with JAX installed bm25s would pick it, and JAX's own CUDA work in this process breaks the
        # reader's CUDA graph captures (and crashed long-history runs on the GPU host)
        docs, scores = self._retriever.retrieve(q, k=k, show_progress=False, backend_selection="numpy")
        return [int(d) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]

    def stored_bytes(self) -> int:
        index = 0
        if self._retriever is not None:
            index = sum(getattr(v, "nbytes", 0) for v in self._retriever.scores.values())
        return text_bytes(self.turns) + index


@register_system("rag-dense", help="MiniLM sentence embeddings of history turns, top-k turns in context")
class DenseRetrieval(TurnRetrieval):
    def __init__(self, runtime):
        super().__init__(runtime)
        from .embedder import SentenceEmbedder

        device = runtime.reasoner.device
        self.embedder = runtime.shared(
            "embedder", lambda: SentenceEmbedder(self.args.embedder, device=device)
        )
        self._vectors = np.zeros((0, self.embedder.dim), dtype=np.float32)

    def reset(self) -> None:
        super().reset()
        self._vectors = np.zeros((0, self.embedder.dim), dtype=np.float32)

    def ingest(self, turns: Sequence[Turn]) -> None:
        if turns:
            self._vectors = np.concatenate(
                [self._vectors, self.embedder.encode([render_turn(t) for t in turns])]
            )

    def search(self, query: str) -> list[int]:
        if not self.turns:
            return []
        sims = self._vectors @ self.embedder.encode([query])[0]  # (N,)
        k = min(self.args.top_k, len(self.turns))
        return [int(i) for i in np.argsort(-sims, kind="stable")[:k]]

    def stored_bytes(self) -> int:
        return text_bytes(self.turns) + int(self._vectors.nbytes)
