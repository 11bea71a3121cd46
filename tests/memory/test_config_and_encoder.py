"""MemoryConfig validation names the bad field; the encoder's input contract."""

from __future__ import annotations

import pytest
import torch

from helpers import random_ids, small_memory
from memsplice import MemoryConfig


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("num_slots", 0, "num_slots"),
        ("operator", "teleport", "operator"),
        ("encoder_width", 31, "encoder_width"),
        ("kv_init", "zeros", "kv_init"),
        ("dropout", 1.5, "dropout"),
        ("max_latent_norm", -1.0, "max_latent_norm"),
        ("embed_warmup_updates", -3, "embed_warmup_updates"),
        ("chunk_tokens", 0, "chunk_tokens"),
        ("chunk_tokens", 4096, "chunk_tokens"),
    ],
)
def test_bad_fields_are_named(field, value, match):
    with pytest.raises(ValueError, match=f"MemoryConfig.{match}"):
        MemoryConfig(**{field: value})


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match="unknown MemoryConfig fields"):
        MemoryConfig.from_dict({"num_slots": 4, "slots_per_chunk": 2})


def test_config_round_trips_through_json(tmp_path):
    cfg = MemoryConfig(num_slots=8, operator="layer_concat", target_layers=[0, 2])
    cfg.save(tmp_path)
    assert MemoryConfig.load(tmp_path) == cfg


def test_layer_concat_rejects_layers_the_reasoner_lacks(reasoner):
    with pytest.raises(ValueError, match="target_layers"):
        small_memory(reasoner, "layer_concat", target_layers=[0, 99])


def test_layer_concat_touches_only_target_layers(reasoner):
    memory = small_memory(reasoner, "layer_concat", target_layers=[1])
    mem = memory.write(random_ids(1, 20))
    bias = mem.kv.gate_bias[0]
    assert torch.isfinite(bias[1]).all()
    assert torch.isneginf(bias[0]).all() and torch.isneginf(bias[2]).all()


def test_encoder_output_ignores_right_padding(reasoner):
    memory = small_memory(reasoner)
    ids = random_ids(1, 12)
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 5)], dim=1).long()
    assert (memory.encode(ids) - memory.encode(padded, mask)).abs().max() < 1e-5


def test_encoder_input_longer_than_the_cap_is_refused(reasoner):
    memory = small_memory(reasoner, max_memory_tokens=16)
    with pytest.raises(ValueError, match="max_memory_tokens"):
        memory.encode(random_ids(1, 17))


def test_wrong_shapes_get_clear_errors(reasoner):
    memory = small_memory(reasoner)
    with pytest.raises(ValueError, match="latents must be"):
        memory.write(random_ids(1, 10), latents=torch.zeros(1, 3, reasoner.shapes.hidden_size))
    mem = memory.write(random_ids(2, 10))
    with pytest.raises(ValueError, match="memory holds 2 rows"):
        memory(random_ids(3, 5), memory=mem)
    with pytest.raises(ValueError, match="input_ids must be"):
        memory(random_ids(1, 5)[0], memory=None)
    with pytest.raises(ValueError, match="does not match"):
        memory(random_ids(2, 5), torch.ones(2, 4, dtype=torch.long), memory=mem)


def test_write_text_uses_the_reasoner_tokenizer(reasoner):
    memory = small_memory(reasoner)
    mem = memory.write_text(["Ada lives in Lisbon.", "The fox jumps."])
    assert mem.latents.shape == (2, 4, reasoner.shapes.hidden_size) and mem.kv.live.all()


def test_evaluating_turns_dropout_off_and_restores_the_mode():
    from helpers import small_memory
    from tiny import tiny_reasoner

    memory = small_memory(tiny_reasoner("llama"))
    for mode in (True, False):
        memory.train(mode)
        with memory.evaluating():
            assert not memory.training and not memory.encoder.training
        assert memory.training is mode
    memory.train(True)
    try:
        with memory.evaluating():
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert memory.training
