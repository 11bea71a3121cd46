"""The frozen reasoner: loading, shapes, identity."""

from .identity import assert_frozen, fingerprint_weights, freeze, weights_digest
from .loading import DEFAULT_REASONER, ReasonerNotFoundError, cache_root, default_gguf_path, load_reasoner
from .reasoner import Reasoner
from .shapes import ReasonerShapes, UnsupportedReasonerError

__all__ = [
    "DEFAULT_REASONER",
    "Reasoner",
    "ReasonerNotFoundError",
    "ReasonerShapes",
    "UnsupportedReasonerError",
    "assert_frozen",
    "cache_root",
    "default_gguf_path",
    "fingerprint_weights",
    "freeze",
    "load_reasoner",
    "weights_digest",
]
