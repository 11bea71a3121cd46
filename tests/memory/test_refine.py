"""Write-time refinement: lowers the read-back loss, changes only the latents, keeps rows independent."""

import pytest
import torch

from helpers import random_ids, small_memory
from memsplice.memory.refine import reconstruction_instruction, reconstruction_loss, refine_latents

INSTRUCTION = "Repeat the text."


def _memory(reasoner, **overrides):
    memory = small_memory(reasoner, reconstruction_instruction=INSTRUCTION, **overrides)
    memory.eval()
    return memory


def _loss(memory, z, ids, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return float(reconstruction_loss(memory, z, ids, mask, reconstruction_instruction(memory)))


def test_refinement_lowers_the_loss_and_changes_nothing_else(reasoner):
    memory = _memory(reasoner)
    ids = random_ids(2, 12)
    before = {n: p.detach().clone() for n, p in memory.named_parameters()}
    digest = reasoner.weights_digest()
    start = memory.encode(ids).detach()
    with torch.no_grad():  # works where writes usually run
        z, losses = refine_latents(memory, ids, steps=15, lr=5e-2)
    assert len(losses) == 15 and losses[-1] < losses[0]
    assert _loss(memory, z, ids) < _loss(memory, start, ids)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in memory.named_parameters())
    assert reasoner.weights_digest() == digest
    seen = []
    last, _ = refine_latents(memory, ids, steps=3, lr=5e-2, on_step=lambda k, z: seen.append((k, z)))
    assert [k for k, _ in seen] == [1, 2, 3] and torch.equal(seen[-1][1], last)
    same, none = refine_latents(memory, ids, steps=0)
    assert torch.equal(same, start) and none == []


def test_rows_are_refined_independently_and_padding_is_not_scored(reasoner):
    memory = _memory(reasoner)
    a, b = random_ids(1, 10), random_ids(1, 7)
    alone_a, _ = refine_latents(memory, a, steps=4)
    alone_b, _ = refine_latents(memory, b, steps=4)
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[0], ids[1, :7] = a[0], b[0]
    mask = torch.zeros_like(ids)
    mask[0], mask[1, :7] = 1, 1
    # the encoder reads the padded row with its mask, so start both from the latents written alone
    start = torch.cat([memory.encode(a), memory.encode(b)]).detach()
    together, _ = refine_latents(memory, ids, mask, steps=4, latents=start)
    torch.testing.assert_close(together[0], alone_a[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together[1], alone_b[0], atol=1e-4, rtol=1e-4)


def test_unsafe_rows_are_left_for_the_safety_check_and_bounds_hold(reasoner):
    memory = _memory(reasoner, max_latent_norm=50.0)
    ids = random_ids(2, 8)
    start = memory.encode(ids).detach()
    start[1, 0, 0] = float("nan")
    z, _ = refine_latents(memory, ids, steps=3, lr=10.0, latents=start)  # a huge step must stay in bounds
    assert torch.isnan(z[1, 0, 0]) and torch.equal(z[1, 1:], start[1, 1:])
    assert torch.isfinite(z[0]).all() and float(z[0].norm(dim=-1).max()) <= 50.0
    mem = memory.write(ids, latents=z)
    assert mem.live.tolist() == [True, False]


def test_write_refines_when_asked_and_refuses_without_an_instruction(reasoner):
    memory = _memory(reasoner)
    ids = random_ids(2, 9)
    with torch.no_grad():
        plain = memory.write(ids)
        refined = memory.write(ids, refine_steps=3)
        memory.set_refine_steps(None)  # keeps the checkpoint's (0)
        assert memory.config.refine_steps == 0
        memory.set_refine_steps(3)
        default = memory.write(ids)
    assert not torch.equal(plain.latents, refined.latents)
    torch.testing.assert_close(default.latents, refined.latents)
    trained = memory.write(ids)  # under autograd (training): the encoder's latents, with their gradient
    assert trained.latents.requires_grad
    torch.testing.assert_close(trained.latents.detach(), plain.latents)
    bare = small_memory(reasoner)
    with pytest.raises(ValueError, match="reconstruction_instruction"):
        bare.write(ids, refine_steps=1)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="refine steps"):
            memory.set_refine_steps(bad)
    assert memory.config.refine_steps == 3


def test_checkpoints_older_than_the_field_take_the_instruction_training_recorded():
    from memsplice.memory import MemoryConfig

    assert MemoryConfig(extra={"instruction": "Say it again."}).reconstruction_instruction == "Say it again."
    assert (
        MemoryConfig(reconstruction_instruction="A", extra={"instruction": "B"}).reconstruction_instruction
        == "A"
    )
    assert MemoryConfig().reconstruction_instruction is None


def test_unpadded_passages_are_read_through_the_fast_reader_with_the_decoders_values(reasoner, monkeypatch):
    """An unpadded batch's loss goes through the shared fast reader; it equals the transformers decoder's, which
    padded batches use, in value and in gradient with respect to the latents."""
    from memsplice.train import fast_reader
    from memsplice.train.fast_reader import shared_reader

    memory = _memory(reasoner)
    ids = random_ids(2, 9)
    z = memory.encode(ids).detach().requires_grad_(True)
    instruction = reconstruction_instruction(memory)
    calls = []
    reader = shared_reader(reasoner)
    original = reader.hidden_states
    monkeypatch.setattr(reader, "hidden_states", lambda *a: calls.append(1) or original(*a))
    fast = reconstruction_loss(memory, z, ids, torch.ones_like(ids), instruction)
    (fast_grad,) = torch.autograd.grad(fast, z)
    assert calls == [1]
    monkeypatch.setattr(fast_reader, "shared_reader", lambda r: None)  # a reasoner without one: the decoder
    slow = reconstruction_loss(memory, z, ids, torch.ones_like(ids), instruction)
    (slow_grad,) = torch.autograd.grad(slow, z)
    assert calls == [1]
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_grad, slow_grad, atol=1e-6, rtol=1e-4)
