"""`memsplice bench latency`: time to first token and decode ms/token, with and without memory, against the floor.

Scenarios (a `--question-tokens` prompt in every one):
- `none`: the question alone;
- `memory-<M>`: M memory slots (written by the memory model from `--memory-tokens` tokens) in front of it;
- `full-<n>`: n tokens of context in front of it, for each n in `--contexts` (capped to the reasoner's window).

Each scenario is timed two ways: with memsplice's engine (`memsplice.engine.GreedyDecoder`: a preallocated cache,
the gate as a mask bias, CUDA graphs on a GPU) and with eager Hugging Face `generate()` (`generate_with_memory`).
Engine times come from CUDA events (`perf_counter` on the CPU); HF times from `perf_counter` around a synchronised
`generate()`: TTFT is a 1-token generate, decode ms/token is (time of N tokens - time of 1) / (N - 1). Every number
is the median of `--repeats` runs after `--warmup` runs. The generated tokens of the engine are compared with HF's
(and, on a GPU, graph replay with the engine's eager path) and the comparison is reported. `none` and the memory
scenarios run on one engine (one cache size and one set of graphs, as a server would serve both), so memory's
overhead is what the memory itself adds. With `--compile`, a second engine whose decode step goes through
`torch.compile` is timed on `none` and the first memory scenario and checked against the first one teacher-forced
(`compare_engines`); the headline uses it only where it is consistent and faster.

The floor is what the hardware allows at best: each decode step must read every weight once plus the KV cache in
use, so floor = (weight bytes + KV bytes) / memory bandwidth (measured with a device-to-device copy; the nominal
figure of known GPUs is reported beside it). For the first token the floor is the larger of that read time and
prefill FLOPs (2 x the weights' matmul parameters per token; attention FLOPs left out, so the floor is if anything
low) over the card's nominal dense bf16 peak (GPUs in `NOMINAL` only).
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..devices import synchronize
from .record import save_result, update_summary

logger = logging.getLogger(__name__)

# name fragment -> (HBM bytes/s, dense bf16 FLOP/s), from the vendors' data sheets
NOMINAL = {
    "H200": (4.8e12, 989e12),
    "H100 80GB HBM3": (3.35e12, 989e12),
    "H100 PCIe": (2.0e12, 756e12),
    "H100": (3.35e12, 989e12),
    "A100-SXM4-80GB": (2.04e12, 312e12),
    "A100": (1.56e12, 312e12),
}


@dataclass
class LatencyArgs:
    """What the latency benchmark measures."""

    question_tokens: int = 64
    """Prompt length in every scenario."""
    new_tokens: int = 64
    """Tokens decoded per timed generation."""
    slots: tuple[int, ...] = (16,)
    """Memory sizes: each is one `memory-<M>` scenario (M a multiple of the memory's slots per write)."""
    memory_tokens: int = 512
    """Tokens written into each memory chunk."""
    contexts: tuple[int, ...] = (1024, 2048, 4096, 8192)
    """Full-context scenarios, in tokens before the question."""
    repeats: int = 10
    warmup: int = 2
    hf_repeats: int = 3
    """Repeats of eager HF generate (slow; 0 skips it)."""
    cuda_graphs: bool | None = None
    """Engine with CUDA graphs (default: on CUDA devices)."""
    compile: bool = False
    """Also time the engine with a `torch.compile`d decode step on `none` and the first `memory-*` scenario."""
    compile_mode: str | None = None
    """`torch.compile` mode of that step (None: the default)."""

    def __post_init__(self):
        for name in ("question_tokens", "new_tokens", "memory_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"LatencyArgs.{name} must be >= 1 (got {getattr(self, name)})")
        if self.new_tokens < 2:
            raise ValueError(
                "LatencyArgs.new_tokens must be >= 2 (decode time is measured after the first token)"
            )
        if any(m < 1 for m in self.slots) or any(n < 1 for n in self.contexts):
            raise ValueError("LatencyArgs.slots and contexts must be positive")


def add_arguments(p):
    def ints(text):
        out = []
        for part in text.split(","):
            part = part.strip().lower()
            if part:
                out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        return tuple(out)

    p.add_argument("--reasoner", default=None, help="reasoner source (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument(
        "--checkpoint", default=None, help="memory checkpoint (default: the shipped one, else untrained)"
    )
    p.add_argument("--device", default=None, help="cuda, cpu ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--question-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per timed run (default: 64)")
    p.add_argument("--slots", type=ints, default=(16,), help="memory slot counts, e.g. 16,64 (default: 16)")
    p.add_argument("--memory-tokens", type=int, default=512, help="tokens written per memory chunk")
    p.add_argument(
        "--contexts",
        type=ints,
        default=(1024, 2048, 4096, 8192),
        help="full-context lengths before the question, e.g. 1k,2k,4k,8k",
    )
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--hf-repeats", type=int, default=3, help="repeats of eager HF generate (0: skip it)")
    p.add_argument("--no-graphs", action="store_true", help="engine without CUDA graphs")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time a torch.compile'd decode step on none and memory (compiles for a minute or two)",
    )
    p.add_argument(
        "--compile-mode",
        default=None,
        choices=("default", "max-autotune-no-cudagraphs"),
        help="torch.compile mode for --compile (default: default; max-autotune-no-cudagraphs compiles longer)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--save",
        action="store_true",
        help="write benchmarks/results/latency.json and the headline into summary.json",
    )
    p.add_argument(
        "--save-as",
        default=None,
        metavar="NAME",
        help="write benchmarks/results/NAME.json only (summary.json untouched), e.g. for a variant run",
    )


# -- measuring ---------------------------------------------------------------------------------------------------
def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once)."""
    n = nbytes // 2 if device.type == "cuda" else nbytes // 16
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n / min(times)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (a tied embedding / LM head counts once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def nominal_for(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, value in NOMINAL.items():
        if key in name:
            return value
    return None, None


def _median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 4)


def _time_engine(decoder, prompt, memory, args: LatencyArgs) -> dict:
    for _ in range(args.warmup):
        decoder.generate(prompt, memory, max_new_tokens=args.new_tokens)
    runs = [decoder.generate(prompt, memory, max_new_tokens=args.new_tokens) for _ in range(args.repeats)]
    return {
        "ttft_ms": _median_ms([r.ttft_s for r in runs]),
        "decode_ms_per_token": _median_ms([r.decode_s_per_token for r in runs]),
        "cuda_graphs": runs[-1].cuda_graphs,
        "tokens": runs[-1].tokens,
    }


def _time_hf(reasoner, prompt, memory, args: LatencyArgs) -> dict:
    from transformers.generation.streamers import BaseStreamer

    from ..inject.splice import generate_with_memory

    device = reasoner.device
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)
    pad = reasoner.tokenizer.pad_token_id if reasoner.tokenizer is not None else 0

    # No stop token: every run decodes exactly new_tokens tokens, and no logit is suppressed to force that (as
    # min_new_tokens would), so the tokens stay comparable with the engine's.
    config = copy.deepcopy(reasoner.model.generation_config)
    config.eos_token_id = None
    config.pad_token_id = pad
    config.do_sample = False
    config.max_new_tokens = args.new_tokens

    class _Clock(BaseStreamer):
        """Timestamps each token generate() emits; the first call carries the prompt, not a new token."""

        def __init__(self):
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            synchronize(device)
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def gen():
        # TTFT and decode time come from the same run (first token, then the rest), so neither is a difference of
        # two separately noisy medians that could come out negative.
        clock = _Clock()
        t0 = time.perf_counter()
        out = generate_with_memory(reasoner, ids, mask, memory, generation_config=config, streamer=clock)
        synchronize(device)
        first, last = clock.times[0], clock.times[-1]
        return first - t0, (last - first) / max(len(clock.times) - 1, 1), out

    for _ in range(min(args.warmup, 1)):
        gen()
    runs = [gen() for _ in range(args.hf_repeats)]
    ttft = statistics.median(r[0] for r in runs)
    per_token = statistics.median(r[1] for r in runs)
    return {
        "ttft_ms": round(ttft * 1e3, 4),
        "decode_ms_per_token": round(per_token * 1e3, 4),
        "tokens": runs[-1][2][0, len(prompt) :].tolist(),
    }


def compare_engines(
    reference, other, prompt, tokens: list[int], memory=None, min_agreement: float = 0.95
) -> dict:
    """Teacher-forced comparison of two engines on the same tokens (`GreedyDecoder.score`).

    bf16 kernels that fuse differently round differently, so two correct engines can pick different greedy tokens
    where the top two logits nearly tie, and their free-running paths then part for good. Fed the same tokens, a
    correct engine agrees at every step except such ties. `consistent`: top-1 agreement of at least `min_agreement`
    and every disagreement a tie, i.e. the reference's margin between the two picks no larger than that step's
    largest logit difference between the engines."""
    ref = reference.score(prompt, tokens, memory).float()
    got = other.score(prompt, tokens, memory).float()
    diff = (ref - got).abs().amax(-1)  # (T,)
    a, b = ref.argmax(-1), got.argmax(-1)
    rows = torch.arange(len(tokens), device=ref.device)
    margin = ref[rows, a] - ref[rows, b]  # 0 where they agree
    disagree = a != b
    agreement = 1.0 - float(disagree.float().mean())
    ties = bool((margin[disagree] <= diff[disagree]).all())
    return {
        "steps": len(tokens),
        "top1_agreement": round(agreement, 4),
        "max_logit_diff": round(float(diff.max()), 4),
        "disagreements_are_ties": ties,
        "consistent": agreement >= min_agreement and ties,
    }


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def measure_latency(reasoner, memory_model, args: LatencyArgs) -> dict:
    """Every scenario's engine and HF timings, the floor, and the token comparison."""
    from ..engine import GreedyDecoder
    from ..inject.compose import concat_slots

    device = reasoner.device
    s = reasoner.shapes
    window = s.max_positions or 2048
    kv_per_position = s.num_layers * 2 * s.kv_width * reasoner.dtype.itemsize
    gen = torch.Generator().manual_seed(0)
    vocab = s.vocab_size
    low = min(100, vocab // 4)
    question = torch.randint(low, vocab, (args.question_tokens,), generator=gen).tolist()

    per_write = memory_model.config.num_slots
    chunk_ids = torch.randint(
        low, vocab, (1, min(args.memory_tokens, memory_model.config.max_memory_tokens)), generator=gen
    ).to(device)
    scenarios: list[tuple[str, list[int], object]] = [("none", question, None)]
    for m in args.slots:
        if m % per_write:
            raise ValueError(f"--slots {m} is not a multiple of the memory's {per_write} slots per write")
        chunks = [memory_model.write(chunk_ids).kv for _ in range(m // per_write)]
        scenarios.append((f"memory-{m}", question, concat_slots(chunks, reasoner)))
    for n in args.contexts:
        n = min(n, window - args.question_tokens - args.new_tokens)
        context = torch.randint(low, vocab, (n,), generator=gen).tolist()
        scenarios.append((f"full-{n}", context + question, None))

    bandwidth = measure_bandwidth(device)
    nominal_bw, nominal_flops = nominal_for(device)
    weights = weight_bytes(reasoner.model)
    flops_per_token = 2 * (
        weights // reasoner.dtype.itemsize - s.vocab_size * s.hidden_size
    )  # matmuls, no lookup

    def positions(prompt, memory) -> int:
        return (memory.num_slots if memory is not None else 0) + len(prompt) + args.new_tokens

    def cache_size(n: int) -> int:
        return min(window, max(64, 1 << (n - 1).bit_length()))

    # `none` and the memory scenarios share one engine (one cache size, one set of graphs), as a server serves
    # requests with and without memory from one preallocated cache; each full-context scenario gets its own.
    shared = cache_size(max(positions(p, m) for n, p, m in scenarios if not n.startswith("full-")))
    engines: dict[tuple[int, str], object] = {}

    def engine_for(size: int, kind: str):
        if (size, kind) not in engines:
            graphs = False if kind == "eager" else args.cuda_graphs
            engines[size, kind] = GreedyDecoder(
                reasoner,
                size,
                max_new_tokens=args.new_tokens,
                cuda_graphs=graphs,
                compile_decode=kind == "compiled",
                compile_mode=args.compile_mode,
            )
        return engines[size, kind]

    rows = []
    for name, prompt, memory in scenarios:
        slots = memory.num_slots if memory is not None else 0
        size = cache_size(positions(prompt, memory)) if name.startswith("full-") else shared
        logger.info("latency: %s (%d positions, cache of %d)", name, positions(prompt, memory), size)
        engine = engine_for(size, "engine")
        row = {
            "scenario": name,
            "memory_slots": slots,
            "prompt_tokens": len(prompt),
            "cache_positions": size,
            "engine": _time_engine(engine, prompt, memory, args),
        }
        if args.compile and (name == "none" or name == f"memory-{args.slots[0]}"):
            t0 = time.perf_counter()
            try:
                compiled = engine_for(size, "compiled")
                row["engine_compiled"] = _time_engine(compiled, prompt, memory, args)
                row["engine_compiled"]["compile_and_time_s"] = round(time.perf_counter() - t0, 1)
                row["compiled_tokens_equal_engine"] = (
                    row["engine_compiled"].pop("tokens") == row["engine"]["tokens"]
                )
                row["compiled_check"] = compare_engines(
                    engine, compiled, prompt, row["engine"]["tokens"], memory
                )
            except (
                Exception
            ) as e:  # compilation is an optional speed-up; its failure is a result, not a crash
                logger.warning("torch.compile of the decode step failed: %s", e)
                row["engine_compiled"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if engine.cuda_graphs:
            eager = engine_for(size, "eager")
            eager_tokens = eager.generate(prompt, memory, max_new_tokens=args.new_tokens).tokens
            row["graph_tokens_equal_eager_engine"] = eager_tokens == row["engine"]["tokens"]
        if args.hf_repeats:
            row["eager_hf"] = _time_hf(reasoner, prompt, memory, args)
            diff = _first_difference(row["engine"]["tokens"], row["eager_hf"]["tokens"])
            row["tokens_equal_hf"] = diff is None
            row["first_token_difference_hf"] = diff
            row["eager_hf"].pop("tokens")
        row["engine"].pop("tokens")
        kv_decode = (
            slots + len(prompt) + args.new_tokens // 2
        ) * kv_per_position  # mean context while decoding
        row["floor"] = {
            "decode_ms_per_token": round((weights + kv_decode) / bandwidth * 1e3, 4),
            "ttft_ms": round(
                max(
                    (weights + (slots + len(prompt)) * kv_per_position) / bandwidth,
                    flops_per_token * len(prompt) / nominal_flops if nominal_flops else 0.0,
                )
                * 1e3,
                4,
            ),
        }
        rows.append(row)
    return {
        "args": asdict(args),
        "reasoner": reasoner.name,
        "dtype": str(reasoner.dtype),
        "weight_bytes": weights,
        "kv_bytes_per_position": kv_per_position,
        "bandwidth_gbps_measured": round(bandwidth / 1e9, 1),
        "bandwidth_gbps_nominal": None if nominal_bw is None else round(nominal_bw / 1e9, 1),
        "peak_bf16_tflops_nominal": None if nominal_flops is None else round(nominal_flops / 1e12),
        "scenarios": rows,
        "headline": headline(rows, device),
    }


def _variant(rows: list[dict]) -> str:
    """ "engine_compiled" when it ran everywhere it was asked, agrees with the engine (`compare_engines`) and
    decodes faster."""
    asked = [r for r in rows if "engine_compiled" in r]
    if not asked or any(
        "error" in r["engine_compiled"] or not r.get("compiled_check", {}).get("consistent") for r in asked
    ):
        return "engine"
    faster = all(
        r["engine_compiled"]["decode_ms_per_token"] < r["engine"]["decode_ms_per_token"] for r in asked
    )
    return "engine_compiled" if faster else "engine"


def headline(rows: list[dict], device: torch.device) -> dict:
    """The numbers summary.json keeps: none, the first memory scenario, and eager HF on it; plus the targets."""
    by = {r["scenario"]: r for r in rows}
    variant = _variant(rows)
    memory = next((r for r in rows if r["scenario"].startswith("memory-")), None)
    out = {
        "engine": "graphs+compile"
        if variant == "engine_compiled"
        else ("graphs" if by["none"]["engine"]["cuda_graphs"] else "static cache, eager")
    }
    out["none"] = {k: by["none"][variant][k] for k in ("ttft_ms", "decode_ms_per_token")}
    if memory is not None:
        out["memory"] = {k: memory[variant][k] for k in ("ttft_ms", "decode_ms_per_token")}
        out["memory"]["slots"] = memory["memory_slots"]
        if "eager_hf" in memory:
            out["eager_hf"] = {k: memory["eager_hf"][k] for k in ("ttft_ms", "decode_ms_per_token")}
        none, mem = out["none"], out["memory"]
        out["memory_overhead"] = {
            k: round(mem[k] / none[k] - 1, 4) for k in ("ttft_ms", "decode_ms_per_token")
        }
        if device.type == "cuda":
            out["targets_met"] = {
                "decode_ms_per_token<=2": mem["decode_ms_per_token"] <= 2.0,
                "ttft_ms<=5": mem["ttft_ms"] <= 5.0,
                "memory_overhead<=10%": max(out["memory_overhead"].values()) <= 0.10,
            }
    out["cuda_graphs"] = by["none"]["engine"]["cuda_graphs"]
    return out


# -- the command -------------------------------------------------------------------------------------------------
def run(args) -> int:
    from memsplice.checkpoints import load_memory
    from memsplice.reasoner import load_reasoner

    largs = LatencyArgs(
        question_tokens=args.question_tokens,
        new_tokens=args.new_tokens,
        slots=args.slots,
        memory_tokens=args.memory_tokens,
        contexts=args.contexts,
        repeats=args.repeats,
        warmup=args.warmup,
        hf_repeats=args.hf_repeats,
        cuda_graphs=False if args.no_graphs else None,
        compile=args.compile,
        compile_mode=None if args.compile_mode in (None, "default") else args.compile_mode,
    )
    reasoner = load_reasoner(args.reasoner, device=args.device, dtype=args.dtype)
    torch.manual_seed(0)
    memory_model = load_memory(reasoner, args.checkpoint).eval()
    result = measure_latency(reasoner, memory_model, largs)
    result["checkpoint"] = args.checkpoint
    if args.save_as:
        result["saved"] = str(save_result(args.save_as, result, device=reasoner.device))
    if args.save:
        path = save_result("latency", result, device=reasoner.device)
        h = result["headline"]
        update_summary(
            "latency",
            {
                k: h[k]
                for k in (
                    "engine",
                    "none",
                    "memory",
                    "eager_hf",
                    "memory_overhead",
                    "targets_met",
                    "cuda_graphs",
                )
                if k in h
            },
            device=reasoner.device,
        )
        result["saved"] = str(path)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['reasoner']} ({result['dtype']}), bandwidth {result['bandwidth_gbps_measured']} GB/s measured"
        + (f", {result['bandwidth_gbps_nominal']} nominal" if result["bandwidth_gbps_nominal"] else "")
    )
    print(
        f"{'scenario':14s} {'TTFT ms':>9s} {'floor':>7s} {'HF':>8s} | {'decode ms/tok':>13s} {'floor':>7s} "
        f"{'HF':>7s} | tokens = HF"
    )
    for r in result["scenarios"]:
        e, f, hf = r["engine"], r["floor"], r.get("eager_hf", {})
        if "decode_ms_per_token" in r.get("engine_compiled", {}):
            c = r["engine_compiled"]
            print(
                f"{r['scenario'] + ' (compiled)':14s} {c['ttft_ms']:9.3f} {'':7s} {'':8s} | "
                f"{c['decode_ms_per_token']:13.3f}"
            )
        print(
            f"{r['scenario']:14s} {e['ttft_ms']:9.3f} {f['ttft_ms']:7.3f} {hf.get('ttft_ms', float('nan')):8.2f} | "
            f"{e['decode_ms_per_token']:13.3f} {f['decode_ms_per_token']:7.3f} "
            f"{hf.get('decode_ms_per_token', float('nan')):7.2f} | {r.get('tokens_equal_hf', 'n/a')}"
        )
    h = result["headline"]
    if "memory_overhead" in h:
        o = h["memory_overhead"]
        print(
            f"memory overhead over none: TTFT {100 * o['ttft_ms']:+.1f}%, decode {100 * o['decode_ms_per_token']:+.1f}%"
        )
    if "targets_met" in h:
        print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in h["targets_met"].items()))
    return 0
