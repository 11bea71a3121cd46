"""The latency benchmark measures what it says: every scenario, the engine against eager HF, and a floor below both."""

from __future__ import annotations

import pytest
import torch

from helpers import small_memory
from memsplice.bench.latency import LatencyArgs, headline, measure_latency, weight_bytes


def test_scenarios_tokens_and_floor(reasoner):
    memory = small_memory(reasoner)
    args = LatencyArgs(
        question_tokens=12,
        new_tokens=6,
        slots=(4, 8),
        memory_tokens=24,
        contexts=(48, 100_000),
        repeats=2,
        warmup=1,
        hf_repeats=1,
    )
    result = measure_latency(reasoner, memory, args)
    rows = {r["scenario"]: r for r in result["scenarios"]}
    window = reasoner.shapes.max_positions
    assert list(rows) == ["none", "memory-4", "memory-8", "full-48", f"full-{window - 12 - 6}"]
    assert rows["memory-8"]["memory_slots"] == 8 and rows["full-48"]["prompt_tokens"] == 60
    for r in rows.values():
        assert r["tokens_equal_hf"], r[
            "scenario"
        ]  # fp32 on the CPU: the engine decodes exactly what HF decodes
        for kind in ("ttft_ms", "decode_ms_per_token"):
            assert 0 < r["floor"][kind] < r["engine"][kind]
            assert r["eager_hf"][kind] > 0
    assert result["weight_bytes"] == weight_bytes(reasoner.model) > 0
    h = result["headline"]
    assert h["memory"]["slots"] == 4 and "targets_met" not in h  # targets are GPU targets


def test_headline_prefers_a_compiled_engine_only_when_it_is_faster_and_exact():
    def row(name, engine, compiled=None, equal=True):
        r = {
            "scenario": name,
            "memory_slots": 4 if name != "none" else 0,
            "engine": {"ttft_ms": engine, "decode_ms_per_token": engine, "cuda_graphs": True},
        }
        if compiled is not None:
            r["engine_compiled"] = {"ttft_ms": compiled, "decode_ms_per_token": compiled}
            r["compiled_check"] = {"consistent": equal}
        return r

    cpu = torch.device("cpu")
    assert headline([row("none", 2.0, 1.0), row("memory-4", 2.2, 1.1)], cpu)["engine"] == "graphs+compile"
    h = headline([row("none", 2.0, 1.0), row("memory-4", 2.2, 1.1, equal=False)], cpu)
    assert h["engine"] == "graphs" and h["memory"]["decode_ms_per_token"] == 2.2
    assert headline([row("none", 2.0, 3.0), row("memory-4", 2.2, 3.0)], cpu)["engine"] == "graphs"
    assert headline([row("none", 2.0), row("memory-4", 2.2)], cpu)["memory_overhead"][
        "ttft_ms"
    ] == pytest.approx(0.1)


def test_args_validate():
    for bad in (dict(new_tokens=1), dict(repeats=0), dict(slots=(0,))):
        with pytest.raises(ValueError, match="LatencyArgs"):
            LatencyArgs(**bad)


def test_compare_engines_tells_ties_from_errors(reasoner):
    from memsplice.bench.latency import compare_engines
    from memsplice.engine import GreedyDecoder

    prompt = list(range(5, 17))
    a = GreedyDecoder(reasoner, max_len=64, max_new_tokens=8)
    tokens = a.generate(prompt).tokens
    same = compare_engines(a, GreedyDecoder(reasoner, max_len=64, max_new_tokens=8), prompt, tokens)
    assert same["consistent"] and same["top1_agreement"] == 1.0 and same["max_logit_diff"] == 0.0

    class Broken:  # an engine that predicts the wrong thing by a wide margin at every step
        def score(self, prompt, tokens, memory=None):
            logits = a.score(prompt, tokens, memory)
            return logits.roll(1, dims=-1) * 3

    bad = compare_engines(a, Broken(), prompt, tokens)
    assert not bad["consistent"] and bad["top1_agreement"] < 0.95
