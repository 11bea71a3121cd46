"""save_pretrained / from_pretrained: identical logits, reasoner identity enforced, bad checkpoints refused."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import random_ids, small_memory
from memsplice import CheckpointError, MemoryModel, ReasonerMismatchError
from tiny import tiny_reasoner


def _logits(memory, mem_ids, ids):
    return memory(ids, memory=memory.write(mem_ids)).logits


@pytest.mark.parametrize("operator", ["prepend_kv", "layer_concat", "prepend_embed"])
def test_save_load_gives_identical_logits(tmp_path, reasoner, operator):
    memory = small_memory(reasoner, operator)
    mem_ids, ids = random_ids(2, 20), random_ids(2, 7)
    memory.save_pretrained(tmp_path / "ckpt")
    loaded = MemoryModel.from_pretrained(tmp_path / "ckpt", reasoner=reasoner)
    assert torch.equal(_logits(memory, mem_ids, ids), _logits(loaded, mem_ids, ids))
    saved = json.loads((tmp_path / "ckpt" / "memsplice_config.json").read_text())
    assert saved["reasoner_fingerprint"] == reasoner.fingerprint
    assert saved["reasoner_name"] == reasoner.name


def test_untied_embedding_is_saved_as_changed_rows(tmp_path, reasoner):
    memory = small_memory(reasoner)
    emb = memory.encoder.untie_embedding()
    with torch.no_grad():
        emb[[5, 17]] += 1.0
    memory.save_pretrained(tmp_path / "ckpt")
    from safetensors.torch import load_file

    state = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert state["encoder.token_embedding.rows"].tolist() == [5, 17]
    loaded = MemoryModel.from_pretrained(tmp_path / "ckpt", reasoner=reasoner)
    assert torch.equal(loaded.encoder.embedding_weight(), emb)


def test_sharded_and_bf16_checkpoints_load(tmp_path, reasoner):
    memory = small_memory(reasoner)
    memory.save_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "ckpt").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    loaded = MemoryModel.from_pretrained(tmp_path / "ckpt", reasoner=reasoner)
    for (n, a), (_, b) in zip(memory.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.allclose(a.to(torch.bfloat16).float(), b, atol=0), n


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path, reasoner):
    small_memory(reasoner, num_slots=4).save_pretrained(tmp_path / "ckpt")
    small_memory(reasoner, num_slots=6).save_pretrained(tmp_path / "ckpt")
    assert MemoryModel.from_pretrained(tmp_path / "ckpt", reasoner=reasoner).config.num_slots == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_different_reasoner_is_refused(tmp_path):
    trained_for = tiny_reasoner("llama", seed=0)
    other = tiny_reasoner("llama", seed=1)
    small_memory(trained_for).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ReasonerMismatchError, match="trained for reasoner"):
        MemoryModel.from_pretrained(tmp_path / "ckpt", reasoner=other)


def test_unreadable_and_missing_checkpoints_get_clear_errors(tmp_path, reasoner):
    with pytest.raises(CheckpointError, match="no memory checkpoint"):
        MemoryModel.from_pretrained(tmp_path / "nowhere", reasoner=reasoner)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="memsplice_config.json is missing"):
        MemoryModel.from_pretrained(tmp_path / "empty", reasoner=reasoner)
    small_memory(reasoner).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read memory weights"):
        MemoryModel.from_pretrained(tmp_path / "ckpt", reasoner=reasoner)
    (tmp_path / "ckpt" / "memsplice_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        MemoryModel.from_pretrained(tmp_path / "ckpt", reasoner=reasoner)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path, reasoner):
    small_memory(reasoner, num_slots=4).save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "memsplice_config.json").read_text())
    cfg["num_slots"] = 8
    (tmp_path / "ckpt" / "memsplice_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        MemoryModel.from_pretrained(tmp_path / "ckpt", reasoner=reasoner)


def test_load_time_overrides_cannot_change_weights(tmp_path, reasoner):
    small_memory(reasoner).save_pretrained(tmp_path / "ckpt")
    loaded = MemoryModel.from_pretrained(tmp_path / "ckpt", reasoner=reasoner, max_latent_norm=5.0)
    assert loaded.config.max_latent_norm == 5.0
    with pytest.raises(ValueError, match="define the weights"):
        MemoryModel.from_pretrained(tmp_path / "ckpt", reasoner=reasoner, num_slots=8)
