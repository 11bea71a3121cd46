"""Write-time refinement: the encoder's latents as a start, then a few gradient steps on how well the frozen reasoner
reads the passage back from them.

A memory is written from a passage the writer holds in full, so the formation objective can be evaluated at write
time: the teacher-forced cross-entropy of the passage after [memory][reconstruction instruction]. `refine_latents`
takes Adam steps on the latents alone against that loss; the encoder, gate, operator and reasoner stay as they are.
The encoder amortises this optimisation and is the starting point; the steps close what it leaves. On held-out
passages, latents a few steps away from the shipped encoder's output are read back verbatim at 8x
(`benchmarks/results/formation/latent-capacity-*.json`, `memsplice bench fidelity --refine-steps`). The price is
write time: every step is one forward and backward pass of the reasoner over [memory][instruction][passage].

Guarantees:
- only the latents change: no parameter of the memory model or of the reasoner gets a gradient or is modified, and
  the call works inside `torch.no_grad()`;
- rows are independent (the loss is a sum of per-row means), so a batch refines each passage as it would alone;
- positions where `attention_mask` is 0 are not scored (right-padded passages); unpadded batches are read through
  the fast reader (`memsplice.train.fast_reader`) when the reasoner has one, padded ones through the transformers
  decoder, with the same values (tests/memory/test_refine.py);
- rows whose latents fail the safety check (non-finite, over `max_latent_norm`) are returned unchanged, for
  `MemoryModel.inject` to refuse and log as before; refined rows are kept within `max_latent_norm`;
- `steps=0` returns the latents unchanged.
"""

from __future__ import annotations

import torch

from ..inject.splice import passage_hidden_states
from ..reasoner.head_loss import lm_head_cross_entropy
from .safety import check_latents


def reconstruction_instruction(memory_model) -> torch.Tensor:
    """Token ids (I,) of the instruction the memory was trained to be read back after."""
    text = memory_model.config.reconstruction_instruction
    if not text:
        raise ValueError(
            "this memory records no reconstruction_instruction (set by `memsplice train`); refinement needs the "
            "instruction it was trained to be read back after"
        )
    ids = memory_model.reasoner.require_tokenizer()(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long, device=memory_model.reasoner.device)


def reconstruction_loss(
    memory_model,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    instruction: torch.Tensor,
) -> torch.Tensor:
    """Sum over rows of each row's mean teacher-forced cross-entropy of its passage after [memory][instruction]."""
    reasoner = memory_model.reasoner
    memory = memory_model.inject(latents)
    scored = attention_mask.bool()
    if bool(scored.all()):
        # unpadded: through the fast reader when the reasoner has one (the one active in this block, else the shared
        # eager one): the same values with fused projections and no mask tensor, so a step launches fewer kernels
        from ..train.fast_reader import active_reader, fast_reading, read_hidden_states, shared_reader

        with fast_reading(active_reader(reasoner) or shared_reader(reasoner)):
            hidden = passage_hidden_states(
                reasoner, instruction, input_ids, memory.kv, read_unpadded=read_hidden_states
            )
    else:
        hidden = passage_hidden_states(reasoner, instruction, input_ids, memory.kv, attention_mask)
    counts = scored.sum(1)
    total = hidden.new_zeros((), dtype=torch.float32)
    # rows with equally many scored tokens share one chunked head-loss call (all rows, for unpadded passages)
    for n in counts.unique().tolist():
        if n == 0:
            continue
        pick = scored & (counts == n)[:, None]
        loss, _ = lm_head_cross_entropy(reasoner, hidden[pick], input_ids[pick])
        total = total + loss / n
    return total


def refine_latents(
    memory_model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    steps: int,
    lr: float = 0.1,
    latents: torch.Tensor | None = None,
    on_step=None,
) -> tuple[torch.Tensor, list[float]]:
    """(refined latents (B, M, d), the loss before each step) for passages `input_ids` (B, T).

    `latents` is the start (default: the encoder's output for the passages). `on_step(step, latents)`, when given,
    sees the (B, M, d) latents after each step (step = 1..steps), e.g. to score them along the way."""
    if steps < 0:
        raise ValueError(f"refine steps must be >= 0, got {steps}")
    device = memory_model.reasoner.device
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    with torch.no_grad():
        start = memory_model.encode(input_ids, mask) if latents is None else latents.to(device)
    start = start.detach().float()
    if steps == 0:
        return start, []
    ok, _, _ = check_latents(start, memory_model.config.max_latent_norm)
    rows = ok.nonzero().squeeze(1)
    if rows.numel() == 0:
        return start, []
    instruction = reconstruction_instruction(memory_model)

    def loss_of(z: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(memory_model, z, input_ids[rows], mask[rows], instruction)

    def seen(step: int, z: torch.Tensor) -> None:
        if on_step is not None:
            on_step(step, _merged(start, rows, z))

    z, losses = adam_on_latents(
        start[rows], loss_of, steps=steps, lr=lr, max_norm=memory_model.config.max_latent_norm, on_step=seen
    )
    return _merged(start, rows, z), [loss / rows.numel() for loss in losses]


def adam_on_latents(
    start: torch.Tensor, loss_of, *, steps: int, lr: float, max_norm: float, on_step=None
) -> tuple[torch.Tensor, list[float]]:
    """(latents after `steps` Adam steps on `loss_of(latents)` from `start` (B, M, d), the loss before each step).

    The loop of write-time refinement: only the latents get a gradient (the loss's graph may hold parameters, which
    are left alone); after each step every latent is scaled back inside 0.99 * `max_norm`, the safety bound, so a
    refined row is never refused. `loss_of` should be a sum of per-row losses, so rows stay independent.
    `on_step(step, latents)` sees the latents after each step. Returns detached float32 latents."""
    z = start.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    bound = 0.99 * max_norm
    losses = []
    with torch.enable_grad():
        for step in range(1, steps + 1):
            loss = loss_of(z)
            (grad,) = torch.autograd.grad(loss, [z])
            losses.append(float(loss.detach()))
            z.grad = grad
            optimizer.step()
            with torch.no_grad():  # stay inside the safety bound, or the refined row would be refused
                norms = z.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                z.mul_((bound / norms).clamp(max=1.0))
            if on_step is not None:
                on_step(step, z.detach())
    return z.detach(), losses


def _merged(start: torch.Tensor, rows: torch.Tensor, refined: torch.Tensor) -> torch.Tensor:
    out = start.clone()
    out[rows] = refined.detach()
    return out
