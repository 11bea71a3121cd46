"""Composing memories along the slot axis, and RoPE for projected keys."""

from __future__ import annotations

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
