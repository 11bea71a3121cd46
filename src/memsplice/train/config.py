"""Run arguments for `memsplice train`: dataclasses with a docstring per field, loaded from YAML.

A training config has five sections, each its own dataclass:
    memory:      the memory's architecture (`MemoryConfig`; saved beside the weights)
    data:        where passages come from, their lengths and the curriculum (`DataArgs`)
    objectives:  which losses, with what weights (`ObjectiveArgs`)
    optim:       optimizer and learning-rate schedule (`OptimArgs`)
    run:         steps, budgets, evaluation, checkpoints, device and speed switches (`RunArgs`)

Guarantees: every field is validated in `__post_init__` and an error names the section and field
("data.lengths: ..."); unknown keys are refused with the list of known ones; `TrainConfig.to_dict()` round-trips
through `from_dict`, and `apply_overrides(["run.steps=10"])` changes single fields from the command line.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..memory.config import MemoryConfig

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""`torch.compile` modes `run.compile_mode` accepts."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-3 as a string; configs mean a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _need(section: str, obj, cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{section}.{name}: {msg} (got {getattr(obj, name)!r})")


@dataclass
class DataArgs:
    root: str | None = None
    """Corpus directory (the project's shared/data layout); None: `$MEMSPLICE_DATA` or a shared/data found nearby."""
    sources: list[str] = field(
        default_factory=lambda: [
            "wikitext-2",
            "gutenberg-nltk",
            "tinyshakespeare",
            "chitchat",
            "topical-chat",
        ]
    )
    """Corpora to read (prose documents and dialogues); the held-out split of each is never trained on."""
    synthetic_fraction: float = 0.1
    """Share of training passages replaced by synthetic text (see `synthetic_kinds`)."""
    synthetic_kinds: list[str] = field(default_factory=lambda: ["shuffled", "facts"])
    """"shuffled": tokens drawn independently from the corpus' unigram distribution (no language prior can guess
    them, so they must be stored); "facts": templated sentences about made-up people, places and numbers."""
    lengths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    """Passage lengths in tokens; each step draws one length, so a step's rows share a shape (no padding)."""
    length_weights: list[float] | None = None
    """Probability of each length (None: uniform)."""
    tokens_per_step: int = 16384
    """Passage tokens per optimizer step over all ranks; rows per step = tokens_per_step // length."""
    curriculum_steps: int = 0
    """Over the first this many steps the longest allowed length grows linearly from `curriculum_start` to
    max(lengths) (0: no curriculum)."""
    curriculum_start: int = 64
    """Longest passage length allowed at step 0 when a curriculum is used."""
    instruction: str = "<|im_start|>user\nRepeat the text.<|im_end|>\n<|im_start|>assistant\n"
    """What the reasoner reads between the memory and the passage it regenerates (reconstruction, denoising)."""
    max_corpus_tokens: int | None = None
    """Stop reading the training corpora after this many tokens (None: all of them); handy for quick runs."""
    cache_dir: str | None = None
    """Where tokenized corpora are cached (None: the memsplice cache directory)."""

    def __post_init__(self):
        s = "data"
        _need(s, self, 0.0 <= self.synthetic_fraction <= 1.0, "synthetic_fraction", "must be in [0, 1]")
        bad = sorted(set(self.synthetic_kinds) - {"shuffled", "facts"})
        _need(s, self, not bad, "synthetic_kinds", 'may hold only "shuffled" and "facts"')
        _need(
            s,
            self,
            bool(self.synthetic_kinds) or self.synthetic_fraction == 0,
            "synthetic_kinds",
            "must not be empty when synthetic_fraction > 0",
        )
        _need(
            s,
            self,
            bool(self.lengths) and all(isinstance(n, int) and n >= 2 for n in self.lengths),
            "lengths",
            "must be a non-empty list of integers >= 2",
        )
        if self.length_weights is not None:
            _need(
                s,
                self,
                len(self.length_weights) == len(self.lengths)
                and all(w >= 0 for w in self.length_weights)
                and sum(self.length_weights) > 0,
                "length_weights",
                "must have one non-negative weight per length, not all zero",
            )
        _need(
            s,
            self,
            self.tokens_per_step >= max(self.lengths),
            "tokens_per_step",
            f"must be at least the longest passage length {max(self.lengths)}",
        )
        _need(s, self, self.curriculum_steps >= 0, "curriculum_steps", "must be >= 0")
        _need(
            s,
            self,
            self.curriculum_steps == 0 or self.curriculum_start >= min(self.lengths),
            "curriculum_start",
            f"must be at least the shortest length {min(self.lengths)}",
        )
        _need(s, self, bool(self.sources), "sources", "must name at least one corpus")
        _need(
            s,
            self,
            self.max_corpus_tokens is None or self.max_corpus_tokens > 4 * max(self.lengths),
            "max_corpus_tokens",
            "must be null or comfortably larger than the longest passage",
        )


@dataclass
class ObjectiveArgs:
    reconstruction: float = 1.0
    """Weight of reconstruction: the reasoner, given only the memory and the instruction, regenerates the passage."""
    continuation: float = 0.0
    """Weight of continuation: given the memory of a passage, predict the text that follows it."""
    denoising: float = 0.0
    """Weight of span denoising: the encoder sees the passage with spans masked or dropped, the reasoner restores it."""
    infonce: float = 0.0
    """Weight of InfoNCE between the latents of a query and of the passage it comes from (in-batch negatives)."""
    refined_target: float = 0.0
    """Weight of the refined-latent target: the encoder's latents of the reconstruction passages are pulled towards
    the latents `refined_target_steps` steps of write-time refinement reach from them (semi-amortised training;
    `memsplice.train.objectives.reconstruction_with_target`). Needs reconstruction > 0. Each step costs one more
    reasoner read with its gradient to the latents."""
    refined_target_steps: int = 2
    """Refinement steps that make the refined-latent target."""
    refined_target_lr: float = 0.1
    """Adam learning rate of those steps (write-time refinement's default)."""
    continuation_length: int = 64
    """Tokens of following text predicted by the continuation objective."""
    denoise_ratio: float = 0.15
    """Share of passage tokens corrupted for denoising."""
    denoise_span: float = 3.0
    """Mean length of a corrupted span (geometric)."""
    denoise_drop: float = 0.5
    """Probability that a corrupted span is dropped rather than replaced by the mask token."""
    infonce_temperature: float = 0.05
    """Temperature of the InfoNCE logits (cosine similarity / temperature)."""
    infonce_query_length: list[int] = field(default_factory=lambda: [8, 32])
    """Query span length range [min, max] in tokens for InfoNCE pairs."""
    aux_rows: int = 32
    """Rows per step (over all ranks) for continuation, denoising and InfoNCE; reconstruction uses the data budget."""

    def __post_init__(self):
        s = "objectives"
        for name in ("reconstruction", "continuation", "denoising", "infonce"):
            _need(s, self, getattr(self, name) >= 0, name, "must be >= 0")
        _need(
            s,
            self,
            any(getattr(self, n) > 0 for n in ("reconstruction", "continuation", "denoising", "infonce")),
            "reconstruction",
            "at least one objective needs a positive weight",
        )
        _need(s, self, self.refined_target >= 0, "refined_target", "must be >= 0")
        _need(
            s,
            self,
            self.refined_target == 0 or self.reconstruction > 0,
            "refined_target",
            "needs reconstruction > 0 (the target is made from the reconstruction passages)",
        )
        _need(s, self, self.refined_target_steps >= 1, "refined_target_steps", "must be >= 1")
        _need(s, self, self.refined_target_lr > 0, "refined_target_lr", "must be positive")
        _need(s, self, self.continuation_length >= 2, "continuation_length", "must be >= 2")
        _need(s, self, 0.0 < self.denoise_ratio < 1.0, "denoise_ratio", "must be in (0, 1)")
        _need(s, self, self.denoise_span >= 1.0, "denoise_span", "must be >= 1")
        _need(s, self, 0.0 <= self.denoise_drop <= 1.0, "denoise_drop", "must be in [0, 1]")
        _need(s, self, self.infonce_temperature > 0, "infonce_temperature", "must be positive")
        q = self.infonce_query_length
        _need(
            s,
            self,
            len(q) == 2 and 1 <= q[0] <= q[1],
            "infonce_query_length",
            "must be [min, max] with 1 <= min <= max",
        )
        _need(s, self, self.aux_rows >= 2, "aux_rows", "must be >= 2")


@dataclass
class OptimArgs:
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """Decoupled weight decay on matrices (not on norms, biases, positions or slots)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    operator_lr_scale: float = 1.0
    """Learning-rate multiplier for the injection projections (they start from the reasoner's own k/v weights)."""
    gate_lr_scale: float = 1.0
    """Learning-rate multiplier for the gate."""

    def __post_init__(self):
        s = "optim"
        _need(s, self, self.lr > 0, "lr", "must be positive")
        _need(s, self, 0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        _need(s, self, self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _need(s, self, self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _need(
            s,
            self,
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            "must be two values in [0, 1)",
        )
        _need(s, self, self.grad_clip >= 0, "grad_clip", "must be >= 0")
        _need(
            s,
            self,
            self.operator_lr_scale >= 0 and self.gate_lr_scale >= 0,
            "operator_lr_scale",
            "learning-rate multipliers must be >= 0",
        )


@dataclass
class RunArgs:
    steps: int = 1000
    """Optimizer steps the learning-rate schedule spans (see `plan_minutes` to derive it from a time budget)."""
    seed: int = 0
    """Seed for initialisation, data order and corruption; a run is reproducible from it."""
    output_dir: str = "runs/formation"
    """Where checkpoints, metrics.jsonl, curves.png and the final memory go."""
    reasoner: str | None = None
    """Reasoner source (a .gguf, a transformers directory, or "tiny:<arch>" for a tiny random one); None: default."""
    device: str | None = None
    """cpu, cuda, ... (None: cuda when available); under torchrun each rank takes its local GPU."""
    reasoner_dtype: str | None = None
    """Dtype the frozen reasoner runs in (None: bf16 on CUDA, fp32 on the CPU)."""
    autocast: bool = True
    """Run the encoder under bf16 autocast on CUDA (float32 masters); ignored on the CPU."""
    fused_attention: bool = True
    """Use the fused gated attention for training forward passes (one SDPA kernel, gate folded into the keys)."""
    fast_reader: bool = True
    """Run the training reads through `FastReader` (the reasoner's decoder as plain tensor functions, fused q/k/v
    and gate/up projections) when the reasoner is Llama-family; other reasoners keep the transformers decoder."""
    compile: str = "none"
    """torch.compile: "none", "encoder" (the memory encoder) or "all" (also the reasoner's decoder layers: the fast
    reader's layer function and LM-head loss when it is used, else the transformers decoder layers)."""
    compile_mode: str = "default"
    """`torch.compile` mode of the fast reader's layer function with `compile: all`: "default", "reduce-overhead"
    (each layer's compiled graphs replayed as CUDA graph trees), "max-autotune" (matrix multiplies tuned per shape
    among cuBLAS and Triton templates, and CUDA graphs) or "max-autotune-no-cudagraphs". The LM-head loss compiles
    with the same mode less its CUDA graphs (its outputs are kept past the step). CUDA graphs only apply on a GPU.
    On an H200 at 256-token passages none paid beyond the spread between calls: 96.3 ms a step with default, 97.3
    reduce-overhead, 94.8 max-autotune-no-cudagraphs (136 s of tuning), 93.2 max-autotune; tuning kept cuBLAS
    (benchmarks/results/formation/profile-mode-h200-256-*.json)."""
    reader_attention: str = "square"
    """The fast reader's gated attention layout (`memsplice.train.fused_attention.gated_causal_attention`):
    "square" (zero query rows in front, the plain causal mask, grouped K/V, cuDNN first) or "lower_right" (the
    (T, M+T) scores under a lower-right causal mask, K/V repeated per query head; SDPA picks flash, 96-wide for 64-wide
    heads). Both compute the same values and gradients. Compiled, on an H200, a training step took 99.9 against
    124.4 ms at 256-token passages and 101.5 against 160.0 ms at 512 (22.2-22.3% against 14.2-17.9% MFU), with loss
    and gradient as the transformers path's (benchmarks/results/formation/profile-attention-h200-{256,512}.json)."""
    reader_shapes: str = "static"
    """How the compiled fast reader treats a new passage shape: "static" (one specialised graph per shape) or "auto"
    (dynamo's default: after its second shape it recompiles with the changed dims dynamic, one graph for all). On the
    64-512 mix on an H200, static trained 10.4% faster once compiled and compiled ~55 s longer
    (benchmarks/results/formation/train-mix-h200-reader-shapes.json)."""
    max_minutes: float | None = None
    """Stop this invocation after this much training time and save (the run can be resumed); None: no limit."""
    plan_minutes: float | None = None
    """For a fresh run: time a few steps, then set `steps` so the whole schedule fits in this many minutes."""
    stop_at: float | None = None
    """Unix time by which this invocation stops and saves (caps max_minutes, not the planned schedule, which may
    span several invocations); None: no deadline."""
    rewarm_steps: int = 20
    """After `--init-from ... --continue-schedule` (fresh optimizer moments), ramp the LR back up over this many steps."""
    stage2_fraction: float = 0.0
    """Last share of the steps in which the encoder is frozen and only the projections and gate train."""
    eval_every: int = 200
    """Evaluate held-out reconstruction every this many steps (0: only at the end)."""
    eval_passages: int = 32
    """Held-out passages per length for the evaluation during training."""
    eval_lengths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    """Passage lengths evaluated during training."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    save_every_steps: int = 0
    """Checkpoint every this many steps (0: only by time and at the end)."""
    save_every_minutes: float = 10.0
    """Checkpoint at least this often (wall clock)."""
    keep_checkpoints: int = 2
    """Training checkpoints kept on disk (the newest ones)."""
    save_dtype: str = "bfloat16"
    """Dtype of the final memory weights written to <output_dir>/memory (training checkpoints stay float32)."""
    save_shard_mb: float = 15.0
    """Shard the final memory weights into files of at most this many MiB (0: one file)."""

    def __post_init__(self):
        s = "run"
        _need(s, self, self.steps >= 1, "steps", "must be >= 1")
        _need(
            s,
            self,
            self.compile in ("none", "encoder", "all"),
            "compile",
            'must be "none", "encoder" or "all"',
        )
        _need(
            s, self, self.reader_shapes in ("auto", "static"), "reader_shapes", 'must be "auto" or "static"'
        )
        _need(
            s,
            self,
            self.compile_mode in COMPILE_MODES,
            "compile_mode",
            "must be one of " + ", ".join(f'"{m}"' for m in COMPILE_MODES),
        )
        _need(
            s,
            self,
            self.reader_attention in ("lower_right", "square"),
            "reader_attention",
            'must be "lower_right" or "square"',
        )
        _need(
            s,
            self,
            self.max_minutes is None or self.max_minutes > 0,
            "max_minutes",
            "must be positive or null",
        )
        _need(
            s,
            self,
            self.plan_minutes is None or self.plan_minutes > 0,
            "plan_minutes",
            "must be positive or null",
        )
        _need(s, self, 0.0 <= self.stage2_fraction < 1.0, "stage2_fraction", "must be in [0, 1)")
        _need(
            s,
            self,
            self.eval_every >= 0 and self.log_every >= 1,
            "eval_every",
            "eval_every >= 0, log_every >= 1",
        )
        _need(
            s,
            self,
            self.eval_passages >= 1 and bool(self.eval_lengths),
            "eval_passages",
            "needs >= 1 passage and at least one eval length",
        )
        _need(
            s,
            self,
            self.save_every_steps >= 0 and self.save_every_minutes > 0,
            "save_every_minutes",
            "save_every_steps >= 0 and save_every_minutes > 0",
        )
        _need(s, self, self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _need(
            s,
            self,
            self.save_dtype in ("float32", "bfloat16", "float16"),
            "save_dtype",
            'must be "float32", "bfloat16" or "float16"',
        )
        _need(s, self, self.save_shard_mb >= 0, "save_shard_mb", "must be >= 0")


SECTIONS = {
    "memory": MemoryConfig,
    "data": DataArgs,
    "objectives": ObjectiveArgs,
    "optim": OptimArgs,
    "run": RunArgs,
}


@dataclass
class TrainConfig:
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    data: DataArgs = field(default_factory=DataArgs)
    objectives: ObjectiveArgs = field(default_factory=ObjectiveArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    run: RunArgs = field(default_factory=RunArgs)

    def __post_init__(self):
        if self.memory.max_memory_tokens < max(self.data.lengths):
            raise ValueError(
                f"data.lengths: the longest passage ({max(self.data.lengths)}) exceeds "
                f"memory.max_memory_tokens ({self.memory.max_memory_tokens})"
            )
        if max(self.run.eval_lengths) > self.memory.max_memory_tokens:
            raise ValueError(
                f"run.eval_lengths: {max(self.run.eval_lengths)} exceeds memory.max_memory_tokens "
                f"({self.memory.max_memory_tokens})"
            )

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        if not isinstance(data, dict):
            raise ValueError("a training config must be a mapping with sections " + ", ".join(SECTIONS))
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown config sections {unknown}; known: {list(SECTIONS)}")
        parts = {}
        for name, klass in SECTIONS.items():
            section = data.get(name) or {}
            if not isinstance(section, dict):
                raise ValueError(f"config section {name!r} must be a mapping")
            known = {f.name for f in fields(klass)}
            bad = sorted(set(section) - known)
            if bad:
                raise ValueError(f"unknown fields in {name}: {bad}; known: {sorted(known)}")
            parts[name] = klass(**section)
        return cls(**parts)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no training config at {path}")
        try:
            data = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {e}") from None
        return cls.from_dict(apply_overrides(data, overrides or []))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply "section.field=value" strings (value parsed as YAML) to a config mapping; returns a new mapping."""
    out = {k: dict(v or {}) for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} must look like section.field=value (e.g. run.steps=100)")
        if section not in SECTIONS:
            raise ValueError(f"override {item!r}: unknown section {section!r}; known: {list(SECTIONS)}")
        out.setdefault(section, {})[name] = load_yaml(raw)
    return out
