"""The fast reader computes what the Hugging Face decoder computes for the training layout, values and gradients."""

import pytest
import torch

from helpers import assert_grads_close, memory_grads, random_ids, small_memory
from memsplice.inject import hidden_states_with_memory
from memsplice.train.fast_reader import FastReader, fast_reading, read_hidden_states
from memsplice.train.objectives import reconstruction
from tiny import tiny_reasoner


@pytest.mark.parametrize("attention", ["lower_right", "square"])
@pytest.mark.parametrize("operator", ["prepend_kv", "layer_concat"])
def test_fast_reader_matches_decoder_values_and_gradients(reasoner, operator, attention):
    memory = small_memory(reasoner, operator)
    with torch.no_grad():
        memory.gate.weight.normal_(0, 0.05)  # a gate that differs per slot
    ids, text = random_ids(3, 10), random_ids(3, 7)
    reader = FastReader(reasoner, attention=attention)

    memory.zero_grad()
    want = hidden_states_with_memory(reasoner, text, None, memory.write(ids).kv)
    want_grads = memory_grads(memory, want)
    memory.zero_grad()
    got = reader.hidden_states(text, memory.write(ids).kv)
    got_grads = memory_grads(memory, got)

    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert_grads_close(got_grads, want_grads, rel=1e-4)


def test_read_hidden_states_uses_the_active_reader_only_for_live_rows(reasoner, monkeypatch):
    memory = small_memory(reasoner, "prepend_kv")
    reader = FastReader(reasoner)
    calls = []
    original = reader.hidden_states
    monkeypatch.setattr(reader, "hidden_states", lambda *a: calls.append(1) or original(*a))
    ids, text = random_ids(2, 6), random_ids(2, 5)
    with torch.no_grad():
        kv = memory.write(ids).kv
        outside = read_hidden_states(reasoner, text, kv)
        with fast_reading(reader):
            inside = read_hidden_states(reasoner, text, kv)
            kv.live[1] = False  # a fallback row: the decoder path, which masks its memory
            fallback = read_hidden_states(reasoner, text, kv)
        assert calls == [1]
        torch.testing.assert_close(inside, outside, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(fallback, hidden_states_with_memory(reasoner, text, None, kv))
        after = read_hidden_states(reasoner, text, kv)
    assert calls == [1] and torch.equal(after, fallback)


def test_reconstruction_loss_is_the_same_through_the_fast_reader(reasoner):
    memory = small_memory(reasoner, "prepend_kv")
    passage, instruction = random_ids(2, 9), random_ids(1, 3)[0]
    want = reconstruction(memory, passage, instruction)
    with fast_reading(FastReader(reasoner)):
        got = reconstruction(memory, passage, instruction)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    assert int(got.correct) == int(want.correct)


def test_fast_reader_refuses_an_unknown_attention_layout(reasoner):
    with pytest.raises(ValueError, match="attention layout 'upper_left'"):
        FastReader(reasoner, attention="upper_left")


def test_fast_reader_refuses_what_it_cannot_run():
    from tiny import tiny_reasoner

    r = tiny_reasoner("llama")
    r.model.config.hidden_act = "gelu"
    assert "gelu" in FastReader.refusal(r)
    with pytest.raises(ValueError, match="FastReader"):
        FastReader(r)


@pytest.mark.parametrize("static, dynamic", [(False, None), (True, False)])
def test_compiled_reader_shapes_follow_the_option(monkeypatch, static, dynamic):
    """run.reader_shapes="static" compiles one graph per shape; "auto" leaves dynamo's default."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw.get("dynamic", "unset")) or fn)
    FastReader(tiny_reasoner("llama"), compile=True, static_shapes=static)
    assert seen == [dynamic, dynamic]  # the layer function and the head loss


@pytest.mark.parametrize(
    "mode, head_mode, graphs",
    [
        ("default", "default", False),
        ("reduce-overhead", "default", True),
        ("max-autotune", "max-autotune-no-cudagraphs", True),
        ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs", False),
    ],
)
def test_compile_mode_reaches_the_layer_function_and_the_head_loss_without_graphs(
    monkeypatch, mode, head_mode, graphs
):
    """run.compile_mode compiles the layer function in that mode; the head loss, whose outputs are kept past the step,
    never gets CUDA graphs; only CUDA-graph modes mark a training step's start."""
    seen, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw.get("mode")) or fn)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    reader = FastReader(tiny_reasoner("llama"), compile=True, compile_mode=mode)
    assert seen == [mode, head_mode]
    reader.mark_step_begin()
    assert marks == ([1] if graphs else [])
    assert not FastReader(tiny_reasoner("llama"), compile=False, compile_mode=mode).cuda_graphs


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile mode"):
        FastReader(tiny_reasoner("llama"), compile=True, compile_mode="fastest")
