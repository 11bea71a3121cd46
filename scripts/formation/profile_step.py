"""Where a formation step spends its time: step time, GPU-busy share, and the kernels that take it.

For each variant (a name and `--set` overrides of the training config), builds the trainer exactly as
`memsplice train` does, runs warm-up steps (compilation included), times `--steps` steps with the device synchronised
(tokens/s and MFU counted as the trainer counts them, `memsplice.train.flops`), then profiles `--profile-steps` more
with torch.profiler: the share of wall time the GPU is busy, and the top kernels by GPU time grouped into
matmul / attention / elementwise-and-reductions / copies.

    PYTHONPATH=src python scripts/formation/profile_step.py --length 256 \
        --variant hf-eager run.fast_reader=false --variant fast-all run.compile=all

Saves benchmarks/results/formation/profile-<record>.json (command, commit, device, date) with --record NAME.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from memsplice.bench.record import save_result
from memsplice.devices import synchronize
from memsplice.train import FormationRecipe, TrainConfig
from memsplice.train.fast_reader import fast_reading
from memsplice.train.fused_attention import fused_memory_attention


def _kind(name: str) -> str:
    """A kernel's group. Attention first (flash kernels name cutlass types in their template arguments) and
    inductor's own kernels before copies (their names list the ops they fused, "cat" among them)."""
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if n.startswith("triton"):
        return "fused (triton)"
    if any(k in n for k in ("gemm", "matmul", "cutlass", "sm90", "xmma", "nvjet", "ampere_bf16", "wgmma")):
        return "matmul"
    if any(k in n for k in ("copy", "memcpy", "memset", "cat", "fill")):
        return "copy/fill"
    return "elementwise/reduce"


def check_against_transformers(recipe) -> dict:
    """One batch's loss and gradient through this variant's reader and through the transformers decoder."""
    batches = recipe._batches(recipe.state.step)
    params = [p for p in recipe.memory.parameters() if p.requires_grad]
    runs = {}
    for name, reader in (("variant", recipe.reader), ("transformers", None)):
        recipe.optimizer.zero_grad(set_to_none=True)
        if reader is not None:
            reader.mark_step_begin()
        with (
            recipe._autocast(),
            fused_memory_attention(recipe.reasoner, recipe.config.run.fused_attention),
            fast_reading(reader),
        ):
            loss, _ = recipe.model(batches)
        loss.backward()
        # float64: in float32 the cosine over ~10M entries came out at 1.0023 on the CPU
        grad = torch.cat([p.grad.double().flatten() for p in params if p.grad is not None])
        runs[name] = (float(loss), grad)
    recipe.optimizer.zero_grad(set_to_none=True)
    (la, ga), (lb, gb) = runs["variant"], runs["transformers"]
    return {
        "loss": la,
        "loss_transformers": lb,
        "grad_cosine": float(torch.nn.functional.cosine_similarity(ga, gb, dim=0)),
        "grad_relative_difference": float((ga - gb).norm() / gb.norm()),
    }


def profile_variant(name: str, sets: list[str], args) -> dict:
    overrides = [
        f"data.lengths=[{args.length}]",
        "data.length_weights=null",
        "data.curriculum_steps=0",
        "run.eval_every=0",
        f"run.output_dir={json.dumps(f'{args.work}/{name}')}",
        f"data.tokens_per_step={args.tokens_per_step}",
        *sets,
    ]
    config = TrainConfig.from_yaml(args.config, overrides)
    recipe = FormationRecipe(config, show_progress=False)
    recipe.setup()
    device = recipe.device
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        recipe.train_step()
    synchronize(device)
    warm = time.perf_counter() - t0
    flops = tokens = 0.0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = recipe.train_step()
        flops += out["cost"].flops
        tokens += out["cost"].tokens
    synchronize(device)
    seconds = time.perf_counter() - t0
    result = {
        "variant": name,
        "sets": sets,
        "device": str(device),
        "warmup_seconds": warm,
        "step_ms": 1000 * seconds / args.steps,
        "tokens_per_s": tokens / seconds,
        "flops_per_step": flops / args.steps,
    }
    if recipe.peak:
        result["mfu"] = flops / seconds / recipe.peak
    if args.check and recipe.reader is not None:
        result["check"] = check_against_transformers(recipe)
    if args.profile_steps and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.profile_steps):
                recipe.train_step()
            synchronize(device)
            wall = time.perf_counter() - t0
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        busy_us = sum(e.self_device_time_total for e in kernels)
        groups: dict[str, float] = {}
        for e in kernels:
            groups[_kind(e.key)] = groups.get(_kind(e.key), 0.0) + e.self_device_time_total
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[: args.top]
        result["profile"] = {
            "steps": args.profile_steps,
            "wall_ms_per_step": 1000 * wall / args.profile_steps,
            "gpu_busy_ms_per_step": busy_us / 1000 / args.profile_steps,
            "gpu_busy_share": busy_us / 1e6 / wall,
            "kernel_launches_per_step": sum(e.count for e in kernels) / args.profile_steps,
            "ms_per_step_by_kind": {
                k: v / 1000 / args.profile_steps for k, v in sorted(groups.items(), key=lambda kv: -kv[1])
            },
            "top_kernels": [
                {
                    "name": e.key[:160],
                    "ms_per_step": e.self_device_time_total / 1000 / args.profile_steps,
                    "calls_per_step": e.count / args.profile_steps,
                }
                for e in top
            ],
        }
    recipe.cleanup()
    del recipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(json.dumps(result, indent=2), flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/formation-smollm2.yaml")
    p.add_argument(
        "--variant",
        nargs="+",
        action="append",
        metavar=("NAME", "KEY=VALUE"),
        required=True,
        help="a variant: its name, then --set overrides (repeatable)",
    )
    p.add_argument("--length", type=int, default=256, help="passage length in tokens (one shape)")
    p.add_argument("--tokens-per-step", type=int, default=32768)
    p.add_argument("--warmup", type=int, default=5, help="steps before timing (compilation happens here)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps after timing (CUDA only)")
    p.add_argument("--top", type=int, default=25, help="kernels listed per variant")
    p.add_argument(
        "--check",
        action="store_true",
        help="also compare one batch's loss and gradient with the transformers decoder (fast-reader variants)",
    )
    p.add_argument("--work", default="/tmp/memsplice-profile", help="output directory of the trainers")
    p.add_argument("--record", default=None, help="save benchmarks/results/formation/profile-NAME.json")
    args = p.parse_args()
    results = [profile_variant(v[0], v[1:], args) for v in args.variant]
    if args.record:
        path = save_result(
            f"profile-{args.record}",
            {"length": args.length, "tokens_per_step": args.tokens_per_step, "variants": results},
            device=results[0]["device"],
            directory=Path(os.environ.get("MEMSPLICE_RESULTS", "benchmarks/results")) / "formation",
        )
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
