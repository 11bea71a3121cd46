"""`memsplice demo`: a scripted multi-session conversation, then questions about it, answered four ways.

Sessions 1 and 3 tell facts about a person (one of them changes: she moves city), sessions 2 and 4 are small talk
from real chat logs, and a last session asks about the facts. Every question is answered by the same frozen
reasoner with the same prompt and greedy decoding:

  none            the question alone (what a stateless LLM knows)
  latent          the question, with the conversation's latent memory spliced into the KV cache
  latent-readback the chunk memory the question picks (address head) read back as text by the reasoner from
                  the memory alone, then the question over that text
  latent+window   the most recent turns as text, latent memory for everything older
  full            the whole history as text in the prompt (the expensive reference)

For each: the answer, whether it contains the gold answer, and its costs (prompt tokens, memory slots, KV-cache bytes
at answer time, time to first token, memory write time per turn). Nothing here is cherry-picked: the script, the
systems and the scoring are the ones `memsplice eval` uses.
"""

from __future__ import annotations

import json

from .common import add_checkpoint_flag, add_reasoner_flags

SYSTEMS = ("none", "latent", "latent-readback", "latent+window", "full")


def add_parser(sub):
    p = sub.add_parser(
        "demo",
        help="the scripted multi-session demo: facts told early, asked about later",
        description=__doc__.split("\n\n")[0],
    )
    add_reasoner_flags(p)
    add_checkpoint_flag(p)
    p.add_argument(
        "--systems", default=",".join(SYSTEMS), help="comma-separated systems (default: %(default)s)"
    )
    p.add_argument(
        "--window-tokens",
        type=int,
        default=128,
        help="latent+window: recent history kept as text (default: %(default)s tokens)",
    )
    p.add_argument(
        "--refine-steps",
        type=int,
        default=0,
        metavar="N",
        help="latent systems: write-time refinement steps of every chunk memory (default: %(default)s)",
    )
    p.add_argument(
        "--select-chunks",
        type=int,
        default=1,
        metavar="K",
        help="latent-readback: chunk memories read back per question (default: %(default)s)",
    )
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    return p


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def run(args) -> int:
    from memsplice.checkpoints import checkpoint_for
    from memsplice.eval.metrics import score_answer
    from memsplice.eval.reader import GenerationSettings, Reader
    from memsplice.eval.systems import Runtime, SystemArgs, build_system
    from memsplice.eval.tasks.demo import build_demo_episode
    from memsplice.reasoner import load_reasoner

    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    reasoner = load_reasoner(args.reasoner, device=args.device, dtype=args.dtype)
    checkpoint = args.checkpoint or checkpoint_for(reasoner)
    reader = Reader(reasoner, settings=GenerationSettings(max_new_tokens=args.max_new_tokens))
    runtime = Runtime(
        reader,
        SystemArgs(
            window_tokens=args.window_tokens,
            checkpoint=checkpoint,
            refine_steps=args.refine_steps,
            select_chunks=args.select_chunks,
        ),
    )
    episode = build_demo_episode()
    history_tokens = sum(reader.count_tokens(t.text) for t in episode.turns)
    results: dict = {
        "reasoner": reasoner.name,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "turns": len(episode.turns),
        "history_tokens": history_tokens,
        "systems": {},
    }
    if not args.json:
        print(f"memsplice demo: {reasoner.name}, memory {checkpoint or 'untrained (no checkpoint)'}")
        print(
            f"history: {len(episode.turns)} turns over 4 sessions, ~{history_tokens} tokens; "
            f"{len(episode.questions)} questions in session 5\n"
        )
    for name in names:
        system = build_system(name, runtime)
        system.reset()
        feed = system.feed(episode.turns)
        rows = []
        for q in episode.questions:
            answer = system.answer(q)
            score = score_answer(answer.text, q.answer, aliases=q.aliases)
            rows.append(
                {
                    "question": q.question,
                    "gold": q.answer,
                    "answer": answer.text.strip(),
                    "correct": bool(score.contains),
                    "costs": answer.costs.to_dict(),
                }
            )
        results["systems"][name] = {
            "feed": feed.to_dict(),
            "answers": rows,
            "correct": sum(r["correct"] for r in rows),
        }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for i, q in enumerate(episode.questions):
        print(f"Q{i + 1}. {q.question}   (answer: {q.answer})")
        for name in names:
            row = results["systems"][name]["answers"][i]
            mark = "yes" if row["correct"] else "no "
            print(f"   {name:<16} [{mark}] {row['answer'][:90]!r}")
        print()
    print(
        f"{'system':<16} {'correct':>8} {'prompt tok':>11} {'slots':>6} {'KV at answer':>13} "
        f"{'TTFT ms':>8} {'write ms/turn':>14} {'stored':>10}"
    )
    for name in names:
        s = results["systems"][name]
        costs = [r["costs"] for r in s["answers"]]
        n = len(costs)
        print(
            f"{name:<16} {s['correct']:>5}/{n:<2} {sum(c['prompt_tokens'] for c in costs) / n:>11.0f} "
            f"{max(c['memory_slots'] for c in costs):>6} {_mib(int(sum(c['kv_bytes'] for c in costs) / n)):>13} "
            f"{1e3 * sum(c['ttft_s'] for c in costs) / n:>8.0f} {1e3 * s['feed']['write_s_per_turn']:>14.1f} "
            f"{s['feed']['stored_bytes'] / 1024:>8.1f} KiB"
        )
    print(
        "\nThe latent rows use the memory checkpoint shipped for this reasoner; see README 'Results' for how far "
        "its recall is from the text baselines. Its address head (which picks the chunk latent-readback reads) was "
        "trained on synthetic conversations, some with made-up names and some with a user's own first-person facts; "
        "unrefined (--refine-steps 0, the default here) a chunk reads back lossily."
    )
    return 0
