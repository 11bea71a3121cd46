"""The formation recipe end to end on a tiny reasoner: learning, exact resume, atomic checkpoints, a frozen reasoner."""

import json
import re
import time
from types import SimpleNamespace

import pytest
import torch

from formation_helpers import tiny_config
from memsplice.memory import MemoryModel
from memsplice.train import FormationRecipe, latest_checkpoint, loop
from memsplice.train.flops import reasoner_read_flops
from memsplice.train.loop import StepTimes, batch_shapes
from memsplice.train.state import LATEST, checkpoint_root
from tiny import tiny_reasoner


def _run(config, resume=False, reasoner=None):
    recipe = FormationRecipe(
        config, resume=resume, reasoner=reasoner or tiny_reasoner("llama"), show_progress=False
    )
    recipe.setup()
    summary = recipe.train()
    recipe.cleanup()
    return recipe, summary


def _train_losses(output):
    return [
        (r["step"], r["loss"])
        for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    ]


def test_run_writes_everything_and_keeps_the_reasoner_frozen(corpus, tmp_path):
    out = tmp_path / "run"
    reasoner = tiny_reasoner("llama")
    digest = reasoner.weights_digest()
    recipe, summary = _run(tiny_config(corpus, out), reasoner=reasoner)
    assert summary["finished"] and summary["step"] == 6
    assert set(summary["eval"]) == {"8", "16"}
    assert reasoner.weights_digest() == digest
    assert not any(p.requires_grad for p in reasoner.model.parameters())
    assert (out / "metrics.jsonl").is_file() and (out / "summary.json").is_file()
    assert (out / "curves.png").stat().st_size > 1000
    loaded = MemoryModel.from_pretrained(out / "memory", reasoner=reasoner)
    assert loaded.config.extra["instruction"] == "<|im_start|>assistant\n"
    assert (
        next(iter(loaded.state_dict().values())).dtype == torch.float32
    )  # masters are float32 again on load
    assert latest_checkpoint(out).name == "step-00000006"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    assert all("loss/reconstruction" in r and "loss/infonce" in r for r in records if r["kind"] == "train")


def test_resume_is_exact(corpus, tmp_path):
    full, _ = _run(tiny_config(corpus, tmp_path / "full"))
    part = tiny_config(corpus, tmp_path / "part", run={"max_minutes": 1e-9})  # stops (and saves) after step 1
    first, summary = _run(part)
    assert summary["stopped_by_time"] and summary["step"] == 1
    resumed, summary = _run(tiny_config(corpus, tmp_path / "part"), resume=True)
    assert summary["finished"]
    for (name, a), b in zip(
        full.memory.state_dict().items(), resumed.memory.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert _train_losses(tmp_path / "full") == _train_losses(tmp_path / "part")


def test_stage_two_freezes_the_encoder(corpus, tmp_path):
    recipe = FormationRecipe(
        tiny_config(corpus, tmp_path / "s2", run={"stage2_fraction": 0.5}),
        reasoner=tiny_reasoner("llama"),
        show_progress=False,
    )
    recipe.setup()
    before = {n: p.detach().clone() for n, p in recipe.memory.named_parameters()}
    for _ in range(3):
        recipe.train_step()
    mid = {n: p.detach().clone() for n, p in recipe.memory.named_parameters()}
    assert recipe.stage == "retention" and any(
        not torch.equal(before[n], mid[n]) for n in mid if "encoder" in n
    )
    for _ in range(3):
        recipe.train_step()
    assert recipe.stage == "reading"
    after = dict(recipe.memory.named_parameters())
    for n, p in after.items():
        if n.startswith("encoder."):
            assert torch.equal(p, mid[n]), n
    assert any(not torch.equal(after[n], mid[n]) for n in after if n.startswith("operator."))


def test_embedding_untie_survives_resume(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "u", memory={"embed_warmup_updates": 2})
    full, _ = _run(cfg)
    assert not full.memory.encoder.embedding_tied and full.state.embedding_untied
    part = tiny_config(
        corpus, tmp_path / "u2", memory={"embed_warmup_updates": 2}, run={"max_minutes": 1e-9, "steps": 6}
    )
    _run(part)
    part2 = tiny_config(corpus, tmp_path / "u2", memory={"embed_warmup_updates": 2})
    resumed, _ = _run(part2, resume=True)
    torch.testing.assert_close(resumed.memory.encoder.token_embedding, full.memory.encoder.token_embedding)


def test_checkpoints_are_atomic_and_pruned(corpus, tmp_path):
    out = tmp_path / "ck"
    _run(tiny_config(corpus, out, run={"save_every_steps": 1, "keep_checkpoints": 2}))
    root = checkpoint_root(out)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000005", "step-00000006"]
    assert not list(root.glob(".*tmp*"))
    (root / LATEST).write_text("step-00000099\n")
    with pytest.raises(FileNotFoundError, match="incomplete or missing"):
        latest_checkpoint(out)


def test_causal_pool_baseline_trains_projections_only(corpus, tmp_path):
    recipe, summary = _run(
        tiny_config(
            corpus,
            tmp_path / "causal",
            memory={"encoder_type": "causal_pool"},
            objectives={"infonce": 0.0, "denoising": 0.0},
        )
    )
    assert summary["finished"]
    assert not any(n.startswith("encoder.") for n, _ in recipe.memory.named_parameters())


def test_learns_on_a_fixed_passage_set(corpus, tmp_path):
    """A seeded short curve: the reconstruction loss falls over a short run."""
    cfg = tiny_config(
        corpus,
        tmp_path / "learn",
        objectives={"continuation": 0.0, "denoising": 0.0, "infonce": 0.0},
        optim={"lr": 1e-2, "warmup_steps": 1},
        run={"steps": 25, "eval_every": 0, "log_every": 5},
        data={"synthetic_fraction": 0.0},
    )
    _run(cfg)
    losses = [loss for _, loss in _train_losses(tmp_path / "learn")]
    assert losses[-1] < 0.95 * losses[0]


def test_continue_schedule_from_exported_weights(corpus, tmp_path):
    """An interrupted run's export (bf16-free here) carries its step; --continue-schedule picks the schedule up."""
    part = tiny_config(corpus, tmp_path / "a", run={"max_minutes": 1e-9})
    first, summary = _run(part)
    assert summary["stopped_by_time"]
    exported = MemoryModel.from_pretrained(tmp_path / "a" / "memory", reasoner=first.reasoner)
    assert exported.config.extra["train_state"]["step"] == 1
    recipe = FormationRecipe(
        tiny_config(corpus, tmp_path / "b"),
        init_from=tmp_path / "a" / "memory",
        continue_schedule=True,
        reasoner=first.reasoner,
        show_progress=False,
    )
    recipe.setup()
    assert recipe.state.step == 1 and recipe.state.planned_steps == 6
    summary = recipe.train()
    assert summary["finished"] and summary["step"] == 6
    with pytest.raises(ValueError, match="--init-from"):
        FormationRecipe(tiny_config(corpus, tmp_path / "c"), continue_schedule=True)


def test_plan_minutes_sizes_the_schedule(corpus, tmp_path):
    cfg = tiny_config(corpus, tmp_path / "plan", run={"plan_minutes": 0.01, "steps": 1000, "eval_every": 0})
    recipe, summary = _run(cfg)
    assert summary["finished"] and 16 <= summary["planned_steps"] < 1000


def test_step_times_leave_out_the_first_step_at_new_shapes():
    times = StepTimes()
    for shapes, seconds in [("a", 9.0), ("a", 0.1), ("b", 7.0), ("a", 0.3), ("b", 0.2)]:
        times.add(shapes, seconds)
    assert times.seconds_per_step() == pytest.approx(0.2)
    only_new = StepTimes()  # no step repeated its shapes: the median of all
    for i, seconds in enumerate([5.0, 0.1, 0.3]):
        only_new.add(i, seconds)
    assert only_new.seconds_per_step() == 0.3


def test_batch_shapes_tell_passage_lengths_apart(corpus, tmp_path):
    recipe = FormationRecipe(
        tiny_config(corpus, tmp_path / "shapes"), reasoner=tiny_reasoner("llama"), show_progress=False
    )
    recipe.setup()
    keys = {batch_shapes(recipe._batches(step)) for step in range(12)}
    lengths = {dict(k)["reconstruction"][0][1] for k in keys}
    assert lengths == {8, 16}
    recipe.cleanup()


def test_plan_minutes_is_not_fooled_by_compilation(corpus, tmp_path, monkeypatch):
    """A step at new shapes that takes 5 s (as compiling them does) does not shrink the plan: on a clock where every
    other step takes 10 ms, 0.02 minutes plan 0.92 * 1.2 s / 10 ms = 110 steps. With eight passage lengths the first
    step at several of them falls among the timed steps (averaging every timed step in plans 41)."""
    cfg = tiny_config(
        corpus,
        tmp_path / "plan-compile",
        run={"plan_minutes": 0.02, "steps": 1000, "eval_every": 0},
        data={"lengths": [4, 8, 12, 16, 20, 24, 28, 32]},
        objectives={"continuation": 0.0, "denoising": 0.0, "infonce": 0.0},
    )
    recipe = FormationRecipe(cfg, reasoner=tiny_reasoner("llama"), show_progress=False)
    recipe.setup()
    clock, seen, real_step = [0.0], set(), recipe.train_step

    def step():
        out = real_step()
        clock[0] += 0.01 + (5.0 if out["shapes"] not in seen else 0.0)
        seen.add(out["shapes"])
        return out

    monkeypatch.setattr(recipe, "train_step", step)
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock[0], time=time.time))
    summary = recipe.train()
    recipe.cleanup()
    assert len(seen) == 8 and summary["planned_steps"] == 110 and summary["finished"]


def test_plan_warns_when_the_time_limit_will_cut_the_schedule(corpus, tmp_path, monkeypatch, caplog):
    """At 10 ms a step, 0.02 minutes plan 110 steps; a time limit of 0.01 minutes (0.4 s of it gone by the plan at
    step 40) fits about 60 of them, so the plan says where the schedule will stop (and the run stops there, by time);
    a limit that fits the schedule says nothing."""
    summaries = {}
    for name, max_minutes in (("cut", 0.01), ("fits", 1.0)):
        cfg = tiny_config(
            corpus,
            tmp_path / f"plan-{name}",
            run={"plan_minutes": 0.02, "max_minutes": max_minutes, "steps": 1000, "eval_every": 0},
            objectives={"continuation": 0.0, "denoising": 0.0, "infonce": 0.0},
        )
        recipe = FormationRecipe(cfg, reasoner=tiny_reasoner("llama"), show_progress=False)
        recipe.setup()
        clock, real_step = [0.0], recipe.train_step

        def step(real_step=real_step, clock=clock):
            clock[0] += 0.01
            return real_step()

        monkeypatch.setattr(recipe, "train_step", step)
        monkeypatch.setattr(recipe, "save", lambda *a, **k: None)
        monkeypatch.setattr(
            loop, "time", SimpleNamespace(perf_counter=lambda clock=clock: clock[0], time=time.time)
        )
        caplog.clear()
        with caplog.at_level("WARNING", logger=loop.logger.name):
            summaries[name] = recipe.train()
        summaries[name]["warnings"] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        recipe.cleanup()
    cut, fits = summaries["cut"], summaries["fits"]
    assert cut["planned_steps"] == fits["planned_steps"] == 110
    assert len(cut["warnings"]) == 1, cut["warnings"]
    near = int(re.search(r"stops near step (\d+) of 110", cut["warnings"][0]).group(1))
    assert 58 <= near <= 60, cut["warnings"]
    assert cut["stopped_by_time"] and not cut["finished"] and 58 <= cut["step"] <= 62
    assert fits["warnings"] == [] and fits["finished"]


def test_reasoner_state_input_trains_with_the_reasoner_frozen(corpus, tmp_path):
    """With memory.encoder_reasoner_states the encoder learns to use the reasoner's states (the projection leaves
    zero), the reasoner's weights do not move, the step's FLOPs count the reasoner's forward over the passages, and
    the export loads back with the channel."""
    reasoner = tiny_reasoner("llama")
    digest = reasoner.weights_digest()
    out = tmp_path / "states"
    recipe, summary = _run(
        tiny_config(corpus, out, memory={"encoder_reasoner_states": True}), reasoner=reasoner
    )
    assert summary["finished"]
    assert recipe.memory.encoder.state_proj.weight.abs().sum() > 0
    assert reasoner.weights_digest() == digest
    loaded = MemoryModel.from_pretrained(out / "memory", reasoner=reasoner)
    assert loaded.config.encoder_reasoner_states and loaded.encoder.reads_reasoner_states
    plain, _ = _run(tiny_config(corpus, tmp_path / "plain"), reasoner=reasoner)
    batches = plain._batches(0)
    extra = recipe._step_cost(batches).flops - plain._step_cost(batches).flops
    rows, n = batches["reconstruction"].shape
    forward = 0.5 * reasoner_read_flops(plain.cost, rows, 0, n, 0)  # at least the reconstruction passages
    assert extra > forward > 0


def test_chunk_slot_attention_trains_and_exports(corpus, tmp_path):
    """memory.slot_attention=chunk goes through the whole recipe and the export loads back reading by chunks."""
    reasoner = tiny_reasoner("llama")
    out = tmp_path / "chunk"
    recipe, summary = _run(tiny_config(corpus, out, memory={"slot_attention": "chunk"}), reasoner=reasoner)
    assert summary["finished"] and recipe.memory.encoder.slot_attention == "chunk"
    loaded = MemoryModel.from_pretrained(out / "memory", reasoner=reasoner)
    assert loaded.config.slot_attention == "chunk" and loaded.encoder.slot_attention == "chunk"
    ids = torch.randint(3, 200, (2, 24))
    by_chunk = loaded.encode(ids)
    loaded.set_slot_attention("global")
    assert (loaded.encode(ids) - by_chunk).abs().max() > 1e-4


def test_refined_target_trains_logs_and_counts_its_reads(corpus, tmp_path):
    """objectives.refined_target runs through the recipe (logged as loss/refined_target, the reasoner frozen), and
    a step's FLOPs count one more reconstruction read per refinement step."""
    reasoner = tiny_reasoner("llama")
    digest = reasoner.weights_digest()
    out = tmp_path / "target"
    objectives = {"refined_target": 0.5, "refined_target_steps": 2}
    recipe, summary = _run(tiny_config(corpus, out, objectives=objectives), reasoner=reasoner)
    assert summary["finished"] and reasoner.weights_digest() == digest
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(r["loss/refined_target"] > 0 for r in train)
    plain, _ = _run(tiny_config(corpus, tmp_path / "plain"), reasoner=reasoner)
    batches = plain._batches(0)
    rows, n = batches["reconstruction"].shape
    m, i = plain.memory.config.num_slots, plain.instruction.numel()
    read = reasoner_read_flops(plain.cost, rows, m, i + n, n)
    extra = recipe._step_cost(batches).flops - plain._step_cost(batches).flops
    assert extra == pytest.approx(2 * read)


def test_throughput_leaves_out_the_windows_that_compiled_new_shapes():
    """A window in which a step ran at shapes new to the process paid for compiling them: the steady-state summary
    leaves it out wherever it falls (on a mix of lengths, long after the first two windows)."""

    def window(seconds, new):
        return {
            "seconds": seconds,
            "tokens_per_s": 1000 / seconds,
            "flops_per_s": 1e6 / seconds,
            "new_shapes": new,
        }

    recipe = SimpleNamespace(
        _windows=[window(100, True), window(1, False), window(30, True), window(1, False), window(2, False)],
        dist=SimpleNamespace(world_size=1),
        peak=None,
    )
    out = loop.FormationRecipe._throughput_summary(recipe)
    assert out["windows_measured"] == 3 and out["windows_left_out"] == 2
    assert out["seconds_measured"] == 4 and out["tokens_per_s"] == pytest.approx(3000 / 4)
    recipe._windows = [
        window(5, True) for _ in range(5)
    ]  # every window compiled (varying shapes): all but two
    assert loop.FormationRecipe._throughput_summary(recipe)["windows_measured"] == 3


def test_a_run_marks_the_windows_that_met_new_shapes(corpus, tmp_path):
    recipe, summary = _run(tiny_config(corpus, tmp_path / "run"))
    flags = [w["new_shapes"] for w in recipe._windows]
    assert flags[0] and len(flags) == 6  # log_every=1: one window a step; the first step is new
    shapes = {batch_shapes(recipe._batches(step)) for step in range(6)}
    assert sum(flags) == len(shapes)
