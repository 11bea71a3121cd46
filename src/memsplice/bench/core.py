"""`memsplice bench core`: reasoner load time (cold and cached) and forward latency with and without memory.

Cold: the GGUF is dequantized into an empty temporary cache directory. Cached: the same load again, reading the
dequantized safetensors. Forward latency: one forward pass over a `--question-tokens` prompt, bare and with
`--slots` memory slots in front (the memory write, i.e. encoder + projections, is timed separately), median over
`--repeats` runs after warm-up, on the device given (CPU by default).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import torch

from ..devices import synchronize
from .record import save_result, update_summary


def add_arguments(p):
    p.add_argument("--reasoner", default=None, help="reasoner source (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument(
        "--checkpoint", default=None, help="memory checkpoint (default: an untrained default config)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--slots", type=int, default=16, help="memory slots when no checkpoint is given")
    p.add_argument("--memory-tokens", type=int, default=512, help="tokens written into memory")
    p.add_argument("--question-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--skip-cold", action="store_true", help="do not time a cold (dequantizing) load")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/core.json and summary.json")


def _median_ms(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(args) -> int:
    from memsplice import MemoryConfig, MemoryModel, load_reasoner

    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"threads": torch.get_num_threads()}
    if not args.skip_cold:
        old = os.environ.get("MEMSPLICE_CACHE")
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["MEMSPLICE_CACHE"] = tmp
            t0 = time.perf_counter()
            load_reasoner(args.reasoner, device=args.device)
            result["load_s_cold"] = round(time.perf_counter() - t0, 3)
        if old is None:
            os.environ.pop("MEMSPLICE_CACHE")
        else:
            os.environ["MEMSPLICE_CACHE"] = old
    load_reasoner(args.reasoner, device=args.device)  # make sure the real cache is warm
    t0 = time.perf_counter()
    reasoner = load_reasoner(args.reasoner, device=args.device)
    result["load_s_cached"] = round(time.perf_counter() - t0, 3)

    if args.checkpoint:
        memory = MemoryModel.from_pretrained(args.checkpoint, reasoner=reasoner)
    else:
        memory = MemoryModel(MemoryConfig(num_slots=args.slots), reasoner)
    memory.eval()
    vocab = reasoner.shapes.vocab_size
    gen = torch.Generator().manual_seed(0)
    mem_ids = torch.randint(
        100, vocab, (1, min(args.memory_tokens, memory.config.max_memory_tokens)), generator=gen
    )
    q_ids = torch.randint(100, vocab, (1, args.question_tokens), generator=gen).to(reasoner.device)

    def sync():
        synchronize(reasoner.device)

    with torch.no_grad():
        mem = memory.write(mem_ids)
        result["cpu_forward_ms"] = {
            "without_memory": round(_median_ms(lambda: memory(q_ids, memory=None), args.repeats, sync), 2),
            "with_memory": round(_median_ms(lambda: memory(q_ids, memory=mem), args.repeats, sync), 2),
        }
        result["memory_write_ms"] = round(_median_ms(lambda: memory.write(mem_ids), args.repeats, sync), 2)
    result.update(
        {
            "slots": memory.config.num_slots,
            "memory_tokens": mem_ids.shape[1],
            "question_tokens": args.question_tokens,
            "reasoner": reasoner.name,
            "checkpoint": args.checkpoint or "untrained default config",
            "repeats": args.repeats,
        }
    )
    if args.save:
        path = save_result("core", result, device=args.device)
        update_summary(
            "core",
            {k: result[k] for k in ("load_s_cold", "load_s_cached", "cpu_forward_ms") if k in result},
            device=args.device,
        )
        result["saved"] = str(path)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        f = result["cpu_forward_ms"]
        if "load_s_cold" in result:
            print(f"load (cold, dequantize GGUF)  {result['load_s_cold']:8.2f} s")
        print(f"load (cached safetensors)     {result['load_s_cached']:8.2f} s")
        print(f"forward, {args.question_tokens}-token prompt, no memory     {f['without_memory']:8.2f} ms")
        print(
            f"forward, {args.question_tokens}-token prompt, {result['slots']} slots     {f['with_memory']:8.2f} ms"
        )
        print(f"memory write, {result['memory_tokens']} tokens           {result['memory_write_ms']:8.2f} ms")
    return 0
