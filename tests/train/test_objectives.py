"""The shared objectives: finite losses with gradients into the memory only, and they fall when trained."""

import torch

from helpers import small_memory
from memsplice.train.objectives import DenoiseBatch, PairBatch, continuation, denoising, infonce
from tiny import tiny_reasoner


def memory():
    torch.manual_seed(0)
    return small_memory(tiny_reasoner("llama"), max_memory_tokens=32)


def test_objectives_give_finite_losses_and_gradients_to_memory_only():
    m = memory()
    ids = torch.randint(3, 300, (3, 16))
    results = [
        continuation(m, ids, ids[:, :8]),
        denoising(m, DenoiseBatch(ids, ids[:, ::2], torch.ones_like(ids[:, ::2])), torch.tensor([5, 6])),
        infonce(m, PairBatch(ids[:, :4], torch.ones_like(ids[:, :4]), ids), temperature=0.1),
    ]
    for r in results:
        assert torch.isfinite(r.loss) and r.loss.requires_grad
        m.zero_grad()
        r.loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert not any(p.requires_grad for p in m.reasoner.model.parameters())
    assert results[0].tokens == 3 * 7 and results[1].tokens == 3 * 16


def test_continuation_loss_falls_when_trained():
    m = memory()
    ids = torch.randint(3, 300, (2, 16))
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        r = continuation(m, ids, ids)
        opt.zero_grad()
        r.loss.backward()
        opt.step()
        losses.append(float(r.loss.detach()))
    assert losses[-1] < 0.85 * losses[0]
