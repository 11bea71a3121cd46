"""The stability stream's early-fact probes asked two ways, before any online update: as the bare user turn the
stability benchmark's forgetting curve uses, and in the eval reader's prompt (system message, "Short answer:") that
the bootstrap and skill rehearsal train.

    python scripts/online/probe_prompts.py CHECKPOINT [CHECKPOINT ...] [--facts 128] [--record NAME]

The probes are the ones `memsplice bench online --part stability --context-tokens 32 --facts N` builds (the same
seed, stream and facts), so the numbers are that run's update-0 point under each prompt.
"""

import argparse
import json

from memsplice.bench import online as bench
from memsplice.bench.record import save_result
from memsplice.checkpoints import load_memory
from memsplice.reasoner import load_reasoner


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--facts", type=int, default=128)
    p.add_argument("--context-tokens", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--record", default=None, help="save as benchmarks/results/NAME.json with provenance")
    args = p.parse_args()
    stream_args = argparse.ArgumentParser()
    bench.add_arguments(stream_args)
    stream_args = stream_args.parse_args(
        ["--facts", str(args.facts), "--context-tokens", str(args.context_tokens)]
    )
    reasoner = load_reasoner(None, device=args.device)
    _, probes, _ = bench.build_stream(reasoner.tokenizer, "{role}: {text}\n", stream_args, 8 * args.facts)
    out = {"facts": len(probes), "context_tokens": args.context_tokens, "checkpoints": {}}
    for checkpoint in args.checkpoints:
        memory = load_memory(reasoner, checkpoint)
        out["checkpoints"][checkpoint] = {
            prompt: bench.fact_accuracy(memory, probes, prompt=prompt) for prompt in ("chat", "reader")
        }
    print(json.dumps(out, indent=2))
    if args.record:
        print(f"saved {save_result(args.record, out, device=reasoner.device)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
