"""The frozen reasoner's LM head as a loss at chosen positions, without (tokens, vocab) logits.

`lm_head_cross_entropy(reasoner, hidden, targets)` forms logits only for the given hidden states and in chunks of
`LOGIT_CHUNK` rows, each reduced at once to its summed cross-entropy, argmax hits and (when a gradient is needed)
the gradient with respect to its hidden states. The largest tensor is one chunk's float32 logits; nothing of them is
kept for the backward pass; the head's weight never gets a gradient. `chunk_fn` can be a compiled
`chunk_cross_entropy` (the training's fast reader passes one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOGIT_CHUNK = 4096
"""Target positions per LM-head chunk: (chunk, vocab) float32 logits is the largest tensor the loss makes."""


def chunk_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For one chunk of target positions: (summed cross-entropy of `h @ weight.T` against `y`, argmax hits, and the
    gradient of that sum with respect to `h` when `with_grad`). A plain function, so that it can be compiled."""
    logits = (h @ weight.T).float()  # (n, V)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, y[:, None]).squeeze(1)
    loss = (lse - picked).sum()
    correct = (logits.argmax(-1) == y).sum()
    if not with_grad:
        return loss, correct, None
    # softmax - onehot, with the onehot as a comparison rather than an indexed write: compiled, this is one
    # element-wise kernel from the logits to the half-precision gradient, with no float32 (n, V) tensor in between
    target = torch.arange(logits.shape[-1], device=y.device)[None, :] == y[:, None]
    grad_logits = torch.exp(logits - lse[:, None]).sub_(target.to(logits.dtype))
    return loss, correct, (grad_logits.to(weight.dtype) @ weight).to(h.dtype)


class _ChunkedLMHeadCE(torch.autograd.Function):
    """Sum of cross-entropy of `hidden @ weight.T` against `targets`, chunk by chunk (`chunk_fn` per chunk).

    The gradient with respect to `hidden` is formed in the forward pass ((softmax - onehot) @ weight, per chunk),
    so no logits are kept for the backward pass; the frozen LM-head weight gets no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, chunk_fn):
        # hidden (N, d) in the reasoner's dtype; weight (V, d); targets (N,)
        loss = hidden.new_zeros((), dtype=torch.float32)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        with_grad = bool(ctx.needs_input_grad[0])
        grad = torch.empty_like(hidden) if with_grad else None
        for start in range(0, hidden.shape[0], chunk):
            part_loss, part_correct, part_grad = chunk_fn(
                hidden[start : start + chunk], weight, targets[start : start + chunk], with_grad
            )
            loss += part_loss
            correct += part_correct
            if grad is not None:
                grad[start : start + chunk] = part_grad
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype) if grad is not None else None), None, None, None, None


def lm_head_cross_entropy(
    reasoner,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = LOGIT_CHUNK,
    chunk_fn=chunk_cross_entropy,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, number of argmax hits) of the reasoner's LM head on `hidden` (..., d) against `targets` (...)."""
    head = reasoner.model.get_output_embeddings()
    assert not head.weight.requires_grad, "the reasoner's LM head must stay frozen"
    if (
        getattr(head, "bias", None) is not None
    ):  # rare; fall back to plain logits (small models have no head bias)
        logits = head(hidden.reshape(-1, hidden.shape[-1])).float()
        y = targets.reshape(-1)
        return F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(-1) == y).sum()
    return _ChunkedLMHeadCE.apply(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1), chunk, chunk_fn
    )
