"""The splice invariants from KV-INJECTION.md, for every operator and tiny architecture (GQA and not)."""

from __future__ import annotations

import pytest
import torch

from helpers import random_ids, small_memory
from memsplice.inject import MemoryKV, forward_with_memory
from memsplice.memory import pad_rows

OPERATORS = ["prepend_kv", "layer_concat", "prepend_embed"]
ATOL = 1e-5


@pytest.fixture(params=OPERATORS)
def memory(request, reasoner):
    return small_memory(reasoner, request.param)


def bare_logits(reasoner, ids, mask=None):
    return reasoner.model(input_ids=ids, attention_mask=mask).logits


def test_no_memory_is_the_bare_reasoner(reasoner, memory):
    ids = random_ids(2, 9)
    assert torch.equal(memory(ids, memory=None).logits, bare_logits(reasoner, ids))


def test_closed_gate_is_the_bare_reasoner(reasoner, memory):
    ids, mask = pad_rows([random_ids(1, 9)[0].tolist(), random_ids(1, 5)[0].tolist()], 0, "cpu", left=True)
    closed = memory.write(random_ids(2, 30), gate_override=0.0)
    assert not closed.kv.live.any()
    out = memory(ids, mask, memory=closed).logits
    ref = bare_logits(reasoner, ids, mask)
    keep = mask.bool()
    assert (out - ref)[keep].abs().max() < ATOL


def test_open_memory_changes_the_output(reasoner, memory):
    ids = random_ids(2, 9)
    mem = memory.write(random_ids(2, 30))
    assert mem.kv.live.all()
    assert (memory(ids, memory=mem).logits - bare_logits(reasoner, ids)).abs().max() > 1e-3


def test_gate_is_a_log_bias_on_memory_logits(reasoner):
    """Weights are proportional to g * exp(q.k): two identical slots at g=0.5 equal one slot at g=1 plus a closed
    slot (same slot count, so the text positions agree)."""
    memory = small_memory(reasoner)
    one = memory.write(random_ids(1, 20)).kv
    keys = [torch.cat([k[:, :, :1], k[:, :, :1]], dim=2) for k in one.keys]
    values = [torch.cat([v[:, :, :1], v[:, :, :1]], dim=2) for v in one.values]
    layers = len(keys)
    half = MemoryKV(keys, values, torch.full((1, layers, 2), torch.log(torch.tensor(0.5)).item()), one.live)
    single = MemoryKV(keys, values, torch.tensor([0.0, float("-inf")]).expand(1, layers, 2).clone(), one.live)
    ids = random_ids(1, 7)
    a = forward_with_memory(reasoner, ids, memory=half).logits
    b = forward_with_memory(reasoner, ids, memory=single).logits
    assert (a - b).abs().max() < ATOL


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_splice_exactness(arch, attn):
    """K/V the reasoner computed for X, injected as memory, reproduce running X in context."""
    from tiny import tiny_reasoner

    reasoner = tiny_reasoner(arch, attn=attn)
    x, y = random_ids(2, 13), random_ids(2, 6)
    in_context = bare_logits(reasoner, torch.cat([x, y], dim=1))[:, x.shape[1] :]
    cache = reasoner.model(input_ids=x, use_cache=True).past_key_values
    spliced = forward_with_memory(reasoner, y, memory=MemoryKV.from_reasoner_cache(cache)).logits
    assert (spliced - in_context).abs().max() < ATOL


def test_prepend_embed_of_token_embeddings_is_exact(reasoner):
    """prepend_embed lets the reasoner compute K/V itself: latents equal to X's token embeddings (gate open)
    reproduce X in context."""
    memory = small_memory(reasoner, "prepend_embed", num_slots=8)
    x, y = random_ids(2, 8), random_ids(2, 5)
    latents = reasoner.embedding_weight[x]
    mem = memory.write(x, latents=latents, gate_override=1.0)
    spliced = memory(y, memory=mem).logits
    in_context = bare_logits(reasoner, torch.cat([x, y], dim=1))[:, 8:]
    assert (spliced - in_context).abs().max() < ATOL


def test_rows_do_not_leak_into_each_other(reasoner, memory):
    mem_ids = random_ids(2, 30)
    ids, mask = pad_rows([random_ids(1, 9)[0].tolist(), random_ids(1, 6)[0].tolist()], 0, "cpu", left=True)
    both = memory(ids, mask, memory=memory.write(mem_ids)).logits
    for row in range(2):
        alone = memory(
            ids[row : row + 1], mask[row : row + 1], memory=memory.write(mem_ids[row : row + 1])
        ).logits
        keep = mask[row].bool()
        assert (both[row][keep] - alone[0][keep]).abs().max() < ATOL
    swapped = memory(ids, mask, memory=memory.write(mem_ids.flip(0))).logits
    assert (swapped[0][mask[0].bool()] - both[0][mask[0].bool()]).abs().max() > 1e-3


def test_same_memory_twice_gives_same_logits(memory):
    ids = random_ids(2, 9)
    mem = memory.write(random_ids(2, 30))
    first = memory(ids, memory=mem, use_cache=True).logits
    second = memory(ids, memory=mem, use_cache=True).logits
    assert torch.equal(first, second)
    assert all(k.shape[2] == memory.config.num_slots for k in mem.kv.keys), "a forward pass grew the memory"


def test_the_gated_mask_of_a_layer_is_the_additive_mask_plus_the_gate():
    """`gated_mask` (what every gated layer computes) equals the two-step definition, values exactly and gradients
    up to the order of a sum, with padding, closed slots and a query row that sees no key at all."""
    from memsplice.inject.attention import additive_mask, apply_memory_gate, gated_mask

    b, q, m, t = 3, 5, 4, 5
    query, key = torch.zeros(b, 2, q, 8), torch.zeros(b, 2, m + t, 8)
    visible = torch.ones(b, 1, q, m + t, dtype=torch.bool).tril(diagonal=m)
    visible[1, ..., :2] = False  # padding at the front of row 1
    visible[2, ..., :m] = False  # row 2's memory is not live...
    visible[2, :, 0, :] = False  # ...and its first query row sees nothing
    bias = torch.randn(b, m)
    bias[0, 1] = float("-inf")  # a closed slot
    bias[2] = float("-inf")
    for mask in (visible, visible[:1], None):
        want_bias, got_bias = (bias.clone().requires_grad_() for _ in "ab")
        want = apply_memory_gate(additive_mask(mask, query, key), want_bias)
        got = gated_mask(mask, query, key, got_bias)
        assert torch.equal(got, want)
        weights = torch.randn(got.shape)
        (torch.nan_to_num(want, neginf=0.0) * weights).sum().backward()
        (torch.nan_to_num(got, neginf=0.0) * weights).sum().backward()
        torch.testing.assert_close(
            got_bias.grad, want_bias.grad, rtol=1e-6, atol=1e-6
        )  # sums in another order
