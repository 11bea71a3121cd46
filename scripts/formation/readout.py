"""Is a fact in the memory, and can the reasoner answer from it? A diagnostic that separates the two.

For each question of the synthetic recall task (test split), the evidence turn and its neighbours are rendered as
the eval renders history, cut to at most --tokens reasoner tokens, and written into ONE memory of the checkpoint's
slots (no chunking, no hierarchy). Then, with the eval's own prompt template and greedy decoding:
- readout: the reasoner, given only the memory and the formation instruction ("Repeat the text."), regenerates the
  passage freely; scored by whether the gold answer occurs in that readout;
- latent: the question asked with the memory in front (what the `latent` system does, minus chunking);
- text: the question asked with the passage as text in the prompt (an oracle with the same passage);
- none: the question alone.
All scores are answer containment (the eval's `contains`).

    PYTHONPATH=src python scripts/formation/readout.py [--questions 24] [--tokens 128] [--checkpoint DIR]
        [--refine-steps N]

Saves benchmarks/results/formation/readout.json (command, commit, device, date, every prediction).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from memsplice import MemoryModel, load_reasoner
from memsplice.bench.record import save_result
from memsplice.checkpoints import default_checkpoint_dir
from memsplice.eval.metrics import contains_answer
from memsplice.eval.reader import GenerationSettings, Reader, render_history
from memsplice.eval.tasks import TaskArgs, get_task

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "formation"


def passages(reader: Reader, n_questions: int, max_tokens: int, seed: int) -> list[dict]:
    count = reader.count_tokens
    episodes = get_task("synthetic")(TaskArgs(examples=max(1, n_questions // 6 + 1), seed=seed), count)
    out = []
    for ep in episodes:
        index = {t.id: i for i, t in enumerate(ep.turns)}
        for q in ep.questions:
            if not q.evidence or q.evidence[-1] not in index:
                continue
            i = index[q.evidence[-1]]
            lo, hi = i, i + 1
            text = render_history(ep.turns[lo:hi])
            while True:  # grow the window around the evidence while it fits
                grown = False
                for a, b in ((lo - 1, hi), (lo, hi + 1)):
                    if a >= 0 and b <= len(ep.turns):
                        cand = render_history(ep.turns[a:b])
                        if count(cand) <= max_tokens:
                            lo, hi, text, grown = a, b, cand, True
                if not grown:
                    break
            out.append(
                {
                    "question": q.question,
                    "answer": q.answer,
                    "aliases": list(q.aliases),
                    "passage": text,
                    "passage_tokens": count(text),
                    "category": q.category,
                }
            )
            if len(out) >= n_questions:
                return out
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=24)
    p.add_argument("--tokens", type=int, default=128, help="passage length cap in reasoner tokens")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", default="readout", help="saved as benchmarks/results/formation/RECORD.json")
    p.add_argument(
        "--refine-steps",
        type=int,
        default=0,
        help="write-time refinement steps of each memory (memsplice.memory.refine; 0: the encoder's latents)",
    )
    args = p.parse_args()
    torch.manual_seed(0)
    reasoner = load_reasoner(device=args.device)
    path = args.checkpoint or default_checkpoint_dir()
    memory = MemoryModel.from_pretrained(path, reasoner=reasoner).eval()
    tok = reasoner.require_tokenizer()
    instruction = memory.config.reconstruction_instruction
    if not instruction:
        raise SystemExit(f"{path} records no formation instruction")
    reader = Reader(reasoner, settings=GenerationSettings(max_new_tokens=24))
    items = passages(reader, args.questions, args.tokens, args.seed)
    scores = {"readout": 0.0, "latent": 0.0, "text": 0.0, "none": 0.0}
    for item in items:
        with torch.no_grad():
            mem = memory.write_text([item["passage"]], refine_steps=args.refine_steps)
            ins = torch.tensor(
                [tok(instruction, add_special_tokens=False)["input_ids"]], device=reasoner.device
            )
            out = memory.generate(
                ins, memory=mem, max_new_tokens=item["passage_tokens"] + 16, do_sample=False
            )
        readout = tok.decode(out[0, ins.shape[1] :], skip_special_tokens=True)
        preds = {
            "readout": readout,
            "latent": reader.read(item["question"], None, mem.kv).text,
            "text": reader.read(item["question"], item["passage"]).text,
            "none": reader.read(item["question"]).text,
        }
        item["predictions"] = preds
        item["contains"] = {}
        for name, text in preds.items():
            hit = max(contains_answer(text, g) for g in [item["answer"], *item["aliases"]])
            item["contains"][name] = hit
            scores[name] += hit
        print(
            f"{item['question']} [{item['answer']}] "
            + " ".join(f"{k}={int(v)}" for k, v in item["contains"].items())
        )
    n = max(1, len(items))
    summary = {k: v / n for k, v in scores.items()}
    print("contains:", {k: round(100 * v, 1) for k, v in summary.items()}, f"over {len(items)} questions")
    saved = save_result(
        args.record,
        {
            "checkpoint": str(path),
            "questions": len(items),
            "max_passage_tokens": args.tokens,
            "slots": memory.config.num_slots,
            "refine_steps": args.refine_steps,
            "contains": summary,
            "items": items,
        },
        device=reasoner.device,
        directory=RESULTS,
    )
    print(f"saved {saved}")


if __name__ == "__main__":
    main()
