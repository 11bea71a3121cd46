"""The fused training attention computes what the core gated attention computes, values and gradients."""

import pytest
import torch

from helpers import assert_grads_close, memory_grads, random_ids, small_memory
from memsplice.inject import hidden_states_with_memory
from memsplice.train.fused_attention import (
    fused_memory_attention,
    gated_causal_attention,
    split_gated_causal_attention,
)


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


@pytest.mark.parametrize("loss_scale", [1.0, 1e-20])
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4)])
def test_split_attention_matches_the_sdpa_kernel_values_and_gradients(heads, kv_heads, loss_scale):
    """Text and memory apart, merged by log-sum-exp, is the same gated causal attention as one SDPA call over
    [memory][text]: grouped heads, a closed slot (log g at -inf) and a gate that differs per row and slot. Also with
    gradients as small as a token-averaged loss gives deep in the reasoner (|dO|^2 below float32's range), where
    the log-sum-exp's gradient once vanished: dQ and dK were off by a third."""
    b, m, t, d, scale = 2, 3, 5, 8, 8**-0.5
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, heads, t, d, generator=gen)
    k, v = torch.randn(2, b, kv_heads, m + t, d, generator=gen)
    gate = torch.randn(b, m, generator=gen)
    gate[0, 1] = float("-inf")
    weights = torch.linspace(-1, 1, b * heads * t * d).view(b, heads, t, d) * loss_scale
    results = []
    for split in (False, True):
        inputs = [x.clone().requires_grad_() for x in (q, k, v, gate)]
        qq, kk, vv, gg = inputs
        if split:
            out = split_gated_causal_attention(
                qq, kk[:, :, m:], vv[:, :, m:], kk[:, :, :m], vv[:, :, :m], gg, scale
            )
        else:
            out = gated_causal_attention(qq, kk, vv, gg, scale)
        (out * weights).sum().backward()
        results.append((out.detach(), [x.grad / loss_scale for x in inputs]))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
