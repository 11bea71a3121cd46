"""Train the address head: let a question pick the chunk memories that hold its answer, from latents alone.

    python -m memsplice.online.address --checkpoint DIR --output runs/address [--steps 1500] [--record NAME]

A bootstrapped memory carries facts (the `latent-oracle` eval system, a memory of the evidence turns alone, scores
83-85% of the text oracle), but a question with every chunk memory of its conversation in front of it rarely finds
the right one. `memory.address.AddressHead` scores chunks against a question from their stored latents; this trains
it, with the encoder, projections and gate left exactly as they are (so memories read back as before).

Data: the eval harness's synthetic task, **train split only** (as `memsplice.online.bootstrap`), written into
chunks exactly as a `ConversationMemory` writes them (`conversation.chunks.pack_turns`, session headers
included). A question's positives are the chunks that hold its evidence turns (`conversation.chunks.turn_chunks`);
its negatives are every other chunk of the step's episodes: the other chunks of its own conversation (the hard
ones: the same people, the same kind of facts) and those of the other episodes. The encoder runs once, without
autograd, over every chunk and every question (rendered as a user turn); only the head trains.

Progress is measured on held-out train-split episodes (another seed) as retrieval within each question's own
conversation: recall@k, the share of questions whose evidence chunk is among the k best-scored (k = 1, 2, 4), next
to what picking k chunks at random would get. The checkpoint (the memory with its head) is saved atomically at the
end; the report records the curve.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..memory.address import address_loss, rank_chunks
from ..memory.model import pad_rows
from .bootstrap import EpisodeExample, episode_examples, mixed_episodes

logger = logging.getLogger(__name__)

RECALL_AT = (1, 2, 4)


@dataclass
class AddressConfig:
    dim: int = 128
    """Width of the head's query and key vectors (`MemoryConfig.address_dim`)."""
    steps: int = 1500
    """Optimizer steps."""
    episodes: int = 400
    """Train-split episodes (each asks `facts` questions)."""
    eval_episodes: int = 24
    """Held-out train-split episodes (another seed) for recall@k."""
    history_tokens: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    """History lengths of the episodes: longer ones give more hard negatives per question."""
    facts: int = 6
    chunk_tokens: int | None = None
    """Tokens per chunk (default: the checkpoint's `chunk_tokens`, else its `max_memory_tokens`)."""
    open_values: float = 0.5
    """Share of episodes (train and held-out) with made-up values (`TaskArgs.values="open"`)."""
    user_perspective: float = 0.0
    """Share of the pool-value episodes (train and held-out) that are a user's chat with an assistant, half of
    whose facts are the user's own, told in the first person (`TaskArgs.perspective="user"`): questions that name
    someone the fact's chunk does not."""
    open_names: float = 0.0
    """Share of every group of episodes (pool values, made-up values, the user's perspective) whose people have
    made-up names (`TaskArgs.names="open"`): the test split's names are never in the train split's, so a head that
    learned the train split's names scores test conversations less sharply."""
    new_head: bool = False
    """Start from a fresh head even when the checkpoint has one (else train the checkpoint's head further)."""
    episodes_per_step: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    eval_every: int = 250
    encode_batch: int = 32
    seed: int = 0
    data: str | None = None
    """Corpus directory for the filler dialogue (as `BootstrapConfig.data`)."""

    def __post_init__(self):
        for name in ("dim", "steps", "episodes", "eval_episodes", "facts", "episodes_per_step", "eval_every"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"AddressConfig.{name} must be a positive integer (got {value!r})")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ValueError(f"AddressConfig.chunk_tokens must be positive (got {self.chunk_tokens})")
        if not self.history_tokens or min(self.history_tokens) < 256:
            raise ValueError(
                f"AddressConfig.history_tokens must be lengths >= 256 (got {self.history_tokens})"
            )
        for name in ("open_values", "user_perspective", "open_names"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AddressConfig.{name} must lie in [0, 1] (got {getattr(self, name)})")
        if self.lr <= 0:
            raise ValueError("AddressConfig.lr must be positive")


@dataclass
class AddressExample:
    """One conversation as address training sees it: its chunks' latents, its questions' latents, the positives."""

    chunk_latents: torch.Tensor
    """(C, M, d) the encoder's latents of each chunk."""
    query_latents: torch.Tensor
    """(Q, M, d) the encoder's latents of each question, written as a user turn."""
    positives: list[list[int]]
    """For each question, the chunks that hold its evidence turns."""


@torch.no_grad()
def encode_rows(memory, rows: list[list[int]], batch: int) -> torch.Tensor:
    """Latents (N, M, d) float32 of token rows, `batch` rows per encoder call, without autograd and in eval mode."""
    out = []
    with memory.evaluating():
        for start in range(0, len(rows), batch):
            ids, mask = pad_rows(
                rows[start : start + batch], pad_id=memory._pad_id() or 0, device=memory.reasoner.device
            )
            out.append(memory.encode(ids, mask).float().cpu())
    return torch.cat(out)


def address_examples(memory, examples: list[EpisodeExample], batch: int = 32) -> list[AddressExample]:
    """Encode every chunk and question of tokenized episodes (`online.bootstrap.episode_examples`; see the module's
    docstring for what is positive)."""
    out = []
    for example in examples:
        out.append(
            AddressExample(
                chunk_latents=encode_rows(memory, example.chunks, batch),
                query_latents=encode_rows(memory, example.queries, batch),
                positives=example.positives,
            )
        )
    return out


def step_batch(examples: list[AddressExample], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every question and every chunk of `examples` -> (query latents, chunk latents, positives (Q, C) bool)."""
    queries = torch.cat([ex.query_latents for ex in examples]).to(device)
    chunks = torch.cat([ex.chunk_latents for ex in examples]).to(device)
    positives = torch.zeros(len(queries), len(chunks), dtype=torch.bool)
    q0 = c0 = 0
    for ex in examples:
        for i, pos in enumerate(ex.positives):
            for c in pos:
                positives[q0 + i, c0 + c] = True
        q0 += len(ex.positives)
        c0 += len(ex.chunk_latents)
    return queries, chunks, positives.to(device)


@torch.no_grad()
def recall_at(
    memory, examples: list[AddressExample], ks=RECALL_AT, recency_margin: float | None = None
) -> dict:
    """Within each question's own conversation: the share of questions whose k first-ranked chunks include an
    evidence chunk, for each k, and what k chunks picked at random would get (expected). Chunks are ranked as
    `ConversationMemory.address` ranks them (`rank_chunks`, with `recency_margin`; None: the memory's
    `address_recency_margin`)."""
    head = memory.address
    margin = memory.config.address_recency_margin if recency_margin is None else recency_margin
    device = memory.reasoner.device
    hits = {k: 0 for k in ks}
    chance = {k: 0.0 for k in ks}
    n = 0
    for ex in examples:
        scores = head.score(head.queries(ex.query_latents.to(device)), head.keys(ex.chunk_latents.to(device)))
        c = scores.shape[1]
        for row, pos in zip(scores, ex.positives, strict=True):
            if not pos:
                continue
            n += 1
            order = rank_chunks(row, margin, limit=max(ks))
            for k in ks:
                hits[k] += bool(set(order[:k]) & set(pos))
                chance[k] += 1.0 - _none_picked(c, len(pos), min(k, c))
    return {
        "questions": n,
        **{f"recall@{k}": hits[k] / max(n, 1) for k in ks},
        **{f"chance@{k}": chance[k] / max(n, 1) for k in ks},
    }


def choose_recency_margin(results: list[dict], values: str = "pools") -> tuple[float, dict[float, int]]:
    """The smallest recency margin with the most questions whose evidence chunk is ranked first, summed over
    `scripts/online/address_recall.py --recency-margins` results (each a dict with `values` -> "by_margin"), and the
    count per margin. Choose on the split the head was trained on, then measure the margin once on the test split."""
    correct: dict[float, int] = {}
    for result in results:
        by_margin = result.get(values, {}).get("by_margin")
        if not by_margin:
            raise ValueError(
                f"choose_recency_margin: a result has no {values!r} -> 'by_margin' (ran with one margin?)"
            )
        for margin, found in by_margin.items():
            correct[float(margin)] = correct.get(float(margin), 0) + round(
                found["recall@1"] * found["questions"]
            )
    counts = [set(float(m) for m in r[values]["by_margin"]) for r in results]
    if any(c != counts[0] for c in counts):
        raise ValueError("choose_recency_margin: the results were run with different margins")
    best = max(correct.values())
    return min(m for m, n in correct.items() if n == best), dict(sorted(correct.items()))


def _none_picked(total: int, good: int, k: int) -> float:
    """Probability that k of `total` chunks picked at random include none of the `good` ones."""
    p = 1.0
    for i in range(k):
        p *= max(total - good - i, 0) / (total - i)
    return p


def run_address(memory, cfg: AddressConfig, output: str | Path) -> dict:
    from tqdm import tqdm

    from ..eval.reader import Reader
    from ..train.plots import MetricsLog

    reasoner = memory.reasoner
    chunk_tokens = cfg.chunk_tokens or memory.config.chunk_tokens or memory.config.max_memory_tokens
    if chunk_tokens > memory.config.max_memory_tokens:
        raise ValueError(
            f"AddressConfig.chunk_tokens={chunk_tokens} is more than the memory reads in one call "
            f"(max_memory_tokens={memory.config.max_memory_tokens})"
        )
    if cfg.new_head:
        memory.address = None
    if memory.address is None:
        memory.add_address_head(cfg.dim)
    elif memory.address.dim != cfg.dim:
        raise ValueError(f"the checkpoint's address head has dim {memory.address.dim}, not {cfg.dim}")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    count = Reader(reasoner).count_tokens
    t0 = time.perf_counter()

    episodes = mixed_episodes(cfg, cfg.episodes, cfg.seed, count)
    held_episodes = mixed_episodes(cfg, cfg.eval_episodes, cfg.seed + 10_000, count)
    train = address_examples(memory, episode_examples(episodes, reasoner, chunk_tokens), cfg.encode_batch)
    held = address_examples(memory, episode_examples(held_episodes, reasoner, chunk_tokens), cfg.encode_batch)
    if not train or not held:
        raise ValueError("address: no usable episodes; raise episodes or eval_episodes")
    encode_seconds = time.perf_counter() - t0
    logger.info(
        "encoded %d training and %d held-out episodes (%d chunks) in %.1f s",
        len(train),
        len(held),
        sum(len(ex.chunk_latents) for ex in train + held),
        encode_seconds,
    )
    for p in memory.parameters():
        p.requires_grad_(False)
    params = list(memory.address.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps, eta_min=cfg.lr * 0.1)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(output / "metrics.jsonl")
    curve = []
    start = time.perf_counter()

    def evaluate(step: int) -> None:
        entry = {"step": step, **recall_at(memory, held), "seconds": round(time.perf_counter() - start, 1)}
        curve.append(entry)
        metrics.write({"eval": entry})
        logger.info("address eval %s", entry)

    evaluate(0)
    order: list[int] = []
    bar = tqdm(range(1, cfg.steps + 1), desc="address", unit="step")
    head = memory.address
    for step in bar:
        while len(order) < cfg.episodes_per_step:  # a step may ask for more episodes than there are
            order += rng.sample(range(len(train)), len(train))
        batch = [train[order.pop()] for _ in range(cfg.episodes_per_step)]
        queries, chunks, positives = step_batch(batch, reasoner.device)
        loss = address_loss(head.score(head.queries(queries), head.keys(chunks)), positives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        metrics.write(
            {"step": step, "loss": round(float(loss), 4), "scale": round(float(head.log_scale.exp()), 3)}
        )
        bar.set_postfix(loss=round(float(loss), 3))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evaluate(step)
    memory.config.extra["address"] = {
        "steps": cfg.steps,
        "episodes": len(train),
        "chunk_tokens": chunk_tokens,
        "history_tokens": list(cfg.history_tokens),
        "split": "train",
        "task": "synthetic",
        "open_values": cfg.open_values,
        "user_perspective": cfg.user_perspective,
        "open_names": cfg.open_names,
        "heldout": {k: v for k, v in curve[-1].items() if k not in ("step", "seconds")},
    }
    memory.config.chunk_tokens = chunk_tokens
    memory.save_pretrained(output / "checkpoint", dtype=torch.bfloat16, max_shard_bytes=15 * 2**20)
    report = {
        "config": asdict(cfg),
        "chunk_tokens": chunk_tokens,
        "train_episodes": len(train),
        "train_questions": sum(len(ex.positives) for ex in train),
        "train_chunks": sum(len(ex.chunk_latents) for ex in train),
        "heldout_questions": curve[-1]["questions"],
        "encode_seconds": round(encode_seconds, 1),
        "curve": curve,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (output / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    from .offline_run import offline_main

    return offline_main(
        argv,
        prog="python -m memsplice.online.address",
        doc=__doc__,
        config_class=AddressConfig,
        run=run_address,
        checkpoint_help="memory checkpoint to add the head to (default: shipped)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
