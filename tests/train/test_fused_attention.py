"""The fused training attention computes what the core gated attention computes, values and gradients."""

import pytest
import torch

from helpers import assert_grads_close, memory_grads, random_ids, small_memory
from memsplice.inject import hidden_states_with_memory
from memsplice.train.fused_attention import GATE_FLOOR, fused_memory_attention, gated_causal_attention


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


@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (4, 4)])
def test_square_layout_computes_the_lower_right_attention(heads, kv_heads):
    """Zero query rows in front, the plain causal mask and grouped K/V as they are: the same values and gradients
    (queries, keys, values and the gate, a closed slot included) as the lower-right layout."""
    torch.manual_seed(0)
    b, t, m, d = 3, 9, 4, 16
    inputs = [
        torch.randn(b, heads, t, d),
        torch.randn(b, kv_heads, m + t, d),
        torch.randn(b, kv_heads, m + t, d),
        torch.rand(b, m).log(),
    ]
    inputs[3][1, 2] = 2 * GATE_FLOOR  # a slot closed below the floor
    results = {}
    for layout in ("lower_right", "square"):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        out = gated_causal_attention(*leaves, d**-0.5, layout=layout)
        out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
        results[layout] = (out.detach(), [x.grad for x in leaves])
    (want, want_grads), (got, got_grads) = results["lower_right"], results["square"]
    assert got.shape == (b, heads, t, d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_unknown_layout_is_refused():
    q, kv = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="unknown attention layout"):
        gated_causal_attention(q, kv, kv, torch.zeros(1, 2), 8**-0.5, layout="diagonal")
