import pytest
import torch
from conversation_builders import tiny_memory

from memsplice.conversation import ConversationConfig, ConversationMemory, memory_attention
from memsplice.inject import forward_with_memory


def written(memory, texts):
    return memory.write_text(texts).kv


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama_mha"])
def test_probe_matches_eager_attention_weights(arch):
    memory = tiny_memory(arch, attn="eager")
    with torch.no_grad():
        memory.gate.weight.normal_(0, 0.3)  # slot-dependent gate, so the bias matters
    kv = written(memory, ["Ada lives in Lisbon.", "The quick brown fox jumps."])
    tok = memory.reasoner.tokenizer
    rows = [tok("Where does Ada live?")["input_ids"], tok("fox?")["input_ids"]]
    t = max(map(len, rows))
    ids = torch.tensor([[0] * (t - len(r)) + r for r in rows])  # left padding
    mask = torch.tensor([[0] * (t - len(r)) + [1] * len(r) for r in rows])
    layers = [0, memory.reasoner.shapes.num_layers - 1]
    reading = memory_attention(memory.reasoner, kv, ids, mask, layers=layers)
    out = forward_with_memory(memory.reasoner, ids, mask, kv, output_attentions=True)
    m = kv.num_slots
    want = torch.stack([out.attentions[i][..., :m].mean(1) for i in layers]).mean(0)  # (B, T, M)
    want = (want * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(reading.slot_mass, want, atol=1e-5, rtol=1e-4)
    assert ((reading.focus >= 0) & (reading.focus <= 1)).all()


def test_dead_rows_get_no_attention():
    memory = tiny_memory()
    kv = memory.write_text(
        ["Ada lives in Lisbon.", "fox"], gate_override=torch.tensor([[1.0] * 4, [0.0] * 4])
    ).kv
    assert kv.live.tolist() == [True, False]
    ids = torch.tensor([[5, 6, 7], [5, 6, 7]])
    reading = memory_attention(memory.reasoner, kv, ids)
    assert reading.slot_mass[1].abs().sum() == 0 and reading.slot_mass[0].sum() > 0


def test_conversation_probe_records_usage_only_when_enabled():
    memory = tiny_memory()
    ids = torch.tensor([memory.reasoner.tokenizer("Where does Ada live?")["input_ids"]])
    off = ConversationMemory(memory, ConversationConfig(slot_budget=16))
    off.add_turn("user", "Ada lives in Lisbon")
    assert off.probe(ids) is None
    on = ConversationMemory(memory, ConversationConfig(slot_budget=16, track_attention=True))
    on.add_turn("user", "Ada lives in Lisbon")
    reading = on.probe(ids)
    assert reading.slot_mass.shape == (1, on.num_slots)
    span = on.store[0]
    assert span.uses == 1 and span.attention > 0 and span.salience > 0
