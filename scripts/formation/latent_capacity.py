"""Where is the gap to perfect reconstruction: in the encoder (amortisation) or in the latent/operator bottleneck?

For held-out passages of each length (the passages `memsplice bench fidelity` scores, with its instruction), the
teacher-forced token accuracy and exact match of the reasoner reading [memory][instruction] P (as in
`memsplice.train.evaluate.reconstruction_fidelity`) for:
- floor:        no memory at all;
- encoder:      the checkpoint as it is (what bench fidelity measures);
- free_latents: the M latents z of each passage are free parameters, started at the encoder's output and optimised
                per passage by Adam on the reconstruction cross-entropy (the training read, teacher forced) through
                the checkpoint's frozen gate and operator (`MemoryModel.inject`); the encoder is bypassed. What the
                latent space plus operator can hold: a ceiling for any encoder of this checkpoint. (Memory writes
                do this for real with `memsplice.memory.refine`, whose step size is absolute, not relative);
- encoder_span: like free_latents, but the latents stay in the span of the encoder's output projection (its
                `encoder_width` columns, fewer than the reasoner's width): the free parameters are the encoder's
                final stream vectors of the slots, so this is what any encoder of this width could write. Its gap
                to free_latents is what the encoder's width costs the latents;
- free_kv:      every layer's memory keys and values are free parameters, started at the operator's output for
                the encoder's latents, with the gate the checkpoint computes from those latents. No bottleneck
                beyond M slots per layer.
Accuracy is reported after 0, 25, 50, 100, 200 and 400 Adam steps (--steps-list); step 0 of both free modes is the
encoder itself. Passages are optimised --batch-rows at a time with the loss summed over rows, so each row's
gradient is its own. Adam's step is relative: the parameters are the latents (per slot) and K/V (per layer and
slot) divided by their starting RMS, so --lr (latents) and --kv-lr are step sizes relative to their scale. The
defaults were checked on the CPU on one 512-token passage: free latents reached 66% / 73% / 81% / 92% token
accuracy after 25 steps at lr 3e-3 / 1e-2 / 3e-2 / 1e-1, and 100% after 100 steps at 1e-1, while 3e-1 spiked the
loss on the way; free K/V reached 100% after 25 steps at 3e-2 and oscillated at 1e-1.

    PYTHONPATH=src python scripts/formation/latent_capacity.py [--lengths 128 512] [--passages 8]
        [--steps-list 0 25 50 100 200 400] [--lr 0.1] [--kv-lr 0.03] [--modes free_latents encoder_span free_kv]
        [--device cuda] [--record NAME]

Passages: bench fidelity cuts --pool (its --passages, default 128) passages per length from the held-out stream;
this script takes --passages of them spread evenly over those (indices i * pool // passages), so a subset covers
the whole held-out stream and the same index is the same passage in every run. Saves
benchmarks/results/formation/latent-capacity-RECORD.json (command, commit, device, date, per-passage accuracy).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from memsplice import MemoryModel, load_reasoner
from memsplice.bench.fidelity import heldout_setup
from memsplice.bench.record import save_result
from memsplice.checkpoints import default_checkpoint_dir
from memsplice.inject.memory_kv import MemoryKV
from memsplice.memory.model import Memory
from memsplice.train.data import heldout_passages
from memsplice.train.evaluate import passage_hits, reconstruction_fidelity
from memsplice.train.objectives import read_back

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "formation"
MODES = ("free_latents", "encoder_span", "free_kv")


def _rms(x: torch.Tensor, dims) -> torch.Tensor:
    return x.pow(2).mean(dim=dims, keepdim=True).sqrt().clamp(min=1e-6)


def free_memory(memory_model: MemoryModel, passages: torch.Tensor, mode: str):
    """Free parameters for `passages` (B, T), started at what the checkpoint writes, and a function that turns them
    into a `Memory`. Each parameter is a tensor divided by its starting RMS (per slot), so Adam's lr is relative."""
    with torch.no_grad():
        start = memory_model.write(passages)
    if mode == "free_latents":
        z0 = start.latents.float()
        scale = _rms(z0, -1)  # (B, M, 1)
        u = (z0 / scale).requires_grad_(True)
        return [u], lambda: memory_model.inject(u * scale)
    if mode == "encoder_span":
        out_proj = memory_model.encoder.out_proj.weight.float()  # (d, w): z = h @ out_proj.T
        z0 = start.latents.float()
        h0 = z0 @ torch.linalg.pinv(out_proj).T  # exact: z0 lies in the span
        scale = _rms(h0, -1)
        u = (h0 / scale).requires_grad_(True)
        return [u], lambda: memory_model.inject((u * scale) @ out_proj.T)
    if mode == "free_kv":
        kv, dtype = start.kv, start.kv.keys[0].dtype
        tensors = [t.float() for t in (*kv.keys, *kv.values)]  # (B, H, M, D) each
        scales = [_rms(t, (1, 3)) for t in tensors]  # (B, 1, M, 1)
        params = [(t / s).requires_grad_(True) for t, s in zip(tensors, scales, strict=True)]
        n = len(kv.keys)

        def build() -> Memory:
            full = [(p * s).to(dtype) for p, s in zip(params, scales, strict=True)]
            return Memory(start.latents, start.gate, MemoryKV(full[:n], full[n:], kv.gate_bias, kv.live))

        return params, build
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def optimise(
    memory_model: MemoryModel,
    passages: torch.Tensor,
    instruction: torch.Tensor,
    mode: str,
    steps_list: list[int],
    lr: float,
) -> dict:
    """Optimise one batch of passages (B, T) for max(steps_list) Adam steps.

    Returns per step in steps_list the (B, T) hits, the mean gate and the mean per-token loss, plus the loss after
    every step ("losses", index = steps taken) and the seconds per optimisation step."""
    reasoner = memory_model.reasoner
    b, t = passages.shape
    prompt = instruction.to(passages.device).view(1, -1).expand(b, -1)
    params, build = free_memory(memory_model, passages, mode)
    opt = torch.optim.Adam(params, lr=lr)
    out = {"hits": {}, "gate": {}, "losses": []}
    last = max(steps_list)
    seconds, timed = 0.0, 0
    for step in range(last + 1):
        if step in steps_list:
            with torch.no_grad():
                memory = build()
                out["hits"][step] = passage_hits(reasoner, memory.kv, passages, instruction).cpu()
                out["gate"][step] = float(memory.gate.float().mean())
        if step == last:
            with torch.no_grad():
                out["losses"].append(read_back(memory_model, build(), prompt, passages).loss.item())
            break
        tic = time.perf_counter()
        result = read_back(memory_model, build(), prompt, passages)
        (result.loss * b).backward()  # each row's mean loss, summed: every row's gradient is its own
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["losses"].append(result.loss.item())  # before this step's update
        if passages.device.type == "cuda":
            torch.cuda.synchronize(passages.device)
        seconds += time.perf_counter() - tic
        timed += 1
    out["seconds_per_step"] = seconds / max(1, timed)
    return out


def choose(pool: int, n: int) -> list[int]:
    """n indices spread evenly over range(pool)."""
    if not 1 <= n <= pool:
        raise ValueError(f"--passages {n} must be between 1 and --pool {pool}")
    return [i * pool // n for i in range(n)]


def _summary(hits: torch.Tensor) -> dict:
    return {
        "token_accuracy": float(hits.float().mean()),
        "exact_match": float(hits.all(dim=1).float().mean()),
        "per_passage": [round(float(x), 5) for x in hits.float().mean(dim=1)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="memory checkpoint (default: the shipped one)"
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512], help="passage lengths in tokens")
    p.add_argument(
        "--passages",
        type=int,
        nargs="+",
        default=[8],
        help="held-out passages per length (one, or one per length)",
    )
    p.add_argument("--pool", type=int, default=128, help="bench fidelity's --passages: the set chosen from")
    p.add_argument("--batch-rows", type=int, default=8, help="passages optimised together")
    p.add_argument("--steps-list", type=int, nargs="+", default=[0, 25, 50, 100, 200, 400])
    p.add_argument("--lr", type=float, default=0.1, help="free_latents: Adam lr relative to the latents' RMS")
    p.add_argument("--kv-lr", type=float, default=3e-2, help="free_kv: Adam lr relative to the K/V's RMS")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--data", default=None, metavar="DIR", help="corpus directory (default: $MEMSPLICE_DATA)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="reasoner dtype (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument(
        "--record", default=None, help="saved as latent-capacity-RECORD.json (default: the device)"
    )
    args = p.parse_args()
    steps_list = sorted(set(args.steps_list))
    if steps_list[0] < 0 or args.batch_rows < 1:
        raise SystemExit("--steps-list must be >= 0 and --batch-rows >= 1")
    torch.manual_seed(0)
    reasoner = load_reasoner(device=args.device, dtype=args.dtype)
    path = args.checkpoint or default_checkpoint_dir()
    memory = MemoryModel.from_pretrained(path, reasoner=reasoner).eval().requires_grad_(False)
    tok = reasoner.require_tokenizer()
    sources, instruction_text, instruction, heldout = heldout_setup(memory, tok, args.data)
    if len(args.passages) not in (1, len(args.lengths)):
        raise SystemExit("--passages takes one count, or one per --lengths")
    counts = args.passages * len(args.lengths) if len(args.passages) == 1 else args.passages
    slots = memory.config.num_slots
    rows = []
    for n, count in zip(args.lengths, counts, strict=True):
        indices = choose(args.pool, count)
        passages = heldout_passages(heldout, n, args.pool)[indices].to(reasoner.device)
        row = {"length": n, "compression": f"{n / slots:g}x", "passage_indices": indices}
        for name, model in (("floor", None), ("encoder", memory)):
            f = reconstruction_fidelity(reasoner, model, passages, instruction, batch_rows=args.batch_rows)
            row[name] = {"token_accuracy": f.token_accuracy, "exact_match": f.exact_match}
            print(
                f"{n:>4} tokens  {name:<13} acc {100 * f.token_accuracy:6.2f}%  exact {100 * f.exact_match:5.1f}%"
            )
        for mode in args.modes:
            before = memory.fallback_log.total
            runs = []
            for start in range(0, len(indices), args.batch_rows):
                runs.append(
                    optimise(
                        memory,
                        passages[start : start + args.batch_rows],
                        instruction,
                        mode,
                        steps_list,
                        args.kv_lr if mode == "free_kv" else args.lr,
                    )
                )
            events = memory.fallback_log.total - before  # rows injected as no memory (latent norm bound)
            steps = {}
            for s in steps_list:
                hits = torch.cat([r["hits"][s] for r in runs])
                weights = [r["hits"][s].shape[0] for r in runs]
                steps[str(s)] = {
                    **_summary(hits),
                    "loss": sum(w * r["losses"][s] for w, r in zip(weights, runs, strict=True))
                    / len(indices),
                    "gate_mean": sum(w * r["gate"][s] for w, r in zip(weights, runs, strict=True))
                    / len(indices),
                }
                print(
                    f"{n:>4} tokens  {mode:<13} step {s:>4}  acc {100 * steps[str(s)]['token_accuracy']:6.2f}%  "
                    f"exact {100 * steps[str(s)]['exact_match']:5.1f}%  loss {steps[str(s)]['loss']:.4f}"
                )
            per_step = sum(r["seconds_per_step"] for r in runs) / len(runs)
            row[mode] = {
                "steps": steps,
                "seconds_per_step": per_step,
                "rows_per_step": min(args.batch_rows, count),
                "fallback_events": events,
            }
            print(
                f"{n:>4} tokens  {mode:<13} {per_step:.2f} s per step of {min(args.batch_rows, count)} rows"
            )
        rows.append(row)
    saved = save_result(
        f"latent-capacity-{args.record or reasoner.device.type}",
        {
            "checkpoint": str(path),
            "reasoner": reasoner.name,
            "dtype": str(reasoner.dtype),
            "sources": sources,
            "instruction": instruction_text,
            "slots": slots,
            "passages_per_length": dict(zip(map(str, args.lengths), counts, strict=True)),
            "pool": args.pool,
            "batch_rows": args.batch_rows,
            "lr": {"free_latents": args.lr, "encoder_span": args.lr, "free_kv": args.kv_lr},
            "steps_list": steps_list,
            "rows": rows,
        },
        device=reasoner.device,
        directory=RESULTS,
    )
    print(f"saved {saved}")


if __name__ == "__main__":
    main()
