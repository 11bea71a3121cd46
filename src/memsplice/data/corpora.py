"""Readers for the open corpora memsplice trains and evaluates on, with one fixed held-out split.

Layout expected under the data root (the `shared/data` folder of the project, or `$MEMSPLICE_DATA`):
  wikitext-2/{valid,test}.txt, gutenberg-nltk/*.txt, tinyshakespeare/input.txt   (prose documents)
  chitchat/dialogues.jsonl.gz, topical-chat/dialogues.jsonl.gz                 (dialogues)

Guarantees:
- Every document and dialogue has a stable id; `split_of(id)` assigns it to "train" or "heldout" by a hash of the
  id alone, so the held-out set is the same on every machine and never depends on iteration order or sampling.
- Without a data root, `bundled_dialogues()` still provides 180 MIT-licensed dialogues shipped in the package.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DOCUMENT_SOURCES = ("wikitext-2", "gutenberg-nltk", "tinyshakespeare")
DIALOGUE_SOURCES = ("chitchat", "topical-chat")
HELDOUT_FRACTION = 0.05


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str


@dataclass(frozen=True)
class Dialogue:
    id: str
    source: str
    turns: tuple[tuple[str, str], ...]
    """(speaker, text) pairs; speakers are "A" and "B"."""


def split_of(item_id: str, heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """ "heldout" for a fixed `heldout_fraction` of ids (by sha256 of the id), else "train"."""
    h = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") / 2**64
    return "heldout" if h < heldout_fraction else "train"


def data_root(path: str | os.PathLike | None = None) -> Path:
    """The corpus directory: `path`, else `$MEMSPLICE_DATA`, else a `shared/data` beside or above the working
    directory or this package's checkout. Raises FileNotFoundError with what to set when none exists."""
    candidates = []
    if path is not None:
        candidates.append(Path(path))
    elif env := os.environ.get("MEMSPLICE_DATA"):
        candidates.append(Path(env))
    else:
        for start in (Path.cwd(), Path(__file__).resolve()):
            for parent in [start, *start.parents]:
                candidates += [parent / "shared" / "data", parent.parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir() and any((c / s).exists() for s in DOCUMENT_SOURCES + DIALOGUE_SOURCES):
            return c
    raise FileNotFoundError(
        "no corpus directory found: pass a data path (e.g. --data DIR) or set MEMSPLICE_DATA to a folder holding "
        f"{', '.join(DOCUMENT_SOURCES + DIALOGUE_SOURCES)}"
    )


def _wikitext_articles(path: Path) -> Iterator[tuple[str, str]]:
    title, lines = None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^ = ([^=].*[^=]) = $", line)
        if m:
            if title and lines:
                yield title, "\n".join(lines)
            title, lines = m.group(1).strip(), []
        elif line.strip() and title:
            lines.append(line.strip())
    if title and lines:
        yield title, "\n".join(lines)


def _blocks(text: str, target_chars: int) -> Iterator[str]:
    """Paragraphs grouped into blocks of about `target_chars`."""
    block: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para:
            continue
        block.append(para)
        size += len(para)
        if size >= target_chars:
            yield "\n".join(block)
            block, size = [], 0
    if block:
        yield "\n".join(block)


def iter_documents(
    root: str | os.PathLike | None = None,
    sources=DOCUMENT_SOURCES,
    split: str | None = None,
    block_chars: int = 4000,
) -> Iterator[Document]:
    """Prose documents: WikiText articles, and Gutenberg / Shakespeare text in blocks of ~`block_chars`."""
    base = data_root(root)
    for source in sources:
        folder = base / source
        if not folder.is_dir():
            continue
        if source == "wikitext-2":
            items = (
                (f"wikitext-2:{f.stem}:{t}", text)
                for f in sorted(folder.glob("*.txt"))
                for t, text in _wikitext_articles(f)
            )
        else:
            items = (
                (f"{source}:{f.stem}:{i}", block)
                for f in sorted(folder.glob("*.txt"))
                if f.name not in ("LICENSE.txt",) and not f.name.startswith("NLTK-README")
                for i, block in enumerate(_blocks(f.read_text(encoding="utf-8"), block_chars))
            )
        for doc_id, text in items:
            if split is None or split_of(doc_id) == split:
                yield Document(doc_id, source, text)


def _read_dialogues(lines, source_hint: str) -> Iterator[Dialogue]:
    for line in lines:
        d = json.loads(line)
        turns = tuple((t["speaker"], t["text"]) for t in d["turns"] if t.get("text", "").strip())
        if len(turns) >= 2:
            yield Dialogue(str(d["id"]), d.get("source", source_hint), turns)


def iter_dialogues(
    root: str | os.PathLike | None = None, sources=DIALOGUE_SOURCES, split: str | None = None
) -> Iterator[Dialogue]:
    base = data_root(root)
    for source in sources:
        path = base / source / "dialogues.jsonl.gz"
        if not path.is_file():
            continue
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for dialogue in _read_dialogues(f, source):
                if split is None or split_of(dialogue.id) == split:
                    yield dialogue


def bundled_dialogues(split: str | None = None) -> list[Dialogue]:
    """The 180 chitchat dialogues shipped inside the package (see resources/README.md)."""
    ref = resources.files(__package__) / "resources" / "chitchat-sample.jsonl.gz"
    with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [d for d in _read_dialogues(f, "chitchat") if split is None or split_of(d.id) == split]
