"""Read-back: what the reasoner regenerates from a memory alone, after the reconstruction instruction."""

import pytest
import torch

import memsplice.memory.readback as readback
from helpers import random_ids, small_memory
from memsplice.memory.readback import read_back, read_back_ids
from memsplice.memory.refine import reconstruction_instruction


@pytest.fixture
def memory(reasoner):
    torch.manual_seed(0)
    return small_memory(reasoner, reconstruction_instruction="Repeat the text.").eval()


def _generated(memory, kv, n):
    """The reasoner's own greedy continuation of [memory][instruction], every row, n tokens, nothing cut."""
    ins = reconstruction_instruction(memory)[None].expand(kv.batch_size, -1)
    out = memory.generate(
        ins, torch.ones_like(ins), memory=kv, max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return out[:, ins.shape[1] :].tolist()


def test_read_back_is_the_greedy_regeneration_cut_at_each_rows_limit(memory, monkeypatch):
    monkeypatch.setattr(readback, "stop_token_ids", lambda tok: set())
    with torch.no_grad():
        kv = memory.write(random_ids(3, 10)).kv
    full = _generated(memory, kv, 6)
    rows = read_back_ids(memory, kv, [6, 2, 4])
    assert rows == [full[0][:6], full[1][:2], full[2][:4]]
    assert read_back_ids(memory, kv, 6) == full
    assert read_back_ids(memory, kv.index_rows([1]), 6) == [full[1]]  # rows do not affect each other
    tok = memory.reasoner.require_tokenizer()
    assert read_back(memory, kv, 6) == [tok.decode(r) for r in full]


def test_read_back_stops_before_an_end_token(memory, monkeypatch):
    monkeypatch.setattr(readback, "stop_token_ids", lambda tok: set())
    with torch.no_grad():
        kv = memory.write(random_ids(1, 10)).kv
    full = _generated(memory, kv, 8)[0]
    stop = full[3]
    monkeypatch.setattr(readback, "stop_token_ids", lambda tok: {stop})
    assert read_back_ids(memory, kv, 8) == [full[: full.index(stop)]]


def test_rows_that_fell_back_read_back_empty_and_bad_limits_are_refused(memory):
    ids = random_ids(2, 8)
    z = memory.encode(ids).detach()
    z[1, 0, 0] = float("nan")
    with torch.no_grad():
        kv = memory.write(ids, latents=z).kv
    rows = read_back_ids(memory, kv, 5)
    assert rows[1] == [] and rows[0] == read_back_ids(memory, kv.index_rows([0]), 5)[0]
    with pytest.raises(ValueError, match="2 rows"):
        read_back_ids(memory, kv, [5])
    with pytest.raises(ValueError, match=">= 1"):
        read_back_ids(memory, kv, [5, 0])


def test_stop_tokens_are_the_end_of_sequence_and_the_chat_end_of_turn(reasoner):
    tok = reasoner.require_tokenizer()
    stops = readback.stop_token_ids(tok)
    assert tok.eos_token_id in stops
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tok.unk_token_id:
        assert end_of_turn in stops


def test_a_refined_write_keeps_the_encoders_latents(memory):
    ids = random_ids(2, 9)
    with torch.no_grad():
        plain = memory.write(ids)
        refined = memory.write(ids, refine_steps=2)
    assert plain.encoded is None
    torch.testing.assert_close(refined.encoded, plain.latents)
    assert not torch.equal(refined.latents, plain.latents)


def test_the_engine_reads_back_what_generate_does_one_row_at_a_time(memory):
    from memsplice.engine import DecoderPool

    ids = random_ids(3, 8)
    z = memory.encode(ids).detach()
    z[2, 0, 0] = float("nan")  # a row that fell back reads back empty on the engine too
    with torch.no_grad():
        kv = memory.write(ids, latents=z).kv
    pool = DecoderPool(memory.reasoner, max_new_tokens=8, min_len=16)
    assert read_back_ids(memory, kv, [7, 4, 5], decoders=pool) == read_back_ids(memory, kv, [7, 4, 5])
    assert read_back_ids(memory, kv, [7, 4, 5], decoders=pool)[2] == []
    with pytest.raises(ValueError, match="at most 8"):
        read_back_ids(memory, kv, 9, decoders=pool)


def test_recalled_text_goes_in_front_of_the_last_user_message_or_into_the_system_message():
    from memsplice.memory.readback import RECALL_FRAME, RECALL_HEADER, with_recalled

    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Where do I live?"},
    ]
    framed = with_recalled(chat, "user: I live in Porto.")
    assert framed[:3] == chat[:3] and len(framed) == 4
    assert framed[3] == {
        "role": "user",
        "content": RECALL_FRAME.format(recalled="user: I live in Porto.", message="Where do I live?"),
    }
    in_system = with_recalled(chat, "user: I live in Porto.", "system")
    assert (
        in_system[0]["content"] == f"Be brief.\n\n{RECALL_HEADER}\nuser: I live in Porto."
        and in_system[1:] == chat[1:]
    )
    no_system = with_recalled(chat[1:], "x", "system")
    assert no_system[0] == {"role": "system", "content": f"{RECALL_HEADER}\nx"} and no_system[1:] == chat[1:]
    assert chat[3]["content"] == "Where do I live?"  # a copy: the request's messages are not changed
    for placement in ("message", "system"):
        assert with_recalled(chat, None, placement) == chat and with_recalled(chat, "", placement) == chat
    with pytest.raises(ValueError, match="needs a user message"):
        with_recalled(chat[:1], "x")
    with pytest.raises(ValueError, match="placement"):
        with_recalled(chat, "x", "prompt")
