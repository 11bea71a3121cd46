"""How fast can the card run the frozen reasoner's matrix multiplies at a formation step's shapes?

Most of a formation step's counted FLOPs (`memsplice.train.flops`) are the frozen reasoner's linear layers, run
forward and again for the activation gradient, over every text token of the step. This script times exactly those
GEMMs in bf16, alone, on one device: for each linear layer as the fast reader runs it (q/k/v fused, o, gate/up
fused, down) the forward product F.linear(x (M, K), W (N, K)) and the activation-gradient product dY (M, N) @ W,
and the LM head at M target positions. For each it reports TFLOP/s, the share of the card's dense bf16 peak, and
the arithmetic intensity (FLOPs per byte of operands and result) next to the card's ridge point (peak over the
measured device-to-device copy bandwidth): a GEMM below the ridge cannot reach the peak on any kernel.

The FLOP-weighted share over one step's reasoner GEMMs (`gemm_share`) bounds what a formation step can reach
while those GEMMs dominate: a step whose attention, norms and copies cost nothing would still run at about that
share of the peak. Presets are the public SmolLM2 shapes (135M is the shipped reasoner; 360M and 1.7B show how
the bound moves with width).

    PYTHONPATH=src python scripts/formation/gemm_ceiling.py --shapes smollm2-135m smollm2-360m smollm2-1.7b \
        --tokens 33792 --record h200
    # a random-weight reasoner of a preset's shape, to time whole steps with profile_step.py run.reasoner=DIR
    PYTHONPATH=src python scripts/formation/gemm_ceiling.py --write-reasoner smollm2-1.7b /tmp/r1.7b

Saves benchmarks/results/formation/gemm-ceiling-<record>.json (command, commit, device, date) with --record NAME.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from memsplice.bench.record import save_result
from memsplice.bench.timing import cuda_ms_per_call
from memsplice.train.flops import peak_flops


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 49152

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features K, out_features N) of each decoder linear layer, q/k/v and gate/up fused."""
        d, hd = self.hidden, self.head_dim
        return {
            "qkv": (d, (self.heads + 2 * self.kv_heads) * hd),
            "o": (self.heads * hd, d),
            "gate_up": (d, 2 * self.intermediate),
            "down": (self.intermediate, d),
        }


PRESETS = {  # the published SmolLM2 configurations
    "smollm2-135m": Shape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3),
    "smollm2-360m": Shape(hidden=960, intermediate=2560, layers=32, heads=15, kv_heads=5),
    "smollm2-1.7b": Shape(hidden=2048, intermediate=8192, layers=24, heads=32, kv_heads=32),
}


def copy_bandwidth(device: torch.device, gib: float = 1.0, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = cuda_ms_per_call(lambda: dst.copy_(src), iters)
    return 2 * n * 2 / (ms / 1000)


def gemm(m: int, k: int, n: int, device: torch.device, iters: int, peak: float) -> dict:
    """Forward (M,K)x(K,N) as F.linear and the activation gradient (M,N)x(N,K), timed in bf16."""
    x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
    w = torch.randn(n, k, dtype=torch.bfloat16, device=device) * k**-0.5
    dy = torch.randn(m, n, dtype=torch.bfloat16, device=device)
    flops = 2.0 * m * k * n
    bytes_moved = 2.0 * (m * k + n * k + m * n)
    out = {"M": m, "K": k, "N": n, "flops": flops, "intensity": flops / bytes_moved}
    for name, fn in (("forward", lambda: F.linear(x, w)), ("input_grad", lambda: dy @ w)):
        ms = cuda_ms_per_call(fn, iters)
        out[f"{name}_ms"] = ms
        out[f"{name}_tflops"] = flops / (ms / 1000) / 1e12
        out[f"{name}_share"] = flops / (ms / 1000) / peak
    return out


def ceiling(shape: Shape, tokens: int, targets: int, device: torch.device, iters: int, peak: float) -> dict:
    """Every reasoner GEMM of one step (each layer forward and activation gradient, the head at `targets`)."""
    rows, flops, ms = {}, 0.0, 0.0
    for name, (k, n) in shape.linears().items():
        g = gemm(tokens, k, n, device, iters, peak)
        rows[name] = g
        flops += 2 * g["flops"] * shape.layers
        ms += (g["forward_ms"] + g["input_grad_ms"]) * shape.layers
    head = gemm(targets, shape.hidden, shape.vocab, device, iters, peak)
    rows["lm_head"] = head
    flops += 2 * head["flops"]
    ms += head["forward_ms"] + head["input_grad_ms"]
    return {
        "shape": asdict(shape),
        "tokens": tokens,
        "targets": targets,
        "gemms": rows,
        "step_gemm_flops": flops,
        "step_gemm_ms": ms,
        "gemm_tflops": flops / (ms / 1000) / 1e12,
        "gemm_share": flops / (ms / 1000) / peak,
    }


def write_reasoner(shape: Shape, directory: str) -> None:
    """A random-weight Llama reasoner of `shape` with the default reasoner's tokenizer, for timing only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from memsplice import load_reasoner

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    load_reasoner(None, device="cpu").require_tokenizer().save_pretrained(directory)
    print(json.dumps({"written": directory, "shape": asdict(shape)}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["smollm2-135m"], choices=sorted(PRESETS))
    p.add_argument(
        "--tokens",
        type=int,
        default=33792,
        help="text tokens the reasoner reads per step (M of the decoder GEMMs; default: 128 rows of 256 + 8)",
    )
    p.add_argument("--targets", type=int, default=32768, help="scored positions per step (M of the LM head)")
    p.add_argument("--iters", type=int, default=50, help="timed calls per GEMM")
    p.add_argument(
        "--write-reasoner", nargs=2, metavar=("PRESET", "DIR"), help="write a random reasoner and exit"
    )
    p.add_argument("--record", default=None, help="save benchmarks/results/formation/gemm-ceiling-NAME.json")
    args = p.parse_args()
    if args.write_reasoner:
        preset, directory = args.write_reasoner
        if preset not in PRESETS:
            p.error(f"unknown preset {preset!r}: one of {', '.join(sorted(PRESETS))}")
        write_reasoner(PRESETS[preset], directory)
        return 0
    if not torch.cuda.is_available():
        p.error("GEMM timing needs a CUDA device")
    device = torch.device("cuda")
    peak = peak_flops(device)
    if peak is None:
        p.error(
            f"no bf16 peak known for {torch.cuda.get_device_name(device)} (memsplice.train.flops.PEAK_BF16)"
        )
    bandwidth = copy_bandwidth(device)
    result = {
        "device_name": torch.cuda.get_device_name(device),
        "peak_bf16_flops": peak,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "ridge_flops_per_byte": peak / bandwidth,
        "presets": {},
    }
    for name in args.shapes:
        result["presets"][name] = c = ceiling(
            PRESETS[name], args.tokens, args.targets, device, args.iters, peak
        )
        per = {g: round(v["forward_share"], 3) for g, v in c["gemms"].items()}
        print(
            f"{name}: step GEMMs at {c['gemm_tflops']:.0f} TFLOP/s = {c['gemm_share']:.1%} of peak; "
            f"forward share per GEMM {per}",
            flush=True,
        )
    print(json.dumps(result, indent=2), flush=True)
    if args.record:
        path = save_result(f"formation/gemm-ceiling-{args.record}", result, device=device)
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
