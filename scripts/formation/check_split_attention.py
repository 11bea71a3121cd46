"""Does split attention compute what the SDPA training attention computes, on this device, in its dtype?

`memsplice.train.fused_attention.split_gated_causal_attention` (the text through the flash kernel, the memory
columns apart, merged by log-sum-exp) against `gated_causal_attention` (one SDPA call over [memory][text]) on
random inputs of a formation step's shape: grouped heads, memory keys scaled up so that the memory columns take
most of the attention (as the reasoner's attention-sink slots do), a gate that differs per slot, and the loss
scaled down to the size of gradients of a token-averaged loss. Both run in `--dtype`, eager and (`--compile`)
compiled; both are compared with the SDPA attention in float32 (the reference), by the cosine of each input's
gradient and the largest output difference.

    PYTHONPATH=src python scripts/formation/check_split_attention.py --compile --record h200

Saves benchmarks/results/formation/check-split-attention-NAME.json with --record NAME.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from memsplice.bench.record import save_result
from memsplice.train.fused_attention import gated_causal_attention, split_gated_causal_attention


def _sdpa(q, k, v, gate, m, scale):
    return gated_causal_attention(q, k, v, gate, scale)


def _split(q, k, v, gate, m, scale):
    return split_gated_causal_attention(q, k[:, :, m:], v[:, :, m:], k[:, :, :m], v[:, :, :m], gate, scale)


def _grads(fn, inputs, dtype, weights, m, scale):
    leaves = [x.detach().to(dtype if i < 3 else torch.float32).requires_grad_() for i, x in enumerate(inputs)]
    out = fn(*leaves, m, scale)
    (out.float() * weights).sum().backward()
    return out.detach().float(), [x.grad.float() for x in leaves]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    top = b.abs().max().clamp(min=torch.finfo(torch.float32).tiny)
    return float(
        torch.nn.functional.cosine_similarity((a / top).flatten().double(), (b / top).flatten().double(), 0)
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--memory-key-scale", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--loss-scale", type=float, nargs="+", default=[1.0, 1e-6, 1e-12, 1e-20])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also run both kernels under torch.compile")
    p.add_argument("--record", default=None)
    args = p.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    b, t, m, d = args.rows, args.length, args.slots, args.head_dim
    scale = d**-0.5
    kernels = {"sdpa": _sdpa, "split": _split}
    if args.compile:
        kernels |= {f"{k}-compiled": torch.compile(f) for k, f in list(kernels.items())}
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for key_scale in args.memory_key_scale:
        q = torch.randn(b, args.heads, t, d, device=dev, generator=gen)
        k, v = torch.randn(2, b, args.kv_heads, m + t, d, device=dev, generator=gen)
        k[:, :, :m] *= key_scale
        gate = torch.randn(b, m, device=dev, generator=gen) * 2
        base = torch.randn(b, args.heads, t, d, device=dev, generator=gen)
        for loss_scale in args.loss_scale:
            weights = base * loss_scale
            ref_out, ref_grads = _grads(_sdpa, (q, k, v, gate), torch.float32, weights, m, scale)
            for name, fn in kernels.items():
                out, grads = _grads(fn, (q, k, v, gate), dtype, weights, m, scale)
                row = {
                    "kernel": name,
                    "memory_key_scale": key_scale,
                    "loss_scale": loss_scale,
                    "output_max_abs_error": float((out - ref_out).abs().max()),
                    **{
                        f"grad_cosine_{n}": _cosine(g, r)
                        for n, g, r in zip(("q", "k", "v", "gate"), grads, ref_grads, strict=True)
                    },
                }
                rows.append(row)
                print(
                    f"{name:16s} key x{key_scale:<4g} loss x{loss_scale:<6g} out err {row['output_max_abs_error']:.4f} "
                    + " ".join(f"{n} {row[f'grad_cosine_{n}']:.5f}" for n in ("q", "k", "v", "gate")),
                    flush=True,
                )
    if args.record:
        path = save_result(
            f"check-split-attention-{args.record}",
            {"dtype": args.dtype, "shape": vars(args), "rows": rows},
            device=str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
            directory=Path(os.environ.get("MEMSPLICE_RESULTS", "benchmarks/results")) / "formation",
        )
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
