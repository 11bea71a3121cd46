"""The fused training attention computes what the core gated attention computes, values and gradients."""

import pytest
import torch

from helpers import assert_grads_close, memory_grads, random_ids, small_memory
from memsplice.inject import hidden_states_with_memory
from memsplice.train.fused_attention import fused_memory_attention


def _run(reasoner, memory, ids, text, fused: bool, gate=None):
    memory.zero_grad()
    mem = memory.write(ids, gate_override=gate)
    with fused_memory_attention(reasoner, fused):
        hidden = hidden_states_with_memory(reasoner, text, None, mem.kv)
    return hidden.detach(), memory_grads(memory, hidden)


@pytest.mark.parametrize("operator", ["prepend_kv", "layer_concat"])
def test_fused_matches_core_values_and_gradients(reasoner, operator):
    memory = small_memory(reasoner, operator)
    with torch.no_grad():
        memory.gate.weight.normal_(0, 0.05)  # a gate that differs per slot
    ids, text = random_ids(3, 10), random_ids(3, 7)
    core, core_grads = _run(reasoner, memory, ids, text, fused=False)
    fused, fused_grads = _run(reasoner, memory, ids, text, fused=True)
    torch.testing.assert_close(fused, core, atol=2e-5, rtol=1e-4)
    assert_grads_close(fused_grads, core_grads, rel=1e-3)


def test_no_memory_is_stock_attention_and_mode_is_restored(reasoner):
    text = random_ids(2, 5)
    before = reasoner.model.config._attn_implementation
    bare = reasoner.decoder(input_ids=text).last_hidden_state
    with torch.no_grad(), fused_memory_attention(reasoner):
        inside = reasoner.decoder(input_ids=text).last_hidden_state
    assert torch.equal(bare, inside)
    assert reasoner.model.config._attn_implementation == before


def test_fused_refuses_eager_reasoner():
    from tiny import tiny_reasoner

    eager = tiny_reasoner("llama", attn="eager")
    with pytest.raises(ValueError, match="sdpa"), fused_memory_attention(eager):
        pass
