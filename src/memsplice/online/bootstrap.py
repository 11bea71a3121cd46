"""Bootstrap: train a memory offline to answer questions from the memory of a whole conversation, on day one.

    python -m memsplice.online.bootstrap --output runs/bootstrap [--checkpoint DIR] [--updates 600]

Data: the eval harness's synthetic task (`memsplice.eval.tasks`, "synthetic"), **train split only**: multi-session
chat among real filler dialogue, with facts about people told in passing, some later changed, some next to a
distractor, and questions about them. The train and test splits draw names, values and filler from disjoint pools,
so nothing here is ever asked in the benchmark.

Each training example is one episode written into memory exactly as the `latent` eval system writes it: the turns with
their session headers (`eval.reader.memory_turns`), rendered with the conversation's turn template, packed into chunks
of `chunk_tokens` (`conversation.chunks.pack_turns`), every chunk encoded into M slots and the chunk memories composed
side by side (`inject.compose.concat_rows`, what `concat_slots` does). Every question of the episode is then asked in
the eval reader's prompt with that memory in front, and the loss is the cross-entropy of the answer tokens
(`train.objectives.answer`). Gradients reach the encoding of every chunk, so the encoder learns to write facts the
reasoner can find among many memories, and the projections and the gate learn how to expose them. To keep what
formation built, `reconstruction_rows` chunks per update are also read back with the formation instruction
(`train.objectives.read_back`), weighted by `reconstruction_weight`.

Values: with pool values alone, a memory can learn to pick an answer among the values it was trained on instead of
carrying the history's word out of memory (measured: its wrong answers on the test split were train-pool values).
So `open_values` of the training episodes take made-up words and numbers, drawn afresh for every fact
(`TaskArgs.values="open"`): there the answer can only come out of the memory.

Curriculum: with `evidence_share` > 0, that share of updates asks each question with a memory of its evidence
turns alone (one small memory per question, all encoded in one batch; what the `latent-oracle` eval system reads),
so that carrying a fact through memory is learned apart from finding it among many chunk memories. Measured on
made-up values, the whole-conversation objective alone left the evidence-only memory nearly as useless as the
conversation's (`latent-oracle` 9.7% on the test split after 836 H200 updates).

Finding: with `address_weight` > 0 the memory gets an address head (`memory.address`) and every update that encodes
whole conversations adds the address loss: each question's latents against its conversation's chunk latents, the
chunks that hold its evidence as positives (`EpisodeExample.positives`), trained with the encoder. At read time the
`latent-select` eval system splices only the chunks the head picks, so `select_share` of the updates train that read
path itself: each question reads its evidence chunk and `select_chunks` - 1 other chunks of its conversation.

Progress is measured on held-out episodes of the train split (another seed: other people and other combinations of
facts; with `open_values` > 0 their values are made up too, so it measures carrying words never seen in training out
of memory; else values come from the same pools and it measures finding a fact among the chunk memories; the eval's
test split is never used here), every `eval_every` updates: the answer's teacher-forced token accuracy with the
episode's own memory, with the evidence turns' memory alone, with another episode's memory (a control: what the memory
teaches about answers in general rather than about this history) and without memory, and the answers the `latent` eval
system itself generates (the real read path: `ConversationMemory`, `Reader`, greedy decoding), scored by answer
containment as the benchmark scores them. The checkpoint is saved (atomically) after every evaluation and records
`chunk_tokens`, so conversations built on it chunk as it was trained."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..conversation.chunks import pack_turns, turn_chunks
from ..inject.compose import concat_rows
from ..inject.memory_kv import MemoryKV
from ..memory.address import address_loss
from ..memory.model import Memory, pad_rows
from ..reasoner.identity import assert_frozen
from ..train.objectives import answer, read_back
from ..train.plots import MetricsLog

logger = logging.getLogger(__name__)

TURN_TEMPLATE = "{role}: {text}\n"
"""How the conversation memory renders a turn (`ConversationConfig.turn_template`'s default)."""
UPDATE_MODES = ("whole", "evidence", "select")
"""What memory a question reads in an update (see `answer_update`)."""


@dataclass
class BootstrapConfig:
    updates: int = 600
    """Optimizer updates."""
    episodes: int = 300
    """Synthetic train-split episodes to train on (each asks `facts` questions)."""
    eval_episodes: int = 6
    """Other train-split episodes (another seed) whose questions measure progress."""
    history_tokens: list[int] = field(default_factory=lambda: [512, 1024, 1536])
    """History lengths of the episodes (reasoner tokens)."""
    facts: int = 6
    """Questions per episode."""
    chunk_tokens: int = 128
    """History tokens per chunk memory (with 16 slots, 128 tokens is 8x compression); recorded in the checkpoint."""
    open_values: float = 0.5
    """Share of training episodes whose values are made up for each fact (see the module's docstring); with any,
    the held-out episodes' values are made up too."""
    evidence_share: float = 0.0
    """Share of updates whose memories hold only each question's evidence turns (one small memory per question,
    as the `latent-oracle` eval system writes it): a curriculum that teaches carrying a fact through memory apart
    from finding it among many chunk memories. 0: every update reads whole conversations."""
    address_weight: float = 0.0
    """Weight of the address loss (`memory.address.address_loss`: each question's latents against its conversation's
    chunk latents, the chunks holding its evidence as positives) in whole-conversation and select updates, trained
    together with the encoder; the memory gets an address head of `address_dim` if it has none. 0: off."""
    address_dim: int = 128
    select_share: float = 0.0
    """Share of updates in which each question reads what `latent-select` would give it: its evidence chunk and
    `select_chunks` - 1 other chunks of its conversation, side by side in conversation order."""
    select_chunks: int = 2
    """Chunk memories a question reads in select updates, and in the held-out `latent-select` answers (with an
    address head)."""
    episodes_per_update: int = 2
    """Episodes (whole conversations, all their questions) per update."""
    lr: float = 1e-4
    """Peak AdamW learning rate (after `warmup_updates`, cosine down to `min_lr_ratio` of it)."""
    min_lr_ratio: float = 0.1
    warmup_updates: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    reconstruction_rows: int = 2
    """Chunks per update read back with the formation instruction, so that memories stay readable (0: off)."""
    reconstruction_weight: float = 0.5
    eval_every: int = 100
    eval_slot_budget: int = 1024
    """Slot budget of the held-out conversations (enough to keep every chunk of `history_tokens` at full
    resolution, as in training)."""
    max_seconds: float | None = None
    """Stop early after this long (the report says so); the learning rate then decays over whichever of
    `updates` and `max_seconds` runs out first."""
    seed: int = 0
    data: str | None = None
    """Corpus directory for the filler dialogue (default: $MEMSPLICE_DATA, the shared corpora, else the bundled
    sample)."""

    def __post_init__(self):
        for name in (
            "updates",
            "episodes",
            "eval_episodes",
            "facts",
            "chunk_tokens",
            "episodes_per_update",
            "eval_every",
            "eval_slot_budget",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"BootstrapConfig.{name} must be a positive integer (got {value!r})")
        if not self.history_tokens or min(self.history_tokens) < 256:
            raise ValueError(
                f"BootstrapConfig.history_tokens must be lengths >= 256 (got {self.history_tokens})"
            )
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError("BootstrapConfig.lr must be positive and min_lr_ratio in [0, 1]")
        if not 0.0 <= self.evidence_share <= 1.0:
            raise ValueError(f"BootstrapConfig.evidence_share must lie in [0, 1] (got {self.evidence_share})")
        if not (self.select_share >= 0.0 and self.evidence_share + self.select_share <= 1.0):
            raise ValueError(
                f"BootstrapConfig.select_share must be >= 0 and evidence_share + select_share <= 1 "
                f"(got {self.select_share} and {self.evidence_share})"
            )
        if not 0.0 <= self.open_values <= 1.0:
            raise ValueError(f"BootstrapConfig.open_values must lie in [0, 1] (got {self.open_values})")
        if self.address_weight < 0 or self.address_dim < 1 or self.select_chunks < 1:
            raise ValueError(
                "BootstrapConfig.address_weight must be >= 0, address_dim and select_chunks positive"
            )
        if self.reconstruction_rows < 0 or self.reconstruction_weight < 0:
            raise ValueError("BootstrapConfig.reconstruction_rows and reconstruction_weight must be >= 0")


@dataclass
class EpisodeExample:
    """One conversation as memory training sees it."""

    chunks: list[list[int]]
    """The history's chunk inputs, as a `ConversationMemory` with the same chunk size builds them."""
    prompts: list[list[int]]
    """Each question in the eval reader's prompt (no history text)."""
    answers: list[list[int]]
    """Each gold answer followed by the end-of-turn token."""
    evidence: list[list[int]]
    """Each question's evidence turns alone, as one chunk input (their last `chunk_tokens` tokens)."""
    queries: list[list[int]]
    """Each question written as a user turn: what the address head (`memory.address`) reads."""
    positives: list[list[int]]
    """For each question, the indices of the chunks that hold its evidence turns."""
    questions: list[str]
    """Each question's text (what `prompts` ask, before any prompt template)."""


def synthetic_episodes(
    cfg: BootstrapConfig,
    count: int,
    seed: int,
    count_tokens,
    values: str = "pools",
    perspective: str = "others",
    names: str = "pools",
):
    """`count` train-split episodes spread over `cfg.history_tokens`, with pool or made-up ("open") values and
    names, in the synthetic task's `perspective` ("others" or "user")."""
    if count <= 0:
        return []
    try:
        from ..eval.tasks import TaskArgs, get_task
    except ImportError as e:
        raise ImportError("bootstrap needs the eval harness's synthetic task (memsplice.eval.tasks)") from e
    args = TaskArgs(
        examples=max(1, -(-count // len(cfg.history_tokens))),
        lengths=tuple(cfg.history_tokens),
        seed=seed,
        split="train",
        facts=cfg.facts,
        values=values,
        names=names,
        perspective=perspective,
        data=Path(cfg.data) if cfg.data else None,
    )
    return get_task("synthetic")(args, count_tokens)[:count]


def mixed_episodes(cfg, total: int, seed: int, count_tokens) -> list:
    """`total` train-split episodes: `cfg.open_values` of them with made-up values, `cfg.user_perspective` of the
    rest in the user's own perspective, the others the default task (`synthetic_episodes` for each). Where `cfg` has
    `open_names` (`AddressConfig`), that share of each group has made-up names."""
    n_open = round(total * cfg.open_values)
    n_user = round((total - n_open) * cfg.user_perspective)
    named = getattr(cfg, "open_names", 0.0)
    out = []
    for count, kind in (
        (total - n_open - n_user, {}),
        (n_user, {"perspective": "user"}),
        (n_open, {"values": "open"}),
    ):
        n_named = round(count * named)
        out += synthetic_episodes(cfg, count - n_named, seed, count_tokens, **kind)
        out += synthetic_episodes(cfg, n_named, seed, count_tokens, names="open", **kind)
    return out


def episode_examples(episodes, reasoner, chunk_tokens: int) -> list[EpisodeExample]:
    """Tokenize episodes into what `answer_update` trains on: chunk inputs, question prompts, answers, and which
    chunks hold each question's evidence."""
    from ..eval.reader import PromptTemplate, memory_turn_sources, memory_turns

    tok = reasoner.require_tokenizer()
    template = PromptTemplate()
    end = [reasoner.end_of_turn_id]
    out = []

    def turn_ids(turns) -> list[list[int]]:
        """Token ids of each turn as memory renders it (session headers included)."""
        return [
            tok(TURN_TEMPLATE.format(role=role, text=text), add_special_tokens=False)["input_ids"]
            for role, text in memory_turns(turns)
        ]

    for episode in episodes:
        questions = [q for q in episode.questions if q.answer]
        if not questions:
            continue
        evidence = [
            [t for ids in turn_ids(episode.turns_by_id(q.evidence)) for t in ids][-chunk_tokens:]
            for q in questions
        ]
        history = turn_ids(episode.turns)
        owners = zip(memory_turn_sources(episode.turns), turn_chunks(history, chunk_tokens), strict=True)
        chunk_of = {source: chunks for source, chunks in owners if source is not None}
        out.append(
            EpisodeExample(
                chunks=pack_turns(history, chunk_tokens),
                prompts=[reasoner.chat_ids(template.messages(q.question, None)) for q in questions],
                answers=[tok(q.answer, add_special_tokens=False)["input_ids"] + end for q in questions],
                evidence=evidence,
                queries=[question_input(tok, q.question) for q in questions],
                positives=[sorted({c for t in q.evidence for c in chunk_of.get(t, [])}) for q in questions],
                questions=[q.question for q in questions],
            )
        )
    return out


def question_input(tokenizer, question: str) -> list[int]:
    """A question as the address head reads it: rendered as a user turn of the conversation, then tokenized (what
    `ConversationMemory.address` encodes)."""
    return tokenizer(TURN_TEMPLATE.format(role="user", text=question), add_special_tokens=False)["input_ids"]


def write_chunks(memory, chunks: list[list[int]]) -> Memory:
    """Chunk inputs encoded in one batch (with autograd, when enabled): one memory row per chunk."""
    ids, mask = pad_rows(chunks, pad_id=memory._pad_id() or 0, device=memory.reasoner.device)
    return memory.write(ids, mask)


def write_episode(memory, example: EpisodeExample) -> tuple[Memory, object]:
    """Encode every chunk of the episode -> (per-chunk memory, the chunks composed side by side in one row)."""
    written = write_chunks(memory, example.chunks)
    return written, concat_rows(written.kv, memory.reasoner)


def answer_update(
    memory,
    examples: list[EpisodeExample],
    cfg: BootstrapConfig,
    instruction: list[int],
    rng,
    mode: str = "whole",
):
    """Forward and backward of one update over `examples`; returns the loss parts and answer-token hits.

    mode: what memory each question reads. "whole": the memory of its whole conversation (every chunk side by side);
    "evidence": a memory of its evidence turns alone (`BootstrapConfig.evidence_share`); "select": the chunk
    memories `latent-select` would give it, its evidence chunk and `select_chunks` - 1 others of its conversation
    in conversation order (`BootstrapConfig.select_share`)."""
    if mode not in UPDATE_MODES:
        raise ValueError(f"answer_update: mode must be one of {UPDATE_MODES} (got {mode!r})")
    reasoner = memory.reasoner
    n_answer = sum(len(a) for ex in examples for a in ex.answers)
    parts = {
        "answer": 0.0,
        "reconstruction": 0.0,
        "address": 0.0,
        "answer_tokens": n_answer,
        "answer_correct": 0,
    }
    keep = cfg.reconstruction_rows > 0 and cfg.reconstruction_weight > 0
    if mode == "evidence":  # one memory row per question: its evidence turns alone, all in one batch
        chunks = [e for ex in examples for e in ex.evidence]
        written = write_chunks(memory, chunks)
        prompts = [p for ex in examples for p in ex.prompts]
        answers = [a for ex in examples for a in ex.answers]
        result = answer(memory, written.kv, prompts, answers)
        result.loss.backward(retain_graph=keep)
        parts["answer"] = float(result.loss.detach())
        parts["answer_correct"] = int(result.correct)
        written_all = [(written, i, chunks[i]) for i in range(len(chunks))]
    else:
        written_all = []
        addressing = cfg.address_weight > 0 and memory.address is not None
        for ex in examples:
            if mode == "select":
                written = write_chunks(memory, ex.chunks)
                kv = selected_memories(written.kv, ex, cfg.select_chunks, rng, reasoner)
            else:
                written, kv = write_episode(memory, ex)
            result = answer(memory, kv, ex.prompts, ex.answers)
            # Weighted by answer tokens, so the loss is the mean over every answer token of the update.
            loss = result.loss * (result.tokens / n_answer)
            if addressing and any(ex.positives):
                found = episode_address_loss(memory, written.latents, ex)
                loss = loss + cfg.address_weight * found / len(examples)
                parts["address"] += float(found.detach()) / len(examples)
            loss.backward(retain_graph=keep)
            parts["answer"] += float(result.loss.detach()) * result.tokens / n_answer
            parts["answer_correct"] += int(result.correct)
            written_all += [(written, i, ex.chunks[i]) for i in range(len(ex.chunks))]
    if keep:
        picks = rng.sample(written_all, min(cfg.reconstruction_rows, len(written_all)))
        prompt = torch.tensor([instruction], device=reasoner.device)
        for k, (written, i, chunk) in enumerate(picks):
            one = Memory(written.latents[i : i + 1], written.gate[i : i + 1], written.kv.index_rows([i]))
            target = torch.tensor([chunk], device=reasoner.device)
            result = read_back(memory, one, prompt, target)
            last = k == len(picks) - 1
            (result.loss * cfg.reconstruction_weight / len(picks)).backward(retain_graph=not last)
            parts["reconstruction"] += float(result.loss.detach()) / len(picks)
    return parts


def selected_memories(kv, example: EpisodeExample, k: int, rng, reasoner):
    """One memory row per question of `example` (its chunks' memories `kv`, one row per chunk): an evidence chunk
    and k - 1 other chunks drawn at random, side by side in conversation order (random chunks for a question
    without evidence)."""
    n = kv.batch_size
    k = min(k, n)
    rows = []
    for positives in example.positives:
        picks = {rng.choice(positives)} if positives else set()
        picks |= set(rng.sample([c for c in range(n) if c not in picks], k - len(picks)))
        rows.append(concat_rows(kv.index_rows(sorted(picks)), reasoner))
    return MemoryKV.cat_rows(rows)


def episode_address_loss(memory, chunk_latents: torch.Tensor, example: EpisodeExample) -> torch.Tensor:
    """The address loss of one conversation: its questions' latents (encoded here, with autograd) against its chunk
    latents (C, M, d), the chunks holding each question's evidence as positives, the others as negatives."""
    head = memory.address
    ids, mask = pad_rows(example.queries, pad_id=memory._pad_id() or 0, device=memory.reasoner.device)
    scores = head.score(head.queries(memory.encode(ids, mask)), head.keys(chunk_latents))
    positives = torch.zeros_like(scores, dtype=torch.bool)
    for row, chunks in enumerate(example.positives):
        positives[row, chunks] = True
    return address_loss(scores, positives)


@torch.no_grad()
def answer_accuracy(memory, examples: list[EpisodeExample], memory_of: str = "own") -> float:
    """Teacher-forced accuracy of the answer tokens after [memory][question prompt] (`train.objectives.answer`).

    memory_of: "own" (the memory of the episode the questions are about), "other" (the memory of the next episode
    in the list: a control, what the memory teaches about answers in general rather than about this history),
    "evidence" (each question's evidence turns alone, as `latent-oracle` reads) or "none" (no memory)."""
    if memory_of not in ("own", "other", "evidence", "none"):
        raise ValueError(
            f'answer_accuracy: memory_of must be "own", "other", "evidence" or "none" (got {memory_of!r})'
        )
    memory.eval()
    hits = total = 0
    for i, ex in enumerate(examples):
        if memory_of == "none":
            kv = None
        elif memory_of == "evidence":
            kv = write_chunks(memory, ex.evidence).kv
        else:
            kv = write_episode(memory, ex if memory_of == "own" else examples[(i + 1) % len(examples)])[1]
        result = answer(memory, kv, ex.prompts, ex.answers)
        hits += int(result.correct)
        total += result.tokens
    return hits / max(total, 1)


@torch.no_grad()
def generated_accuracy(
    memory,
    episodes,
    chunk_tokens: int,
    slot_budget: int,
    reader=None,
    system: str = "latent",
    select_chunks: int = 1,
) -> dict:
    """Answers generated by the `latent` eval system (or another latent `system`, e.g. "latent-oracle" or
    "latent-select" reading `select_chunks` chunks) with this memory: the share that contains the gold answer."""
    from ..eval.metrics import contains_answer
    from ..eval.reader import Reader
    from ..eval.systems import Runtime, SystemArgs, build_system

    memory.eval()
    runtime = Runtime(
        reader or Reader(memory.reasoner),
        SystemArgs(chunk_tokens=chunk_tokens, slot_budget=slot_budget, select_chunks=select_chunks),
    )
    runtime.shared("memory_model", lambda: memory)
    system = build_system(system, runtime)
    hits, items = 0.0, []
    for episode in episodes:
        system.reset()
        system.feed(episode.turns)
        for q in episode.questions:
            text = system.answer(q).text
            hit = max(contains_answer(text, gold) for gold in (q.answer, *q.aliases))
            hits += hit
            items.append({"question": q.question, "answer": q.answer, "prediction": text, "contains": hit})
    return {"contains": hits / max(len(items), 1), "questions": len(items), "items": items}


def lr_at(update: int, cfg: BootstrapConfig, elapsed: float = 0.0) -> float:
    """Linear warm-up, then cosine decay over the updates, or over `max_seconds` when that ends the run first
    (so a run stopped by its time budget still ends at the low learning rate)."""
    if update <= cfg.warmup_updates:
        return cfg.lr * update / max(cfg.warmup_updates, 1)
    progress = (update - cfg.warmup_updates) / max(cfg.updates - cfg.warmup_updates, 1)
    if cfg.max_seconds:
        progress = max(progress, elapsed / cfg.max_seconds)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def run_bootstrap(memory, cfg: BootstrapConfig, output: str | Path) -> dict:
    from tqdm import tqdm

    from ..eval.reader import Reader

    reasoner = memory.reasoner
    tok = reasoner.require_tokenizer()
    if cfg.chunk_tokens > memory.config.max_memory_tokens:
        raise ValueError(
            f"BootstrapConfig.chunk_tokens={cfg.chunk_tokens} is more than the memory reads in one call "
            f"(max_memory_tokens={memory.config.max_memory_tokens})"
        )
    reader = Reader(reasoner)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    n_open = round(cfg.episodes * cfg.open_values)
    train_episodes = synthetic_episodes(cfg, cfg.episodes - n_open, cfg.seed, reader.count_tokens)
    train_episodes += synthetic_episodes(cfg, n_open, cfg.seed, reader.count_tokens, values="open")
    train = episode_examples(train_episodes, reasoner, cfg.chunk_tokens)
    held_values = "open" if cfg.open_values > 0 else "pools"
    held_episodes = synthetic_episodes(
        cfg, cfg.eval_episodes, cfg.seed + 10_000, reader.count_tokens, values=held_values
    )
    held = episode_examples(held_episodes, reasoner, cfg.chunk_tokens)
    if not train or not held:
        raise ValueError("bootstrap: no usable episodes; raise episodes or eval_episodes")
    logger.info(
        "%d training and %d held-out episodes (%d and %d questions) built in %.1f s",
        len(train),
        len(held),
        sum(len(e.answers) for e in train),
        sum(len(e.answers) for e in held),
        time.perf_counter() - t0,
    )
    instruction = memory.config.reconstruction_instruction
    if cfg.reconstruction_rows and not instruction:
        raise ValueError(
            "bootstrap: the checkpoint records no formation instruction; set reconstruction_rows=0"
        )
    instruction_ids = tok(instruction, add_special_tokens=False)["input_ids"] if instruction else []
    if cfg.address_weight > 0 and memory.address is None:
        memory.add_address_head(cfg.address_dim)
    params = memory.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(output / "metrics.jsonl")  # a fresh log (a previous run's is removed)
    log: list[dict] = []
    start = time.perf_counter()

    def evaluate(update: int) -> None:
        generated = generated_accuracy(memory, held_episodes, cfg.chunk_tokens, cfg.eval_slot_budget, reader)
        entry = {
            "update": update,
            "answer_accuracy": answer_accuracy(memory, held),
            "answer_accuracy_other_memory": answer_accuracy(memory, held, "other"),
            "answer_accuracy_evidence_memory": answer_accuracy(memory, held, "evidence"),
            "generated_contains": generated["contains"],
            **(
                {
                    "generated_contains_evidence_memory": generated_accuracy(
                        memory, held_episodes, cfg.chunk_tokens, cfg.eval_slot_budget, reader, "latent-oracle"
                    )["contains"]
                }
                if cfg.evidence_share > 0 or cfg.select_share > 0
                else {}
            ),
            **(address_metrics() if memory.address is not None else {}),
            "seconds": round(time.perf_counter() - start, 1),
        }
        log.append({**entry, "items": generated["items"]})
        metrics.write({"eval": entry})
        logger.info("bootstrap eval %s", entry)
        if update:
            save(update)

    def address_metrics() -> dict:
        """Held-out recall@k of the address head within each conversation, and the answers `latent-select` generates
        reading the `select_chunks` chunks it picks."""
        from .address import address_examples, recall_at

        found = recall_at(memory, address_examples(memory, held), ks=(1, 2))
        selected = generated_accuracy(
            memory,
            held_episodes,
            cfg.chunk_tokens,
            cfg.eval_slot_budget,
            reader,
            "latent-select",
            cfg.select_chunks,
        )
        return {
            "address_recall@1": found["recall@1"],
            "address_recall@2": found["recall@2"],
            "generated_contains_select": selected["contains"],
        }

    def save(update: int) -> None:
        """The checkpoint as of `update` (written atomically: a killed run leaves the last one whole)."""
        memory.config.chunk_tokens = cfg.chunk_tokens
        memory.config.extra["bootstrap"] = {
            "updates": update,
            "episodes": len(train),
            "history_tokens": list(cfg.history_tokens),
            "chunk_tokens": cfg.chunk_tokens,
            "split": "train",
            "task": "synthetic",
            "open_values": cfg.open_values,
            "heldout_generated_contains": log[-1]["generated_contains"],
        }
        memory.save_pretrained(output / "checkpoint", dtype=torch.bfloat16, max_shard_bytes=15 * 2**20)

    no_memory = answer_accuracy(memory, held, "none")
    evaluate(0)
    stopped = "updates"
    update = 0
    order: list[int] = []
    bar = tqdm(range(1, cfg.updates + 1), desc="bootstrap", unit="upd")
    for update in bar:
        if cfg.max_seconds and time.perf_counter() - start > cfg.max_seconds:
            stopped, update = "max_seconds", update - 1
            break
        while len(order) < cfg.episodes_per_update:  # an update may ask for more episodes than there are
            order += rng.sample(range(len(train)), len(train))
        batch = [train[order.pop()] for _ in range(cfg.episodes_per_update)]
        memory.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(update, cfg, time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)
        draw = rng.random()
        mode = (
            "evidence"
            if draw < cfg.evidence_share
            else "select"
            if draw < cfg.evidence_share + cfg.select_share
            else "whole"
        )
        parts = answer_update(memory, batch, cfg, instruction_ids, rng, mode=mode)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        entry = {
            "update": update,
            "lr": optimizer.param_groups[0]["lr"],
            "loss_answer": round(parts["answer"], 4),
            "loss_reconstruction": round(parts["reconstruction"], 4),
            "loss_address": round(parts["address"], 4),
            "answer_token_acc": round(parts["answer_correct"] / max(parts["answer_tokens"], 1), 4),
            "mode": mode,
            "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
        metrics.write(entry)
        bar.set_postfix(loss=entry["loss_answer"], acc=entry["answer_token_acc"])
        if update % cfg.eval_every == 0:
            evaluate(update)
    assert_frozen(reasoner.model)
    if log[-1]["update"] != update:
        evaluate(update)
    if not update:
        save(update)
    report = {
        "config": asdict(cfg),
        "updates": update,
        "stopped_by": stopped,
        "train_episodes": len(train),
        "train_questions": sum(len(e.answers) for e in train),
        "heldout_questions": sum(len(e.answers) for e in held),
        "heldout_values": held_values,
        "answer_accuracy_no_memory": no_memory,
        "curve": [{k: v for k, v in e.items() if k != "items"} for e in log],
        "heldout_predictions": {"first": log[0]["items"], "last": log[-1]["items"]},
        "seconds": round(time.perf_counter() - start, 1),
    }
    (output / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    from .offline_run import offline_main

    return offline_main(
        argv,
        prog="python -m memsplice.online.bootstrap",
        doc=__doc__,
        config_class=BootstrapConfig,
        run=run_bootstrap,
        checkpoint_help="memory checkpoint to start from (default: shipped/untrained)",
        hide=("config", "heldout_predictions"),
    )


if __name__ == "__main__":
    raise SystemExit(main())
