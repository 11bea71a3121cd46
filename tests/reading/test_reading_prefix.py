"""Reading prefixes: a prefix made from a text reads as that text; it trains, saves, loads and is refused where it
does not belong."""

import json

import pytest
import torch

from memsplice.eval import EvalConfig
from memsplice.eval.reader import Reader
from memsplice.inject.splice import forward_with_memory
from memsplice.reading import ReadingPrefix, ReadingPrefixConfig, ReadingPrefixError
from memsplice.reading.train import LAYOUTS, ReadingConfig, answer_loss, build_examples, encode, run_reading
from tiny import tiny_reasoner

TEXT = "The quick brown fox jumps over the lazy dog."


def small_config(**overrides) -> ReadingConfig:
    """A training run small enough for a tiny reasoner on the CPU."""
    settings = dict(
        eval_episodes=1,
        eval_every=2,
        history_tokens=[512],
        facts=2,
        window_tokens=[64],
        eval_window_tokens=64,
        chunk_tokens=40,
        num_slots=4,
    )
    return ReadingConfig(**{**settings, **overrides})


def test_prefix_from_text_reads_as_that_text(reasoner):
    tok = reasoner.tokenizer
    text = tok(TEXT, add_special_tokens=False)["input_ids"]
    prompt = tok("Ada Lovelace lives in Lisbon.", add_special_tokens=False)["input_ids"]
    prefix = ReadingPrefix.from_text(reasoner, ReadingPrefixConfig(num_slots=len(text), init_text=TEXT))
    with torch.no_grad():
        spliced = forward_with_memory(reasoner, torch.tensor([prompt]), memory=prefix.memory_kv()).logits
        plain = reasoner.model(input_ids=torch.tensor([text + prompt])).logits[:, len(text) :]
    torch.testing.assert_close(spliced, plain, atol=1e-4, rtol=1e-4)


def test_short_init_text_is_repeated_to_fill_the_slots():
    reasoner = tiny_reasoner()
    prefix = ReadingPrefix.from_text(reasoner, ReadingPrefixConfig(num_slots=40, init_text="fox"))
    assert prefix.keys.shape == (3, 2, 40, 16)
    assert torch.isfinite(prefix.keys).all() and prefix.values.abs().sum() > 0


def test_gradient_reaches_only_the_prefix():
    reasoner = tiny_reasoner()
    prefix = ReadingPrefix.from_text(reasoner, ReadingPrefixConfig(num_slots=4))
    batch = [([5, 6, 7, 8], [9, 10]), ([11, 12], [13])]
    loss, tokens, hits = answer_loss(prefix, batch)
    loss.backward()
    assert tokens == 3 and 0 <= hits <= 3
    assert prefix.keys.grad.abs().sum() > 0 and prefix.values.grad.abs().sum() > 0
    assert all(p.grad is None for p in reasoner.model.parameters())


def test_answer_loss_ignores_padding():
    """A row's loss does not depend on the rows padded beside it."""
    reasoner = tiny_reasoner()
    prefix = ReadingPrefix.from_text(reasoner, ReadingPrefixConfig(num_slots=4))
    short = ([5, 6], [9, 10])
    alone = answer_loss(prefix, [short])[0]
    beside = answer_loss(prefix, [short, ([7] * 20, [9])])
    with torch.no_grad():
        other = answer_loss(prefix, [([7] * 20, [9])])[0]
    torch.testing.assert_close(beside[0] * 3, alone * 2 + other, atol=1e-4, rtol=1e-4)


def test_save_and_load_round_trip(tmp_path):
    reasoner = tiny_reasoner()
    prefix = ReadingPrefix.from_text(reasoner, ReadingPrefixConfig(num_slots=6))
    prefix.save_pretrained(tmp_path / "p", dtype=None)
    loaded = ReadingPrefix.from_pretrained(tmp_path / "p", reasoner=reasoner)
    torch.testing.assert_close(loaded.keys, prefix.keys)
    torch.testing.assert_close(loaded.values, prefix.values)
    assert loaded.config.num_slots == 6 and loaded.config.reasoner_fingerprint == reasoner.fingerprint


def test_load_refuses_another_reasoner_and_bad_files(tmp_path):
    reasoner = tiny_reasoner()
    ReadingPrefix.from_text(reasoner, ReadingPrefixConfig(num_slots=6)).save_pretrained(tmp_path / "p")
    with pytest.raises(ReadingPrefixError, match="trained for reasoner"):
        ReadingPrefix.from_pretrained(tmp_path / "p", reasoner=tiny_reasoner("qwen2"))
    with pytest.raises(ReadingPrefixError, match="no reading prefix directory"):
        ReadingPrefix.from_pretrained(tmp_path / "missing", reasoner=reasoner)
    with pytest.raises(ReadingPrefixError, match="holds no reading prefix"):
        ReadingPrefix.from_pretrained(tmp_path, reasoner=reasoner)
    config = json.loads((tmp_path / "p" / "reading_config.json").read_text())
    (tmp_path / "p" / "reading_config.json").write_text(json.dumps({**config, "num_slots": 7}))
    with pytest.raises(ReadingPrefixError, match="shape"):
        ReadingPrefix.from_pretrained(tmp_path / "p", reasoner=reasoner)
    (tmp_path / "p" / "reading_config.json").write_text("{")
    with pytest.raises(ReadingPrefixError, match="not valid JSON"):
        ReadingPrefix.from_pretrained(tmp_path / "p", reasoner=reasoner)


def test_load_refuses_non_finite_weights(tmp_path):
    reasoner = tiny_reasoner()
    prefix = ReadingPrefix.from_text(reasoner, ReadingPrefixConfig(num_slots=3))
    with torch.no_grad():
        prefix.values[0, 0, 0, 0] = float("nan")
    prefix.save_pretrained(tmp_path / "p")
    with pytest.raises(ReadingPrefixError, match="non-finite"):
        ReadingPrefix.from_pretrained(tmp_path / "p", reasoner=reasoner)


def test_config_validation():
    with pytest.raises(ValueError, match="num_slots"):
        ReadingPrefixConfig(num_slots=0)
    with pytest.raises(ValueError, match="layout_weights"):
        ReadingConfig(layout_weights=[1.0])
    with pytest.raises(ValueError, match="window_tokens"):
        ReadingConfig(window_tokens=[])


def test_reader_puts_the_prefix_in_front_and_refuses_it_beside_memory():
    reasoner = tiny_reasoner()
    prefix = ReadingPrefix.from_text(reasoner, ReadingPrefixConfig(num_slots=5))
    reader = Reader(reasoner, prefix=prefix)
    answer = reader.read("Where does Ada live?", "Ada Lovelace lives in Lisbon.")
    assert answer.costs.memory_slots == 5
    with pytest.raises(ValueError, match="splices 5 memory slots"):
        reader.read("Where does Ada live?", None, memory=prefix.memory_kv())


def test_eval_config_refuses_a_prefix_with_systems_that_splice_memory(tmp_path):
    EvalConfig(systems=("oracle", "latent-readback+window"), reading_prefix=tmp_path)
    with pytest.raises(ValueError, match="latent, latent-select splice memory"):
        EvalConfig(systems=("oracle", "latent", "latent-select"), reading_prefix=tmp_path)


def test_training_examples_cover_every_layout_and_hold_the_answer():
    reasoner = tiny_reasoner()
    cfg = ReadingConfig(episodes=2, history_tokens=[512], facts=2, window_tokens=[64], chunk_tokens=40)
    examples = build_examples(cfg, reasoner, 2, 0, [64])
    assert {e.layout for e in examples} == set(LAYOUTS)
    for e in examples:
        assert e.history and e.answer
        prompt, answer = encode(reasoner, Reader(reasoner).template, e)
        assert answer[-1] == reasoner.end_of_turn_id and e.question in reasoner.tokenizer.decode(prompt)
    # the evidence layout is the oracle's: the answer is in the text
    assert all(e.answer.lower() in e.history.lower() for e in examples if e.layout == "evidence")


def test_run_reading_trains_and_saves(tmp_path):
    reasoner = tiny_reasoner()
    cfg = small_config(steps=3, batch=2, episodes=2)
    before = ReadingPrefix.from_text(reasoner, ReadingPrefixConfig(num_slots=4))
    report = run_reading(reasoner, cfg, tmp_path)
    assert [c["step"] for c in report["curve"]] == [0, 2, 3]
    assert set(report["curve"][-1]) >= set(LAYOUTS)
    saved = ReadingPrefix.from_pretrained(tmp_path / "prefix", reasoner=reasoner)
    assert saved.config.trained["split"] == "train" and saved.config.trained["steps"] == 3
    assert not torch.allclose(saved.keys, before.keys.to(torch.bfloat16).float())
    assert (tmp_path / "metrics.jsonl").is_file() and json.loads((tmp_path / "report.json").read_text())


def test_the_shipped_prefix_loads_for_its_reasoner_only():
    from memsplice.checkpoints import load_reading_prefix, reading_prefix_for

    reasoner = tiny_reasoner()
    assert reading_prefix_for(reasoner) is None
    with pytest.raises(ReadingPrefixError, match="no reading prefix ships"):
        load_reading_prefix(reasoner, "shipped")


@pytest.mark.real_model
def test_shipped_prefix_answers_in_a_few_words_and_stops(real_reasoner):
    """The shipped prefix in front of the eval reader's prompt: the answer alone, then the turn ends."""
    from memsplice.checkpoints import load_reading_prefix

    prefix = load_reading_prefix(real_reasoner, "shipped")
    assert prefix.num_slots == 16 and prefix.config.trained["split"] == "train"
    reader = Reader(real_reasoner, prefix=prefix)
    history = "system: [Session 3, 2:10 pm on 4 May, 2023]\nLina Costa: My dog Olive loves the beach."
    answer = reader.read("What is the name of Lina Costa's dog?", history)
    assert answer.text == "Olive" and answer.costs.memory_slots == 16


def test_two_recalled_layouts_add_the_distractor_in_conversation_order():
    from memsplice.online.bootstrap import mixed_episodes
    from memsplice.reading.train import hard_distractor

    reasoner = tiny_reasoner()
    cfg = ReadingConfig(episodes=2, history_tokens=[512], facts=4, window_tokens=[64], chunk_tokens=40)
    examples = build_examples(cfg, reasoner, 2, 0, [64])
    recalled = {e.question: e.history for e in examples if e.layout == "recalled"}
    two = [e for e in examples if e.layout == "window_two_recalled"]
    assert two and all(recalled[e.question] in e.history for e in two)
    alone = {e.question: e.history for e in examples if e.layout == "two_recalled"}
    assert all(e.history.endswith(alone[e.question]) and len(e.history) > len(alone[e.question]) for e in two)
    # where a question has a distractor turn, it is in the history under a header of its own
    episode = mixed_episodes(cfg, 2, 0, Reader(reasoner).count_tokens)[0]
    turns = list(episode.turns)
    q = next(q for q in episode.questions if q.answer and hard_distractor(turns, q.question, set(q.evidence)))
    other = hard_distractor(turns, q.question, set(q.evidence))
    assert other.id not in q.evidence
    with_two = next(e for e in two if e.question == q.question)
    assert other.text in with_two.history and with_two.history.count("system: [Session") >= 2


def test_ordinary_rows_are_chat_prompts_with_the_reasoners_own_reply():
    from memsplice.engine import DecoderPool
    from memsplice.eval.tasks.filler import filler_dialogues
    from memsplice.memory.readback import RECALL_FRAME
    from memsplice.reading.train import ordinary_examples

    reasoner = tiny_reasoner()
    dialogues = filler_dialogues("train")[:6]
    pool = DecoderPool(reasoner, max_new_tokens=8)
    rows = ordinary_examples(reasoner, dialogues, 9, 0, pool)
    assert len(rows) == 9  # fewer dialogues than prompts: reused
    for row in rows:
        text = reasoner.tokenizer.decode(row.prompt)
        assert RECALL_FRAME.split("\n")[0] in text and row.reply
        # the target is what the reasoner itself says with no prefix
        again = pool.decoder_for(len(row.prompt) + 8).generate(
            row.prompt, None, stop_ids=tuple(reasoner.eos_ids)
        )
        ended = again.tokens + ([reasoner.end_of_turn_id] if again.stop_id is not None else [])
        assert row.reply == ended
    with pytest.raises(ValueError, match="two dialogues"):
        ordinary_examples(reasoner, dialogues[:1], 2, 0, pool)


def test_run_reading_reports_ordinary_replies(tmp_path):
    reasoner = tiny_reasoner()
    cfg = small_config(
        steps=2,
        batch=4,
        episodes=1,
        ordinary_share=0.5,
        ordinary_prompts=4,
        ordinary_eval_prompts=2,
        ordinary_tokens=6,
    )
    report = run_reading(reasoner, cfg, tmp_path)
    ordinary = report["curve"][-1]["ordinary"]
    assert ordinary["prompts"] == 2 and 0 <= ordinary["token_agreement"] <= 1
    assert 0 < ordinary["mean_tokens_own"] <= 6 and ordinary["mean_tokens_with_prefix"] <= 6
    assert report["ordinary_prompts"] == 4
    with pytest.raises(ValueError, match="ordinary_share"):
        ReadingConfig(ordinary_share=1.0)
