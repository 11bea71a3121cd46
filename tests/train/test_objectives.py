"""Objectives: the chunked LM-head loss equals plain cross-entropy; each objective is a real, trainable loss."""

import torch
import torch.nn.functional as F

from helpers import random_ids, small_memory
from memsplice.inject import forward_with_memory
from memsplice.train import objectives as obj
from memsplice.train.data import DenoiseBatch, PairBatch


def test_chunked_lm_head_loss_matches_cross_entropy(reasoner):
    head = reasoner.model.get_output_embeddings()
    hidden = torch.randn(11, reasoner.shapes.hidden_size, requires_grad=True)
    targets = torch.randint(0, reasoner.shapes.vocab_size, (11,))
    loss, correct = obj.lm_head_cross_entropy(reasoner, hidden, targets, chunk=4)
    ref_logits = head(hidden)
    ref = F.cross_entropy(ref_logits, targets, reduction="sum")
    torch.testing.assert_close(loss, ref)
    assert int(correct) == int((ref_logits.argmax(-1) == targets).sum())
    (g,) = torch.autograd.grad(3.0 * loss, hidden)
    (g_ref,) = torch.autograd.grad(3.0 * ref, hidden)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)


def test_reconstruction_loss_is_teacher_forced_cross_entropy(reasoner):
    memory = small_memory(reasoner)
    passage, instruction = random_ids(2, 6), random_ids(1, 3)[0]
    result = obj.reconstruction(memory, passage, instruction)
    mem = memory.write(passage)
    text = torch.cat([instruction.expand(2, -1), passage], 1)
    logits = forward_with_memory(reasoner, text, None, mem.kv).logits  # (B, 9, V)
    ref = F.cross_entropy(logits[:, 2:8].reshape(-1, logits.shape[-1]), passage.reshape(-1))
    torch.testing.assert_close(result.loss, ref, atol=1e-5, rtol=1e-5)
    assert result.tokens == 12 and 0 <= int(result.correct) <= 12


def test_every_objective_reaches_the_memory_weights(reasoner):
    memory = small_memory(reasoner)
    passage, instruction = random_ids(3, 8), random_ids(1, 2)[0]
    results = {
        "reconstruction": obj.reconstruction(memory, passage, instruction),
        "continuation": obj.continuation(memory, passage, random_ids(3, 5)),
        "denoising": obj.denoising(
            memory, DenoiseBatch(passage, passage[:, :5], torch.ones(3, 5, dtype=torch.long)), instruction
        ),
        "infonce": obj.infonce(
            memory, PairBatch(passage[:, 2:5], torch.ones(3, 3, dtype=torch.long), passage), 0.1
        ),
    }
    for name, result in results.items():
        memory.zero_grad()
        assert torch.isfinite(result.loss), name
        result.loss.backward()
        grads = [p.grad for p in memory.encoder.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
    # InfoNCE with identical query and passage latents is minimised by the matching pair
    same = obj.infonce(memory, PairBatch(passage, torch.ones_like(passage), passage), 0.05)
    assert same.loss < torch.log(torch.tensor(3.0))


def test_training_reduces_reconstruction_loss(reasoner):
    torch.manual_seed(0)
    memory = small_memory(reasoner)
    passage, instruction = random_ids(4, 8), random_ids(1, 2)[0]
    opt = torch.optim.Adam(memory.trainable_parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = obj.reconstruction(memory, passage, instruction).loss
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.7 * first


def test_refined_target_is_write_time_refinement_and_trains_the_encoder(reasoner):
    from memsplice.memory.refine import refine_latents

    memory = small_memory(reasoner, reconstruction_instruction="Repeat the text.")
    passage = random_ids(3, 8)
    instruction = torch.tensor(
        reasoner.require_tokenizer()("Repeat the text.", add_special_tokens=False)["input_ids"]
    )
    result, distance = obj.reconstruction_with_target(memory, passage, instruction, steps=3, lr=0.05)
    # the reconstruction part is the plain objective's
    torch.testing.assert_close(result.loss, obj.reconstruction(memory, passage, instruction).loss)
    # the target is where write-time refinement takes the encoder's latents: rebuild the distance from it
    z = memory.encode(passage).detach()
    target, _ = refine_latents(memory, passage, steps=3, lr=0.05, latents=z)
    assert not torch.allclose(target, z)
    expected = (z - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()
    torch.testing.assert_close(distance.loss.detach(), expected, atol=1e-5, rtol=1e-4)
    assert distance.tokens == 3 * memory.config.num_slots and distance.correct is None
    # its gradient reaches the encoder; the refinement itself left no gradient anywhere
    assert all(p.grad is None for p in memory.parameters())
    distance.loss.backward()
    grads = [p.grad for p in memory.encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in [*memory.operator.parameters(), *memory.gate.parameters()])
