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
