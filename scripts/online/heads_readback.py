"""`latent-readback` end to end with two address heads on the same written memory: paired answers that differ only
in the chunk each head picks.

    python scripts/online/heads_readback.py CHECKPOINT_A CHECKPOINT_B [--margins-a M ...] [--margins-b M ...]
        [--perspective others|user]
        [--lengths 1024 2048 4096] [--examples 4] [--seed 0] [--refine-steps 5] [--write-turns 64]
        [--reading-prefix DIR|shipped] [--device cpu] [--record NAME]

The address head scores the encoder's unrefined latents and nothing else, so two heads on one encoder can share one
write of each conversation (the costly part: encoding and write-time refinement). Each episode is written once by
the `latent-readback` system of `memsplice eval`, with CHECKPOINT_A's memory; then every question is answered once
with each head at each of its recency margins (weights swapped in, margin set), through the same reader and prompt;
a chunk picked by several of them is read and answered once, since the answer depends on nothing else. Both
checkpoints must hold the same encoder (checked: every weight but the address head's must match). Reports `contains`
accuracy per head and margin, overall and per length, and every question's picks and answers.
"""

import argparse
import json
import time

from memsplice.bench.record import provenance, save_result
from memsplice.checkpoints import load_memory
from memsplice.conversation.memory import weights_signature
from memsplice.eval.metrics import score_answer
from memsplice.eval.reader import GenerationSettings, Reader
from memsplice.eval.systems import Runtime, SystemArgs, build_system
from memsplice.eval.systems.latent import load_memory_model
from memsplice.eval.tasks import TaskArgs, get_task
from memsplice.reasoner import load_reasoner


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint_a")
    p.add_argument("checkpoint_b")
    p.add_argument(
        "--margins-a",
        type=float,
        nargs="+",
        default=None,
        help="head A's recency margins (default: its config's)",
    )
    p.add_argument(
        "--margins-b",
        type=float,
        nargs="+",
        default=None,
        help="head B's recency margins (default: its config's)",
    )
    p.add_argument("--perspective", choices=["others", "user"], default="others")
    p.add_argument("--values", choices=["pools", "open"], default="pools")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--examples", type=int, default=4, help="episodes per length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--refine-steps", type=int, default=5)
    p.add_argument("--write-turns", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--reading-prefix", default=None, metavar="DIR|shipped")
    p.add_argument("--device", default=None)
    p.add_argument("--record", default=None, help="save as benchmarks/results/NAME.json with provenance")
    args = p.parse_args()

    reasoner = load_reasoner(None, device=args.device)
    started = provenance(reasoner.device)
    prefix = None
    if args.reading_prefix is not None:
        from memsplice.checkpoints import load_reading_prefix

        prefix = load_reading_prefix(reasoner, args.reading_prefix)
    reader = Reader(reasoner, settings=GenerationSettings(max_new_tokens=args.max_new_tokens), prefix=prefix)
    runtime = Runtime(
        reader,
        SystemArgs(
            checkpoint=args.checkpoint_a,
            refine_steps=args.refine_steps,
            write_turns=args.write_turns,
            select_chunks=1,
        ),
    )
    model = load_memory_model(runtime)
    other = load_memory(reasoner, args.checkpoint_b)
    _check_same_encoder(model, other)
    heads = {"A": model.address, "B": other.address}
    if heads["A"] is None or heads["B"] is None:
        raise SystemExit("heads_readback: both checkpoints need an address head")
    margins = {
        "A": args.margins_a or [model.config.address_recency_margin],
        "B": args.margins_b or [other.config.address_recency_margin],
    }
    task = TaskArgs(
        examples=args.examples,
        lengths=tuple(args.lengths),
        seed=args.seed,
        split="test",
        facts=6,
        values=args.values,
        perspective=args.perspective,
    )
    episodes = get_task("synthetic")(task, reader.count_tokens)
    system = build_system("latent-readback", runtime)
    configs = [("A", m) for m in margins["A"]] + [("B", m) for m in margins["B"]]
    names = [f"{h}@{m:g}" for h, m in configs]
    rows = []
    t0 = time.perf_counter()
    for episode in episodes:
        system.reset()
        system.feed(episode.turns)
        for q in episode.questions:
            row = {
                "episode": episode.id,
                "question": q.question,
                "answer": q.answer,
                "length": _length(episode),
            }
            # One answer per distinct pick: the answer depends on nothing else.
            answered: dict[tuple, dict] = {}
            for name, (head, margin) in zip(names, configs, strict=True):
                _use(model, heads[head], margin)
                picked = tuple(c.id for c in system.conversation._address_chunks(q.question, 1))
                if picked not in answered:
                    text = system.answer(q).text.strip()
                    score = score_answer(text, q.answer, aliases=q.aliases)
                    answered[picked] = {"prediction": text, "contains": bool(score.contains)}
                row[name] = {"picked": list(picked), **answered[picked]}
            rows.append(row)
        print(
            f"{episode.id}: "
            + ", ".join(f"{n} {sum(r[n]['contains'] for r in rows)}" for n in names)
            + f" of {len(rows)} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    _use(model, heads["A"], margins["A"][0])
    out = {
        "checkpoint_a": args.checkpoint_a,
        "checkpoint_b": args.checkpoint_b,
        "task": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(task).items()},
        "refine_steps": args.refine_steps,
        "write_turns": args.write_turns,
        "reading_prefix": args.reading_prefix,
        "questions": len(rows),
        "contains": {n: sum(r[n]["contains"] for r in rows) / max(len(rows), 1) for n in names},
        "correct": {n: sum(r[n]["contains"] for r in rows) for n in names},
        "lengths": {
            str(n): {
                "questions": len(sub),
                **{c: sum(r[c]["contains"] for r in sub) / len(sub) for c in names},
            }
            for n in args.lengths
            if (sub := [r for r in rows if r["length"] == n])
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if args.record:
        print(f"saved {save_result(args.record, {**out, **started, 'rows': rows}, device=reasoner.device)}")
    print(json.dumps(out, indent=2))
    return 0


def _use(model, head, margin: float) -> None:
    """Swap `head` in with `margin`. A conversation's cached address keys are keyed on the head's parameters
    (`head_version`), so the other head's are not reused."""
    model.address = head
    model.set_recency_margin(margin)


def _length(episode) -> int:
    return int((episode.meta or {}).get("target_tokens", 0))


def _check_same_encoder(a, b) -> None:
    """Both memories write the same latents: every weight but the address head's is the same."""
    if weights_signature(a) != weights_signature(b):
        raise SystemExit(
            "heads_readback: the two checkpoints differ beyond the address head: not the same encoder"
        )


if __name__ == "__main__":
    raise SystemExit(main())
