"""What read-back depends on, on the eval's synthetic test split (never trained on): three measurements in one run.

1. fidelity: conversation chunks of `--chunk-tokens` tokens written with `--refine-steps` N (and 0) steps, read back
   (`memory.readback`) and compared token by token with the chunk's input; exact = the whole chunk verbatim.
2. selection: with the chunks refined, does the address head find a question's evidence chunk (recall@1, @2) when it
   scores the refined latents, and when it scores the encoder's own (what `ConversationMemory` does)?
3. reading: the reasoner's answer (the eval's prompt and `contains` metric) with the text of the top-1, -2 or -3
   chunks the head picks as history, at chunk sizes `--reading-chunks`. The chunks' transcript text stands in for
   their read-back (identical when read back verbatim, which 1. checks), so this needs no refinement.

    python scripts/online/readback_probe.py CHECKPOINT [--record NAME]

The conversations are those `memsplice eval --task synthetic --examples 4 --lengths 1k,2k,4k` asks (seed 0);
fidelity and selection use the first `--episodes` 2k-token ones (refinement is slow on a CPU).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from memsplice.bench.record import save_result
from memsplice.checkpoints import load_memory
from memsplice.conversation import ConversationConfig, ConversationMemory
from memsplice.conversation.chunks import chunk_input
from memsplice.eval.metrics import contains_answer
from memsplice.eval.reader import Reader, memory_turns
from memsplice.eval.tasks import TaskArgs, get_task
from memsplice.inject.memory_kv import MemoryKV
from memsplice.memory.readback import read_back_ids
from memsplice.reasoner import load_reasoner


def conversation(memory, episode, chunk_tokens: int) -> ConversationMemory:
    conv = ConversationMemory(memory, ConversationConfig(chunk_tokens=chunk_tokens, slot_budget=1 << 20))
    conv.add_turns(memory_turns(episode.turns))
    return conv


def holds_evidence(conv, chunk, question, turns_by_id) -> bool:
    evidence = [turns_by_id[e].text for e in question.evidence]
    return any(e in conv.store[s].text for s in chunk.span_ids for e in evidence)


def fidelity(memory, episodes, chunk_tokens: int, steps: int, max_chunks: int) -> dict:
    memory.config.refine_steps = steps
    t0 = time.perf_counter()
    total = exact = right = tokens = 0
    for episode in episodes:
        conv = conversation(memory, episode, chunk_tokens)
        chunks = [c for c in conv._all_chunks() if c.live][: max_chunks - total]
        if not chunks:
            break
        got = read_back_ids(memory, MemoryKV.cat_rows([c.kv for c in chunks]), [c.tokens for c in chunks])
        for chunk, ids in zip(chunks, got, strict=True):
            want = chunk_input(chunk, conv.store)
            right += sum(int(a == b) for a, b in zip(ids, want, strict=False))
            tokens += len(want)
            exact += ids == want
            total += 1
        if total >= max_chunks:
            break
    return {
        "refine_steps": steps,
        "chunks": total,
        "token_accuracy": right / max(tokens, 1),
        "exact": exact,
        "seconds": time.perf_counter() - t0,
    }


def selection(memory, episodes, chunk_tokens: int, steps: int) -> dict:
    memory.config.refine_steps = steps
    head = memory.address
    hits = {"refined_latents": [0, 0], "encoder_latents": [0, 0]}
    questions = 0
    for episode in episodes:
        conv = conversation(memory, episode, chunk_tokens)
        by_id = {t.id: t for t in episode.turns}
        live = [c for c in conv._all_chunks() if c.live]
        with torch.no_grad():
            keys = {
                "refined_latents": head.keys(torch.stack([c.latents for c in live])),
                "encoder_latents": head.keys(
                    torch.stack([c.latents if c.address_latents is None else c.address_latents for c in live])
                ),
            }
            for q in episode.questions:
                questions += 1
                text = conv.config.turn_template.format(role="user", text=q.question)
                ids = conv.tokenizer(text, add_special_tokens=False)["input_ids"]
                query = head.queries(memory.encode(torch.tensor([ids])))
                for name, k in keys.items():
                    order = head.score(query, k)[0].argsort(descending=True).tolist()
                    for i, at in enumerate((1, 2)):
                        hits[name][i] += any(holds_evidence(conv, live[j], q, by_id) for j in order[:at])
    return {
        "refine_steps": steps,
        "questions": questions,
        **{
            f"{name}_recall@{at}": h[i] / questions for name, h in hits.items() for i, at in enumerate((1, 2))
        },
    }


def reading(memory, reader, episodes, chunk_tokens: int) -> dict:
    memory.config.refine_steps = 0
    tok = memory.reasoner.require_tokenizer()
    right = {1: 0, 2: 0, 3: 0}
    questions = 0
    for episode in episodes:
        conv = conversation(memory, episode, chunk_tokens)
        for q in episode.questions:
            questions += 1
            for k in right:
                picked = conv._address_chunks(q.question, k)
                history = "\n".join(tok.decode(chunk_input(c, conv.store)).strip() for c in picked)
                answer = reader.read(q.question, history or None).text
                right[k] += max(contains_answer(answer, g) for g in [q.answer, *q.aliases])
    return {
        "chunk_tokens": chunk_tokens,
        "questions": questions,
        **{f"top{k}": v / questions for k, v in right.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--chunk-tokens", type=int, default=32, help="fidelity and selection (default: 32)")
    p.add_argument("--refine-steps", type=int, default=5)
    p.add_argument("--episodes", type=int, default=3, help="2k-token episodes for fidelity and selection")
    p.add_argument("--fidelity-chunks", type=int, default=16)
    p.add_argument(
        "--reading-chunks", type=int, nargs="*", default=[32, 64], help="chunk sizes for 3. (none: skip it)"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--record", default=None, help="save as benchmarks/results/online/NAME.json")
    args = p.parse_args()
    torch.manual_seed(0)
    reasoner = load_reasoner(None, device=args.device)
    memory = load_memory(reasoner, args.checkpoint).eval()
    if memory.address is None:
        raise SystemExit(f"{args.checkpoint} has no address head")
    reader = Reader(reasoner)
    task = TaskArgs(examples=4, lengths=(1024, 2048, 4096), seed=0, split="test", facts=6)
    episodes = get_task("synthetic")(task, reader.count_tokens)
    mid = [e for e in episodes if e.meta.get("target_tokens") == 2048][: args.episodes]
    out: dict = {"checkpoint": args.checkpoint, "split": "test"}
    out["fidelity"] = [
        fidelity(memory, mid, args.chunk_tokens, s, args.fidelity_chunks) for s in (0, args.refine_steps)
    ]
    print("fidelity", out["fidelity"], flush=True)
    out["selection"] = selection(memory, mid, args.chunk_tokens, args.refine_steps)
    print("selection", out["selection"], flush=True)
    out["reading"] = [reading(memory, reader, episodes, c) for c in args.reading_chunks]
    print("reading", out["reading"], flush=True)
    if args.record:
        directory = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "online"
        print(f"saved {save_result(args.record, out, device=reasoner.device, directory=directory)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
