"""`memsplice bench fidelity`: held-out reconstruction at 4x-32x compression, next to the baselines.

For each passage length (default 64, 128, 256 and 512 tokens, i.e. 4x-32x into 16 slots) and each system, the
teacher-forced token accuracy and exact-match rate of regenerating held-out passages (see memsplice.train.evaluate):
    latent      a trained memory checkpoint (one row per --checkpoint; each names its injection operator)
    latent_refined  --refine-steps N: the same checkpoints with N steps of write-time refinement of the latents
                (`memsplice.memory.refine`: Adam on the latents against reading the passage back), one row per N
    floor       the reasoner with no memory at all, reading the same instruction and passage
    causal      --causal: a memory whose latents are the reasoner's own hidden states, pooled into slots
    prior_init  --prior: a memory whose encoder started from the reasoner's layers instead of at random
Passages come from the held-out side of the fixed corpus split, never trained on, identical for every system.
With --save the numbers go to benchmarks/results/formation-fidelity.json and to summary.json under "formation";
with --record NAME to benchmarks/results/NAME.json alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

SYSTEM_ORDER = ("latent", "floor", "causal", "prior_init")


def add_arguments(p) -> None:
    from ..cli.common import add_reasoner_flags

    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="DIR",
        help="trained memory checkpoint (repeatable, e.g. one per injection operator; default: the "
        "checkpoint shipped for SmolLM2-135M-Instruct)",
    )
    p.add_argument("--causal", default=None, metavar="DIR", help="causal-embedding baseline checkpoint")
    p.add_argument(
        "--prior", default=None, metavar="DIR", help="language-prior (reasoner-initialised) checkpoint"
    )
    p.add_argument(
        "--lengths", type=int, nargs="+", default=[64, 128, 256, 512], help="passage lengths in tokens"
    )
    p.add_argument("--passages", type=int, default=128, help="held-out passages per length")
    p.add_argument(
        "--refine-steps",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="also score each checkpoint with N steps of write-time refinement of its latents (one row per N)",
    )
    p.add_argument(
        "--refine-lr",
        type=float,
        default=None,
        help="learning rate of that refinement (default: each checkpoint's refine_lr)",
    )
    p.add_argument("--batch-rows", type=int, default=32, help="passages per forward pass")
    p.add_argument("--data", default=None, metavar="DIR", help="corpus directory (default: $MEMSPLICE_DATA)")
    p.add_argument(
        "--sources",
        nargs="+",
        default=None,
        help="corpora for held-out passages (default: those the first checkpoint was trained on)",
    )
    p.add_argument(
        "--train-run",
        default=None,
        metavar="DIR",
        help="a training run directory whose summary.json throughput goes into the saved summary",
    )
    p.add_argument(
        "--save", action="store_true", help="save under benchmarks/results/ and update summary.json"
    )
    p.add_argument(
        "--record",
        metavar="NAME",
        default=None,
        help="save under benchmarks/results/NAME.json only (summary.json untouched), e.g. to re-measure a "
        "checkpoint trained further than formation",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_reasoner_flags(p)


def _load(directory, reasoner):
    from ..memory.model import MemoryModel

    memory = MemoryModel.from_pretrained(directory, reasoner=reasoner)
    memory.eval()
    return memory


def heldout_setup(memory, tokenizer, data=None, sources=None):
    """What every system is scored on, as `memory` (a checkpoint) was trained: (sources, instruction text,
    instruction ids (I,), held-out token stream). Sources default to the checkpoint's training corpora, the
    instruction to the one it was trained with; `heldout_passages(stream, length, count)` cuts the passages."""
    import torch

    from ..train.config import DataArgs
    from ..train.data import corpus_tokens

    extra = memory.config.extra or {}
    sources = list(sources or extra.get("data_sources") or DataArgs().sources)
    instruction_text = memory.config.reconstruction_instruction or DataArgs().instruction
    ids = tokenizer(instruction_text, add_special_tokens=False)["input_ids"]
    heldout = corpus_tokens(tokenizer, DataArgs(root=data, sources=sources), "heldout")
    return sources, instruction_text, torch.tensor(ids, dtype=torch.long), heldout


def run(args) -> int:
    from tqdm.auto import tqdm

    from ..checkpoints import default_checkpoint_dir
    from ..cli.common import load_reasoner_from
    from ..devices import synchronize
    from ..train.data import heldout_passages
    from ..train.evaluate import reconstruction_fidelity

    checkpoints = [Path(c) for c in args.checkpoint] or [default_checkpoint_dir()]
    for c in [*checkpoints, *(Path(x) for x in (args.causal, args.prior) if x)]:
        if not c.is_dir():
            raise FileNotFoundError(f"no memory checkpoint at {c}")
    if args.passages < 1 or args.batch_rows < 1 or any(n < 2 for n in args.lengths):
        raise ValueError("--passages and --batch-rows must be >= 1 and --lengths >= 2")
    if any(n < 1 for n in args.refine_steps):
        raise ValueError("--refine-steps must be >= 1")
    if args.refine_lr is not None and args.refine_lr <= 0:
        raise ValueError("--refine-lr must be positive")
    reasoner = load_reasoner_from(args)
    tok = reasoner.require_tokenizer()
    # (system, label, memory, refinement steps, checkpoint directory)
    systems: list[tuple[str, str, object, int, str | None]] = []
    for c in checkpoints:
        m = _load(c, reasoner)
        if args.refine_lr is not None:
            m.config.refine_lr = args.refine_lr
        systems.append(("latent", f"latent:{m.config.operator}", m, 0, str(c)))
        systems += [
            ("latent_refined", f"latent:{m.config.operator}+refine{k}", m, k, str(c))
            for k in args.refine_steps
        ]
    systems.append(("floor", "floor", None, 0, None))
    if args.causal:
        systems.append(("causal", "causal", _load(args.causal, reasoner), 0, args.causal))
    if args.prior:
        systems.append(("prior_init", "prior_init", _load(args.prior, reasoner), 0, args.prior))
    first = systems[0][2]
    sources, instruction_text, instruction, heldout = heldout_setup(first, tok, args.data, args.sources)
    slots = first.config.num_slots
    too_long = [n for n in args.lengths if n > min(s[2].config.max_memory_tokens for s in systems if s[2])]
    if too_long:
        raise ValueError(f"--lengths {too_long} exceed what the checkpoints read (max_memory_tokens)")

    rows = []
    total = len(args.lengths) * len(systems) * args.passages
    with tqdm(total=total, desc="fidelity", unit="passage", disable=args.json) as bar:
        for n in args.lengths:
            passages = heldout_passages(heldout, n, args.passages)
            for system, label, memory, refine, directory in systems:
                m = memory.config.num_slots if memory is not None else slots
                synchronize(reasoner.device)
                t0 = time.perf_counter()
                f = reconstruction_fidelity(
                    reasoner,
                    memory,
                    passages,
                    instruction,
                    batch_rows=args.batch_rows,
                    progress=bar,
                    refine_steps=refine,
                )
                synchronize(reasoner.device)
                rows.append(
                    {
                        "length": n,
                        "slots": m,
                        "compression": f"{n // m}x" if n % m == 0 else f"{n / m:.1f}x",
                        "system": system,
                        "label": label,
                        **({"refine_steps": refine} if refine else {}),
                        **({"checkpoint": directory} if directory else {}),
                        **f.to_dict(),
                        "seconds": time.perf_counter() - t0,
                    }
                )
    result = {
        "reasoner": reasoner.name,
        "instruction": instruction_text,
        "sources": list(sources),
        "passages_per_length": args.passages,
        "batch_rows": args.batch_rows,
        "refine_lr": {label: m.config.refine_lr for _, label, m, steps, _ in systems if steps},
        "checkpoints": [str(c) for c in checkpoints],
        "causal": args.causal,
        "prior": args.prior,
        "rows": rows,
    }
    if args.save:
        from .record import save_result, update_summary

        save_result("formation-fidelity", result, device=reasoner.device)
        update_summary("formation", _summary(rows, args.train_run), device=reasoner.device)
    if args.record:
        from .record import save_result

        saved = save_result(args.record, result, device=reasoner.device)
        if args.json:  # stdout stays one JSON object
            result["saved"] = str(saved)
        else:
            print(f"saved {saved}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"held-out reconstruction, {args.passages} passages per length ({reasoner.name})")
        print(f"{'length':>6} {'ratio':>6}  {'system':<30} {'token acc':>9} {'exact':>7} {'seconds':>8}")
        for r in rows:
            print(
                f"{r['length']:>6} {r['compression']:>6}  {r['label']:<30} {100 * r['token_accuracy']:>8.2f}% "
                f"{100 * r['exact_match']:>6.1f}% {r['seconds']:>8.1f}"
            )
    return 0


def _summary(rows: list[dict], train_run: str | None) -> dict:
    """{"4x": {"latent": best operator, "floor", "causal", "prior_init"}, ..., throughput} for summary.json."""
    out: dict = {}
    latent_slots = next(r["slots"] for r in rows if r["system"] == "latent")
    for r in rows:
        key = f"{r['length'] // latent_slots}x"
        entry = out.setdefault(key, {})
        name = r["system"]
        if name == "latent_refined":
            if r["refine_steps"] >= entry.get("refine_steps", 0):
                entry["latent_refined"] = r["token_accuracy"]
                entry["latent_refined_exact_match"] = r["exact_match"]
                entry["refine_steps"] = r["refine_steps"]
        elif name == "latent":
            if r["token_accuracy"] >= entry.get("latent", -1.0):
                entry["latent"] = r["token_accuracy"]
                entry["latent_operator"] = r["label"].split(":", 1)[1]
                entry["latent_exact_match"] = r["exact_match"]
        else:
            entry[name] = r["token_accuracy"]
    if train_run:
        path = Path(train_run) / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"--train-run {train_run} has no summary.json")
        throughput = json.loads(path.read_text()).get("throughput", {})
        if "tokens_per_s" in throughput:
            out["train_tokens_per_s"] = throughput["tokens_per_s"]
        if "mfu" in throughput:
            out["train_mfu"] = throughput["mfu"]
    return out
