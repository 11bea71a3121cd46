"""`memsplice bench online`: what conversation memory costs, and whether online learning stays stable.

Parts (`--part`):
- `cost`: a conversation of real dialogue turns is written into a `ConversationMemory` turn by turn until the history
  reaches `--history-tokens`; per-turn write time (mean, p50, p95), tokens the encoder read per turn, slots in use,
  and the KV bytes the memory holds against the KV bytes the full history would take in context (`kv_fraction`).
  Answer latency: `--answer-tokens` greedy tokens for a question with that memory, and with no memory. For contrast,
  a Mem0-style text-memory write measured with the same reasoner on the same device: one LLM call that extracts
  facts from the turn and one that decides ADD/UPDATE/DELETE against retrieved memories (`--mem0-extract-tokens` +
  `--mem0-update-tokens` generated tokens). A hosted Mem0 uses a larger LLM over an API, so this is a lower bound
  on its write cost, not a measurement of Mem0 itself.
- `stability`: a stream of interactions (consecutive dialogue turns of one long conversation, with fact statements
  spliced into its first part) drives `OnlineLearner` for `--updates` updates or `--max-seconds` (or
  `--stop-after-updates`), whichever ends first. Every `--eval-every` updates: accuracy on the early facts (memory
  written from the history that holds the fact, re-encoded with the current weights; the reasoner answers the
  question, teacher-forced: answer-token accuracy and exact match; asked as a bare chat turn, and again in the eval
  reader's prompt as `reader_*`, the forgetting drop being taken on the first), and the perplexity of held-out prose
  with memory of the text before it injected (gate as learned). `--variant ewc_replay` (EWC + replay, the default
  config) or `plain` (both off) for the contrast; `--rehearsal N` adds skill rehearsal to either (N questions per
  update answered from a memory of their evidence, from the synthetic task's train split: `online.rehearsal`; the
  result is then `online-stability-<variant>-rehearsal`); `--guard-tolerance T` adds a skill guard (`online.guard`:
  at every anchor refresh a canary set of train-split questions is answered from memory, and the updates since the
  last refresh are rolled back when its score fell more than T below the start; `-guard` is added to the name; the
  early facts are never part of the canary); `--consolidation-weight W` adds write consolidation
  (`online.consolidation`: the writes of a uniform sample of past histories, as the memory wrote them right after
  seeing them, are held with weight W; `-consolidation` is added to the name). With `--state DIR` a run spans several commands: each
  continues where the last stopped (the learner with its optimizer, anchor, Fisher, replay and generators; the
  position in the stream, which is rebuilt from the seed; the curve, losses and update times; the seconds so far)
  and saves that into DIR, atomically, at every evaluation and when it stops. Such a run evaluates on the
  `--eval-every` grid and at its end only, so that it computes what one command would; arguments that define the run
  must match the saved ones. The result reports `segments` (commands that ran part of the stream), `complete`, and
  `seconds` over all of them.
- `recall`: the eval harness's synthetic multi-session task (test split) at `--history-tokens` with the systems
  `latent`, `latent+window`, `rag-bm25` and `oracle` (only the evidence turns in context); accuracy per length and
  system (the task's main metric), plus the latent systems' KV bytes against full context. Needs `memsplice.eval`.
- `summary`: merges the saved cost and stability results into benchmarks/results/summary.json under "online".

Every number is saved with `memsplice.bench.record` (command, commit, device, date) when `--save` is given.
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_directory
from ..cli.common import add_chunk_reading_flags, add_reading_prefix_flag
from ..devices import synchronize
from .record import RESULTS_DIR, save_result, update_summary

logger = logging.getLogger(__name__)

RELATIONS = (
    "sister",
    "brother",
    "cousin",
    "neighbour",
    "colleague",
    "aunt",
    "uncle",
    "friend",
    "boss",
    "landlord",
)
NAMES = (
    "Ada",
    "Bram",
    "Clea",
    "Dario",
    "Elif",
    "Femi",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kaia",
    "Luca",
    "Mira",
    "Nils",
    "Oona",
    "Pavel",
    "Rosa",
    "Sami",
    "Tilde",
    "Umar",
    "Vera",
    "Wim",
    "Xenia",
    "Yusuf",
    "Zora",
)
CITIES = (
    "Lisbon",
    "Porto",
    "Lyon",
    "Oslo",
    "Bergen",
    "Krakow",
    "Seville",
    "Ghent",
    "Utrecht",
    "Tallinn",
    "Riga",
    "Zagreb",
    "Graz",
    "Bologna",
    "Turin",
    "Dublin",
    "Galway",
    "Cardiff",
    "Leeds",
    "Aarhus",
    "Malmo",
    "Geneva",
    "Basel",
    "Bremen",
    "Leipzig",
    "Dresden",
    "Munich",
    "Naples",
    "Palermo",
    "Brno",
)


def add_arguments(p):
    p.add_argument("--part", choices=["cost", "stability", "recall", "summary"], default="cost")
    p.add_argument("--reasoner", default=None, help="reasoner source (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument(
        "--checkpoint", default=None, help="memory checkpoint (default: the shipped one, else untrained)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument(
        "--data", default=None, help="corpus directory (default: $MEMSPLICE_DATA or the bundled sample)"
    )
    p.add_argument("--seed", type=int, default=0)
    # cost
    p.add_argument(
        "--history-tokens",
        type=int,
        nargs="+",
        default=[16384],
        help="history lengths (reasoner tokens) to write (cost)",
    )
    p.add_argument(
        "--slot-budget",
        type=int,
        default=None,
        help="ConversationConfig.slot_budget of latent and latent+window (default: history tokens / 16 for each length; "
        "the address-head pick systems keep every chunk)",
    )
    p.add_argument(
        "--chunk-tokens",
        type=int,
        default=None,
        help="history tokens per chunk memory (cost, recall; default: the memory's chunk_tokens)",
    )
    p.add_argument(
        "--refine-steps",
        type=int,
        default=None,
        metavar="N",
        help="write-time refinement steps of every chunk memory (cost, recall; default: the checkpoint's)",
    )
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--mem0-turns", type=int, default=8, help="turns timed for the Mem0-style write")
    p.add_argument("--mem0-extract-tokens", type=int, default=64)
    p.add_argument("--mem0-update-tokens", type=int, default=48)
    # recall
    p.add_argument("--systems", nargs="+", default=["latent", "latent+window", "rag-bm25", "oracle"])
    p.add_argument("--examples", type=int, default=2, help="episodes per history length (recall)")
    p.add_argument(
        "--select-chunks",
        type=int,
        default=2,
        help="latent-select, latent-readback: chunk memories each question reads (recall; default: 2)",
    )
    add_chunk_reading_flags(p)  # recall
    add_reading_prefix_flag(p)  # recall
    p.add_argument(
        "--window-tokens",
        type=int,
        default=1024,
        help="latent+window systems: the most recent history kept as text, in reasoner tokens (recall; default: "
        "%(default)s)",
    )
    p.add_argument(
        "--encode-batch",
        type=int,
        default=None,
        metavar="N",
        help="latent systems: chunks encoded (and refined) per call when a write changed several (recall)",
    )
    p.add_argument(
        "--write-turns",
        type=int,
        default=1,
        metavar="N",
        help="latent systems: turns per memory write (recall; 1: after every turn; more: a backlog at once, its "
        "chunks encoded and refined in batches; default: 1)",
    )
    p.add_argument(
        "--values",
        choices=("pools", "open"),
        default="pools",
        help="the synthetic task's values: from its pools, or made up for every fact (recall; default: pools)",
    )
    p.add_argument(
        "--time-budget", type=float, default=None, help="start no new episode after this long (recall)"
    )
    # stability
    p.add_argument("--variant", choices=["ewc_replay", "plain"], default="ewc_replay")
    p.add_argument("--updates", type=int, default=10000)
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="stop this command's part of the stream after this long (stability; with --state a later command "
        "continues it)",
    )
    p.add_argument(
        "--stop-after-updates",
        type=int,
        default=None,
        help="stop this command after this many updates of its own (stability; with --state a later command "
        "continues it)",
    )
    p.add_argument(
        "--state",
        default=None,
        metavar="DIR",
        help="resumable stability run: continue the run saved in DIR (same arguments required), save it there at "
        "every evaluation and when this command stops",
    )
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=2, help="interactions per update")
    p.add_argument("--replay", type=int, default=2, help="replayed interactions per update (ewc_replay)")
    p.add_argument("--ewc-weight", type=float, default=10.0)
    p.add_argument(
        "--rehearsal",
        type=int,
        default=0,
        help="rehearsal items per update: questions answered from a memory of their evidence, from the synthetic "
        "task's train split (online.rehearsal; any variant; 0: off)",
    )
    p.add_argument(
        "--rehearsal-questions", type=int, default=512, help="size of the rehearsal set (with --rehearsal)"
    )
    p.add_argument(
        "--rehearsal-prompts",
        choices=("reader", "chat", "both"),
        default="reader",
        help="how rehearsal asks: the eval reader's prompt, the bare question as a chat turn (as the stability "
        "probe asks), or every other item each way (with --rehearsal; default: reader)",
    )
    p.add_argument(
        "--consolidation-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="write consolidation (online.consolidation): weight of the relative error between what the memory "
        "writes now for held past histories and what it wrote for them then (any variant; 0: off)",
    )
    p.add_argument(
        "--consolidation-items",
        type=int,
        default=256,
        help="past interactions whose writes are held (with --consolidation-weight)",
    )
    p.add_argument(
        "--consolidation-per-update",
        type=int,
        default=4,
        help="held writes compared per update (with --consolidation-weight)",
    )
    p.add_argument(
        "--guard-tolerance",
        type=float,
        default=None,
        metavar="T",
        help="skill guard (online.guard): at every anchor refresh, roll the memory back to the anchor when its "
        "canary score fell more than T (a share, e.g. 0.01) below the starting score (any variant; default: off)",
    )
    p.add_argument(
        "--guard-questions",
        type=int,
        default=128,
        help="canary questions of the skill guard (with --guard-tolerance)",
    )
    p.add_argument(
        "--anchor-interval", type=int, default=200, help="interaction steps between anchor refreshes"
    )
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--context-tokens", type=int, default=128)
    p.add_argument("--target-tokens", type=int, default=32)
    p.add_argument("--contrastive-weight", type=float, default=0.1)
    p.add_argument(
        "--objective-schedule",
        choices=["all", "alternate"],
        default="alternate",
        help="next-token and denoising in every update, or one of them per update (half the cost)",
    )
    p.add_argument("--facts", type=int, default=64, help="facts spliced into the start of the stream")
    p.add_argument("--ppl-passages", type=int, default=32)
    p.add_argument("--compile", action="store_true", help="torch.compile the reasoner's decoder layers")
    p.add_argument("--results", default=None, help="results directory (default: benchmarks/results)")
    p.add_argument("--save", action="store_true", help="save results (and summary.json for --part summary)")
    p.add_argument(
        "--record",
        default=None,
        metavar="NAME",
        help="with --save: save as NAME.json instead of the part's default name (online-cost, online-recall, ...)",
    )
    p.add_argument("--json", action="store_true")


# -- data ----------------------------------------------------------------------------------------------------
def dialogue_turns(data: str | None, split: str, seed: int):
    """(role, text) turns of many dialogues, shuffled by dialogue, endlessly (the second pass reshuffles)."""
    from ..data import bundled_dialogues, iter_dialogues

    try:
        dialogues = list(iter_dialogues(data, split=split))
    except FileNotFoundError:
        dialogues = []
    if not dialogues:
        dialogues = bundled_dialogues(split=split) or bundled_dialogues()
    rng = random.Random(seed)
    epoch = 0
    while True:
        order = list(range(len(dialogues)))
        rng.shuffle(order)
        for i in order:
            for k, (_, text) in enumerate(dialogues[i].turns):
                yield ("user" if k % 2 == 0 else "assistant"), text, epoch
        epoch += 1


def heldout_prose(data: str | None, count: int) -> list[str]:
    from ..data import bundled_dialogues, iter_documents

    try:
        texts = [d.text for d in iter_documents(data, split="heldout")]
    except FileNotFoundError:
        texts = []
    if not texts:
        # No corpus directory: the held-out dialogues of the bundled sample, as plain text in blocks.
        joined = " ".join(t for d in bundled_dialogues(split="heldout") for _, t in d.turns)
        texts = [joined[i : i + 1500] for i in range(0, len(joined), 1500)]
    random.Random(1234).shuffle(texts)
    return texts  # callers take the first `count` that are long enough


def make_fact(rng: random.Random, used: set) -> tuple[str, str, str, str]:
    while True:
        rel, name, city = rng.choice(RELATIONS), rng.choice(NAMES), rng.choice(CITIES)
        if (rel, name) not in used:
            used.add((rel, name))
            break
    return (
        f"By the way, my {rel} {name} lives in {city} now.",
        f"Good to know, your {rel} {name} lives in {city}.",
        f"Where does my {rel} {name} live?",
        city,
    )


def tokenized_exchanges(tok, template: str, turns, first_batch: int = 64, max_batch: int = 4096):
    """(x ids, y ids, epoch of y) for consecutive pairs of `turns` (x read as the user's, y as the assistant's),
    the same ids as tokenizing each turn on its own, but tokenized many turns per tokenizer call (batches grow from
    `first_batch` to `max_batch` exchanges, so a short stream tokenizes little ahead)."""
    batch = first_batch
    while True:
        pairs = [(next(turns), next(turns)) for _ in range(batch)]
        texts = [
            template.format(role=role, text=turn[1])
            for pair in pairs
            for role, turn in zip(("user", "assistant"), pair, strict=True)
        ]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        for k, (_, (_, _, epoch)) in enumerate(pairs):
            yield ids[2 * k], ids[2 * k + 1], epoch
        batch = min(2 * batch, max_batch)


def build_stream(tok, template: str, args, n_interactions: int):
    """Interactions of fixed shape (context: the last `context_tokens` tokens of the history; x_t y_t: at least
    `target_tokens` + 1 tokens) from one long conversation, with `args.facts` fact exchanges in its first part.

    Returns (interactions, probes, epochs): a probe holds a fact's question, answer and the history right after the
    fact was told (what memory is written from when the fact is asked about); epochs counts passes over the corpus.
    """
    from ..online import Interaction

    rng = random.Random(args.seed)
    dialogue = tokenized_exchanges(tok, template, dialogue_turns(args.data, "train", args.seed))

    def ids(role, text):
        return tok(template.format(role=role, text=text), add_special_tokens=False)["input_ids"]

    history: list[int] = []
    stream, probes, used = [], [], set()
    epochs = 0
    exchanges = 0
    while len(stream) < n_interactions:
        exchanges += 1
        probe = None
        if len(probes) < args.facts and exchanges % 4 == 0 and len(history) >= args.context_tokens:
            x, y, question, answer = make_fact(rng, used)
            probe = {"question": question, "answer": answer}
            q_ids, r_ids = ids("user", x), ids("assistant", y)
        else:
            q_ids, r_ids, e = next(dialogue)
            epochs = max(epochs, e)
        if len(history) >= args.context_tokens and len(q_ids) + len(r_ids) > args.target_tokens:
            stream.append(
                Interaction(id=-1, context=history[-args.context_tokens :], query=q_ids, response=r_ids)
            )
        history = (history + q_ids + r_ids)[-4 * args.context_tokens :]
        if probe is not None:
            probe["context"] = history[-args.context_tokens :]
            probes.append(probe)
    return stream, probes, epochs


# -- measurements ----------------------------------------------------------------------------------------------
@torch.no_grad()
def fact_accuracy(memory, probes: list[dict], prompt: str = "chat") -> dict:
    """Teacher-forced answer accuracy for each probe: memory of its context, then the question, asked as the bare
    user turn of the chat template (`prompt="chat"`, as `memsplice chat` and the server pass it on) or in the eval
    reader's prompt (`"reader"`, its system message and "Short answer:", as the latent eval systems ask)."""
    from ..eval.reader import PromptTemplate
    from ..inject import forward_with_memory
    from ..memory.model import pad_rows

    if prompt not in ("chat", "reader"):
        raise ValueError(f'fact_accuracy: prompt must be "chat" or "reader" (got {prompt!r})')

    reasoner = memory.reasoner
    tok = reasoner.require_tokenizer()
    memory.eval()
    ctx, cmask = pad_rows([p["context"] for p in probes], pad_id=0, device=reasoner.device)
    mem = memory.write(ctx, cmask)
    rows, spans = [], []
    for p in probes:
        messages = (
            PromptTemplate().messages(p["question"], None)
            if prompt == "reader"
            else [{"role": "user", "content": p["question"]}]
        )
        asked = reasoner.chat_ids(messages)
        answer = tok(p["answer"], add_special_tokens=False)["input_ids"]
        rows.append(asked + answer)
        spans.append((len(asked), len(answer)))
    ids, mask = pad_rows(rows, pad_id=0, device=reasoner.device, left=True)
    logits = forward_with_memory(reasoner, ids, mask, mem.kv).logits.float()
    hits, exact, total = 0, 0, 0
    t = ids.shape[1]
    for i, (start, n) in enumerate(spans):
        offset = t - len(rows[i])
        pred = logits[i, offset + start - 1 : offset + start + n - 1].argmax(-1)
        gold = ids[i, offset + start : offset + start + n]
        ok = (pred == gold).sum().item()
        hits, total, exact = hits + ok, total + n, exact + int(ok == n)
    return {"token_accuracy": hits / max(total, 1), "exact": exact / max(len(probes), 1)}


def prose_passages(
    tok, data, count: int, memory_tokens: int, target_tokens: int
) -> list[tuple[list[int], list[int]]]:
    out = []
    for text in heldout_prose(data, count):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= memory_tokens + target_tokens:
            out.append((ids[:memory_tokens], ids[memory_tokens : memory_tokens + target_tokens]))
        if len(out) == count:
            break
    return out


@torch.no_grad()
def prose_perplexity(memory, passages, with_memory: bool = True) -> float:
    from ..inject import forward_with_memory

    reasoner = memory.reasoner
    memory.eval()
    ctx = torch.tensor([p[0] for p in passages], device=reasoner.device)
    text = torch.tensor([p[1] for p in passages], device=reasoner.device)
    kv = memory.write(ctx).kv if with_memory else None
    logits = forward_with_memory(reasoner, text, None, kv).logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), text[:, 1:].reshape(-1)
    )
    return math.exp(float(nll))


def _compile_layers(reasoner) -> None:
    for layer in reasoner.decoder.layers:
        layer.compile(dynamic=False)


def _uncompile_layers(reasoner) -> None:
    for layer in reasoner.decoder.layers:
        layer._compiled_call_impl = None


# -- resumable stability runs --------------------------------------------------------------------------------
STATE_FORMAT = 1
STATE_NAME = "stability_state.json"
STATE_RNG_NAME = "stability_rng.pt"
STATE_LEARNER = "learner"
RUN_ARGUMENTS = (
    "variant",
    "seed",
    "reasoner",
    "checkpoint",
    "data",
    "device",
    "dtype",
    "updates",
    "eval_every",
    "batch_size",
    "replay",
    "ewc_weight",
    "rehearsal",
    "rehearsal_questions",
    "rehearsal_prompts",
    "consolidation_weight",
    "consolidation_items",
    "consolidation_per_update",
    "guard_tolerance",
    "guard_questions",
    "anchor_interval",
    "lr",
    "context_tokens",
    "target_tokens",
    "contrastive_weight",
    "objective_schedule",
    "facts",
    "ppl_passages",
)
"""The arguments that define a stability run (its stream, its updates, its evaluations): a saved state is resumed
only under the same values. --max-seconds, --stop-after-updates and --compile say how one command runs its part."""


@dataclass
class StabilityProgress:
    """Where a stability run stands: what `--state DIR` saves, and what a later command continues from."""

    arguments: dict
    """The run's RUN_ARGUMENTS (paths resolved; `data` is the corpus directory used, or "bundled")."""
    position: int = 0
    """Interactions of the stream observed so far: the stream is rebuilt from the seed, and this indexes it."""
    updates: int = 0
    curve: list[dict] = field(default_factory=list)
    """Evaluations so far; the first (update 0) is the baseline that every drop is measured against."""
    losses: list[float] = field(default_factory=list)
    update_seconds: list[float] = field(default_factory=list)
    bare_perplexity: float | None = None
    seconds: float = 0.0
    """Seconds of the stream over all commands so far (its evaluations included, set-up not)."""
    segments: int = 0
    """Commands that ran part of the stream."""
    stopped_by: str | None = None
    complete: bool = False
    """The stream ended (all --updates done, or the stream ran out): a later command has nothing to add."""
    compiled: bool = False


def run_arguments(args) -> dict:
    """RUN_ARGUMENTS of `args`, with paths made absolute and the corpus directory that --data resolves to."""
    from ..data import data_root

    out = {}
    for name in RUN_ARGUMENTS:
        value = getattr(args, name)
        if name == "data":
            try:
                value = str(data_root(value).resolve())
            except FileNotFoundError:
                value = "bundled"
        elif name in ("reasoner", "checkpoint") and value is not None and Path(value).exists():
            value = str(Path(value).resolve())
        out[name] = value
    return out


def load_stability_state(directory: str | Path, args) -> StabilityProgress | None:
    """The progress saved in `directory` (None when it holds none yet); refuses a state of another run."""
    directory = Path(directory)
    path = directory / STATE_NAME
    if not path.is_file():
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise ValueError(
                f"--state {directory} exists but holds no stability state ({STATE_NAME} is missing); "
                "give a new or empty directory"
            )
        return None
    data = json.loads(path.read_text())
    if data.pop("format", None) != STATE_FORMAT:
        raise ValueError(f"{path} is not a stability state of format {STATE_FORMAT}")
    progress = StabilityProgress(**data)
    given = run_arguments(args)
    differ = [
        f"--{name.replace('_', '-')} {progress.arguments.get(name)!r} there, {value!r} here"
        for name, value in given.items()
        if progress.arguments.get(name) != value
    ]
    if differ:
        raise ValueError(
            f"--state {directory} holds a stability run with other arguments ({'; '.join(differ)}): resume it "
            "with the arguments it was started with, or give another --state directory"
        )
    return progress


def save_stability_state(directory: str | Path, learner, progress: StabilityProgress) -> Path:
    """Write the learner (weights, optimizer, anchor, Fisher, replay, buffer, counters, its generators), the torch
    generators and `progress` into `directory`, atomically: a command killed while writing leaves the previous
    state."""
    device = torch.device(learner.reasoner.device)
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    with atomic_directory(directory) as tmp:
        learner.save(tmp / STATE_LEARNER)
        torch.save(rng, tmp / STATE_RNG_NAME)
        (tmp / STATE_NAME).write_text(json.dumps({"format": STATE_FORMAT, **asdict(progress)}))
    return Path(directory)


def _restore_generators(directory: Path, device) -> None:
    rng = torch.load(directory / STATE_RNG_NAME, weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], torch.device(device))


# -- parts ---------------------------------------------------------------------------------------------------
def _rehearsal_set(args, memory):
    """The rehearsal set of a stability run with --rehearsal (train split, a seed of its own), else None."""
    if not args.rehearsal:
        return None
    from ..online import default_rehearsal

    return default_rehearsal(
        memory,
        args.rehearsal_questions,
        seed=args.seed + 1000,
        prompts=args.rehearsal_prompts,
        data=args.data,
    )


def _guard(args, memory):
    """The skill guard of a stability run with --guard-tolerance (train split, a seed of its own), else None."""
    if args.guard_tolerance is None:
        return None
    from ..online import default_guard
    from ..online.guard import GUARD_SEED

    return default_guard(
        memory, args.guard_tolerance, args.guard_questions, seed=args.seed + GUARD_SEED, data=args.data
    )


def stability_name(args) -> str:
    """The result's name: online-stability-<variant>, with -rehearsal when the run rehearses, -consolidation when it
    holds past writes and -guard when a skill guard checks it."""
    return (
        f"online-stability-{args.variant}"
        + ("-rehearsal" if args.rehearsal else "")
        + ("-consolidation" if args.consolidation_weight > 0 else "")
        + ("-guard" if args.guard_tolerance is not None else "")
    )


def run_stability(args, reasoner, memory) -> dict:
    """The stability stream (see the module docstring). With `args.state`, resumable: the run continues from the
    state saved there (same arguments required), saves it again at every evaluation and when this command stops,
    and evaluates only on the --eval-every grid and at the end of the stream, so that a run split over several
    commands computes what one command would (the same weights, losses and curve)."""
    from ..online import OnlineConfig, OnlineLearner

    cfg = OnlineConfig(
        batch_size=args.batch_size,
        lr=args.lr,
        context_tokens=args.context_tokens,
        target_tokens=args.target_tokens,
        contrastive_weight=args.contrastive_weight,
        anchor_interval=args.anchor_interval,
        seed=args.seed,
        objective_schedule=args.objective_schedule,
        ewc_weight=args.ewc_weight if args.variant == "ewc_replay" else 0.0,
        replay_per_update=args.replay if args.variant == "ewc_replay" else 0,
        rehearsal_per_update=args.rehearsal,
        consolidation_weight=args.consolidation_weight,
        consolidation_capacity=args.consolidation_items,
        consolidation_per_update=args.consolidation_per_update,
        guard_tolerance=args.guard_tolerance,
    )
    state = Path(args.state) if args.state else None
    progress = load_stability_state(state, args) if state is not None else None
    resumed = progress is not None
    if progress is None:
        learner = OnlineLearner(
            memory, cfg, rehearsal=_rehearsal_set(args, memory), guard=_guard(args, memory)
        )
        progress = StabilityProgress(arguments=run_arguments(args))
    else:
        learner = OnlineLearner.load(state / STATE_LEARNER, reasoner=reasoner)
        if learner.config.to_dict() != cfg.to_dict():
            raise ValueError(
                f"--state {state}: the saved learner's config differs from the one these arguments give"
            )
        memory = learner.memory
        logger.info(
            "resuming %s from %s: update %d, interaction %d, %d command(s) so far",
            args.variant,
            state,
            progress.updates,
            progress.position,
            progress.segments,
        )
    tok = reasoner.require_tokenizer()
    t0 = time.perf_counter()
    stream, probes, epochs = build_stream(tok, "{role}: {text}\n", args, args.updates * args.batch_size)
    passages = prose_passages(tok, args.data, args.ppl_passages, args.context_tokens, 64)
    logger.info(
        "stream of %d interactions, %d fact probes, %d prose passages built in %.1f s",
        len(stream),
        len(probes),
        len(passages),
        time.perf_counter() - t0,
    )
    if not probes or not passages:
        raise ValueError("stability: could not build fact probes or held-out passages; check --data")
    if progress.bare_perplexity is None:
        progress.bare_perplexity = prose_perplexity(memory, passages, with_memory=False)
    curve, losses, update_seconds = progress.curve, progress.losses, progress.update_seconds
    seconds_before = progress.seconds

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - start

    def evaluate(update: int):
        acc = fact_accuracy(memory, probes)
        reader = fact_accuracy(memory, probes, prompt="reader")
        curve.append(
            {
                "update": update,
                "seconds": round(elapsed(), 2),
                **acc,
                "reader_token_accuracy": reader["token_accuracy"],
                "reader_exact": reader["exact"],
                "perplexity": prose_perplexity(memory, passages),
            }
        )
        logger.info("update %d: %s", update, curve[-1])

    def save(stopped_by: str | None, complete: bool) -> None:
        progress.position, progress.updates = i, learner.updates
        progress.seconds, progress.stopped_by, progress.complete = elapsed(), stopped_by, complete
        progress.compiled = compiled
        save_stability_state(state, learner, progress)

    if resumed:
        _restore_generators(state, reasoner.device)  # after everything above that may have drawn from them
    compiled = progress.compiled if progress.complete else args.compile
    if compiled and not progress.complete:
        _compile_layers(reasoner)
    start = time.perf_counter()
    i = progress.position
    stopped = progress.stopped_by or "updates"
    if not progress.complete:
        progress.segments += 1
        if not curve:
            evaluate(0)
        from tqdm import tqdm

        bar = tqdm(
            total=args.updates, initial=learner.updates, desc=f"online updates ({args.variant})", unit="upd"
        )
        this_command = 0
        stopped = "updates"
        while learner.updates < args.updates:
            if args.max_seconds and time.perf_counter() - start > args.max_seconds:
                stopped = "max_seconds"
                break
            if args.stop_after_updates is not None and this_command >= args.stop_after_updates:
                stopped = "stop_after_updates"
                break
            if i >= len(stream):
                stopped = "stream"
                break
            try:
                stats, _ = learner.observe(stream[i])
            except Exception:
                if not compiled:
                    raise
                logger.exception("compiled layers failed; continuing without torch.compile")
                _uncompile_layers(reasoner)
                compiled = False
                learner.buffer.items.clear()
                continue
            i += 1
            if stats is None:
                continue
            this_command += 1
            bar.update(1)
            losses.append(stats.loss)
            update_seconds.append(stats.seconds)
            if learner.updates % args.eval_every == 0:
                evaluate(learner.updates)
                if state is not None and learner.updates < args.updates:
                    save(None, False)  # a point to resume from should this command not get to its end
        bar.close()
        complete = stopped in ("updates", "stream")
        # A command that stops before the end of a resumable run leaves the curve on the --eval-every grid.
        if (complete or state is None) and curve[-1]["update"] != learner.updates:
            evaluate(learner.updates)
        progress.seconds, progress.complete = elapsed(), complete
        if state is not None:
            save(stopped, complete)
            logger.info("state saved in %s (%s)", state, "complete" if complete else f"stopped by {stopped}")
    first, last = curve[0], curve[-1]
    base_acc = first["token_accuracy"]
    return {
        "variant": args.variant,
        "updates": learner.updates,
        "updates_target": args.updates,
        "stopped_by": stopped,
        "complete": progress.complete,
        "segments": progress.segments,
        "interactions": i,
        "stream_epochs": epochs,
        "config": cfg.to_dict(),
        "compiled": compiled,
        "facts": len(probes),
        "rehearsal": None if learner.rehearsal is None else learner.rehearsal.source,
        "guard": None if learner.guard is None else _guard_report(learner.guard),
        "ppl_passages": len(passages),
        "bare_perplexity": progress.bare_perplexity,
        "curve": curve,
        "forgetting_drop": max(0.0, (base_acc - last["token_accuracy"]) / base_acc) if base_acc > 0 else None,
        "forgetting_drop_exact": (
            max(0.0, (first["exact"] - last["exact"]) / first["exact"]) if first["exact"] > 0 else None
        ),
        "forgetting_drop_reader": (
            max(0.0, 1 - last["reader_token_accuracy"] / first["reader_token_accuracy"])
            if first.get("reader_token_accuracy") and "reader_token_accuracy" in last
            else None
        ),
        "perplexity_drop": max(0.0, (last["perplexity"] - first["perplexity"]) / first["perplexity"]),
        "mean_update_ms": 1e3 * statistics.fmean(update_seconds) if update_seconds else None,
        "loss_first_100": statistics.fmean(losses[:100]) if losses else None,
        "loss_last_100": statistics.fmean(losses[-100:]) if losses else None,
        "seconds": round(progress.seconds, 1),
    }


def _guard_report(guard) -> dict:
    """What the skill guard did over the run: its canary, its reference, and every check (kept or rolled back)."""
    return {
        "canary": guard.canary.source,
        "canary_questions": len(guard.canary),
        "tolerance": guard.tolerance,
        "reference": guard.reference,
        "checks": len(guard.events),
        "rollbacks": guard.rollbacks,
        "events": [asdict(e) for e in guard.events],
    }


def _mem0_style_write_seconds(reasoner, turns: list[str], args) -> list[float]:
    """Two LLM calls per write, as Mem0 makes: fact extraction, then an ADD/UPDATE/DELETE decision."""
    memories = ["The user likes hiking.", "The user's sister lives in Porto.", "The user works as a nurse."]
    out = []
    for turn in turns:
        t0 = time.perf_counter()
        extract = reasoner.chat_ids(
            [
                {
                    "role": "system",
                    "content": "Extract the facts about the user in this "
                    "message as a JSON list of short strings.",
                },
                {"role": "user", "content": turn},
            ]
        )
        ids = torch.tensor([extract], device=reasoner.device)
        facts = reasoner.model.generate(
            input_ids=ids,
            max_new_tokens=args.mem0_extract_tokens,
            min_new_tokens=args.mem0_extract_tokens,
            do_sample=False,
            pad_token_id=reasoner.tokenizer.eos_token_id,
        )
        facts_text = reasoner.tokenizer.decode(facts[0, ids.shape[1] :], skip_special_tokens=True)
        decide = reasoner.chat_ids(
            [
                {
                    "role": "system",
                    "content": "For each new fact decide ADD, UPDATE or DELETE "
                    "against the existing memories; answer as JSON.",
                },
                {
                    "role": "user",
                    "content": "Existing memories:\n" + "\n".join(memories) + "\nNew facts:\n" + facts_text,
                },
            ]
        )
        ids = torch.tensor([decide], device=reasoner.device)
        reasoner.model.generate(
            input_ids=ids,
            max_new_tokens=args.mem0_update_tokens,
            min_new_tokens=args.mem0_update_tokens,
            do_sample=False,
            pad_token_id=reasoner.tokenizer.eos_token_id,
        )
        synchronize(reasoner.device)
        out.append(time.perf_counter() - t0)
    return out


def _median_generate_seconds(reasoner, prompt, memory, gen: dict, repeats: int = 3) -> float:
    from ..inject import generate_with_memory

    generate_with_memory(reasoner, prompt, None, memory, **gen)  # warm-up
    synchronize(reasoner.device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate_with_memory(reasoner, prompt, None, memory, **gen)
        synchronize(reasoner.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_cost(args, reasoner, memory) -> dict:
    from ..conversation import ConversationConfig, ConversationMemory

    tok = reasoner.require_tokenizer()
    s = reasoner.shapes
    per_token_kv = 2 * s.num_layers * s.num_kv_heads * s.head_dim * torch.finfo(reasoner.dtype).bits // 8
    results = []
    from tqdm import tqdm

    for target in args.history_tokens:
        budget = args.slot_budget or max(target // 16, 4 * memory.config.num_slots)
        conv = ConversationMemory(
            memory,
            ConversationConfig(
                slot_budget=budget, max_live_tokens=max(target, 65536), chunk_tokens=args.chunk_tokens
            ),
        )
        turns = dialogue_turns(args.data, "heldout", args.seed)
        writes, tokens = [], 0
        bar = tqdm(total=target, desc=f"writing {target} tokens", unit="tok")
        sample_turns = []
        while tokens < target:
            role, text, _ = next(turns)
            stats = conv.add_turn(role, text)
            synchronize(reasoner.device)
            writes.append(stats)
            tokens += stats.tokens
            bar.update(stats.tokens)
            if len(sample_turns) < args.mem0_turns and role == "user":
                sample_turns.append(text)
        bar.close()
        secs = sorted(w.seconds for w in writes[1:]) or [writes[0].seconds]
        kv = conv.memory_kv()
        prompt = torch.tensor(
            [reasoner.chat_ids([{"role": "user", "content": "What did I tell you about my family?"}])],
            device=reasoner.device,
        )
        gen = dict(
            max_new_tokens=args.answer_tokens,
            min_new_tokens=args.answer_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )

        mem0 = _mem0_style_write_seconds(reasoner, sample_turns, args)
        full_kv = tokens * per_token_kv
        results.append(
            {
                "history_tokens": tokens,
                "turns": len(writes),
                "slot_budget": budget,
                "slots": conv.num_slots,
                "write_ms_mean": 1e3 * statistics.fmean(secs),
                "write_ms_p50": 1e3 * secs[len(secs) // 2],
                "write_ms_p95": 1e3 * secs[min(len(secs) - 1, int(0.95 * len(secs)))],
                "encoded_tokens_per_turn": statistics.fmean(w.encoded_tokens for w in writes),
                "evicted_spans": sum(w.evicted for w in writes),
                "merges": sum(w.merges for w in writes),
                "memory_kv_bytes": kv.nbytes() if kv is not None else 0,
                "full_context_kv_bytes": full_kv,
                "kv_fraction": (kv.nbytes() / full_kv) if kv is not None else 0.0,
                "answer_ms_with_memory": 1e3 * _median_generate_seconds(reasoner, prompt, kv, gen),
                "answer_ms_no_memory": 1e3 * _median_generate_seconds(reasoner, prompt, None, gen),
                "answer_tokens": args.answer_tokens,
                "mem0_style_write_ms_mean": 1e3 * statistics.fmean(mem0) if mem0 else None,
                "mem0_style_generated_tokens": args.mem0_extract_tokens + args.mem0_update_tokens,
                "chunk_tokens": conv.chunk_tokens,
                "refine_steps": memory.config.refine_steps,
                "conversation_stats": conv.stats(),
            }
        )
        logger.info("cost at %d tokens: %s", target, results[-1])
    return {"lengths": results}


def run_recall(args, reasoner, on_length=None) -> dict:
    """Recall at each of `args.history_tokens`; `on_length(result so far)` after each length (e.g. to save it, so
    that a command stopped during a later length keeps the earlier ones)."""
    try:
        from ..eval import EvalConfig, SystemArgs, TaskArgs, run_eval
    except ImportError as e:
        raise NotImplementedError(f"--part recall needs the eval harness (memsplice.eval): {e}") from None
    s = reasoner.shapes
    results = {}
    cut = False  # a length whose time budget stopped it before every episode ran
    per_token_kv = 2 * s.num_layers * s.num_kv_heads * s.head_dim * torch.finfo(reasoner.dtype).bits // 8
    for length in args.history_tokens:
        budget = args.slot_budget or length // 16
        config = EvalConfig(
            task="synthetic",
            systems=tuple(args.systems),
            reasoner=args.reasoner,
            device=args.device,
            dtype=args.dtype,
            time_budget_s=args.time_budget,
            reading_prefix=args.reading_prefix,
            task_args=TaskArgs(
                examples=args.examples,
                lengths=(length,),
                seed=args.seed,
                split="test",
                values=args.values,
                data=Path(args.data) if args.data else None,
            ),
            system_args=SystemArgs(
                checkpoint=Path(args.checkpoint) if args.checkpoint else None,
                slot_budget=budget,
                chunk_tokens=args.chunk_tokens,
                select_chunks=args.select_chunks,
                recency_margin=args.recency_margin,
                extra_margin=args.extra_chunk_margin,
                readback_context=args.readback_context,
                window_tokens=args.window_tokens,
                refine_steps=args.refine_steps,
                write_turns=args.write_turns,
                encode_batch=args.encode_batch,
                seed=args.seed,
            ),
        )
        out = run_eval(config, reasoner=reasoner)
        cut = cut or out["episodes"] < out["episodes_planned"]
        metric = out["main_metric"]
        by_system: dict[str, list[float]] = {}
        slots: dict[str, list[float]] = {}
        answer_kv: dict[str, list[float]] = {}
        ttft: dict[str, list[float]] = {}
        for r in out["records"]:
            if r.get(metric) is not None:
                by_system.setdefault(r["system"], []).append(float(r[metric]))
            # memory K/V at answer over the K/V full context would hold, per question
            if r.get("memory_slots"):
                slots.setdefault(r["system"], []).append(r["memory_slots"] / max(r["history_tokens"], 1))
            # all K/V the answer held (memory, prompt, answer) over the K/V of the full history, per question
            if r.get("kv_bytes"):
                answer_kv.setdefault(r["system"], []).append(
                    r["kv_bytes"] / (max(r["history_tokens"], 1) * per_token_kv)
                )
            if r.get("ttft_s"):
                ttft.setdefault(r["system"], []).append(1e3 * r["ttft_s"])
        results[str(length)] = {
            "accuracy": {k: statistics.fmean(v) for k, v in by_system.items()},
            "metric": metric,
            "episodes": out["episodes"],
            "episodes_planned": out["episodes_planned"],
            "questions": out["questions"],
            "slot_budget": budget,
            "kv_fraction": budget * per_token_kv / (length * per_token_kv),
            "kv_fraction_measured": {k: statistics.fmean(v) for k, v in slots.items()},
            "kv_fraction_answer": {k: statistics.fmean(v) for k, v in answer_kv.items()},
            "ttft_ms": {k: statistics.fmean(v) for k, v in ttft.items()},
            "write_s_per_turn": {f["system"]: f["write_s_per_turn"] for f in out["feeds"]},
        }
        logger.info("recall at %d tokens: %s", length, results[str(length)]["accuracy"])
        if on_length is not None and len(results) < len(args.history_tokens):
            on_length(_recall_result(results, args, complete=False))
    return _recall_result(results, args, complete=not cut)


def _recall_result(results: dict, args, complete: bool) -> dict:
    return {
        "recall": {k: v["accuracy"] for k, v in results.items()},
        "kv_fraction": {k: v["kv_fraction_measured"] for k, v in results.items()},
        "kv_fraction_answer": {k: v["kv_fraction_answer"] for k, v in results.items()},
        "values": args.values,
        "lengths": results,
        "complete": complete,
    }


def run_summary(args) -> dict:
    directory = Path(args.results or RESULTS_DIR)
    out: dict = {}
    cost = directory / "online-cost.json"
    if cost.is_file():
        data = json.loads(cost.read_text())
        out["kv_fraction"] = {str(r["history_tokens"]): r["kv_fraction"] for r in data["lengths"]}
        out["write_ms_per_turn"] = {str(r["history_tokens"]): r["write_ms_mean"] for r in data["lengths"]}
        out["mem0_style_write_ms"] = {
            str(r["history_tokens"]): r["mem0_style_write_ms_mean"] for r in data["lengths"]
        }
        out["answer_ms"] = {str(r["history_tokens"]): r["answer_ms_with_memory"] for r in data["lengths"]}
    for variant, key in (
        ("ewc_replay", "with_ewc_replay"),
        ("plain", "without_ewc_replay"),
        ("ewc_replay-rehearsal", "with_ewc_replay_rehearsal"),
        ("plain-rehearsal", "with_rehearsal_only"),
        ("ewc_replay-guard", "with_ewc_replay_guard"),
        ("ewc_replay-rehearsal-guard", "with_ewc_replay_rehearsal_guard"),
        ("plain-guard", "with_guard_only"),
        ("ewc_replay-consolidation", "with_ewc_replay_consolidation"),
        ("plain-consolidation", "with_consolidation_only"),
    ):
        path = directory / f"online-stability-{variant}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            out.setdefault("forgetting_drop", {})[key] = data["forgetting_drop"]
            out.setdefault("perplexity_drop", {})[key] = data["perplexity_drop"]
            out.setdefault("stability_updates", {})[key] = data["updates"]
    recall = directory / "online-recall.json"
    if recall.is_file():
        data = json.loads(recall.read_text())
        out["recall"] = data.get("recall", {})
        # per length and system: memory K/V at answer over full-context K/V, measured
        if "kv_fraction" in data:
            out["recall_kv_fraction"] = data["kv_fraction"]
        out["recall_metric"] = next(iter(data.get("lengths", {}).values()), {}).get("metric")
    return out


def run(args) -> int:
    from ..checkpoints import load_memory
    from ..reasoner import load_reasoner

    torch.manual_seed(args.seed)
    directory = Path(args.results) if args.results else None
    if args.part == "summary":
        data = run_summary(args)
        if args.save:
            update_summary("online", data, directory=directory)
        print(json.dumps(data, indent=2))
        return 0
    reasoner = load_reasoner(args.reasoner, device=args.device, dtype=args.dtype)
    memory = load_memory(reasoner, args.checkpoint)
    memory.set_refine_steps(args.refine_steps)
    # what the recall systems read, so that the saved memory_config says it
    memory.set_recency_margin(args.recency_margin)
    memory.set_extra_margin(args.extra_chunk_margin)

    def save(data: dict, name: str):
        data["checkpoint"] = args.checkpoint
        data["memory_config"] = asdict(memory.config)
        if args.save:
            path = save_result(args.record or name, data, device=reasoner.device, directory=directory)
            print(f"saved {path}", file=sys.stderr if args.json else sys.stdout)  # --json: stdout is JSON

    if args.part == "cost":
        data = run_cost(args, reasoner, memory)
        name = "online-cost"
    elif args.part == "recall":
        name = "online-recall"
        data = run_recall(args, reasoner, on_length=lambda partial: save(partial, name))
    else:
        data = run_stability(args, reasoner, memory)
        name = stability_name(args)
    save(data, name)
    if args.json or not args.save:
        print(json.dumps(data, indent=2, default=str))
    return 0
