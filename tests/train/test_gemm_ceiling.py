"""scripts/formation/gemm_ceiling.py: its GEMM shapes are the reasoner's linear layers, as the FLOP count sees them."""

from helpers import load_script
from memsplice.train.flops import ReasonerCost
from tiny import tiny_config, tiny_reasoner


def _script():
    return load_script("formation/gemm_ceiling.py")


def test_shapes_cover_the_linear_flops_the_trainer_counts():
    gc = _script()
    cfg = tiny_config("llama")
    shape = gc.Shape(
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        layers=cfg.num_hidden_layers,
        heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        vocab=cfg.vocab_size,
    )
    per_token = sum(2 * k * n for k, n in shape.linears().values()) * shape.layers
    assert per_token == ReasonerCost.from_reasoner(tiny_reasoner("llama")).linear_per_token


def test_presets_are_the_published_smollm2_shapes():
    presets = _script().PRESETS
    assert presets["smollm2-135m"].linears()["qkv"] == (576, 960)  # 9 query heads, 3 KV heads of 64
    assert presets["smollm2-1.7b"].head_dim == 64 and presets["smollm2-360m"].head_dim == 64
