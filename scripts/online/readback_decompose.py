"""Where `latent-readback` loses answers against the oracle, one step at a time, on the eval's synthetic test split.

    python scripts/online/readback_decompose.py [CHECKPOINT] [--lengths 16384 65536] [--seeds 0 1 2 3]
        [--examples 4] [--refine-steps 5] [--dtype bfloat16] [--record NAME]

For every question the same reader (prompt, greedy decoding) answers over four histories, each one step further
from the oracle towards what `latent-readback` reads:
- `evidence`: the evidence turns as text, as the oracle system gives them;
- `chunk_text`: the text of the 32-token chunk that holds the evidence, as the conversation memory cut it (the
  turn, plus whatever of the turn before shares the chunk);
- `chunk_readback`: that chunk's memory (refined at write time) read back as text by the reasoner;
- `picked_readback`: the memory of the chunk the address head picks (recency tie-break included) read back; what
  `latent-readback` answered over before `ConversationMemory.read_back` put the chunk's session header in front
  (`scripts/online/reader_context.py` measures what that header is worth).
The drops between neighbours are what the chunk's cut, read-back fidelity and addressing each cost. Chunks are
written one at a time here (not within a whole conversation), with the same chunking, refinement and read-back as
`ConversationMemory`.
"""

import argparse
import json

import torch

from memsplice.bench.record import provenance, save_result
from memsplice.checkpoints import load_memory
from memsplice.eval.metrics import score_answer
from memsplice.eval.reader import Reader, render_history
from memsplice.eval.tasks import TaskArgs, get_task
from memsplice.memory.address import top_chunks
from memsplice.memory.readback import read_back
from memsplice.online.address import address_examples
from memsplice.online.bootstrap import episode_examples, write_chunks
from memsplice.reasoner import load_reasoner

HISTORIES = ("evidence", "chunk_text", "chunk_readback", "picked_readback")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "checkpoint", nargs="?", default=None, help="default: the checkpoint shipped for the reasoner"
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536], help="history tokens")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--examples", type=int, default=4, help="conversations per length and seed")
    p.add_argument("--refine-steps", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--record", default=None, help="save as benchmarks/results/NAME.json with provenance")
    args = p.parse_args()
    reasoner = load_reasoner(None, device=args.device, dtype=args.dtype)
    started = provenance(reasoner.device)
    memory = load_memory(reasoner, args.checkpoint).eval()
    memory.set_refine_steps(args.refine_steps)
    tok = reasoner.require_tokenizer()
    reader = Reader(reasoner)
    chunk_tokens = memory.config.chunk_tokens or memory.config.max_memory_tokens
    margin = memory.config.address_recency_margin
    rows = []
    for length in args.lengths:
        for seed in args.seeds:
            task = TaskArgs(
                examples=args.examples, lengths=(length,), seed=seed, split="test", values="pools"
            )
            episodes = get_task("synthetic")(task, reader.count_tokens)
            examples = episode_examples(episodes, reasoner, chunk_tokens)
            with torch.no_grad():
                addressed = address_examples(memory, examples)
            for episode, example, address in zip(episodes, examples, addressed, strict=True):
                head = memory.address
                with torch.no_grad():
                    scores = head.score(head.queries(address.query_latents), head.keys(address.chunk_latents))
                questions = [q for q in episode.questions if q.answer]
                for q, row_scores, positives in zip(questions, scores, example.positives, strict=True):
                    right = positives[0]
                    picked = top_chunks(row_scores, 1, margin)[0]
                    chunks = [example.chunks[right], example.chunks[picked]]
                    with torch.no_grad():  # a write without autograd is refined (config.refine_steps)
                        written = write_chunks(memory, chunks)
                    texts = read_back(memory, written.kv, [len(c) for c in chunks])
                    histories = {
                        "evidence": render_history(episode.turns_by_id(q.evidence)),
                        "chunk_text": tok.decode(example.chunks[right]).strip(),
                        "chunk_readback": texts[0].strip(),
                        "picked_readback": texts[1].strip(),
                    }
                    row = {
                        "length": length,
                        "seed": seed,
                        "episode": episode.id,
                        "category": q.category,
                        "question": q.question,
                        "answer": q.answer,
                        "addressed": picked in positives,
                        "readback_verbatim": histories["chunk_readback"] == histories["chunk_text"],
                    }
                    for name in HISTORIES:
                        prediction = reader.read(q.question, histories[name] or None).text
                        row[name] = score_answer(prediction, q.answer, aliases=q.aliases).contains
                        row[f"{name}_prediction"] = prediction
                    row["chunk_readback_text"] = histories["chunk_readback"]
                    rows.append(row)
            print(length, seed, summarize([r for r in rows if r["length"] == length and r["seed"] == seed]))
    out = {
        "checkpoint": args.checkpoint or "shipped",
        "refine_steps": args.refine_steps,
        "recency_margin": margin,
        "split": "test",
        "by_length": {str(n): summarize([r for r in rows if r["length"] == n]) for n in args.lengths},
        "all": summarize(rows),
        "rows": rows,
    }
    if args.record:
        print(f"saved {save_result(args.record, {**out, **started}, device=reasoner.device)}")
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))
    return 0


def summarize(rows: list[dict]) -> dict:
    n = max(len(rows), 1)
    out = {"questions": len(rows)}
    for name in HISTORIES:
        out[name] = sum(r[name] for r in rows) / n
    out["addressed"] = sum(r["addressed"] for r in rows) / n
    out["readback_verbatim"] = sum(r["readback_verbatim"] for r in rows) / n
    return out


if __name__ == "__main__":
    raise SystemExit(main())
