"""How much an untrained memory hurts the reasoner's reading, per projection initialisation (kv_init).

Reconstruction loss (teacher-forced, nats/token) and token accuracy on held-out passages for: no memory (floor),
and an untrained memory with kv_init = reasoner / random / sink (gate bias 3 and 0). A memory that starts far above
the floor has to be un-learned before it can help, which costs steps; the formation recipe starts from "sink".

    PYTHONPATH=src python scripts/formation/init_loss.py [--passages 6] [--length 64] [--device cpu]

Saves benchmarks/results/formation-init-loss.json (command, commit, device, date).
"""

from __future__ import annotations

import argparse

import torch

from memsplice import MemoryConfig, MemoryModel, load_reasoner
from memsplice.bench.record import save_result
from memsplice.inject.splice import hidden_states_with_memory
from memsplice.train import objectives as obj
from memsplice.train.config import DataArgs
from memsplice.train.data import corpus_tokens, heldout_passages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=6)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--sources", nargs="+", default=["tinyshakespeare"])
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    reasoner = load_reasoner(device=args.device)
    tok = reasoner.tokenizer
    passages = heldout_passages(
        corpus_tokens(tok, DataArgs(sources=args.sources), "heldout"), args.length, args.passages
    ).to(reasoner.device)
    instruction = torch.tensor(
        tok(DataArgs().instruction, add_special_tokens=False)["input_ids"], device=reasoner.device
    )
    rows = []
    with torch.no_grad():
        text = torch.cat([instruction.expand(len(passages), -1), passages], 1)
        hidden = hidden_states_with_memory(reasoner, text, None, None)
        i = instruction.numel()
        loss, hits = obj.lm_head_cross_entropy(reasoner, hidden[:, i - 1 : i + args.length - 1], passages)
        rows.append(
            {
                "memory": "none (floor)",
                "loss": float(loss) / passages.numel(),
                "token_accuracy": int(hits) / passages.numel(),
            }
        )
        for kv_init in ("reasoner", "random", "sink"):
            for bias in (3.0, 0.0):
                torch.manual_seed(0)
                memory = MemoryModel(MemoryConfig(kv_init=kv_init, gate_init_bias=bias), reasoner)
                result = obj.reconstruction(memory, passages, instruction)
                rows.append(
                    {
                        "memory": f"untrained, kv_init={kv_init}, gate_init_bias={bias}",
                        "loss": float(result.loss),
                        "token_accuracy": int(result.correct) / result.tokens,
                    }
                )
    for r in rows:
        print(f"{r['memory']:<48} loss {r['loss']:6.3f}  token acc {100 * r['token_accuracy']:5.1f}%")
    save_result(
        "formation-init-loss",
        {
            "reasoner": reasoner.name,
            "passages": args.passages,
            "length": args.length,
            "sources": args.sources,
            "rows": rows,
        },
        device=reasoner.device,
    )


if __name__ == "__main__":
    main()
