"""scripts/online/heads_readback.py: swapping address heads on one written conversation picks each head's own chunks
(no keys cached from the other head), and checkpoints with different encoders are refused."""

import copy

import pytest
import torch
from online_builders import tiny_memory

from helpers import load_script
from memsplice.conversation import ConversationConfig, ConversationMemory
from memsplice.memory.address import top_chunks


def _picks(conversation, head, question: str, margin: float) -> list[int]:
    """The chunk ids `head` ranks first for `question`, computed from scratch (no cache)."""
    live = [c for c in conversation._all_chunks() if c.live and c.latents is not None]
    text = conversation.config.turn_template.format(role="user", text=question)
    ids = conversation.tokenizer(text, add_special_tokens=False)["input_ids"]
    memory = conversation.memory
    with torch.no_grad(), memory.evaluating():
        query = memory.encode(torch.tensor([ids[-memory.config.max_memory_tokens :]]))
        keys = head.keys(torch.stack([c.latents for c in live]))
        scores = head.score(head.queries(query), keys)[0]
    return [live[i].id for i in top_chunks(scores, 1, margin)]


def test_swapped_heads_pick_their_own_chunks():
    script = load_script("online/heads_readback.py")
    memory = tiny_memory(chunk_tokens=12)
    memory.add_address_head(16)
    head_a = memory.address
    head_b = copy.deepcopy(head_a)
    torch.manual_seed(7)
    for p in head_b.parameters():
        p.data.normal_()
    conversation = ConversationMemory(memory, ConversationConfig(slot_budget=None))
    for i in range(12):
        conversation.add_turn(
            "user" if i % 2 == 0 else "assistant", f"turn {i}: the number {i * 37} and word {i}"
        )
    questions = [f"what about the number {i * 37}?" for i in range(6)]
    expected = {
        name: [_picks(conversation, head, q, 0.0) for q in questions]
        for name, head in (("A", head_a), ("B", head_b))
    }
    assert expected["A"] != expected["B"], "the two random heads should disagree somewhere"
    for name, head in (("A", head_a), ("B", head_b), ("A", head_a)):
        script._use(memory, head, 0.0)
        got = [[c.id for c in conversation._address_chunks(q, 1)] for q in questions]
        assert got == expected[name]


def test_checkpoints_with_other_encoders_are_refused():
    script = load_script("online/heads_readback.py")
    a, b = tiny_memory(), tiny_memory()  # the same seed: the same encoder
    a.add_address_head(16)
    b.add_address_head(16)
    torch.nn.init.normal_(b.address.query_proj.weight)
    script._check_same_encoder(a, b)  # only the heads differ
    with torch.no_grad():
        next(p for n, p in b.named_parameters() if not n.startswith("address.")).add_(1.0)
    with pytest.raises(SystemExit, match="not the same encoder"):
        script._check_same_encoder(a, b)
