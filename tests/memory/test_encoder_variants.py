"""Baseline encoders (causal pooling of the reasoner's states, init from its layers) and encoder growth."""

import pytest
import torch

from helpers import load_script, random_ids, small_memory
from memsplice.memory import CausalPoolEncoder, MemoryConfig, MemoryModel
from tiny import tiny_reasoner


def test_causal_pool_latents_are_chunk_means_of_reasoner_states():
    reasoner = tiny_reasoner("llama")
    memory = MemoryModel(
        MemoryConfig(num_slots=4, max_memory_tokens=64, encoder_type="causal_pool"), reasoner
    )
    assert isinstance(memory.encoder, CausalPoolEncoder)
    assert not any(n.startswith("encoder.") for n, _ in memory.named_parameters())
    ids = torch.randint(3, 300, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # row 1 has 6 tokens
    z = memory.encode(ids, mask)
    hidden = reasoner.decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(z[0, 1], hidden[0, 2:4].mean(0))
    # 6 tokens into 4 slots: chunks [0,1) [1,3) [3,4) [4,6)
    torch.testing.assert_close(z[1, 1], hidden[1, 1:3].mean(0))
    torch.testing.assert_close(z[1, 3], hidden[1, 4:6].mean(0))
    # fewer tokens than slots still fills every slot from the row's own tokens
    short = memory.encode(ids[:1, :2])
    assert torch.isfinite(short).all()


def test_causal_pool_refuses_left_padding():
    memory = MemoryModel(
        MemoryConfig(num_slots=2, max_memory_tokens=64, encoder_type="causal_pool"), tiny_reasoner("llama")
    )
    with pytest.raises(ValueError, match="right-padded"):
        memory.encode(torch.ones(1, 4, dtype=torch.long), torch.tensor([[0, 1, 1, 1]]))


def test_causal_pool_checkpoint_round_trip(tmp_path):
    reasoner = tiny_reasoner("llama")
    memory = MemoryModel(
        MemoryConfig(num_slots=2, max_memory_tokens=64, encoder_type="causal_pool"), reasoner
    )
    with torch.no_grad():
        memory.operator.key_bias.add_(0.5)
    memory.save_pretrained(tmp_path / "ckpt")
    loaded = MemoryModel.from_pretrained(tmp_path / "ckpt", reasoner=reasoner)
    ids = torch.randint(3, 300, (1, 6))
    torch.testing.assert_close(loaded.write(ids).kv.keys[0], memory.write(ids).kv.keys[0])


def test_reasoner_init_copies_the_first_layers():
    reasoner = tiny_reasoner("llama")
    s = reasoner.shapes
    mlp_width = reasoner.decoder.layers[0].mlp.gate_proj.out_features
    cfg = MemoryConfig(
        num_slots=2,
        max_memory_tokens=64,
        encoder_layers=2,
        encoder_width=s.hidden_size,
        encoder_heads=s.num_heads,
        encoder_mlp_ratio=mlp_width / s.hidden_size,
        encoder_init="reasoner",
    )
    memory = MemoryModel(cfg, reasoner)
    x = torch.randn(3, 5, s.hidden_size)
    for mine, theirs in zip(memory.encoder.blocks, reasoner.decoder.layers, strict=False):
        gate, up = mine.gate_up(x).chunk(2, dim=-1)
        torch.testing.assert_close(mine.down(torch.nn.functional.silu(gate) * up), theirs.mlp(x))
        q, k, v = mine.qkv(x).chunk(3, dim=-1)
        torch.testing.assert_close(q, theirs.self_attn.q_proj(x))
        rep = s.num_heads // s.num_kv_heads
        kv_k = theirs.self_attn.k_proj(x).view(3, 5, s.num_kv_heads, s.head_dim).repeat_interleave(rep, 2)
        torch.testing.assert_close(k, kv_k.reshape(3, 5, -1))
    random = MemoryModel(
        MemoryConfig(
            **{**cfg.to_dict(), "encoder_init": "random", "reasoner_name": None, "reasoner_fingerprint": None}
        ),
        reasoner,
    )
    assert not torch.equal(random.encoder.blocks[0].qkv.weight, memory.encoder.blocks[0].qkv.weight)


def test_reasoner_init_names_the_mismatched_field():
    with pytest.raises(ValueError, match="encoder_width"):
        MemoryModel(
            MemoryConfig(
                num_slots=2, max_memory_tokens=64, encoder_width=32, encoder_heads=2, encoder_init="reasoner"
            ),
            tiny_reasoner("llama"),
        )
    with pytest.raises(ValueError, match="encoder_init"):
        MemoryConfig(encoder_init="pretrained")


def test_sink_init_starts_every_slot_as_the_reasoners_first_token():
    from transformers import DynamicCache

    from memsplice.compat import cache_layer_tensors

    reasoner = tiny_reasoner("llama")
    memory = MemoryModel(
        MemoryConfig(num_slots=3, max_memory_tokens=64, kv_init="sink", kv_init_scale=1e-8), reasoner
    )
    cache = DynamicCache()
    bos = reasoner.tokenizer.bos_token_id
    reasoner.decoder(input_ids=torch.tensor([[bos]]), past_key_values=cache, use_cache=True)
    mem = memory.write(torch.randint(3, 300, (2, 5)))
    for layer, (k, v) in enumerate(cache_layer_tensors(cache)):
        torch.testing.assert_close(mem.kv.values[layer], v.expand(2, -1, 3, -1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mem.kv.keys[layer][:, :, :1], k.expand(2, -1, 1, -1), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="kv_init_scale"):
        MemoryConfig(kv_init="sink", kv_init_scale=0.0)


def test_grown_encoder_writes_the_same_latents_and_loads_as_grown(tmp_path):
    reasoner = tiny_reasoner("llama")
    memory = small_memory(reasoner, encoder_mlp_ratio=1.5)
    with torch.no_grad():  # a memory whose blocks are not at their initial values
        for p in memory.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids = random_ids(2, 10)
    before = memory.encode(ids).detach()
    memory.grow_encoder(3)
    assert memory.config.encoder_layers == 5 and len(memory.encoder.blocks) == 5
    grown = memory.encoder.blocks[-1]
    assert grown.down.in_features == memory.encoder.blocks[0].down.in_features
    torch.testing.assert_close(memory.encode(ids), before, rtol=0, atol=0)
    memory.save_pretrained(tmp_path / "grown")
    loaded = MemoryModel.from_pretrained(tmp_path / "grown", reasoner=reasoner)
    assert loaded.config.encoder_layers == 5
    torch.testing.assert_close(loaded.encode(ids), before, rtol=0, atol=0)


def test_widened_encoder_writes_the_same_latents_learns_and_loads_as_widened(tmp_path):
    reasoner = tiny_reasoner("llama")
    memory = small_memory(reasoner, encoder_mlp_ratio=1.5)
    memory.read_reasoner_states()
    with torch.no_grad():  # a memory whose weights are not at their initial values
        for p in memory.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
        # a stream of order 1, as in a trained encoder: the norms' eps (added to a mean over more dimensions once
        # widened) is then negligible, as it is for the shipped checkpoint
        for p in (memory.encoder.in_proj.weight, memory.encoder.position, memory.encoder.slots):
            p.mul_(30)
    ids = random_ids(2, 10)
    before = memory.encode(ids).detach()
    w, heads = memory.config.encoder_width, memory.config.encoder_heads
    head_w = w // heads
    memory.widen_encoder(w + 2 * head_w)
    assert (memory.config.encoder_width, memory.config.encoder_heads) == (w + 2 * head_w, heads + 2)
    block = memory.encoder.blocks[0]
    assert block.down.in_features == int(1.5 * (w + 2 * head_w))
    torch.testing.assert_close(memory.encode(ids), before, rtol=1e-4, atol=1e-5)
    memory.encode(ids).pow(2).sum().backward()
    # what writes the new dimensions starts at zero but gets a gradient, so they leave zero once trained
    assert memory.encoder.in_proj.weight.grad[w:].abs().sum() > 0
    assert block.down.weight.grad[w:].abs().sum() > 0 and block.out.weight.grad[:, w:].abs().sum() > 0
    memory.save_pretrained(tmp_path / "wide")
    loaded = MemoryModel.from_pretrained(tmp_path / "wide", reasoner=reasoner)
    assert loaded.config.encoder_width == w + 2 * head_w
    torch.testing.assert_close(loaded.encode(ids), before, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="head width"):
        memory.widen_encoder(w + 2 * head_w + 1)


def test_grown_blocks_learn():
    """Zero output projections still get a gradient, so the new blocks leave the identity once trained."""
    memory = small_memory(tiny_reasoner("llama"))
    memory.grow_encoder(1)
    memory.encode(random_ids(2, 10)).pow(2).sum().backward()
    block = memory.encoder.blocks[-1]
    assert block.out.weight.grad.abs().sum() > 0 and block.down.weight.grad.abs().sum() > 0


def test_only_a_transformer_encoder_grows():
    memory = MemoryModel(
        MemoryConfig(num_slots=2, max_memory_tokens=64, encoder_type="causal_pool"), tiny_reasoner("llama")
    )
    with pytest.raises(ValueError, match="transformer"):
        memory.grow_encoder(1)
    with pytest.raises(ValueError, match="at least one"):
        small_memory(tiny_reasoner("llama")).encoder.add_blocks(0)


def test_grow_encoder_script_checks_the_latents():
    grow = load_script("formation/grow_encoder.py").grow
    memory = small_memory(tiny_reasoner("llama"))
    assert grow(memory, 2) == (0.0, 0.0)
    assert memory.config.encoder_layers == 4


def test_reasoner_state_channel_starts_silent_learns_and_round_trips(tmp_path):
    """The reasoner-state input starts at zero (same latents), gets a gradient, and loads back as extended."""
    reasoner = tiny_reasoner("llama")
    memory = small_memory(reasoner)
    ids = random_ids(2, 10)
    before = memory.encode(ids).detach()
    memory.read_reasoner_states()
    assert memory.config.encoder_reasoner_states
    assert memory.encoder.state_mix.shape == (reasoner.shapes.num_layers + 1,)
    torch.testing.assert_close(memory.encode(ids), before, rtol=0, atol=0)
    memory.encode(ids).pow(2).sum().backward()
    assert memory.encoder.state_proj.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad and p.grad is not None for p in reasoner.model.parameters())
    with torch.no_grad():
        memory.encoder.state_proj.weight.normal_()
        memory.encoder.state_mix.normal_()
    changed = memory.encode(ids).detach()
    assert (changed - before).abs().max() > 0
    memory.save_pretrained(tmp_path / "states")
    loaded = MemoryModel.from_pretrained(tmp_path / "states", reasoner=reasoner)
    assert loaded.config.encoder_reasoner_states
    torch.testing.assert_close(loaded.encode(ids), changed, rtol=0, atol=0)
    with pytest.raises(ValueError, match="already"):
        memory.read_reasoner_states()


def test_reasoner_states_follow_the_padding_and_are_checked():
    """A right-padded row gets the same latents as the row alone; a missing or misshaped state input is refused."""
    memory = small_memory(tiny_reasoner("llama"), encoder_reasoner_states=True)
    with torch.no_grad():
        memory.encoder.state_proj.weight.normal_()
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    both = memory.encode(ids, mask)
    alone = memory.encode(ids[1:, :6])
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="hidden states"):
        memory.encoder(ids)
    with pytest.raises(ValueError, match="encoder_type"):
        MemoryConfig(encoder_type="causal_pool", encoder_reasoner_states=True)


def test_grow_encoder_script_adds_the_reasoner_states():
    grow = load_script("formation/grow_encoder.py").grow
    memory = small_memory(tiny_reasoner("llama"))
    assert grow(memory, 0, states=True) == (0.0, 0.0)
    assert memory.config.encoder_reasoner_states and memory.config.encoder_layers == 2


def test_slot_spans_cut_each_rows_real_tokens_into_contiguous_chunks():
    from memsplice.memory.encoder import slot_spans

    mask = torch.zeros(3, 10, dtype=torch.long)
    mask[0] = 1  # 10 tokens into 4 slots: [0,2) [2,5) [5,7) [7,10)
    mask[1, :6] = 1  # right-padded, 6 tokens: [0,1) [1,3) [3,4) [4,6)
    mask[2, 4:] = 1  # left-padded, the same 6 tokens at positions 4-9
    spans = slot_spans(mask, 4)
    assert spans.shape == (3, 4, 10)
    assert [row.nonzero().flatten().tolist() for row in spans[0]] == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9]]
    assert [row.nonzero().flatten().tolist() for row in spans[1]] == [[0], [1, 2], [3], [4, 5]]
    torch.testing.assert_close(spans[2, :, 4:], spans[1, :, :6])
    assert not spans[2, :, :4].any() and not spans[1, :, 6:].any()
    # every real token belongs to exactly one slot when there are at least as many tokens as slots
    assert (spans.sum(1) == mask.bool()).all()
    # fewer tokens than slots: every slot still reads one token, tokens are shared
    short = slot_spans(torch.ones(1, 2, dtype=torch.long), 4)
    assert short.sum(-1).tolist() == [[1, 1, 1, 1]]
    assert not slot_spans(torch.zeros(1, 3, dtype=torch.long), 2).any()


def test_chunk_slot_attention_makes_a_slot_read_only_its_chunk():
    """With one layer, a slot's latent depends on its chunk's tokens alone under "chunk" (tokens mix only from the
    first layer on), and on every token under "global"."""
    reasoner = tiny_reasoner("llama")
    ids = random_ids(1, 12)
    other = ids.clone()
    other[0, 10] = (ids[0, 10] + 1) % 300 + 3  # a token of the last chunk (slots of 3 tokens: 9-11)
    for mode, first_slots_move in (("chunk", False), ("global", True)):
        memory = small_memory(reasoner, encoder_layers=1, slot_attention=mode)
        a, b = memory.encode(ids), memory.encode(other)
        assert bool((a[0, :3] - b[0, :3]).abs().max() > 1e-6) == first_slots_move
        assert (a[0, 3] - b[0, 3]).abs().max() > 1e-6
    deep = small_memory(reasoner, slot_attention="chunk")  # two layers: the rest arrives through the tokens
    assert (deep.encode(ids)[0, 0] - deep.encode(other)[0, 0]).abs().max() > 1e-6


def test_chunk_slot_attention_follows_the_padding_and_round_trips(tmp_path):
    reasoner = tiny_reasoner("llama")
    memory = small_memory(reasoner, slot_attention="chunk")
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    torch.testing.assert_close(memory.encode(ids, mask)[1:], memory.encode(ids[1:, :7]), atol=1e-5, rtol=1e-4)
    memory.save_pretrained(tmp_path / "chunk")
    loaded = MemoryModel.from_pretrained(tmp_path / "chunk", reasoner=reasoner)
    assert loaded.config.slot_attention == "chunk"
    torch.testing.assert_close(loaded.encode(ids), memory.encode(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="slot_attention"):
        MemoryConfig(slot_attention="local")
    with pytest.raises(ValueError, match="slot_attention"):
        MemoryConfig(slot_attention="chunk", encoder_type="causal_pool")


def test_slot_attention_changes_on_a_trained_memory_and_is_reported():
    grow = load_script("formation/grow_encoder.py").grow
    memory = small_memory(tiny_reasoner("llama"))
    with pytest.raises(ValueError, match="slot_attention"):
        memory.set_slot_attention("local")
    assert memory.config.slot_attention == "global"
    diff, changed = grow(memory, 0, slot_attention="chunk")
    assert diff == 0.0 and changed > 0
    assert memory.config.slot_attention == "chunk" and memory.encoder.slot_attention == "chunk"
