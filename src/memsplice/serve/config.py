"""`ServeConfig`: every setting of `memsplice serve`, from defaults, a config file, the environment and flags.

Precedence, lowest first: the defaults below, a YAML (.yaml/.yml) or TOML (.toml) file whose top-level keys are
field names (optionally under a `serve:` section), environment variables `MEMSPLICE_<FIELD>` (e.g.
`MEMSPLICE_PORT=9000`, `MEMSPLICE_DATABASE_URL=postgresql://...`), then command-line flags. Unknown keys in a file
are an error that names them; every value is validated in `__post_init__` and an error names the field.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "MEMSPLICE_"
LOG_FORMATS = ("json", "text")
ENGINES = ("auto", "eager")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """Address to bind. The default serves loopback only; bind 0.0.0.0 only behind TLS and with auth on."""
    port: int = 8000
    """TCP port (0 picks a free one)."""
    data_dir: str = "memsplice-data"
    """Directory for the default SQLite database and the memory weights the server keeps (`memory/`)."""
    database_url: str | None = None
    """SQLAlchemy URL of the store: sqlite:///path.db or postgresql://user:pw@host/db (default: SQLite in data_dir)."""
    sqlite_synchronous: str = "FULL"
    """SQLite durability: FULL survives power loss; NORMAL survives a crash of the process only."""
    reasoner: str | None = None
    """Reasoner source: a .gguf file, a transformers directory or a hub id (default: SmolLM2-135M-Instruct)."""
    device: str | None = None
    """cpu, cuda, cuda:1 ... (default: cuda when available)."""
    dtype: str | None = None
    """float32 / bfloat16 (default: bf16 on CUDA, fp32 on the CPU)."""
    checkpoint: str | None = None
    """Memory checkpoint to start from when data_dir holds no weights yet (default: a fresh, untrained memory)."""
    seed: int = 0
    """Seed of a fresh memory's initialisation (the weights are saved to data_dir, so restarts agree)."""
    model_id: str | None = None
    """The model name clients send and `GET /v1/models` lists (default: "memsplice-<reasoner name>")."""
    auth: bool = True
    """Require an API key (`Authorization: Bearer msk_...`) on every API route; keys list the scopes they may touch."""
    scope_header: str = "X-Memsplice-Scope"
    """Header naming the memory scope of a chat request (alternative to the request's `user` field)."""
    max_body_bytes: int = 1_000_000
    """Largest request body accepted; larger bodies get 413 before anything is read into memory."""
    max_prompt_tokens: int = 4096
    """Longest chat prompt (after the chat template) accepted."""
    max_new_tokens: int = 512
    """Upper bound of `max_tokens` a request may ask for."""
    default_max_new_tokens: int = 128
    """`max_tokens` of a request that names none."""
    max_turns_per_request: int = 64
    """Most turns one memory write may add."""
    max_turn_chars: int = 32_000
    """Longest text of one turn written to memory."""
    memory_chunk_tokens: int | None = None
    """Transcript tokens per memory chunk, i.e. per encoder call (default: the memory's chunk_tokens, else its
    max_memory_tokens)."""
    memory_slot_budget: int = 256
    """Most memory slots a scope's conversation uses; older chunks are compressed to stay within it."""
    memory_select_chunks: int | None = None
    """With a memory that has an address head: a chat reads only this many chunk memories, those its last user
    message picks (`ConversationMemory.address`); null: every chunk."""
    memory_refine_steps: int | None = None
    """Write-time refinement steps of every memory write (`memsplice.memory.refine`; each is one forward and backward
    pass of the reasoner, paid in the request that writes); null: the checkpoint's `refine_steps` (0 unless set)."""
    memory_max_live_tokens: int = 65536
    """Most transcript tokens a scope's memory is built from; least-recently-used spans beyond it are evicted."""
    memory_track_attention: bool = False
    """After each chat, measure the reasoner's attention to memory to keep the spans' LRU clock (one extra
    forward pass per request); off: least recently written is evicted first."""
    write_chat_turns: bool = True
    """A chat request with a scope writes its last user message and the reply into that scope's memory."""
    scope_cache_size: int = 256
    """Scope memories kept loaded in RAM (least recently used are dropped and reloaded from the store)."""
    online_learning: bool = False
    """Train the memory online from every memory write (a chat exchange, or turns written through the memory
    API) in a background worker, with replay and EWC (`memsplice.online.OnlineLearner`)."""
    online_interval_s: float = 5.0
    """Seconds the online worker waits when its queue is empty."""
    online_batch_size: int = 8
    """Queued samples (memory writes) per online update."""
    replay_capacity: int = 2048
    """Interactions the online learner keeps in its replay reservoir (a uniform sample of all it trained on)."""
    online_replay_per_update: int = 4
    """Replayed interactions mixed into each online update (0: no replay)."""
    online_lr: float = 5e-5
    """AdamW learning rate of online updates."""
    online_ewc_weight: float = 10.0
    """Weight of the EWC pull towards the anchor weights (0: no EWC)."""
    online_anchor_interval: int = 64
    """Samples between refreshes of the EWC anchor (and its Fisher estimate)."""
    online_rehearsal_per_update: int = 0
    """Skill-rehearsal questions per online update (`memsplice.online.rehearsal`: synthetic train-split questions
    answered from a memory of their evidence, so learning from traffic keeps the skill of answering from memory;
    0: off)."""
    online_guard_tolerance: float | None = None
    """Skill guard of the online learner (`memsplice.online.guard`): at every anchor refresh a canary set of synthetic
    train-split questions is answered from memory, and the updates since the last refresh are rolled back when the
    score fell more than this share below where the learner started (e.g. 0.01; null: off)."""
    online_consolidation_weight: float = 0.0
    """Write consolidation of the online learner (`memsplice.online.consolidation`): weight of the pull that keeps
    what the memory writes for a sample of past requests' histories as it wrote them then (e.g. 1000, the weight
    measured on the stability stream; 0: off)."""
    online_context_tokens: int = 256
    """Most history tokens a queued sample keeps as the context its next-token objective writes into memory
    (capped by the memory's max_memory_tokens)."""
    expose_memory_digest: bool = False
    """Add the sha256 of the memory K/V used to each chat response (for isolation audits)."""
    log_format: str = "json"
    """"json" (one object per line) or "text"."""
    log_level: str = "info"
    """debug, info, warning or error."""
    graceful_timeout_s: float = 30.0
    """On SIGTERM/SIGINT: seconds to let in-flight requests (and their memory writes) finish before exiting."""
    torch_threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""
    engine: str = "auto"
    """How greedy requests (temperature 0) decode: "auto" runs them on `memsplice.engine.GreedyDecoder` (a
    preallocated cache, CUDA graphs on a GPU; the same tokens as eager generation) whenever memory + prompt +
    max_tokens fit the reasoner's window and its generation config is plain greedy; "eager" keeps transformers'
    `generate()` for every request. Sampling requests always run eagerly."""
    engine_compile: bool = False
    """With engine "auto": run the engine's decode step through `torch.compile` (compiled on the first request of
    each cache size; faster per token on a GPU, bf16 rounding may part from eager decoding at near-ties)."""

    def __post_init__(self):
        def need(cond: bool, name: str, msg: str):
            if not cond:
                raise ValueError(f"ServeConfig.{name}: {msg} (got {getattr(self, name)!r})")

        need(isinstance(self.port, int) and 0 <= self.port < 65536, "port", "must be an integer in 0..65535")
        for name in (
            "max_body_bytes",
            "max_prompt_tokens",
            "max_new_tokens",
            "default_max_new_tokens",
            "max_turns_per_request",
            "max_turn_chars",
            "scope_cache_size",
            "online_batch_size",
            "online_anchor_interval",
            "online_context_tokens",
            "memory_slot_budget",
            "memory_max_live_tokens",
        ):
            need(
                isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                name,
                "must be a positive integer",
            )
        need(
            self.default_max_new_tokens <= self.max_new_tokens,
            "default_max_new_tokens",
            "must not exceed max_new_tokens",
        )
        need(
            self.memory_chunk_tokens is None
            or (isinstance(self.memory_chunk_tokens, int) and self.memory_chunk_tokens > 0),
            "memory_chunk_tokens",
            "must be a positive integer or null",
        )
        need(
            self.memory_select_chunks is None
            or (isinstance(self.memory_select_chunks, int) and self.memory_select_chunks > 0),
            "memory_select_chunks",
            "must be a positive integer or null",
        )
        need(
            isinstance(self.replay_capacity, int) and self.replay_capacity >= 0,
            "replay_capacity",
            "must be a non-negative integer",
        )
        need(
            self.memory_refine_steps is None
            or (isinstance(self.memory_refine_steps, int) and self.memory_refine_steps >= 0),
            "memory_refine_steps",
            "must be a non-negative integer or null",
        )
        for name in ("online_replay_per_update", "online_rehearsal_per_update"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 0, name, "must be a non-negative integer")
        need(self.online_interval_s > 0, "online_interval_s", "must be positive")
        need(self.online_lr > 0, "online_lr", "must be positive")
        need(self.online_ewc_weight >= 0, "online_ewc_weight", "must be non-negative")
        need(self.online_consolidation_weight >= 0, "online_consolidation_weight", "must be non-negative")
        need(
            self.online_guard_tolerance is None or 0.0 <= self.online_guard_tolerance < 1.0,
            "online_guard_tolerance",
            "must be null or in [0, 1)",
        )
        need(self.graceful_timeout_s >= 0, "graceful_timeout_s", "must be non-negative")
        need(self.engine in ENGINES, "engine", f"must be one of {ENGINES}")
        need(self.log_format in LOG_FORMATS, "log_format", f"must be one of {LOG_FORMATS}")
        need(self.log_level in LOG_LEVELS, "log_level", f"must be one of {LOG_LEVELS}")
        need(
            self.sqlite_synchronous.upper() in ("OFF", "NORMAL", "FULL", "EXTRA"),
            "sqlite_synchronous",
            "must be OFF, NORMAL, FULL or EXTRA",
        )
        need(
            bool(self.scope_header) and self.scope_header.replace("-", "").isalnum(),
            "scope_header",
            "must be a header name",
        )
        need(
            self.torch_threads is None or (isinstance(self.torch_threads, int) and self.torch_threads > 0),
            "torch_threads",
            "must be a positive integer or null",
        )

    # -- derived -------------------------------------------------------------------------------------------------
    def conversation_config(self):
        """The `ConversationConfig` every scope's memory is built with."""
        from ..conversation import ConversationConfig

        return ConversationConfig(
            chunk_tokens=self.memory_chunk_tokens,
            slot_budget=self.memory_slot_budget,
            select_chunks=self.memory_select_chunks,
            max_live_tokens=self.memory_max_live_tokens,
            track_attention=self.memory_track_attention,
        )

    def online_config(self):
        """The `OnlineConfig` of the online learner (`--online-learning`)."""
        from ..online import OnlineConfig

        return OnlineConfig(
            batch_size=self.online_batch_size,
            lr=self.online_lr,
            ewc_weight=self.online_ewc_weight,
            anchor_interval=self.online_anchor_interval,
            replay_capacity=self.replay_capacity,
            replay_per_update=self.online_replay_per_update,
            rehearsal_per_update=self.online_rehearsal_per_update,
            guard_tolerance=self.online_guard_tolerance,
            consolidation_weight=self.online_consolidation_weight,
            context_tokens=self.online_context_tokens,
            seed=self.seed,
        )

    @property
    def online_dir(self) -> Path:
        """Where the online learner's state (optimizer, EWC anchor and Fisher, replay) is saved, atomically."""
        return Path(self.data_dir).expanduser().resolve() / "online"

    @property
    def store_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.data_dir).expanduser().resolve() / 'memsplice.db'}"

    @property
    def weights_dir(self) -> Path:
        """Where the server keeps the memory weights it serves (written atomically by save_pretrained)."""
        return Path(self.data_dir).expanduser().resolve() / "memory"

    def to_dict(self) -> dict:
        return asdict(self)

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def load(
        cls,
        path: str | os.PathLike | None = None,
        environ: dict[str, str] | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> ServeConfig:
        """Defaults < file at `path` < `MEMSPLICE_*` variables of `environ` (default os.environ) < `overrides`."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(read_config_file(path))
        values.update(env_values(os.environ if environ is None else environ))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**values)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
    elif path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from None
    else:
        raise ValueError(f"config file {path} must end in .yaml, .yml or .toml")
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings")
    if set(data) == {"serve"} and isinstance(data["serve"], dict):
        data = data["serve"]
    known = set(ServeConfig.field_names())
    if unknown := sorted(set(data) - known):
        raise ValueError(f"{path}: unknown settings {unknown}; known settings: {sorted(known)}")
    return data


def env_values(environ: dict[str, str]) -> dict[str, Any]:
    """Settings from `MEMSPLICE_<FIELD>` variables, converted to each field's type."""
    out: dict[str, Any] = {}
    for f in fields(ServeConfig):
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            out[f.name] = _convert(f.name, raw, f.type)
    return out


def _convert(name: str, raw: str, annotation: Any) -> Any:
    kind = str(annotation)
    if raw.strip().lower() in ("", "none", "null") and "None" in kind:
        return None
    try:
        if kind.startswith("bool"):
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError as e:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r}: {e}") from None
    return raw
