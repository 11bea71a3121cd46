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
from memsplice.train.fused_attention import (
    _CausalFlash,
    _repeat_kv,
    gated_causal_attention,
    split_gated_causal_attention,
)


def _sdpa(q, k, v, gate, m, scale):
    return gated_causal_attention(q, k, v, gate, scale)


def _split(q, k, v, gate, m, scale):
    return split_gated_causal_attention(q, k[:, :, m:], v[:, :, m:], k[:, :, :m], v[:, :, :m], gate, scale)


def _flash(q, k, v, lse_weights, scale):
    out, lse = _CausalFlash.apply(q, k, v, scale)
    return out, lse


def _flash_reference(q, k, v, lse_weights, scale):
    t = q.shape[2]
    rep = q.shape[1] // k.shape[1]
    scores = q @ _repeat_kv(k, rep).transpose(-1, -2) * scale
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(scores, -1) @ _repeat_kv(v, rep), torch.logsumexp(scores, -1)


def _flash_grads(fn, inputs, dtype, weights, lse_weights, scale):
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out, lse = fn(*leaves, lse_weights, scale)
    ((out.float() * weights).sum() + (lse.float() * lse_weights).sum()).backward()
    return out.detach().float(), lse.detach().float(), [x.grad.float() for x in leaves]


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
    p.add_argument("--rows", type=int, nargs="+", default=[8, 128])
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
    t, m, d = args.length, args.slots, args.head_dim
    scale = d**-0.5
    dynamic = {"sdpa-compiled-dynamic": torch.compile(_sdpa, dynamic=True)} if args.compile else {}
    if args.compile:
        dynamic |= {
            "split-compiled-dynamic": torch.compile(_split, dynamic=True),
            "flash-compiled-dynamic": torch.compile(_flash, dynamic=True),
        }
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []

    def report(row):
        rows.append(row)
        print(
            " ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
            flush=True,
        )

    for b in args.rows:
        kernels = {"sdpa": _sdpa, "split": _split}
        flash_kernels = {"flash": _flash}
        if args.compile:
            torch._dynamo.reset()  # static shapes for this batch size, as a training run compiles them
            kernels |= {f"{k}-compiled": torch.compile(f) for k, f in list(kernels.items())}
            flash_kernels["flash-compiled"] = torch.compile(_flash)
            kernels |= {k: f for k, f in dynamic.items() if not k.startswith("flash")}
            flash_kernels |= {k: f for k, f in dynamic.items() if k.startswith("flash")}
        for key_scale in args.memory_key_scale:
            q = torch.randn(b, args.heads, t, d, device=dev, generator=gen)
            k, v = torch.randn(2, b, args.kv_heads, m + t, d, device=dev, generator=gen)
            k[:, :, :m] *= key_scale
            gate = torch.randn(b, m, device=dev, generator=gen) * 2
            base = torch.randn(b, args.heads, t, d, device=dev, generator=gen)
            lse_base = torch.randn(b, args.heads, t, device=dev, generator=gen)
            for loss_scale in args.loss_scale:
                weights = base * loss_scale
                ref_out, ref_grads = _grads(_sdpa, (q, k, v, gate), torch.float32, weights, m, scale)
                for name, fn in kernels.items():
                    try:
                        out, grads = _grads(fn, (q, k, v, gate), dtype, weights, m, scale)
                    except Exception as err:  # a kernel that fails to compile is reported, not fatal
                        report(
                            {"kernel": name, "rows": b, "error": f"{type(err).__name__}: {str(err)[:200]}"}
                        )
                        continue
                    report(
                        {
                            "kernel": name,
                            "rows": b,
                            "memory_key_scale": key_scale,
                            "loss_scale": loss_scale,
                            "output_max_abs_error": float((out - ref_out).abs().max()),
                            **{
                                f"grad_cosine_{n}": _cosine(g, r)
                                for n, g, r in zip(("q", "k", "v", "gate"), grads, ref_grads, strict=True)
                            },
                        }
                    )
                # the flash part alone (text only), its log-sum-exp carrying a gradient of the output's size
                text = (q, k[:, :, m:], v[:, :, m:])
                lse_weights = lse_base * loss_scale
                ref_out, ref_lse, ref_grads = _flash_grads(
                    _flash_reference, text, torch.float32, weights, lse_weights, scale
                )
                for name, fn in flash_kernels.items():
                    try:
                        out, lse, grads = _flash_grads(fn, text, dtype, weights, lse_weights, scale)
                    except Exception as err:
                        report(
                            {"kernel": name, "rows": b, "error": f"{type(err).__name__}: {str(err)[:200]}"}
                        )
                        continue
                    report(
                        {
                            "kernel": name,
                            "rows": b,
                            "memory_key_scale": key_scale,
                            "loss_scale": loss_scale,
                            "output_max_abs_error": float((out - ref_out).abs().max()),
                            "lse_max_abs_error": float((lse - ref_lse).abs().max()),
                            **{
                                f"grad_cosine_{n}": _cosine(g, r)
                                for n, g, r in zip(("q", "k", "v"), grads, ref_grads, strict=True)
                            },
                        }
                    )
    if args.record:
        path = save_result(
            f"check-split-attention-{args.record}",
            {"dtype": args.dtype, "shape": vars(args), "rows": rows},
            device=str(dev),
            directory=Path(os.environ.get("MEMSPLICE_RESULTS", "benchmarks/results")) / "formation",
        )
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
