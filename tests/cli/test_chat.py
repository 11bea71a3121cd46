"""memsplice chat, driven through stdin: memory file written each turn, resumed, refused when foreign or corrupt."""

from __future__ import annotations

import io
import json

import pytest

from memsplice.cli.main import main
from tiny import tiny_reasoner


@pytest.fixture
def tiny_model_dir(tmp_path):
    r = tiny_reasoner("llama")
    r.model.save_pretrained(tmp_path / "tiny")
    r.tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _chat(monkeypatch, capsys, model_dir, memory_file, lines, *flags, max_new_tokens=4):
    """`memsplice chat` on the tiny reasoner with `lines` on stdin and `flags` added: (exit code, captured output)."""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(
        [
            "chat",
            "--reasoner",
            str(model_dir),
            "--device",
            "cpu",
            "--memory-file",
            str(memory_file),
            "--max-new-tokens",
            str(max_new_tokens),
            *flags,
        ]
    )
    return code, capsys.readouterr()


def test_chat_writes_and_resumes_memory(monkeypatch, capsys, tiny_model_dir, tmp_path):
    f = tmp_path / "chat.json"
    code, out = _chat(
        monkeypatch, capsys, tiny_model_dir, f, ["Ada lives in Lisbon.", "Where does Ada live?"]
    )
    assert code == 0
    turns = json.loads(f.read_text())["turns"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert "memory 0 slots" in out.out and "memory 4 slots" not in out.out.split("\n")[2]
    assert "gate" in out.out and "no fallback" in out.out
    code, out = _chat(monkeypatch, capsys, tiny_model_dir, f, ["/stats"])
    assert "4 turns remembered" in out.out and "[4 turns" in out.out


def test_forget_erases_the_memory_file(monkeypatch, capsys, tiny_model_dir, tmp_path):
    f = tmp_path / "chat.json"
    _chat(monkeypatch, capsys, tiny_model_dir, f, ["hello"])
    assert f.exists()
    _chat(monkeypatch, capsys, tiny_model_dir, f, ["/forget"])
    assert not f.exists()


def test_corrupt_or_foreign_memory_file_is_refused(monkeypatch, capsys, tiny_model_dir, tmp_path):
    f = tmp_path / "chat.json"
    f.write_text("{not json")
    code, out = _chat(monkeypatch, capsys, tiny_model_dir, f, ["hi"])
    assert code == 2 and "not a memsplice chat file" in out.err
    f.write_text(json.dumps({"version": 1, "turns": [], "reasoner": "x", "reasoner_fingerprint": "0" * 64}))
    code, out = _chat(monkeypatch, capsys, tiny_model_dir, f, ["hi"])
    assert code == 2 and "another reasoner" in out.err
    assert json.loads(f.read_text())["reasoner"] == "x", "a refused file must not be overwritten"


def test_chat_learn_updates_saves_and_resumes(monkeypatch, capsys, tiny_model_dir, tmp_path):
    f, learn = tmp_path / "chat.json", tmp_path / "learner"

    def chat(lines):
        flags = ("--learn", "--learn-dir", str(learn), "--learn-batch", "2")
        return _chat(monkeypatch, capsys, tiny_model_dir, f, lines, *flags, max_new_tokens=3)

    code, out = chat(["Ada lives in Lisbon.", "Where does Ada live?", "Thanks."])
    assert code == 0 and out.out.count("online update") == 1 and "learning online" in out.out
    state = json.loads((learn / "online_state.json").read_text())
    assert state["updates"] == 1 and state["steps"] == 3 and len(state["buffer"]) == 1
    assert (learn / "memory" / "memsplice_config.json").is_file()
    code, out = chat(["One more."])
    assert code == 0 and "online update 2" in out.out
    assert json.loads((learn / "online_state.json").read_text())["updates"] == 2


def test_chat_learn_rehearsal_trains_on_synthetic_questions_and_is_saved(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    f, learn = tmp_path / "chat.json", tmp_path / "learner"
    flags = ("--learn", "--learn-dir", str(learn), "--learn-batch", "1", "--learn-rehearsal", "2")
    code, out = _chat(
        monkeypatch, capsys, tiny_model_dir, f, ["Ada lives in Lisbon."], *flags, max_new_tokens=3
    )
    assert code == 0 and "online update 1" in out.out
    state = json.loads((learn / "online_state.json").read_text())
    assert state["config"]["rehearsal_per_update"] == 2 and state["rehearsal"]["items"]
    assert "rehearsal" in state["history"][-1]["parts"]
    code, out = _chat(monkeypatch, capsys, tiny_model_dir, f, ["hi"], "--learn", "--learn-rehearsal", "-1")
    assert code == 2 and "--learn-rehearsal" in out.err


def test_chat_learn_guard_keeps_its_canary_and_reference_in_the_state(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    f, learn = tmp_path / "chat.json", tmp_path / "learner"
    flags = ("--learn", "--learn-dir", str(learn), "--learn-batch", "1", "--learn-guard", "0.05")
    code, out = _chat(
        monkeypatch, capsys, tiny_model_dir, f, ["Ada lives in Lisbon."], *flags, max_new_tokens=3
    )
    assert code == 0 and "online update 1" in out.out
    state = json.loads((learn / "online_state.json").read_text())
    guard = state["guard"]
    assert state["config"]["guard_tolerance"] == 0.05 and guard["tolerance"] == 0.05
    assert guard["canary"]["items"] and 0.0 <= guard["reference"] <= 1.0 and guard["events"] == []
    code, out = _chat(monkeypatch, capsys, tiny_model_dir, f, ["hi"], "--learn", "--learn-dir", str(learn))
    assert code == 0
    assert json.loads((learn / "online_state.json").read_text())["guard"] is None  # resumed without it: off
    code, out = _chat(monkeypatch, capsys, tiny_model_dir, f, ["hi"], "--learn", "--learn-guard", "1.5")
    assert code == 2 and "--learn-guard" in out.err


def test_chat_learn_consolidation_holds_writes_and_resumes_with_or_without_it(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    f, learn = tmp_path / "chat.json", tmp_path / "learner"
    flags = ("--learn", "--learn-dir", str(learn), "--learn-batch", "1", "--learn-consolidation", "10")
    code, out = _chat(
        monkeypatch,
        capsys,
        tiny_model_dir,
        f,
        ["Ada lives in Lisbon.", "And Bram in Oslo.", "Clea in Lyon."],
        *flags,
        max_new_tokens=3,
    )
    assert code == 0 and "online update 3" in out.out
    state = json.loads((learn / "online_state.json").read_text())
    assert state["config"]["consolidation_weight"] == 10
    # the first exchange has no history to write; the second's write is held, and the third update pulls on it
    assert "consolidation" in state["history"][-1]["parts"]
    code, out = _chat(monkeypatch, capsys, tiny_model_dir, f, ["hi"], "--learn", "--learn-dir", str(learn))
    assert code == 0
    assert json.loads((learn / "online_state.json").read_text())["config"]["consolidation_weight"] == 0
    code, out = _chat(
        monkeypatch, capsys, tiny_model_dir, f, ["hi"], "--learn", "--learn-consolidation", "-1"
    )
    assert code == 2 and "--learn-consolidation" in out.err


def test_chat_learn_batch_must_be_positive(monkeypatch, capsys, tiny_model_dir, tmp_path):
    flags = ("--learn", "--learn-batch", "0")
    code, out = _chat(monkeypatch, capsys, tiny_model_dir, tmp_path / "c.json", ["hi"], *flags)
    assert code == 2 and "--learn-batch" in out.err


def test_chat_select_chunks_must_be_positive(monkeypatch, capsys, tiny_model_dir, tmp_path):
    code, out = _chat(
        monkeypatch, capsys, tiny_model_dir, tmp_path / "c.json", ["hi"], "--select-chunks", "0"
    )
    assert code != 0 and "select_chunks" in out.err


@pytest.mark.parametrize("operator", ["prepend_kv", "layer_concat"])
def test_greedy_answers_on_the_engine_equal_eager_generate(operator):
    """ChatSession answers greedily on GreedyDecoder with the text eager generate() gives, memory live or not,
    ending on an eos id or at the token limit; sampling stays eager."""
    import torch

    from helpers import small_memory
    from memsplice.cli.chat import ChatSession
    from memsplice.inject import generate_with_memory

    reasoner = tiny_reasoner("qwen2")
    memory = small_memory(reasoner, operator=operator)
    system, lines = (
        "You are helpful.",
        ["Ada lives in Lisbon.", "Where does Ada live?", "What did the fox do?"],
    )
    prompt = torch.tensor(
        [reasoner.chat_ids([{"role": "system", "content": system}, {"role": "user", "content": lines[0]}])]
    )
    bare = generate_with_memory(
        reasoner, prompt, torch.ones_like(prompt), None, max_new_tokens=8, do_sample=False, pad_token_id=0
    )[0, prompt.shape[1] :].tolist()
    eos = next((t for t in bare if t != bare[0]), bare[0])  # the first answer ends on it, after some text
    reasoner.model.generation_config.eos_token_id = [2, eos]
    auto = ChatSession(reasoner, memory, system, engine="auto")
    eager = ChatSession(reasoner, memory, system, engine="eager")
    answers = []
    for line in lines:
        got, status = auto.answer(line, 8, 0.0)
        want, _ = eager.answer(line, 8, 0.0)
        assert got == want
        answers.append(got)
    # generate() keeps the eos id in its output: an eos that is not a special token is part of the text
    assert (
        answers[0] == reasoner.tokenizer.decode(bare[: bare.index(eos) + 1], skip_special_tokens=True).strip()
    )
    assert status["slots"] > 0 and auto._decoders.decoders and eager._decoders is None
    assert isinstance(auto.answer("hi", 4, 0.8)[0], str)  # sampling: eager
    with pytest.raises(ValueError, match="engine"):
        ChatSession(reasoner, memory, system, engine="fast")


def test_chat_engine_flags(monkeypatch, capsys, tiny_model_dir, tmp_path):
    f = tmp_path / "chat.json"
    code, out = _chat(monkeypatch, capsys, tiny_model_dir, f, ["hello"], "--engine", "eager")
    assert code == 0 and "assistant>" in out.out
    with pytest.raises(SystemExit):
        _chat(monkeypatch, capsys, tiny_model_dir, tmp_path / "b.json", ["hello"], "--engine", "fast")
    assert "--engine" in capsys.readouterr().err


def test_read_back_answers_over_the_text_read_back_from_memory():
    from helpers import small_memory
    from memsplice.cli.chat import ChatSession
    from memsplice.memory.readback import RECALL_FRAME, RECALL_HEADER

    reasoner = tiny_reasoner("llama")
    memory = small_memory(reasoner)
    with pytest.raises(ValueError, match="reconstruction instruction"):
        ChatSession(reasoner, memory, "You are helpful.", read_back=True)
    memory.config.reconstruction_instruction = "Repeat the text."
    for address in (False, True):  # the prompt's attention picks, then the address head
        if address:
            memory.add_address_head(8)
        placement = "message" if address else "system"  # each placement once
        chat = ChatSession(
            reasoner,
            memory,
            "You are helpful.",
            read_back=True,
            read_back_placement=placement,
            engine="eager",
        )
        # picking by the address head, the chat keeps every chunk (no slot budget); by attention it keeps one
        assert chat.conversation.config.slot_budget == (None if address else 256)
        text, status = chat.answer("Ada lives in Lisbon.", 4, 0.0)
        assert status["recalled"] == "" and status["slots"] == 0  # nothing written yet
        for line in ("The fox jumps over the lazy dog.", "Ada works as a carpenter."):
            chat.answer(line, 4, 0.0)
        question = "Where does Ada live?"
        if address:
            want = "\n".join(t.strip() for t in chat.conversation.read_back(question, 1) if t.strip())
        seen, real = {}, reasoner.chat_ids

        def spy(messages, seen=seen, real=real):
            seen["messages"] = messages  # the last prompt rendered is the answer's
            return real(messages)

        reasoner.chat_ids = spy
        try:
            text, status = chat.answer(question, 4, 0.0)
        finally:
            reasoner.chat_ids = real
        assert status["slots"] == 0 and status["read_back_ms"] > 0 and isinstance(text, str)
        assert status["recalled"] and (not address or status["recalled"] == want)
        system, last = seen["messages"][0]["content"], seen["messages"][-1]
        if placement == "system":
            assert system == f"You are helpful.\n\n{RECALL_HEADER}\n{status['recalled']}"
            assert last == {"role": "user", "content": question}
        else:
            assert system == "You are helpful."
            assert last == {
                "role": "user",
                "content": RECALL_FRAME.format(recalled=status["recalled"], message=question),
            }
    with pytest.raises(ValueError, match="read_back_placement"):
        ChatSession(reasoner, memory, "You are helpful.", read_back=True, read_back_placement="prompt")


def test_chat_read_back_refuses_a_memory_that_cannot_be_read_back(
    monkeypatch, capsys, tiny_model_dir, tmp_path
):
    code, out = _chat(monkeypatch, capsys, tiny_model_dir, tmp_path / "c.json", ["hi"], "--read-back")
    assert code == 2 and "reconstruction instruction" in out.err


def test_read_back_with_a_reading_prefix_decodes_with_the_prefix_in_front():
    import torch

    from helpers import small_memory
    from memsplice.cli.chat import ChatSession
    from memsplice.reading import ReadingPrefix, ReadingPrefixConfig

    reasoner = tiny_reasoner("llama")
    memory = small_memory(reasoner)
    memory.config.reconstruction_instruction = "Repeat the text."
    memory.add_address_head(8)
    prefix = ReadingPrefix.from_text(reasoner, ReadingPrefixConfig(num_slots=5))
    with pytest.raises(ValueError, match="use it with read_back"):
        ChatSession(reasoner, memory, "You are helpful.", reading_prefix=prefix)
    for engine in ("eager", "auto"):
        chat = ChatSession(
            reasoner, memory, "You are helpful.", read_back=True, engine=engine, reading_prefix=prefix
        )
        chat.answer("Ada lives in Lisbon.", 4, 0.0)
        seen, real = {}, reasoner.chat_ids

        def spy(messages, seen=seen, real=real):
            seen["ids"] = real(messages)
            return seen["ids"]

        reasoner.chat_ids = spy
        try:
            text, status = chat.answer("Where does Ada live?", 4, 0.0)
        finally:
            reasoner.chat_ids = real
        assert status["slots"] == 0 and status["reading_prefix_slots"] == 5
        ids = torch.tensor([seen["ids"]])
        with torch.no_grad():
            out = memory.generate(
                ids,
                memory=prefix.memory_kv(),
                max_new_tokens=4,
                do_sample=False,
                eos_token_id=reasoner.eos_ids,
            )
        want = reasoner.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert text == want, engine


def test_chat_reading_prefix_flag_needs_read_back(monkeypatch, capsys, tiny_model_dir, tmp_path):
    code, out = _chat(
        monkeypatch, capsys, tiny_model_dir, tmp_path / "p.json", ["hi"], "--reading-prefix", "shipped"
    )
    assert code == 2 and "--reading-prefix goes with --read-back" in out.err
