"""Composing memories along the slot axis, and RoPE for projected keys."""

from __future__ import annotations

import pytest
import torch

from helpers import random_ids, small_memory
from memsplice.inject import MemoryKV, concat_slots, forward_with_memory


def test_a_closed_chunk_in_front_leaves_the_next_chunk_unchanged(reasoner):
    memory = small_memory(reasoner)
    a, b = memory.write(random_ids(1, 20)).kv, memory.write(random_ids(1, 20)).kv
    a_closed = MemoryKV(a.keys, a.values, torch.full_like(a.gate_bias, float("-inf")), a.live)
    ids = random_ids(1, 7)
    both = forward_with_memory(reasoner, ids, memory=concat_slots([a_closed, b], reasoner)).logits
    alone = forward_with_memory(reasoner, ids, memory=b).logits
    assert (both - alone).abs().max() < 1e-5


def test_concat_keeps_rows_and_slots(reasoner):
    memory = small_memory(reasoner)
    parts = [memory.write(random_ids(2, 20)).kv for _ in range(3)]
    joined = concat_slots(parts, reasoner)
    assert joined.num_slots == 12 and joined.batch_size == 2 and joined.live.all()
    assert joined.nbytes() == sum(p.nbytes() for p in parts)


def test_projected_keys_rotate_like_the_reasoners_own(reasoner):
    """With projections initialised from the reasoner, a latent equal to layer 0's input (the token embeddings)
    gives layer 0's cached keys: this checks the RoPE convention and the init together."""
    memory = small_memory(reasoner, num_slots=6)
    x = random_ids(1, 6)
    cache = reasoner.model(input_ids=x, use_cache=True).past_key_values
    keys, values = memory.operator(reasoner.embedding_weight[x], reasoner)
    assert (keys[0] - cache.layers[0].keys).abs().max() < 1e-3
    assert (values[0] - cache.layers[0].values).abs().max() < 1e-3


def _per_chunk_concat(parts, reasoner):
    """The definition: each chunk's keys moved S - M_i positions later, chunk by chunk."""
    from memsplice.inject.compose import shift_keys

    total = sum(p.num_slots for p in parts)
    keys = [
        torch.cat([shift_keys(p.keys[i], total - p.num_slots, reasoner) for p in parts], dim=2)
        for i in range(parts[0].num_layers)
    ]
    return keys


def test_concat_of_equal_chunks_rotates_once_and_equals_the_per_chunk_definition(reasoner):
    memory = small_memory(reasoner)
    parts = [memory.write(random_ids(2, 20)).kv for _ in range(3)]
    joined = concat_slots(parts, reasoner)
    for got, want in zip(joined.keys, _per_chunk_concat(parts, reasoner), strict=True):
        assert (got - want).abs().max() < 1e-5
    uneven = [parts[0], small_memory(reasoner, num_slots=6).write(random_ids(2, 20)).kv]
    joined = concat_slots(uneven, reasoner)
    for got, want in zip(joined.keys, _per_chunk_concat(uneven, reasoner), strict=True):
        assert (got - want).abs().max() < 1e-5


def test_concat_rows_is_concat_slots_of_the_rows(reasoner):
    from memsplice.inject.compose import concat_rows

    memory = small_memory(reasoner)
    written = memory.write(random_ids(5, 20)).kv
    written = MemoryKV(
        written.keys, written.values, written.gate_bias, torch.tensor([True, False] * 2 + [True])
    )
    fast = concat_rows(written, reasoner)
    slow = concat_slots([written.index_rows([i]) for i in range(5)], reasoner)
    assert fast.batch_size == 1 and fast.num_slots == 5 * written.num_slots and bool(fast.live.all())
    for a, b in zip(fast.keys + fast.values, slow.keys + slow.values, strict=True):
        assert (a - b).abs().max() < 1e-5
    assert torch.equal(fast.gate_bias, slow.gate_bias)
    assert concat_rows(written.index_rows([2]), reasoner).num_slots == written.num_slots


def _per_layer_projection(operator, latents, reasoner):
    """`prepend_kv` / `layer_concat` K/V as first written: projected for all layers, then each target layer
    rotated and cast on its own."""
    from memsplice.inject.prepend_kv import _rms
    from memsplice.inject.rope import memory_positions, rotate_keys

    s = operator.shapes
    b, m, _ = latents.shape
    z = _rms(latents.float())
    k = torch.einsum("bmd,ldw->lbmw", z, operator.key_weight) + operator.key_bias[:, None, None]
    v = torch.einsum("bmd,ldw->lbmw", z, operator.value_weight) + operator.value_bias[:, None, None]
    k = k.view(-1, b, m, s.num_kv_heads, s.head_dim).transpose(2, 3)
    v = v.view(-1, b, m, s.num_kv_heads, s.head_dim).transpose(2, 3)
    cos, sin = reasoner.rotary_cos_sin(memory_positions(b, m, latents.device), like=k)
    zeros = torch.zeros(b, s.num_kv_heads, m, s.head_dim, dtype=reasoner.dtype)
    keys, values = [zeros] * s.num_layers, [zeros] * s.num_layers
    for i, layer in enumerate(operator.target_layers()):
        keys[layer] = rotate_keys(k[i], cos, sin).to(reasoner.dtype)
        values[layer] = v[i].to(reasoner.dtype)
    return keys, values


@pytest.mark.parametrize("operator", ["prepend_kv", "layer_concat"])
def test_projected_kv_of_all_layers_at_once_equals_layer_by_layer(reasoner, operator):
    """The operator rotates every layer's keys in one go; values and gradients are those of one layer at a time."""
    memory = small_memory(reasoner, operator, kv_init="random")
    latents = torch.randn(2, memory.config.num_slots, reasoner.shapes.hidden_size)
    weights = [torch.randn(k.shape) for k in memory.operator(latents, reasoner)[0]]

    def run(fn):
        memory.zero_grad(set_to_none=True)
        keys, values = fn(latents, reasoner)
        sum((k * w).sum() + (v * w).sum() for k, v, w in zip(keys, values, weights, strict=True)).backward()
        return keys, values, {n: p.grad.clone() for n, p in memory.operator.named_parameters()}

    keys, values, grads = run(memory.operator)
    want_keys, want_values, want_grads = run(lambda z, r: _per_layer_projection(memory.operator, z, r))
    for got, want in zip(keys + values, want_keys + want_values, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for n, g in grads.items():
        torch.testing.assert_close(g, want_grads[n], rtol=0, atol=0)
