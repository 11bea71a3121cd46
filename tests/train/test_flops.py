"""FLOP counting: linear layers counted from the model itself; attention and encoder terms scale as they should."""

import torch

from helpers import small_memory
from memsplice.train.flops import ReasonerCost, encoder_flops, peak_flops, reasoner_read_flops


def test_reasoner_linear_flops_are_twice_the_layer_weights(reasoner):
    cost = ReasonerCost.from_reasoner(reasoner)
    weights = sum(
        m.weight.numel()
        for layer in reasoner.decoder.layers
        for m in layer.modules()
        if isinstance(m, torch.nn.Linear)
    )
    assert cost.linear_per_token == 2 * weights
    assert cost.head_per_token == 2 * reasoner.shapes.hidden_size * reasoner.shapes.vocab_size


def test_read_flops_scale_with_rows_and_grow_with_memory(reasoner):
    cost = ReasonerCost.from_reasoner(reasoner)
    one = reasoner_read_flops(cost, 1, 4, 10, 10)
    assert reasoner_read_flops(cost, 3, 4, 10, 10) == 3 * one
    assert reasoner_read_flops(cost, 1, 8, 10, 10) > one
    no_grad_forward = (
        10 * cost.linear_per_token + 10 * cost.head_per_token + (4 * 10 + 55) * cost.attn_per_query_key
    )
    assert one == 2 * no_grad_forward


def test_encoder_flops_are_three_forward_passes(reasoner):
    memory = small_memory(reasoner)
    assert encoder_flops(memory, 2, 10) == 2 * encoder_flops(memory, 1, 10)
    assert encoder_flops(memory, 1, 20) > encoder_flops(memory, 1, 10)


def test_no_peak_on_cpu():
    assert peak_flops("cpu") is None


def test_the_reasoner_state_input_counts_its_projection_once_per_token(reasoner):
    """state_proj runs over the passage's tokens (not its slots), like in_proj."""
    plain = small_memory(reasoner)
    states = small_memory(reasoner, encoder_reasoner_states=True)
    proj = states.encoder.state_proj
    rows, tokens = 2, 10
    extra = encoder_flops(states, rows, tokens) - encoder_flops(plain, rows, tokens)
    assert extra == 3.0 * rows * tokens * 2 * proj.in_features * proj.out_features
