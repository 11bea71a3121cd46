"""Train a reading prefix: teach the frozen reasoner to answer from recalled text beside the recent turns.

    python -m memsplice.reading.train --output runs/reading [--steps 600] [--record NAME]

Data: the eval harness's synthetic task, **train split only** (as `memsplice.online.bootstrap`); another seed of it
is held out for the curve. Every question becomes a prompt in the eval reader's template (`eval.reader`) in one of
one of these layouts, the ones memsplice's text read paths and the oracle build:
- `window_recalled`: the most recent `window_tokens` of the conversation, then the question's evidence chunk under
  its session header (what `latent-readback+window` reads, the chunk's text standing in for its read-back);
- `recalled`: the evidence chunk under its header alone (`latent-readback`);
- `evidence`: the evidence turns alone (the `oracle`);
- `window_evidence`: a window that ends a few turns after the evidence turn, so that the window holds the answer,
  then another chunk of the conversation under its header (a question about something just said, with the address
  head's pick beside it): the prefix must not learn to ignore the window;
- `window_two_recalled`: the window, then the evidence chunk and a hard distractor (`hard_distractor`: the turn that
  shares the most names with the question, under its own header) in conversation order, as two chunks read back
  (`--select-chunks 2`) would give them;
- `two_recalled`: the same two without the window (`latent-readback --select-chunks 2`).
The target is the gold answer and the end-of-turn token, teacher-forced through [prefix][prompt]; only the prefix's
K/V train.

Ordinary replies (`ordinary_share` of the rows): a prefix trained on short answers alone shortens every reply it is
put in front of. Chat and the server put it in front of any message that has read-back text, question or not, so a
share of each batch is chat's own prompt (its system prompt, a few turns of a train-split dialogue of the corpora,
then a message of it with an unrelated exchange read back in front, as `with_recalled` frames it) and the target is
the reply the reasoner gives *without* the prefix (greedy, at most `ordinary_tokens` tokens, made once before
training): the prefix is taught to leave such replies as they were (sequence-level self-distillation).

Held-out: the loss, and the answers the reasoner generates (the eval reader, greedy) with the prefix and without it,
per layout; for ordinary replies, the mean length of the replies generated with the prefix against the reasoner's
own, and the share of its own tokens the prefix keeps (teacher-forced argmax). The prefix is saved atomically at the
end with what it was trained on.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

LAYOUTS = (
    "window_recalled",
    "recalled",
    "evidence",
    "window_evidence",
    "window_two_recalled",
    "two_recalled",
)


@dataclass
class ReadingConfig:
    num_slots: int = 16
    """Positions of the prefix (`ReadingPrefixConfig.num_slots`)."""
    steps: int = 600
    batch: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    episodes: int = 240
    """Train-split episodes (each asks `facts` questions)."""
    eval_episodes: int = 16
    """Held-out train-split episodes (another seed)."""
    eval_every: int = 200
    history_tokens: list[int] = field(default_factory=lambda: [2048, 4096])
    facts: int = 6
    chunk_tokens: int = 32
    """Tokens per chunk, as the conversation memory chunks history (the shipped checkpoint's 32)."""
    window_tokens: list[int] = field(default_factory=lambda: [128, 256, 384])
    """Window sizes drawn from for the window layouts (the eval reads 256)."""
    eval_window_tokens: int = 256
    layout_weights: list[float] = field(default_factory=lambda: [0.3, 0.15, 0.15, 0.15, 0.15, 0.1])
    """Shares of `LAYOUTS` in training; a layout of share 0 is still measured on the held-out episodes."""
    ordinary_share: float = 0.1
    """Share of each batch's rows that are ordinary chat replies (see the module's docstring); 0 trains on answers
    alone."""
    ordinary_prompts: int = 192
    """Ordinary chat prompts to train on (from the train split of the dialogue corpora)."""
    ordinary_eval_prompts: int = 24
    """More of them (other dialogues) for the held-out curve."""
    ordinary_tokens: int = 48
    """Most tokens of the reasoner's own reply kept as an ordinary row's target."""
    open_values: float = 0.25
    """Share of episodes with made-up values (`TaskArgs.values="open"`)."""
    user_perspective: float = 0.25
    """Share of the rest in the user's own perspective (`TaskArgs.perspective="user"`)."""
    seed: int = 0
    data: str | None = None
    """Corpora directory for the synthetic task's filler (None: its default)."""

    def __post_init__(self):
        if (
            len(self.layout_weights) != len(LAYOUTS)
            or min(self.layout_weights) < 0
            or sum(self.layout_weights) <= 0
        ):
            raise ValueError(
                f"ReadingConfig.layout_weights: {len(LAYOUTS)} non-negative shares, not all zero"
            )
        for name in (
            "steps",
            "batch",
            "episodes",
            "eval_episodes",
            "eval_every",
            "chunk_tokens",
            "num_slots",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ReadingConfig.{name} must be >= 1 (got {getattr(self, name)})")
        if not 0.0 <= self.ordinary_share < 1.0:
            raise ValueError(f"ReadingConfig.ordinary_share must lie in [0, 1) (got {self.ordinary_share})")
        for name in ("ordinary_prompts", "ordinary_eval_prompts", "ordinary_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"ReadingConfig.{name} must be >= 1 (got {getattr(self, name)})")
        if not self.window_tokens or min(self.window_tokens) < 1:
            raise ValueError("ReadingConfig.window_tokens: at least one size, each >= 1")


@dataclass
class ReadingExample:
    question: str
    answer: str
    aliases: tuple
    layout: str
    history: str


def question_examples(
    episode, chunk_texts: list[str], positives: list[list[int]], window_tokens, count_tokens, rng
):
    """Every layout of every answerable question of `episode` (`chunk_texts`: its memory chunks as text;
    `positives`: per question the chunks that hold its evidence)."""
    from ..eval.reader import render_history, render_session_header, render_turn
    from ..eval.systems.context import recent_window

    out = []
    turns = list(episode.turns)
    index = {t.id: i for i, t in enumerate(turns)}
    questions = [q for q in episode.questions if q.answer]
    for q, chunks in zip(questions, positives, strict=True):
        evidence = episode.turns_by_id(q.evidence)
        if not evidence or not chunks:
            continue
        last = evidence[-1]
        header = f"system: {render_session_header(last)}"
        recalled = f"{header}\n{chunk_texts[chunks[-1]]}"
        window = render_history(recent_window(turns, window_tokens, count_tokens)[1])
        end = min(len(turns), index[last.id] + 1 + rng.randint(0, 3))
        near = render_history(recent_window(turns[:end], window_tokens, count_tokens)[1])
        other_turn = hard_distractor(turns, q.question, set(q.evidence))
        two = recalled
        if other_turn is not None:
            extra = f"system: {render_session_header(other_turn)}\n{render_turn(other_turn)}"
            two = f"{extra}\n{recalled}" if index[other_turn.id] < index[last.id] else f"{recalled}\n{extra}"
        others = [i for i in range(len(chunk_texts)) if i not in set(chunks)]
        other = chunk_texts[rng.choice(others)] if others else chunk_texts[chunks[-1]]
        histories = {
            "window_recalled": f"{window}\n{recalled}",
            "recalled": recalled,
            "evidence": render_history(evidence),
            "window_evidence": f"{near}\n{header}\n{other}",
            "window_two_recalled": f"{window}\n{two}",
            "two_recalled": two,
        }
        out.extend(ReadingExample(q.question, q.answer, q.aliases, name, histories[name]) for name in LAYOUTS)
    return out


QUESTION_WORDS = {"What", "When", "Where", "Who", "How"}


def hard_distractor(turns, question: str, evidence: set):
    """The turn outside `evidence` (turn ids) that shares the most capitalised words with `question` (the same
    person, most often; the earliest of equals), or None when none shares any: a stand-in for the address head's
    second pick."""
    words = {w.strip("?.,'s") for w in question.split() if w[:1].isupper()} - QUESTION_WORDS
    best, score = None, 0
    for t in turns:
        if t.id in evidence:
            continue
        n = sum(w in t.text for w in words)
        if n > score:
            best, score = t, n
    return best


@dataclass
class OrdinaryExample:
    """Chat's prompt for a message that asks nothing of memory, with unrelated read-back text in front of it, and the
    reply the reasoner gives it without a prefix."""

    prompt: list[int]
    reply: list[int]
    """The reply's tokens, then the end-of-turn token when it ended within `ordinary_tokens`."""


def ordinary_examples(reasoner, dialogues, count: int, seed: int, pool) -> list[OrdinaryExample]:
    """`count` chat prompts made from `dialogues` (each its turns' texts; reused in turn when there are fewer): the
    chat system prompt, the dialogue's first 0, 2 or 4 turns as messages, then its next turn as the user's message
    with the opening exchange of another dialogue read back in front (`with_recalled`, placement "message"), each with
    the reasoner's own greedy reply from `pool` (an `engine.DecoderPool`; its `max_new_tokens` caps the reply)."""
    from ..cli.chat import DEFAULT_SYSTEM
    from ..memory.readback import with_recalled

    usable = [d for d in dialogues if len(d) >= 2]
    if len(usable) < 2:
        raise ValueError("reading: ordinary replies need at least two dialogues of two turns or more")
    rng = random.Random(seed)
    out = []
    for n in range(count):
        turns = usable[n % len(usable)]
        other = rng.choice([d for d in usable if d is not turns])
        k = rng.choice([i for i in (0, 2, 4) if i < len(turns)])
        earlier = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": text}
            for i, text in enumerate(turns[:k])
        ]
        recalled = f"user: {other[0]}\nassistant: {other[1]}"
        messages = with_recalled(
            [{"role": "system", "content": DEFAULT_SYSTEM}, *earlier, {"role": "user", "content": turns[k]}],
            recalled,
            "message",
        )
        prompt = reasoner.chat_ids(messages)
        decoder = pool.decoder_for(len(prompt) + pool.max_new_tokens)
        if decoder is None:
            continue
        with torch.no_grad():
            result = decoder.generate(prompt, None, stop_ids=tuple(reasoner.eos_ids))
        reply = result.tokens + ([reasoner.end_of_turn_id] if result.stop_id is not None else [])
        if reply:
            out.append(OrdinaryExample(prompt, reply))
    return out


@torch.no_grad()
def ordinary_held_out(prefix, examples: list[OrdinaryExample], pool) -> dict:
    """Replies generated with the prefix in front against the reasoner's own (mean tokens, end-of-turn excluded),
    and the teacher-forced loss and argmax agreement of the prefix on the reasoner's own replies."""
    front = prefix.memory_kv()
    stops = tuple(prefix.reasoner.eos_ids)
    lengths = []
    for e in examples:
        decoder = pool.decoder_for(front.num_slots + len(e.prompt) + pool.max_new_tokens)
        if decoder is not None:
            lengths.append(len(decoder.generate(e.prompt, front, stop_ids=stops).tokens))
    end = prefix.reasoner.end_of_turn_id
    own = [len(e.reply) - (e.reply[-1] == end) for e in examples]
    losses, tokens, hits = 0.0, 0, 0
    for i in range(0, len(examples), 16):
        batch = [(e.prompt, e.reply) for e in examples[i : i + 16]]
        loss, n, h = answer_loss(prefix, batch)
        losses, tokens, hits = losses + float(loss) * n, tokens + n, hits + h
    return {
        "prompts": len(examples),
        "mean_tokens_own": round(sum(own) / len(own), 1),
        "mean_tokens_with_prefix": round(sum(lengths) / max(len(lengths), 1), 1),
        "loss": round(losses / tokens, 4),
        "token_agreement": round(hits / tokens, 4),
    }


def build_examples(
    cfg: ReadingConfig, reasoner, count: int, seed: int, window_tokens: list[int]
) -> list[ReadingExample]:
    """`count` train-split episodes (pool values, made-up values and the user's perspective as `cfg` shares them),
    every question in every layout, each episode with one window size drawn from `window_tokens`."""
    from ..eval.reader import Reader
    from ..online.bootstrap import episode_examples, mixed_episodes

    rng = random.Random(seed)
    count_tokens = Reader(reasoner).count_tokens
    episodes = mixed_episodes(cfg, count, seed, count_tokens)
    tok = reasoner.require_tokenizer()
    out = []
    for episode, example in zip(
        episodes, episode_examples(episodes, reasoner, cfg.chunk_tokens), strict=True
    ):
        texts = [tok.decode(c).strip() for c in example.chunks]
        out += question_examples(
            episode, texts, example.positives, rng.choice(window_tokens), count_tokens, rng
        )
    return out


def encode(reasoner, template, example: ReadingExample) -> tuple[list[int], list[int]]:
    """(prompt ids as the eval reader renders them, answer ids with the chat template's end-of-turn token)."""
    tok = reasoner.require_tokenizer()
    prompt = reasoner.chat_ids(template.messages(example.question, example.history))
    return prompt, tok(example.answer, add_special_tokens=False)["input_ids"] + [reasoner.end_of_turn_id]


def answer_loss(prefix, batch: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, int, int]:
    """(mean cross-entropy of the answer tokens, answer tokens, argmax hits) of the reasoner reading
    [prefix][prompt] and teacher-forced on the answer, right-padded in one batch."""
    from ..inject.splice import hidden_states_with_memory
    from ..memory.model import pad_rows
    from ..reasoner.head_loss import lm_head_cross_entropy

    reasoner = prefix.reasoner
    rows = [p + a for p, a in batch]
    ids, mask = pad_rows(rows, pad_id=0, device=reasoner.device)
    hidden = hidden_states_with_memory(reasoner, ids, mask, prefix.memory_kv(len(rows)))
    picks, targets = [], []
    for i, (p, a) in enumerate(batch):
        picks += [(i, j) for j in range(len(p) - 1, len(p) + len(a) - 1)]
        targets += a
    rows_i = torch.tensor([i for i, _ in picks], device=reasoner.device)
    cols = torch.tensor([j for _, j in picks], device=reasoner.device)
    y = torch.tensor(targets, device=reasoner.device)
    loss, hits = lm_head_cross_entropy(reasoner, hidden[rows_i, cols], y)
    return loss / len(targets), len(targets), int(hits)


@torch.no_grad()
def held_out(prefix, examples: list[ReadingExample], reader) -> dict:
    """Per layout: answers generated with the prefix and without it (share that contains the gold answer, as the
    eval scores), and the teacher-forced loss with the prefix."""
    from ..eval.metrics import score_answer

    out = {}
    for layout in LAYOUTS:
        rows = [e for e in examples if e.layout == layout]
        if not rows:
            continue
        scores = {}
        for name, use in (("with_prefix", prefix), ("without", None)):
            reader.prefix = use
            hits = [
                score_answer(reader.read(e.question, e.history).text, e.answer, aliases=e.aliases).contains
                for e in rows
            ]
            scores[name] = round(sum(hits) / len(hits), 4)
        encoded = [encode(prefix.reasoner, reader.template, e) for e in rows]
        losses = [float(answer_loss(prefix, encoded[i : i + 16])[0]) for i in range(0, len(encoded), 16)]
        out[layout] = {"questions": len(rows), **scores, "loss": round(sum(losses) / len(losses), 4)}
    reader.prefix = prefix
    return out


def run_reading(reasoner, cfg: ReadingConfig, output: str | Path) -> dict:
    from tqdm import tqdm

    from ..eval.reader import Reader
    from ..train.plots import MetricsLog
    from .prefix import ReadingPrefix, ReadingPrefixConfig

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    t0 = time.perf_counter()
    train = build_examples(cfg, reasoner, cfg.episodes, cfg.seed, cfg.window_tokens)
    held = build_examples(cfg, reasoner, cfg.eval_episodes, cfg.seed + 10_000, [cfg.eval_window_tokens])
    if not train or not held:
        raise ValueError("reading: no usable questions; raise episodes or eval_episodes")
    by_layout = {name: [e for e in train if e.layout == name] for name in LAYOUTS}
    ordinary, held_ordinary, pool = [], [], None
    if cfg.ordinary_share > 0:
        from ..engine import DecoderPool
        from ..eval.tasks.filler import filler_dialogues

        dialogues = filler_dialogues("train", cfg.data)
        random.Random(cfg.seed).shuffle(dialogues)
        cut = min(max(2, 2 * cfg.ordinary_eval_prompts), len(dialogues) // 2)
        pool = DecoderPool(reasoner, max_new_tokens=cfg.ordinary_tokens)
        held_ordinary = ordinary_examples(
            reasoner, dialogues[:cut], cfg.ordinary_eval_prompts, cfg.seed + 1, pool
        )
        ordinary = ordinary_examples(reasoner, dialogues[cut:], cfg.ordinary_prompts, cfg.seed, pool)
        if not ordinary or not held_ordinary:
            raise ValueError("reading: no ordinary replies could be made; set ordinary_share to 0")
    data_seconds = time.perf_counter() - t0
    logger.info("%d training and %d held-out prompts built in %.1f s", len(train), len(held), data_seconds)
    prefix = ReadingPrefix.from_text(reasoner, ReadingPrefixConfig(num_slots=cfg.num_slots))
    reader = Reader(reasoner, prefix=prefix)
    optimizer = torch.optim.AdamW(prefix.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps, eta_min=cfg.lr * 0.1)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(output / "metrics.jsonl")
    curve = []
    start = time.perf_counter()

    def evaluate(step: int) -> None:
        entry = {
            "step": step,
            **held_out(prefix, held, reader),
            **({"ordinary": ordinary_held_out(prefix, held_ordinary, pool)} if held_ordinary else {}),
            "seconds": round(time.perf_counter() - start, 1),
        }
        curve.append(entry)
        metrics.write({"eval": entry})
        logger.info("reading eval %s", json.dumps(entry))

    evaluate(0)
    bar = tqdm(range(1, cfg.steps + 1), desc="reading prefix", unit="step")
    for step in bar:
        batch = []
        for name in rng.choices(LAYOUTS, weights=cfg.layout_weights, k=cfg.batch):
            if ordinary and rng.random() < cfg.ordinary_share:
                row = rng.choice(ordinary)
                batch.append((row.prompt, row.reply))
            else:
                batch.append(encode(reasoner, reader.template, rng.choice(by_layout[name])))
        loss, tokens, hits = answer_loss(prefix, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        metrics.write(
            {"step": step, "loss": round(float(loss.detach()), 4), "token_accuracy": round(hits / tokens, 4)}
        )
        bar.set_postfix(loss=round(float(loss.detach()), 3))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evaluate(step)
    prefix.config.trained = {
        "steps": cfg.steps,
        "task": "synthetic",
        "split": "train",
        "prompts": len(train),
        "layouts": dict(zip(LAYOUTS, cfg.layout_weights, strict=True)),
        "ordinary_share": cfg.ordinary_share,
        "window_tokens": list(cfg.window_tokens),
        "heldout": {k: v for k, v in curve[-1].items() if k not in ("step", "seconds")},
    }
    prefix.save_pretrained(output / "prefix")
    report = {
        "config": asdict(cfg),
        "train_prompts": len(train),
        "heldout_prompts": len(held),
        "ordinary_prompts": len(ordinary),
        "heldout_ordinary_prompts": len(held_ordinary),
        "data_seconds": round(data_seconds, 1),
        "curve": curve,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (output / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    from ..bench.record import provenance, save_result
    from ..online.offline_run import config_from_args, config_parser
    from ..reasoner import load_reasoner

    p = config_parser(
        "python -m memsplice.reading.train", __doc__, ReadingConfig, "unused: a prefix needs no memory"
    )
    args = p.parse_args(argv)
    if args.checkpoint:
        p.error("--checkpoint: a reading prefix is trained for the reasoner alone, with no memory")
    cfg = config_from_args(ReadingConfig, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    reasoner = load_reasoner(args.reasoner, device=args.device, dtype=args.dtype)
    started = provenance(reasoner.device)
    report = run_reading(reasoner, cfg, args.output)
    if args.record:
        print(f"saved {save_result(args.record, {**report, **started}, device=reasoner.device)}")
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
