"""The timed greedy engine decodes exactly what transformers' generate() decodes, with and without memory."""

from __future__ import annotations

import pytest
import torch

from helpers import small_memory
from memsplice.engine import GreedyDecoder, PositionedKVCache
from memsplice.inject import forward_with_memory, generate_with_memory

NEW = 12


def _memory(reasoner, operator="prepend_kv", gate=None, seed=0):
    torch.manual_seed(seed)
    model = small_memory(reasoner, operator=operator)
    ids = torch.randint(3, 300, (1, 20))
    return model.write(ids, gate_override=gate).kv


def _reference(reasoner, prompt, memory):
    ids = torch.tensor([prompt])
    out = generate_with_memory(
        reasoner,
        ids,
        torch.ones_like(ids),
        memory,
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("case", ["none", "memory", "closed", "layer_concat", "partial_gate"])
@pytest.mark.parametrize("pad", [False, True])
def test_tokens_equal_generate(reasoner, case, pad):
    prompt = list(range(5, 5 + 11))
    memory = {
        "none": lambda: None,
        "memory": lambda: _memory(reasoner),
        "closed": lambda: _memory(reasoner, gate=0.0),
        "layer_concat": lambda: _memory(reasoner, operator="layer_concat"),
        "partial_gate": lambda: _memory(reasoner, gate=torch.tensor([[1.0, 0.0, 0.3, 0.9]])),
    }[case]()
    decoder = GreedyDecoder(reasoner, max_len=64, max_new_tokens=NEW, pad_prompts=pad)
    got = decoder.generate(prompt, memory)
    assert got.tokens == _reference(reasoner, prompt, memory)
    live = memory is not None and memory.any_live
    assert got.memory_slots == (4 if live else 0)
    assert got.prompt_tokens == len(prompt)
    assert got.decode_steps == NEW - 1
    assert got.kv_positions == got.memory_slots + len(prompt) + NEW - 1
    assert got.ttft_s > 0 and got.decode_s > 0


def test_reuse_across_requests_leaves_no_trace(reasoner):
    """Stale cache contents of a longer earlier request (memory, prompt) must not leak into the next one."""
    decoder = GreedyDecoder(reasoner, max_len=96, max_new_tokens=NEW, pad_prompts=True)
    mem = _memory(reasoner, seed=1)
    short = [7, 8, 9]
    fresh = GreedyDecoder(reasoner, max_len=96, max_new_tokens=NEW).generate(short).tokens
    decoder.generate(list(range(3, 60)), mem)
    assert decoder.generate(short).tokens == fresh
    assert decoder.generate(short, mem).tokens == _reference(reasoner, short, mem)


def test_stop_ids_cut_and_stop(reasoner):
    decoder = GreedyDecoder(reasoner, max_len=64, max_new_tokens=NEW)
    full = decoder.generate([5, 6, 7]).tokens
    stop = full[3]
    cut = decoder.generate([5, 6, 7], stop_ids=[stop])
    assert cut.tokens == full[: full.index(stop)]
    assert cut.decode_steps == full.index(stop)  # eager decoding stops at the stop id


def test_refuses_what_does_not_fit(reasoner):
    decoder = GreedyDecoder(reasoner, max_len=16, max_new_tokens=8)
    with pytest.raises(ValueError, match="exceed"):
        decoder.generate(list(range(5, 15)))
    with pytest.raises(ValueError, match="empty"):
        decoder.generate([])
    with pytest.raises(ValueError, match="CUDA"):
        GreedyDecoder(reasoner, max_len=16, cuda_graphs=True)


def test_cache_writes_where_told(reasoner):
    cache = PositionedKVCache.for_reasoner(reasoner, max_len=8)
    s = reasoner.shapes
    k = torch.randn(1, s.num_kv_heads, 2, s.head_dim)
    cache.write_positions = torch.tensor([5, 2])
    keys, values = cache.update(k, -k, 0)
    assert torch.equal(keys[:, :, 5], k[:, :, 0]) and torch.equal(keys[:, :, 2], k[:, :, 1])
    assert torch.equal(values[:, :, 2], -k[:, :, 1])
    assert keys.shape[2] == 8 and float(keys[:, :, [0, 1, 3, 4, 6, 7]].abs().sum()) == 0


@pytest.mark.parametrize("case", ["none", "memory", "layer_concat"])
def test_cache_holds_what_the_reference_forward_computes(reasoner, case):
    """Stronger than equal tokens (tiny random models often repeat one token): after prefill, every layer's
    cache equals the K/V of `forward_with_memory` for the same memory and prompt, so memory reached every layer."""
    memory = (
        None if case == "none" else _memory(reasoner, operator="prepend_kv" if case == "memory" else case)
    )
    prompt = list(range(5, 5 + 11))
    decoder = GreedyDecoder(reasoner, max_len=64, max_new_tokens=2, pad_prompts=True)
    decoder.generate(prompt, memory, max_new_tokens=1)
    ids = torch.tensor([prompt])
    ref = forward_with_memory(reasoner, ids, None, memory, use_cache=True).past_key_values
    n = 4 + len(prompt) if memory is not None else len(prompt)
    for layer, ref_layer in zip(decoder.cache.layers, ref.layers, strict=True):
        torch.testing.assert_close(layer.keys[:, :, :n], ref_layer.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values[:, :, :n], ref_layer.values, atol=1e-5, rtol=1e-5)
    if memory is not None:  # and memory changed what the text computed beyond the first layer
        bare = forward_with_memory(reasoner, ids, None, None, use_cache=True).past_key_values
        assert not torch.allclose(decoder.cache.layers[-1].keys[:, :, 4:n], bare.layers[-1].keys, atol=1e-4)


def test_long_prompts_pad_to_multiples_of_512():
    from memsplice.engine.greedy import _bucket

    assert [_bucket(n) for n in (1, 16, 17, 300, 512, 513, 1100, 8000)] == [
        16,
        16,
        32,
        512,
        512,
        1024,
        1536,
        8192,
    ]


@pytest.mark.parametrize("case", ["none", "memory", "layer_concat"])
def test_score_is_the_teacher_forced_forward(reasoner, case):
    """score() runs the engine's own steps on given tokens; its logits are those of one forward over prompt+tokens."""
    memory = (
        None if case == "none" else _memory(reasoner, operator="prepend_kv" if case == "memory" else case)
    )
    prompt, forced = list(range(5, 16)), [40, 41, 7, 300, 2]
    decoder = GreedyDecoder(reasoner, max_len=64, max_new_tokens=8, pad_prompts=True)
    got = decoder.score(prompt, forced, memory)
    ids = torch.tensor([prompt + forced])
    ref = forward_with_memory(reasoner, ids, None, memory).logits[0, len(prompt) - 1 : -1].float()
    assert got.shape == (len(forced), reasoner.shapes.vocab_size)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # and greedy decoding is score() fed its own tokens
    tokens = decoder.generate(prompt, memory, max_new_tokens=6).tokens
    assert decoder.score(prompt, tokens, memory).argmax(-1).tolist() == tokens
    with pytest.raises(ValueError, match="at least one token"):
        decoder.score(prompt, [], memory)


def test_memory_loads_with_one_stacked_copy(reasoner):
    memory = _memory(reasoner)
    stacked = memory.stacked(torch.float32, "cpu")
    assert stacked.shape == (2, memory.num_layers, 1, *memory.keys[0].shape[1:])
    assert memory.stacked(torch.float32, "cpu") is stacked  # made once per memory
    cache = PositionedKVCache.for_reasoner(reasoner, max_len=16)
    cache.write_prefix(stacked)
    for i, layer in enumerate(cache.layers):
        assert torch.equal(layer.keys[:, :, :4], memory.keys[i]) and torch.equal(
            layer.values[:, :, :4], memory.values[i]
        )
        assert float(layer.keys[:, :, 4:].abs().sum()) == 0
        assert layer.keys.data_ptr() == cache.storage[0, i].data_ptr()  # views: one storage
    with pytest.raises(ValueError, match="layers"):
        cache.write_prefix(stacked[:, :1])
    with pytest.raises(ValueError, match="do not fit"):
        PositionedKVCache.for_reasoner(reasoner, max_len=2).write_prefix(stacked)
    with pytest.raises(ValueError, match=r"\(2, L, B, H, M, D\)"):
        cache.write_prefix(stacked[0])


@pytest.mark.parametrize("case", ["none", "memory", "layer_concat"])
def test_on_token_streams_the_same_tokens(reasoner, case):
    """Every token reaches the callback as it is made, in order, and streaming changes no token."""
    memory = (
        None if case == "none" else _memory(reasoner, operator="prepend_kv" if case == "memory" else case)
    )
    prompt = list(range(5, 16))
    decoder = GreedyDecoder(reasoner, max_len=64, max_new_tokens=NEW, pad_prompts=True)
    plain = decoder.generate(prompt, memory)
    seen = []
    streamed = decoder.generate(prompt, memory, on_token=seen.append)
    assert seen == streamed.tokens == plain.tokens == _reference(reasoner, prompt, memory)
    assert streamed.stop_id is None and not streamed.halted and streamed.decode_steps == NEW - 1


def test_on_token_sees_the_stop_id_last(reasoner):
    decoder = GreedyDecoder(reasoner, max_len=64, max_new_tokens=NEW)
    full = decoder.generate([5, 6, 7]).tokens
    stop = full[4]
    seen = []
    cut = decoder.generate([5, 6, 7], stop_ids=[stop], on_token=seen.append)
    assert cut.tokens == full[: full.index(stop)] and cut.stop_id == stop and not cut.halted
    assert seen == [*cut.tokens, stop]


def test_on_token_stops_decoding_when_it_returns_true(reasoner):
    """A callback that answers True (a stop string, a cancelled request) ends decoding after that token."""
    decoder = GreedyDecoder(reasoner, max_len=64, max_new_tokens=NEW)
    full = decoder.generate([5, 6, 7]).tokens
    seen = []

    def on_token(t):
        seen.append(t)
        return len(seen) == 3

    cut = decoder.generate([5, 6, 7], on_token=on_token)
    assert cut.tokens == seen == full[:3]
    assert cut.halted and cut.stop_id is None and cut.decode_steps == 2
    assert cut.kv_positions == 3 + 2
    # the next request is not affected by the one that stopped early
    assert decoder.generate([5, 6, 7]).tokens == full


def test_pool_sizes_decoders_by_what_a_request_needs(reasoner):
    from memsplice.engine import DecoderPool

    pool = DecoderPool(reasoner, max_new_tokens=4, min_len=16, window=100)
    assert [pool.size_for(n) for n in (1, 16, 17, 64, 65, 100)] == [16, 16, 32, 64, 100, 100]
    assert pool.size_for(101) is None and pool.decoder_for(101) is None
    a = pool.decoder_for(20)
    assert a is pool.decoder_for(30) and a.max_len == 32 and a.max_new_tokens == 4
    assert pool.decoder_for(10).max_len == 16 and sorted(pool.decoders) == [16, 32]


def test_plain_greedy_sees_generation_settings_the_engine_does_not_apply(reasoner):
    from memsplice.engine import plain_greedy

    assert plain_greedy(reasoner)
    reasoner.model.generation_config.repetition_penalty = 1.3
    assert not plain_greedy(reasoner)
