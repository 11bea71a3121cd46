"""Text for training and evaluation: the open corpora (prose and dialogue) with a fixed held-out split."""

from .corpora import (
    DIALOGUE_SOURCES,
    DOCUMENT_SOURCES,
    Dialogue,
    Document,
    bundled_dialogues,
    data_root,
    iter_dialogues,
    iter_documents,
    split_of,
)

__all__ = [
    "DIALOGUE_SOURCES",
    "DOCUMENT_SOURCES",
    "Dialogue",
    "Document",
    "bundled_dialogues",
    "data_root",
    "iter_dialogues",
    "iter_documents",
    "split_of",
]
