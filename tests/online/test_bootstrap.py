import json
import random

import pytest
import torch
from online_builders import tiny_memory

pytest.importorskip("memsplice.eval.tasks")

from memsplice.conversation import ConversationConfig, ConversationMemory  # noqa: E402
from memsplice.conversation.chunks import chunk_input  # noqa: E402
from memsplice.eval.reader import Reader  # noqa: E402
from memsplice.memory import MemoryModel  # noqa: E402
from memsplice.online.bootstrap import (  # noqa: E402
    BootstrapConfig,
    answer_update,
    episode_examples,
    generated_accuracy,
    run_bootstrap,
    synthetic_episodes,
    write_episode,
)
from memsplice.reasoner.identity import weights_digest  # noqa: E402
from memsplice.train.objectives import answer  # noqa: E402

CHUNK = 40


def small_run(**overrides) -> BootstrapConfig:
    """A bootstrap run small enough for the tiny reasoner: 512-token episodes of 2 facts, evaluated every update."""
    settings = dict(
        eval_episodes=1,
        history_tokens=[512],
        facts=2,
        chunk_tokens=CHUNK,
        episodes_per_update=1,
        reconstruction_rows=0,
        eval_every=1,
    )
    return BootstrapConfig(**{**settings, **overrides})


def episodes(memory, count=2, length=512, seed=0):
    cfg = BootstrapConfig(history_tokens=[length], facts=3)
    return synthetic_episodes(cfg, count, seed, Reader(memory.reasoner).count_tokens)


def test_episode_chunks_are_the_chunks_the_latent_system_writes():
    """Training writes memory exactly as the eval's `latent` system does: same turns, headers, template, chunks."""
    from memsplice.eval.systems import Runtime, SystemArgs, build_system

    memory = tiny_memory()
    eps = episodes(memory)
    examples = episode_examples(eps, memory.reasoner, CHUNK)
    runtime = Runtime(Reader(memory.reasoner), SystemArgs(chunk_tokens=CHUNK, slot_budget=4096))
    runtime.shared("memory_model", lambda: memory)
    system = build_system("latent", runtime)
    for episode, example in zip(eps, examples, strict=True):
        system.reset()
        system.feed(episode.turns)
        conv = system.conversation
        written = [chunk_input(c, conv.store) for c in conv._all_chunks()]
        assert written == example.chunks
        assert all(0 < len(c) <= CHUNK for c in example.chunks)
        assert len(example.prompts) == len(example.answers) == len(episode.questions)


def test_answer_loss_does_not_depend_on_padding_or_batch():
    memory = tiny_memory().eval()
    ex = episode_examples(episodes(memory, count=1), memory.reasoner, CHUNK)[0]
    with torch.no_grad():
        _, kv = write_episode(memory, ex)
        together = answer(memory, kv, ex.prompts, ex.answers)
        alone = [answer(memory, kv, [p], [a]) for p, a in zip(ex.prompts, ex.answers, strict=True)]
    total = sum(r.loss * r.tokens for r in alone) / sum(r.tokens for r in alone)
    assert together.tokens == sum(len(a) for a in ex.answers)
    assert torch.allclose(together.loss, total, atol=1e-4)
    assert int(together.correct) == sum(int(r.correct) for r in alone)


def test_answer_updates_learn_an_episode_and_leave_the_reasoner_alone():
    memory = tiny_memory()
    before = weights_digest(memory.reasoner.model)
    ex = episode_examples(episodes(memory, count=1), memory.reasoner, CHUNK)[:1]
    cfg = BootstrapConfig(reconstruction_rows=1)
    opt = torch.optim.AdamW(memory.trainable_parameters(), lr=1e-2)
    instruction = memory.reasoner.tokenizer("Repeat the text.", add_special_tokens=False)["input_ids"]
    rng = random.Random(0)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        parts = answer_update(memory, ex, cfg, instruction, rng)
        opt.step()
        losses.append(parts["answer"])
        assert parts["reconstruction"] > 0
    assert losses[-1] < 0.8 * losses[0]  # 6.05 -> 4.51 when written
    assert weights_digest(memory.reasoner.model) == before


def test_evidence_memories_hold_the_answer_and_train_in_one_batch():
    memory = tiny_memory()
    eps = episodes(memory, count=2)
    examples = episode_examples(eps, memory.reasoner, CHUNK)
    tok = memory.reasoner.tokenizer
    for episode, ex in zip(eps, examples, strict=True):
        assert len(ex.evidence) == len(ex.prompts)
        for q, chunk in zip(episode.questions, ex.evidence, strict=True):
            assert 0 < len(chunk) <= CHUNK and q.answer in tok.decode(chunk)
    cfg = BootstrapConfig(reconstruction_rows=1)
    instruction = tok("Repeat the text.", add_special_tokens=False)["input_ids"]
    before = [p.detach().clone() for p in memory.trainable_parameters()]
    parts = answer_update(memory, examples, cfg, instruction, random.Random(0), mode="evidence")
    assert parts["answer_tokens"] == sum(len(a) for ex in examples for a in ex.answers)
    assert parts["answer"] > 0 and parts["reconstruction"] > 0
    grads = [p.grad for p in memory.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.equal(a, b) for a, b in zip(before, memory.trainable_parameters(), strict=True))
    from memsplice.online.bootstrap import answer_accuracy

    assert 0.0 <= answer_accuracy(memory, examples, "evidence") <= 1.0
    result = generated_accuracy(memory, eps[:1], CHUNK, 4096, system="latent-oracle")
    assert result["questions"] == len(eps[0].questions)


def test_select_updates_read_an_evidence_chunk_and_others_in_order():
    from memsplice.inject.compose import concat_rows
    from memsplice.online.bootstrap import selected_memories, write_chunks

    memory = tiny_memory()
    example = episode_examples(episodes(memory, count=1, length=1024), memory.reasoner, CHUNK)[0]
    assert len(example.chunks) > 3 and all(example.positives)
    with torch.no_grad():
        kv = write_chunks(memory, example.chunks).kv
        rows = selected_memories(kv, example, 2, random.Random(0), memory.reasoner)
    assert rows.batch_size == len(example.prompts) and rows.num_slots == 2 * kv.num_slots
    for q, positives in enumerate(example.positives):
        # the row is two chunks of the conversation side by side, one of them an evidence chunk, older first
        matches = [
            (a, b)
            for a in range(kv.batch_size)
            for b in range(a + 1, kv.batch_size)
            if torch.equal(
                rows.index_rows([q]).values[0], concat_rows(kv.index_rows([a, b]), memory.reasoner).values[0]
            )
        ]
        assert len(matches) == 1 and set(matches[0]) & set(positives)
    cfg = BootstrapConfig(reconstruction_rows=0, select_chunks=2)
    parts = answer_update(memory, [example], cfg, [], random.Random(0), mode="select")
    assert parts["answer"] > 0
    with pytest.raises(ValueError, match="mode"):
        answer_update(memory, [example], cfg, [], random.Random(0), mode="nonsense")


def test_generated_accuracy_reads_through_the_latent_system():
    memory = tiny_memory()
    eps = episodes(memory, count=1)
    result = generated_accuracy(memory, eps, CHUNK, 4096)
    assert result["questions"] == len(eps[0].questions) == len(result["items"])
    assert 0.0 <= result["contains"] <= 1.0


def test_bootstrap_run_saves_a_checkpoint_that_chunks_as_trained(tmp_path):
    memory = tiny_memory()
    cfg = small_run(updates=2, episodes=2)
    report = run_bootstrap(memory, cfg, tmp_path)
    assert report["updates"] == 2 and report["stopped_by"] == "updates"
    assert [e["update"] for e in report["curve"]] == [0, 1, 2]
    assert all(0 <= e["answer_accuracy_other_memory"] <= 1 for e in report["curve"])
    assert json.loads((tmp_path / "report.json").read_text())["train_questions"] == 4
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum("loss_answer" in line for line in lines) == 2
    loaded = MemoryModel.from_pretrained(tmp_path / "checkpoint", reasoner=memory.reasoner)
    assert loaded.config.chunk_tokens == CHUNK
    assert ConversationMemory(loaded, ConversationConfig(slot_budget=64)).chunk_tokens == CHUNK


def test_address_loss_trains_the_head_with_the_encoder(tmp_path):
    memory = tiny_memory()
    encoder_before = {k: v.clone() for k, v in memory.encoder.state_dict().items()}
    report = run_bootstrap(
        memory, small_run(updates=2, episodes=2, address_weight=1.0, address_dim=8), tmp_path
    )
    assert memory.address is not None and memory.config.address_dim == 8
    assert any(not torch.equal(v, memory.encoder.state_dict()[k]) for k, v in encoder_before.items())
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(entry["loss_address"] > 0 for entry in lines if "loss_address" in entry)
    for entry in report["curve"]:
        assert 0 <= entry["address_recall@1"] <= entry["address_recall@2"] <= 1
        assert 0 <= entry["generated_contains_select"] <= 1
    loaded = MemoryModel.from_pretrained(tmp_path / "checkpoint", reasoner=memory.reasoner)
    assert torch.equal(
        loaded.address.key_proj.weight, memory.address.key_proj.weight.to(torch.bfloat16).float()
    )


def test_open_values_mix_into_training_and_make_the_heldout_open(tmp_path):
    memory = tiny_memory()
    cfg = small_run(updates=1, episodes=4, open_values=0.5)
    opened = synthetic_episodes(cfg, 2, 0, Reader(memory.reasoner).count_tokens, values="open")
    assert all("open" in e.id for e in opened)
    report = run_bootstrap(memory, cfg, tmp_path)
    assert report["heldout_values"] == "open" and report["train_episodes"] == 4
    assert (
        "open"
        not in run_bootstrap(memory, BootstrapConfig(**{**cfg.__dict__, "open_values": 0.0}), tmp_path)[
            "heldout_values"
        ]
    )


def test_learning_rate_decays_over_the_time_budget_when_it_ends_first():
    from memsplice.online.bootstrap import lr_at

    cfg = BootstrapConfig(updates=1000, warmup_updates=10, lr=1.0, min_lr_ratio=0.1, max_seconds=100.0)
    assert lr_at(5, cfg) == 0.5
    assert lr_at(20, cfg, elapsed=1.0) > 0.99
    assert lr_at(20, cfg, elapsed=100.0) == pytest.approx(0.1)  # time is up: the floor, whatever the update
    assert lr_at(1000, cfg, elapsed=1.0) == pytest.approx(0.1)
    assert lr_at(
        510, BootstrapConfig(updates=1010, warmup_updates=10, lr=1.0, min_lr_ratio=0.0)
    ) == pytest.approx(0.5)


def test_bad_bootstrap_settings_name_the_field():
    with pytest.raises(ValueError, match="open_values"):
        BootstrapConfig(open_values=1.5)
    with pytest.raises(ValueError, match="evidence_share"):
        BootstrapConfig(evidence_share=-0.1)
    with pytest.raises(ValueError, match="updates"):
        BootstrapConfig(updates=0)
    with pytest.raises(ValueError, match="history_tokens"):
        BootstrapConfig(history_tokens=[100])
    with pytest.raises(ValueError, match="chunk_tokens"):
        BootstrapConfig(chunk_tokens=0)
    with pytest.raises(ValueError, match="select_share"):
        BootstrapConfig(evidence_share=0.7, select_share=0.5)
    with pytest.raises(ValueError, match="address_weight"):
        BootstrapConfig(address_weight=-1.0)
    memory = tiny_memory()
    with pytest.raises(ValueError, match="max_memory_tokens"):
        run_bootstrap(memory, BootstrapConfig(chunk_tokens=4096), "/nonexistent/never-written")
