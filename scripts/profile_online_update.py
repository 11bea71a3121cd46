"""Count the PyTorch ops one online update issues (the stability stream's settings), on the CPU.

On a GPU an update of this small model is bound by launching kernels from the host, so the number of ops an update
dispatches is what its time follows. This counts them with `torch.profiler`: every `aten::` op (nested ones
included) and the outermost ones (those called from Python or by autograd, not from another op), per update, for an update that
runs next-token + InfoNCE + EWC and one that runs denoising + InfoNCE + EWC (the `alternate` schedule), plus the
first update, which also estimates the Fisher; and for each update the outermost ops attributed to its phases (the
objectives' forward passes, backward, EWC penalty, gradient clip, optimizer step). The outermost count is the one to
compare: on the CPU a multi-tensor `_foreach_*` op runs as one nested op per tensor, on CUDA as a few kernels.

    PYTHONPATH=src python scripts/profile_online_update.py              # SmolLM2-shaped random reasoner (fast)
    PYTHONPATH=src python scripts/profile_online_update.py --real       # the real reasoner and shipped memory
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from pathlib import Path

import torch


def smollm2_shaped(layers: int):
    """A random Llama with SmolLM2-135M's layer count, heads and tying but narrow widths and a small vocab."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from memsplice import MemoryConfig, MemoryModel
    from tiny import tiny_reasoner

    reasoner = tiny_reasoner("llama", layers=layers)
    memory = MemoryModel(
        MemoryConfig(
            num_slots=16,
            max_memory_tokens=512,
            encoder_layers=8,
            encoder_width=48,
            encoder_heads=6,
            encoder_mlp_ratio=2.0,
            kv_init="sink",
            embed_warmup_updates=10**9,
        ),
        reasoner,
    )
    return reasoner, memory


def stream(n: int, vocab: int, context: int, query: int, response: int, seed: int = 0):
    from memsplice.online import Interaction

    rng = random.Random(seed)

    def tok(k):
        return [rng.randrange(3, vocab) for _ in range(k)]

    return [
        Interaction(id=-1, context=tok(context), query=tok(query), response=tok(response)) for _ in range(n)
    ]


PHASE = "phase:"


def labelled(fn, name: str):
    """`fn` run inside a profiler range `phase:<name>`, so the ops it issues can be attributed to it."""

    def wrapper(*a, **k):
        with torch.profiler.record_function(PHASE + name):
            return fn(*a, **k)

    return wrapper


def label_phases(learner) -> None:
    import memsplice.online.loop as loop

    # module functions (versions before the shared read pass call continuation and denoising apart)
    for name in ("continuation", "denoising", "infonce"):
        if hasattr(loop, name):
            setattr(loop, name, labelled(getattr(loop, name), name))
    if hasattr(learner, "_read"):  # the read objectives' shared encoder call and reasoner pass
        learner._read = labelled(learner._read, "memory reads")
    if hasattr(learner, "_rehearsal_loss"):
        learner._rehearsal_loss = labelled(learner._rehearsal_loss, "rehearsal")
    learner.anchor.penalty = labelled(learner.anchor.penalty, "ewc penalty")
    if hasattr(learner.anchor, "accumulate_grad"):
        learner.anchor.accumulate_grad = labelled(learner.anchor.accumulate_grad, "ewc penalty")
    learner.anchor.estimate_fisher = labelled(learner.anchor.estimate_fisher, "fisher")
    learner.optimizer.step = labelled(learner.optimizer.step, "optimizer step")
    torch.nn.utils.clip_grad_norm_ = labelled(torch.nn.utils.clip_grad_norm_, "grad clip")
    torch.Tensor.backward = labelled(torch.Tensor.backward, "backward")


def phase_of(event) -> str:
    while event is not None:
        if event.name.startswith(PHASE):
            return event.name[len(PHASE) :]
        event = event.cpu_parent
    return "other"


def count(fn) -> tuple[int, int, collections.Counter, collections.Counter, object]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    outer = [e for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return (
        len(events),
        len(outer),
        collections.Counter(e.name for e in outer),
        collections.Counter(phase_of(e) for e in outer),
        result,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="store_true", help="the real SmolLM2-135M reasoner and shipped memory")
    p.add_argument("--layers", type=int, default=30, help="reasoner layers of the random reasoner")
    p.add_argument("--top", type=int, default=25, help="most frequent outermost ops to list")
    p.add_argument(
        "--rehearsal",
        type=int,
        default=0,
        help="rehearsal items per update (random tokens shaped like the synthetic set: 64-token evidence, "
        "48-token prompt, 4-token answer)",
    )
    args = p.parse_args()
    torch.manual_seed(0)
    if args.real:
        from memsplice.checkpoints import load_memory
        from memsplice.reasoner import load_reasoner

        reasoner = load_reasoner(device="cpu")
        memory = load_memory(reasoner)
    else:
        reasoner, memory = smollm2_shaped(args.layers)
    from memsplice.online import OnlineConfig, OnlineLearner, RehearsalItem, RehearsalSet

    # `memsplice bench online --part stability --variant ewc_replay` (its defaults)
    cfg = OnlineConfig(
        batch_size=2,
        lr=2e-5,
        context_tokens=128,
        target_tokens=32,
        contrastive_weight=0.1,
        anchor_interval=200,
        objective_schedule="alternate",
        ewc_weight=10.0,
        replay_per_update=2,
        rehearsal_per_update=args.rehearsal,
    )
    rng = random.Random(1)
    vocab = reasoner.shapes.vocab_size
    rehearsal = RehearsalSet(
        [
            RehearsalItem(
                memory=[rng.randrange(3, vocab) for _ in range(64)],
                prompt=[rng.randrange(3, vocab) for _ in range(48)],
                answer=[rng.randrange(3, vocab) for _ in range(4)],
            )
            for _ in range(32)
        ]
    )
    learner = OnlineLearner(memory, cfg, rehearsal=rehearsal if args.rehearsal else None)
    label_phases(learner)
    items = stream(64, reasoner.shapes.vocab_size, 128, 16, 24)
    fed = iter(items)

    def one_update():
        while True:
            stats, _ = learner.observe(next(fed))
            if stats is not None:
                return stats

    rows = []
    totals = collections.Counter()
    for k in range(5):
        t0 = time.perf_counter()
        n_all, n_outer, ops, phases, stats = count(one_update)
        label = "next-token" if "next_token" in stats.parts else "denoising"
        label += " + rehearsal" if "rehearsal" in stats.parts else ""
        label += " + Fisher" if "fisher" in phases else ""
        rows.append((label, n_all, n_outer, phases, time.perf_counter() - t0))
        if k > 0:
            totals.update(ops)
    for label, n_all, n_outer, phases, secs in rows:
        print(f"{label:30s} aten ops {n_all:7d}  outermost {n_outer:6d}  ({secs:.2f} s with profiling)")
        print("    " + ", ".join(f"{k} {v}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])))
    steady = rows[1:]
    print(
        f"mean over the last {len(steady)} updates: {sum(r[1] for r in steady) / len(steady):.0f} aten ops, "
        f"{sum(r[2] for r in steady) / len(steady):.0f} outermost"
    )
    print(f"most frequent outermost ops over the last {len(rows) - 1} updates:")
    for name, n in totals.most_common(args.top):
        print(f"  {n / (len(rows) - 1):8.1f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
