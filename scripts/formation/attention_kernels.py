"""Time the training attention's kernels alone, at a formation step's shapes, and check them against float32.

The training reads run one gated causal attention per reasoner layer over [memory][text]
(`memsplice.train.fused_attention.gated_causal_attention`): the gate is folded into one extra key dimension, the
head dim padded from 64 to 72, and the mask is the lower-right causal mask of the (T, M+T) score matrix. SDPA runs
that in flash attention's kernel, which rounds the head dim up to 96. This script asks what another layout or
backend would save, before any of them goes into the training code:

- `lower-right`: the shipped call as it is (SDPA's own choice of backend);
- `square`: the fast reader's `run.reader_attention: square` as it is (cuDNN first, grouped K/V);
- `square-<backend>`: the same attention with M query rows of zeros put in front of the text's, so the score
  matrix is square (M+T, M+T) and the mask the ordinary causal one (`is_causal=True`); text row M+i then sees the
  M memory keys and text keys <= i, exactly as before, and the M extra rows are dropped. Square causal attention is
  what every backend supports;
- `square-<backend>-gqa`: the same with the grouped K/V heads handed over as they are (`enable_gqa=True`);
- `text-only-<backend>`: causal attention over the text alone at head dim 64, no memory and no gate: the floor
  any gated memory attention is measured against.

Each variant is timed forward + backward (gradients for queries, keys, values and the gate) with CUDA events, and
checked on a few rows against the float32 reference (SDPA's math backend on the shipped layout): the largest output
error and the cosine of each gradient.

    PYTHONPATH=src python3 scripts/formation/attention_kernels.py --rows 128 --text 264 --record h200

Saves benchmarks/results/formation/attention-kernels-<record>.json (command, commit, device, date) with --record.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from memsplice.bench.record import save_result
from memsplice.bench.timing import cuda_ms_per_call
from memsplice.train.fused_attention import gate_folded, gated_causal_attention

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def square_gated_attention(query, key, value, gate_bias, scale, backend=None, gqa=False):
    """`gated_causal_attention(..., layout="square")` on one named SDPA backend, grouped K/V as they are (`gqa`) or
    repeated per query head. query (B, Hq, T, D); key, value (B, H, M+T, D), memory first; gate_bias (B, M)."""
    b, hq, t, d = query.shape
    m = key.shape[2] - t
    q, k, v = gate_folded(query, key, value, gate_bias, scale)
    q = torch.cat([q.new_zeros(b, hq, m, q.shape[-1]), q], dim=2)
    rep = hq // key.shape[1]
    if not gqa and rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    kwargs = {"enable_gqa": True} if gqa else {}
    with sdpa_kernel([BACKENDS[backend]]) if backend else _nothing():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **kwargs)
    return out[:, :, m:, :d]


def text_only_attention(query, key, value, gate_bias, scale, backend=None):
    """Causal attention over the text alone at the native head dim (no memory, no gate): the floor."""
    t = query.shape[2]
    rep = query.shape[1] // key.shape[1]
    k = key[:, :, -t:].repeat_interleave(rep, dim=1)
    v = value[:, :, -t:].repeat_interleave(rep, dim=1)
    with sdpa_kernel([BACKENDS[backend]]) if backend else _nothing():
        return F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scale)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def make_inputs(rows, text, memory, heads, kv_heads, head_dim, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q = randn(rows, heads, text, head_dim)
    k = randn(rows, kv_heads, memory + text, head_dim)
    v = randn(rows, kv_heads, memory + text, head_dim)
    gate = (torch.rand(rows, memory, generator=g) * 0.98 + 0.01).log().to(device=device, dtype=torch.float32)
    return q, k, v, gate


def run_variant(fn, inputs, scale):
    """Forward and backward once; returns the output and the gradients of q, k, v and the gate."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves, scale)
    grad_out = torch.ones_like(out) / out.numel() ** 0.5
    out.backward(grad_out)
    return out.detach(), [x.grad for x in leaves]


def time_ms(fn, inputs, scale, iters: int) -> float:
    """Milliseconds per forward + backward of one variant."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]

    def step():
        out = fn(*leaves, scale)
        out.backward(torch.ones_like(out))

    return cuda_ms_per_call(step, iters)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=128, help="rows a step (32,768 passage tokens at 256 a row)")
    p.add_argument("--text", type=int, default=264, help="text tokens a row: instruction + passage")
    p.add_argument("--memory", type=int, default=16, help="memory slots")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=30, help="attention calls a step (to report ms a step)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--check-rows", type=int, default=4, help="rows checked against the float32 reference")
    p.add_argument("--record", default=None, help="save formation/attention-kernels-NAME.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("kernel timing needs a CUDA device")
    device = torch.device("cuda")
    scale = args.head_dim**-0.5
    shape = (args.memory, args.heads, args.kv_heads, args.head_dim)
    full = make_inputs(args.rows, args.text, *shape, device, torch.bfloat16)
    few = [x[: args.check_rows] for x in full]
    ref_out, ref_grads = run_variant(
        lambda q, k, v, g, s: _math(gated_causal_attention, q, k, v, g, s),
        [x.float() if x.is_floating_point() else x for x in few],
        scale,
    )
    variants = {
        "lower-right": lambda q, k, v, g, s: gated_causal_attention(q, k, v, g, s),
        "square": lambda q, k, v, g, s: gated_causal_attention(q, k, v, g, s, layout="square"),
    }
    for name in ("flash", "efficient", "cudnn"):
        variants[f"square-{name}"] = lambda q, k, v, g, s, n=name: square_gated_attention(q, k, v, g, s, n)
        variants[f"square-{name}-gqa"] = lambda q, k, v, g, s, n=name: square_gated_attention(
            q, k, v, g, s, n, gqa=True
        )
    floors = {
        f"text-only-{name}": lambda q, k, v, g, s, n=name: text_only_attention(q, k, v, g, s, n)
        for name in ("flash", "cudnn")
    }
    result = {"shape": vars(args), "variants": {}}
    for name, fn in {**variants, **floors}.items():
        entry: dict = {}
        try:
            ms = time_ms(fn, full, scale, args.iters)
            entry["ms_per_call"] = ms
            entry["ms_per_step"] = ms * args.layers
            if name in variants:
                out, grads = run_variant(fn, few, scale)
                entry["max_abs_error"] = (out.float() - ref_out).abs().max().item()
                entry["grad_cosine"] = {
                    n: cosine(gr.float(), rg) for n, gr, rg in zip("qkvg", grads, ref_grads, strict=True)
                }
        except RuntimeError as err:  # a backend that refuses this layout says so
            entry["error"] = str(err).splitlines()[0][:300]
        result["variants"][name] = entry
        print(name, json.dumps(entry), flush=True)
    if args.record:
        path = save_result(f"formation/attention-kernels-{args.record}", result, device=device)
        print(f"saved {path}")
    return 0


def _math(fn, *args):
    with sdpa_kernel([SDPBackend.MATH]):
        return fn(*args)


if __name__ == "__main__":
    raise SystemExit(main())
