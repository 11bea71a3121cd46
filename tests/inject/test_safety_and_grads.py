"""Safety fallback (NaN, inf, oversized latents, non-finite K/V) and gradient isolation."""

from __future__ import annotations

import pytest
import torch

from helpers import random_ids, small_memory
from memsplice.memory import pad_rows


def _latents_with(memory, mem_ids, row: int, value: float):
    latents = memory.encode(mem_ids).detach().clone()
    latents[row, 1, 3] = value
    return latents


@pytest.mark.parametrize(
    ("value", "reason"), [(float("nan"), "non_finite"), (float("inf"), "non_finite"), (1e6, "norm_exceeded")]
)
def test_bad_latents_fall_back_to_the_bare_reasoner(reasoner, value, reason):
    memory = small_memory(reasoner)
    mem_ids = random_ids(2, 25)
    ids, mask = pad_rows([random_ids(1, 7)[0].tolist(), random_ids(1, 5)[0].tolist()], 0, "cpu", left=True)
    mem = memory.write(mem_ids, latents=_latents_with(memory, mem_ids, 0, value), scope="user-a")
    assert mem.kv.live.tolist() == [False, True]
    assert [e.reason for e in mem.events] == [reason]
    assert mem.events[0].scope == "user-a" and mem.events[0].row == 0
    assert mem.events[0].detail["input_ids"] == mem_ids[0].tolist()
    assert memory.fallback_log.counts[reason] == 1
    assert all(torch.isfinite(k).all() for k in mem.kv.keys)

    out = memory(ids, mask, memory=mem).logits
    bare = reasoner.model(input_ids=ids, attention_mask=mask).logits
    keep = mask[0].bool()
    assert (out[0][keep] - bare[0][keep]).abs().max() < 1e-5
    alone = memory(ids[1:], mask[1:], memory=memory.write(mem_ids[1:])).logits
    assert (out[1] - alone[0]).abs().max() < 1e-5
    gen = memory.generate(ids, mask, memory=mem, max_new_tokens=3, do_sample=False)
    assert gen.shape[0] == 2


def test_a_whole_batch_falling_back_is_the_bare_reasoner(reasoner):
    memory = small_memory(reasoner, max_latent_norm=1e-3)
    ids = random_ids(2, 6)
    mem = memory.write(random_ids(2, 20))
    assert not mem.kv.live.any() and memory.fallback_log.total == 2
    assert torch.equal(memory(ids, memory=mem).logits, reasoner.model(input_ids=ids).logits)


def test_non_finite_kv_falls_back(reasoner):
    memory = small_memory(reasoner)
    with torch.no_grad():
        memory.operator.key_bias[0, 0] = float("inf")
    mem = memory.write(random_ids(1, 20))
    assert not mem.kv.live.any()
    assert mem.events[0].reason == "non_finite_kv"


def test_non_finite_kv_in_one_layer_of_one_row_drops_that_row_only(reasoner):
    memory = small_memory(reasoner)
    project = memory.operator.forward

    def nan_in_last_value_of_row_0(latents, r):
        keys, values = project(latents, r)
        values[-1] = values[-1].clone()
        values[-1][0, 0, 0, 0] = float("nan")
        return keys, values

    memory.operator.forward = nan_in_last_value_of_row_0
    mem = memory.write(random_ids(2, 20))
    assert mem.kv.live.tolist() == [False, True]
    assert [(e.reason, e.row) for e in mem.events] == [("non_finite_kv", 0)]
    assert all(torch.isfinite(v).all() for v in mem.kv.values)


def test_latent_norm_clip_bounds_every_slot(reasoner):
    memory = small_memory(reasoner, latent_norm_clip=0.5)
    mem = memory.write(random_ids(2, 20))
    assert mem.latents.norm(dim=-1).max() <= 0.5 + 1e-5
    assert mem.kv.live.all()


@pytest.mark.parametrize("operator", ["prepend_kv", "layer_concat", "prepend_embed"])
def test_only_memory_parameters_get_gradients(reasoner, operator):
    memory = small_memory(reasoner, operator)
    before = reasoner.weights_digest()
    ids = random_ids(2, 9)
    out = memory(ids, memory=memory.write(random_ids(2, 25)), labels=ids)
    out.loss.backward()
    assert all(p.grad is None for p in reasoner.model.parameters())
    grads = {n: p.grad for n, p in memory.named_parameters() if p.requires_grad}
    assert grads and all(
        g is not None
        for n, g in grads.items()
        if not n.startswith("operator.") or operator != "prepend_embed"
    )
    assert any(g.abs().sum() > 0 for g in grads.values() if g is not None)
    torch.optim.AdamW(memory.trainable_parameters(), lr=1e-2).step()
    assert reasoner.weights_digest() == before
    assert not reasoner.model.training


def test_tied_embedding_is_the_reasoners_until_untied(reasoner):
    memory = small_memory(reasoner)
    enc = memory.encoder
    assert enc.embedding_tied and enc.embedding_weight() is reasoner.embedding_weight
    assert all(p is not reasoner.embedding_weight for p in memory.parameters())
    param = enc.untie_embedding()
    assert param.requires_grad and param.data_ptr() != reasoner.embedding_weight.data_ptr()
    assert torch.equal(param, reasoner.embedding_weight)
