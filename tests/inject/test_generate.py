"""generate() with memory: batch > 1, left padding, each row its own memory, positions as in a forward pass."""

from __future__ import annotations

import pytest
import torch

from helpers import random_ids, small_memory
from memsplice.memory import pad_rows


@pytest.mark.parametrize("operator", ["prepend_kv", "prepend_embed"])
def test_greedy_generate_matches_stepwise_forward(reasoner, operator):
    memory = small_memory(reasoner, operator)
    mem_ids = random_ids(2, 25)
    rows = [random_ids(1, 8)[0].tolist(), random_ids(1, 4)[0].tolist()]
    ids, mask = pad_rows(rows, 0, "cpu", left=True)
    out = memory.generate(ids, mask, memory=memory.write(mem_ids), max_new_tokens=5, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 5)
    for i, row in enumerate(rows):
        seq = torch.tensor([row])
        single = memory.write(mem_ids[i : i + 1])
        for _ in range(5):
            nxt = memory(seq, memory=single).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        assert seq[0, -5:].tolist() == out[i, -5:].tolist()


def test_generate_without_memory_is_bare_generate(reasoner):
    memory = small_memory(reasoner)
    ids = random_ids(2, 6)
    ours = memory.generate(ids, memory=None, max_new_tokens=4, do_sample=False)
    bare = reasoner.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0
    )
    assert torch.equal(ours, bare)


def test_generate_twice_with_one_memory_is_repeatable(reasoner):
    memory = small_memory(reasoner)
    mem = memory.write(random_ids(1, 25))
    ids = random_ids(1, 6)
    a = memory.generate(ids, memory=mem, max_new_tokens=6, do_sample=False)
    b = memory.generate(ids, memory=mem, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_sampling_with_several_return_sequences(reasoner):
    memory = small_memory(reasoner)
    mem = memory.write(random_ids(2, 25))
    out = memory.generate(
        random_ids(2, 6), memory=mem, max_new_tokens=3, do_sample=True, num_return_sequences=3
    )
    assert out.shape == (6, 9)


def test_beam_search_is_refused_clearly(reasoner):
    memory = small_memory(reasoner)
    with pytest.raises(ValueError, match="num_beams"):
        memory.generate(
            random_ids(1, 6), memory=memory.write(random_ids(1, 20)), num_beams=2, max_new_tokens=2
        )
