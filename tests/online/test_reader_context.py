"""The chat layouts of `scripts/online/reader_context.py` are the prompts chat and the server build."""

from helpers import load_script
from memsplice.memory.readback import with_recalled

reader_context = load_script("online/reader_context.py")


def _layout(name, window):
    where, with_window, system = reader_context.CHAT_LAYOUTS[name]
    return reader_context.ChatLayout(where=where, with_window=with_window, window=window, system=system)


def test_chat_layouts_place_the_recalled_text_as_with_recalled_does():
    window = (
        {"role": "user", "content": "I just got back."},
        {"role": "assistant", "content": "Welcome back!"},
    )
    system = {"role": "system", "content": reader_context.CHAT_SYSTEM}
    question = {"role": "user", "content": "Where does Ada live?"}
    recalled = "system: [Session 2]\nuser: Ada lives in Porto."
    for name, placement in (("chat_recalled_as_history", "message"), ("chat_recalled_in_system", "system")):
        got = _layout(name, window).messages(question["content"], recalled)
        assert got == with_recalled([system, *window, question], recalled, placement)
    alone = _layout("chat_recalled_as_history_alone", window).messages(question["content"], recalled)
    assert alone == with_recalled([system, question], recalled, "message")
    assert _layout("chat_window", window).messages(question["content"], recalled) == [
        system,
        *window,
        question,
    ]
    before = _layout("chat_recalled_before_question", window).messages(question["content"], recalled)
    assert before[-2]["role"] == "system" and recalled in before[-2]["content"] and before[-1] == question


def test_distractor_is_the_non_evidence_turn_that_names_the_person_asked_about():
    from memsplice.eval.tasks.base import Turn
    from memsplice.reading.train import hard_distractor

    turns = [
        Turn("a", "Ada", "Lina Costa adopted a dog named Olive."),
        Turn("b", "Ben", "The weather was fine today."),
        Turn("c", "Ada", "Lina Costa moved to Porto last spring."),
        Turn("d", "Ben", "Lina said hello."),
    ]
    question = "What is the name of Lina Costa's dog?"
    assert hard_distractor(turns, question, {"a"}).id == "c"
    assert hard_distractor(turns, "What is the weather like?", {"a"}) is None
