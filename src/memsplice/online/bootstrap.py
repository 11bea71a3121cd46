"""Bootstrap: train a memory offline on synthetic multi-session conversations, so it answers from memory on day one.

    python -m memsplice.online.bootstrap --checkpoint DIR --output runs/bootstrap --updates 2000

Data: the eval harness's synthetic task (`memsplice.eval.tasks`, "synthetic"), **train split only**: multi-session
chat among real filler dialogue, with facts about people told in passing, some later changed, and questions about
them with the evidence turn marked. The train and test splits draw names, values and filler from disjoint pools,
so nothing here is ever asked in the benchmark.

Each question becomes one `Interaction`: `context` is a window of `context_tokens` tokens of the rendered history
(turns written as `ConversationMemory` writes them, session headers included) that holds the evidence turn at a
random position; `query` is the question in the reader's prompt (the one the eval harness asks with); `response` is
the answer and the end-of-turn token. Training is the online learner's update (next-token: memory of the window ->
the reasoner predicts question and answer; span denoising of the window; no EWC, no replay: this is offline), on
batches whose rows share one length so that no padding reaches the reasoner.

Every `eval_every` updates the answer accuracy (teacher-forced, answer tokens) on held-out questions of *other
train-split episodes* is measured with and without memory; the checkpoint, the metrics log and a JSON report are
written to `output`.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .buffer import Interaction
from .loop import OnlineConfig, OnlineLearner

logger = logging.getLogger(__name__)


@dataclass
class BootstrapConfig:
    updates: int = 2000
    """Optimizer updates."""
    episodes: int = 120
    """Synthetic train-split episodes to train on (each with `facts` questions)."""
    eval_episodes: int = 16
    """Other train-split episodes (another seed) whose questions measure progress."""
    history_tokens: list[int] = field(default_factory=lambda: [2048, 4096])
    """History lengths of the episodes (reasoner tokens)."""
    facts: int = 6
    """Questions per episode."""
    context_tokens: int = 512
    """Tokens of history around the evidence written into memory (capped by the memory's max_memory_tokens)."""
    batch_size: int = 8
    lr: float = 3e-4
    denoise_weight: float = 0.5
    contrastive_weight: float = 0.0
    eval_every: int = 250
    max_seconds: float | None = None
    """Stop early after this long (the report says so)."""
    seed: int = 0
    data: str | None = None
    """Corpus directory for the filler dialogue (default: $MEMSPLICE_DATA, else the bundled sample)."""

    def __post_init__(self):
        for name in (
            "updates",
            "episodes",
            "eval_episodes",
            "facts",
            "context_tokens",
            "batch_size",
            "eval_every",
        ):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(
                    f"BootstrapConfig.{name} must be a positive integer (got {getattr(self, name)!r})"
                )
        if not self.history_tokens or min(self.history_tokens) < 256:
            raise ValueError(
                f"BootstrapConfig.history_tokens must be lengths >= 256 (got {self.history_tokens})"
            )


def _synthetic_episodes(cfg: BootstrapConfig, count: int, seed: int, count_tokens):
    try:
        from ..eval.tasks import TaskArgs, get_task
    except ImportError as e:
        raise ImportError("bootstrap needs the eval harness's synthetic task (memsplice.eval.tasks)") from e
    per_length = max(1, count // len(cfg.history_tokens))
    args = TaskArgs(
        examples=per_length,
        lengths=tuple(cfg.history_tokens),
        seed=seed,
        split="train",
        facts=cfg.facts,
        data=Path(cfg.data) if cfg.data else None,
    )
    return get_task("synthetic")(args, count_tokens)


def _reader_prompt(reasoner, question: str) -> list[int]:
    """The question as the eval harness's reader asks it without history in the prompt."""
    try:
        from ..eval.reader import PromptTemplate

        messages = PromptTemplate().messages(question, None)
    except ImportError:
        messages = [{"role": "user", "content": question}]
    return reasoner.chat_ids(messages)


def qa_interactions(
    episodes, reasoner, template: str, context_tokens: int, rng: random.Random
) -> list[Interaction]:
    """One interaction per question: a history window holding the evidence, the question prompt, the answer."""
    tok = reasoner.require_tokenizer()
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    out = []
    for episode in episodes:
        ids: list[int] = []
        spans: dict[str, tuple[int, int]] = {}
        session = None
        for turn in episode.turns:
            if turn.session != session:  # as the latent systems write it: a session header turn
                header = f"[Session {turn.session}{', ' + turn.date if turn.date else ''}]"
                ids += tok(template.format(role="system", text=header), add_special_tokens=False)["input_ids"]
                session = turn.session
            start = len(ids)
            ids += tok(template.format(role=turn.speaker, text=turn.text), add_special_tokens=False)[
                "input_ids"
            ]
            spans[turn.id] = (start, len(ids))
        for q in episode.questions:
            if not q.evidence or q.evidence[0] not in spans or len(ids) < context_tokens:
                continue
            start, end = spans[q.evidence[0]]
            if end - start > context_tokens:
                continue
            lo = max(0, end - context_tokens)
            hi = min(start, len(ids) - context_tokens)
            offset = rng.randint(lo, max(lo, hi))
            context = ids[offset : offset + context_tokens]
            answer = tok(q.answer, add_special_tokens=False)["input_ids"] + eos
            out.append(
                Interaction(
                    id=len(out), context=context, query=_reader_prompt(reasoner, q.question), response=answer
                )
            )
    return out


@torch.no_grad()
def answer_accuracy(memory, items: list[Interaction], with_memory: bool = True, batch: int = 32) -> float:
    """Teacher-forced accuracy of the response tokens after [memory of context][query]."""
    from ..inject import forward_with_memory
    from ..memory.model import pad_rows

    reasoner = memory.reasoner
    memory.eval()
    hits = total = 0
    for i in range(0, len(items), batch):
        group = items[i : i + batch]
        kv = None
        if with_memory:
            ctx, mask = pad_rows([it.context for it in group], pad_id=0, device=reasoner.device)
            kv = memory.write(ctx, mask).kv
        rows = [it.query + it.response for it in group]
        ids, mask = pad_rows(rows, pad_id=0, device=reasoner.device, left=True)
        logits = forward_with_memory(reasoner, ids, mask, kv).logits
        t = ids.shape[1]
        for r, it in enumerate(group):
            n = len(it.response)
            pred = logits[r, t - n - 1 : t - 1].argmax(-1)
            hits += int((pred == ids[r, t - n :]).sum())
            total += n
    return hits / max(total, 1)


def length_buckets(items: list[Interaction]) -> dict[int, list[Interaction]]:
    buckets: dict[int, list[Interaction]] = defaultdict(list)
    for it in items:
        buckets[len(it.query) + len(it.response)].append(it)
    return buckets


def run_bootstrap(memory, cfg: BootstrapConfig, output: str | Path) -> dict:
    from tqdm import tqdm

    reasoner = memory.reasoner
    tok = reasoner.require_tokenizer()
    context_tokens = min(cfg.context_tokens, memory.config.max_memory_tokens)
    template = "{role}: {text}\n"

    def count_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    rng = random.Random(cfg.seed)
    t0 = time.perf_counter()
    train = qa_interactions(
        _synthetic_episodes(cfg, cfg.episodes, cfg.seed, count_tokens),
        reasoner,
        template,
        context_tokens,
        rng,
    )
    held = qa_interactions(
        _synthetic_episodes(cfg, cfg.eval_episodes, cfg.seed + 10_000, count_tokens),
        reasoner,
        template,
        context_tokens,
        rng,
    )
    if not train or not held:
        raise ValueError(
            "bootstrap: no usable questions; use longer history_tokens or a smaller context_tokens"
        )
    logger.info(
        "%d training and %d held-out questions built in %.1f s",
        len(train),
        len(held),
        time.perf_counter() - t0,
    )
    longest = max(len(it.query) + len(it.response) for it in train)
    learner = OnlineLearner(
        memory,
        OnlineConfig(
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            ewc_weight=0.0,
            replay_per_update=0,
            contrastive_weight=cfg.contrastive_weight,
            denoise_weight=cfg.denoise_weight,
            denoise_source="context",
            context_tokens=context_tokens,
            target_tokens=longest,
            anchor_interval=10**9,
            seed=cfg.seed,
        ),
    )
    buckets = [b for b in length_buckets(train).values() if len(b) >= 2]
    weights = [len(b) for b in buckets]
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    log = []

    def evaluate(update: int):
        entry = {
            "update": update,
            "answer_accuracy": answer_accuracy(memory, held),
            "seconds": round(time.perf_counter() - start, 1),
        }
        log.append(entry)
        with open(output / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        logger.info("bootstrap %s", entry)

    start = time.perf_counter()
    no_memory = answer_accuracy(memory, held, with_memory=False)
    evaluate(0)
    stopped = "updates"
    for update in tqdm(range(1, cfg.updates + 1), desc="bootstrap", unit="upd"):
        if cfg.max_seconds and time.perf_counter() - start > cfg.max_seconds:
            stopped = "max_seconds"
            break
        bucket = rng.choices(buckets, weights=weights)[0]
        learner.update(rng.sample(bucket, min(cfg.batch_size, len(bucket))))
        if update % cfg.eval_every == 0:
            evaluate(update)
    if log[-1]["update"] != learner.updates:
        evaluate(learner.updates)
    memory.config.extra["bootstrap"] = {
        "updates": learner.updates,
        "episodes": cfg.episodes,
        "split": "train",
        "task": "synthetic",
    }
    memory.save_pretrained(output / "checkpoint", dtype=torch.bfloat16, max_shard_bytes=15 * 2**20)
    report = {
        "config": asdict(cfg),
        "updates": learner.updates,
        "stopped_by": stopped,
        "train_questions": len(train),
        "heldout_questions": len(held),
        "answer_accuracy_no_memory": no_memory,
        "curve": log,
        "loss_last": learner.history[-1].parts if learner.history else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (output / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m memsplice.online.bootstrap", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--reasoner", default=None)
    p.add_argument(
        "--checkpoint", default=None, help="memory checkpoint to start from (default: shipped/untrained)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--output", required=True, help="directory for checkpoint/, metrics.jsonl and report.json")
    types = {
        "updates": int,
        "episodes": int,
        "eval_episodes": int,
        "facts": int,
        "context_tokens": int,
        "batch_size": int,
        "lr": float,
        "denoise_weight": float,
        "contrastive_weight": float,
        "eval_every": int,
        "max_seconds": float,
        "seed": int,
        "data": str,
    }
    for name, kind in types.items():
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"BootstrapConfig.{name} (default: {getattr(BootstrapConfig, name, None)})",
        )
    p.add_argument(
        "--history-tokens", type=int, nargs="+", default=None, help="BootstrapConfig.history_tokens"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {
        k: v for k, v in vars(args).items() if k in BootstrapConfig.__dataclass_fields__ and v is not None
    }
    cfg = BootstrapConfig(**overrides)
    from ..checkpoints import load_memory
    from ..reasoner import load_reasoner

    reasoner = load_reasoner(args.reasoner, device=args.device, dtype=args.dtype)
    memory = load_memory(reasoner, args.checkpoint)
    report = run_bootstrap(memory, cfg, args.output)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
