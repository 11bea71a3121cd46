"""`ReadingPrefix`: a few trained K/V slots in front of every prompt that teach the frozen reasoner how to read.

What it is for: a 135M reasoner reads a recalled chunk well when the chunk is all the history it is given (the eval
reader answers 89.6% of the synthetic test questions over the evidence chunk under its header), and much worse when
the most recent turns of the conversation sit beside it as text (73.6% with 256 tokens of them), because it answers
from the recent turns or carries the conversation on. The reasoner stays frozen; what can be trained is what sits in
its cache. A reading prefix is `num_slots` positions of keys and values in every layer (prefix tuning), put in front
of the prompt exactly as memory is (`inject.memory_kv`): slots at positions 0..n-1, keys rotated, gate open. It holds
no conversation content: it is the same for every user and every question, so it is trained once, offline
(`memsplice.reading.train`), and can be shared across users and servers.

Layout and guarantees:
- `keys` and `values` are parameters of shape (L, H, n, D) in float32 (the reasoner's cache shapes); `memory_kv()`
  returns them as a `MemoryKV` of one row (or `batch` rows) in the reasoner's dtype and device, with gradient when
  the prefix trains;
- initialised from the reasoner's own K/V of an instruction text (`from_text`), so that before training the prefix
  is an ordinary text prompt, which the reasoner reads as it reads text;
- `save_pretrained` / `from_pretrained`: a directory with `reading_config.json` and `model.safetensors`, written
  atomically; loading refuses another reasoner (fingerprint) or shapes that do not match the config.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_directory
from ..inject.memory_kv import MemoryKV

CONFIG_NAME = "reading_config.json"
WEIGHTS_NAME = "model.safetensors"

DEFAULT_INIT_TEXT = (
    "Read the conversation below. The question is about something said in it; answer it in a few words, from the "
    "part of the conversation that says it."
)
"""The instruction whose K/V a new prefix starts from (its first `num_slots` tokens)."""


class ReadingPrefixError(ValueError):
    """A reading-prefix directory that cannot be loaded for this reasoner."""


@dataclass
class ReadingPrefixConfig:
    num_slots: int = 16
    """Positions the prefix occupies in front of every prompt."""
    init_text: str = DEFAULT_INIT_TEXT
    """The text whose K/V the prefix started from."""
    reasoner_name: str | None = None
    reasoner_fingerprint: str | None = None
    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    trained: dict = field(default_factory=dict)
    """How it was trained (steps, data, held-out accuracy): recorded by `memsplice.reading.train`."""

    def __post_init__(self):
        if not isinstance(self.num_slots, int) or self.num_slots < 1:
            raise ValueError(
                f"ReadingPrefixConfig.num_slots must be a whole number >= 1 (got {self.num_slots!r})"
            )

    def save(self, directory: Path) -> None:
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> ReadingPrefixConfig:
        path = directory / CONFIG_NAME
        if not path.is_file():
            raise ReadingPrefixError(f"{directory} holds no reading prefix ({CONFIG_NAME} is missing)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ReadingPrefixError(f"{path} is not valid JSON: {e}") from e
        unknown = sorted(set(raw) - {f for f in cls.__dataclass_fields__})
        if unknown:
            raise ReadingPrefixError(f"{path}: unknown fields {unknown}")
        return cls(**raw)


class ReadingPrefix(nn.Module):
    def __init__(self, config: ReadingPrefixConfig, reasoner):
        super().__init__()
        s = reasoner.shapes
        for name, want in (
            ("num_layers", s.num_layers),
            ("num_kv_heads", s.num_kv_heads),
            ("head_dim", s.head_dim),
        ):
            got = getattr(config, name)
            if got is not None and got != want:
                raise ReadingPrefixError(
                    f"this reading prefix was made for {name}={got}; {reasoner.name} has {want}"
                )
        config.num_layers, config.num_kv_heads, config.head_dim = s.num_layers, s.num_kv_heads, s.head_dim
        config.reasoner_name = config.reasoner_name or reasoner.name
        config.reasoner_fingerprint = config.reasoner_fingerprint or reasoner.fingerprint
        self.config = config
        self.__dict__["reasoner"] = reasoner  # not a submodule: never trained, never saved
        shape = (s.num_layers, s.num_kv_heads, config.num_slots, s.head_dim)
        self.keys = nn.Parameter(torch.zeros(shape, device=reasoner.device))
        self.values = nn.Parameter(torch.zeros(shape, device=reasoner.device))

    @property
    def num_slots(self) -> int:
        return self.config.num_slots

    @classmethod
    @torch.no_grad()
    def from_text(cls, reasoner, config: ReadingPrefixConfig | None = None) -> ReadingPrefix:
        """A prefix holding the reasoner's own K/V of the first `num_slots` tokens of `config.init_text` (repeated
        when the text is shorter): before any training it reads as that text."""
        config = config or ReadingPrefixConfig()
        tok = reasoner.require_tokenizer()
        ids = tok(config.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("ReadingPrefixConfig.init_text has no tokens")
        ids = (ids * -(-config.num_slots // len(ids)))[: config.num_slots]
        prefix = cls(config, reasoner)
        out = reasoner.model(input_ids=torch.tensor([ids], device=reasoner.device), use_cache=True)
        kv = MemoryKV.from_reasoner_cache(out.past_key_values)
        prefix.keys.copy_(torch.stack([k[0] for k in kv.keys]).float())
        prefix.values.copy_(torch.stack([v[0] for v in kv.values]).float())
        return prefix

    def memory_kv(self, batch: int = 1) -> MemoryKV:
        """The prefix as memory in front of `batch` rows: open gate, every row live."""
        r = self.reasoner
        keys = [k[None].to(r.dtype).expand(batch, -1, -1, -1) for k in self.keys]
        values = [v[None].to(r.dtype).expand(batch, -1, -1, -1) for v in self.values]
        bias = torch.zeros(batch, len(keys), self.num_slots, dtype=r.dtype, device=r.device)
        live = torch.ones(batch, dtype=torch.bool, device=r.device)
        return MemoryKV(keys, values, bias, live)

    # -- persistence -------------------------------------------------------------------------------------------
    def save_pretrained(
        self, directory: str | os.PathLike, *, dtype: torch.dtype | None = torch.bfloat16
    ) -> Path:
        """Config and weights, atomically (a sibling temp directory renamed into place)."""
        directory = Path(directory)
        state = {"keys": self.keys.detach(), "values": self.values.detach()}
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        with atomic_directory(directory) as tmp:
            self.config.save(tmp)
            meta = {
                "format": "pt",
                "memsplice": "reading_prefix",
                "reasoner_fingerprint": self.config.reasoner_fingerprint,
            }
            save_file({k: v.contiguous().cpu() for k, v in state.items()}, tmp / WEIGHTS_NAME, metadata=meta)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, reasoner) -> ReadingPrefix:
        """Load a prefix saved by `save_pretrained` onto `reasoner`; refuses another reasoner's."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ReadingPrefixError(f"no reading prefix directory at {directory}")
        config = ReadingPrefixConfig.load(directory)
        if config.reasoner_fingerprint and config.reasoner_fingerprint != reasoner.fingerprint:
            raise ReadingPrefixError(
                f"{directory} was trained for reasoner {config.reasoner_name!r} (fingerprint "
                f"{config.reasoner_fingerprint[:12]}), not {reasoner.name!r} (fingerprint {reasoner.fingerprint[:12]})"
            )
        prefix = cls(config, reasoner)
        path = directory / WEIGHTS_NAME
        if not path.is_file():
            raise ReadingPrefixError(f"{directory}: {WEIGHTS_NAME} is missing")
        state = load_file(path)
        if set(state) != {"keys", "values"}:
            raise ReadingPrefixError(f"{path}: expected tensors keys and values, found {sorted(state)}")
        with torch.no_grad():
            for name in ("keys", "values"):
                own = getattr(prefix, name)
                if tuple(state[name].shape) != tuple(own.shape):
                    raise ReadingPrefixError(
                        f"{path}: {name} has shape {tuple(state[name].shape)}, the config wants {tuple(own.shape)}"
                    )
                if not torch.isfinite(state[name]).all():
                    raise ReadingPrefixError(f"{path}: {name} holds non-finite values")
                own.copy_(state[name].to(own))
        return prefix
