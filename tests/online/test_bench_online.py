import argparse
import json

import pytest
import torch
from online_builders import tiny_memory

from memsplice.bench import online as bench
from memsplice.online import OnlineLearner


def args(**overrides):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    a = p.parse_args([])
    for k, v in {"facts": 6, "context_tokens": 48, "target_tokens": 12, **overrides}.items():
        setattr(a, k, v)
    return a


def test_stream_has_fixed_shapes_and_fact_probes():
    memory = tiny_memory()
    tok = memory.reasoner.tokenizer
    a = args()
    stream, probes, _ = bench.build_stream(tok, "{role}: {text}\n", a, 40)
    assert len(stream) == 40 and len(probes) == 6
    assert all(len(it.context) == 48 and len(it.query) + len(it.response) > 12 for it in stream)
    for p in probes:
        assert len(p["context"]) == 48
        assert p["answer"] in tok.decode(p["context"])  # the fact is in what memory is written from
    acc = bench.fact_accuracy(memory, probes)
    assert 0.0 <= acc["token_accuracy"] <= 1.0 and 0.0 <= acc["exact"] <= 1.0
    reader = bench.fact_accuracy(memory, probes, prompt="reader")
    assert 0.0 <= reader["token_accuracy"] <= 1.0 and 0.0 <= reader["exact"] <= 1.0
    with pytest.raises(ValueError, match="prompt"):
        bench.fact_accuracy(memory, probes, prompt="system")


def test_turns_tokenized_in_batches_are_tokenized_as_one_by_one():
    tok = tiny_memory().reasoner.tokenizer
    template = "{role}: {text}\n"
    turns = bench.dialogue_turns(None, "train", 3)
    batched = bench.tokenized_exchanges(tok, template, bench.dialogue_turns(None, "train", 3), first_batch=2)
    for _ in range(40):  # across several batches of growing size
        (_, x, _), (_, y, epoch) = next(turns), next(turns)
        want = [
            tok(template.format(role=r, text=t), add_special_tokens=False)["input_ids"]
            for r, t in (("user", x), ("assistant", y))
        ]
        assert next(batched) == (*want, epoch)


def test_prose_perplexity_is_finite_and_memory_changes_it():
    memory = tiny_memory()
    passages = bench.prose_passages(memory.reasoner.tokenizer, None, 4, 32, 16)
    assert len(passages) == 4
    with_memory = bench.prose_perplexity(memory, passages)
    bare = bench.prose_perplexity(memory, passages, with_memory=False)
    assert 1.0 < with_memory < 1e6 and 1.0 < bare < 1e6 and with_memory != bare


def test_summary_merges_saved_parts(tmp_path):
    (tmp_path / "online-cost.json").write_text(
        json.dumps(
            {
                "lengths": [
                    {
                        "history_tokens": 16384,
                        "kv_fraction": 0.03,
                        "write_ms_mean": 5.0,
                        "mem0_style_write_ms_mean": 900.0,
                        "answer_ms_with_memory": 40.0,
                    }
                ]
            }
        )
    )
    for variant, drop in (("ewc_replay", 0.01), ("plain", 0.2)):
        (tmp_path / f"online-stability-{variant}.json").write_text(
            json.dumps({"forgetting_drop": drop, "perplexity_drop": drop / 2, "updates": 10000})
        )
    out = bench.run_summary(args(results=str(tmp_path)))
    assert out["kv_fraction"] == {"16384": 0.03}
    assert out["forgetting_drop"] == {"with_ewc_replay": 0.01, "without_ewc_replay": 0.2}
    assert out["perplexity_drop"]["without_ewc_replay"] == 0.1


@pytest.mark.slow
def test_stability_run_on_a_tiny_model():
    memory = tiny_memory()
    a = args(updates=4, eval_every=2, ppl_passages=4, batch_size=2, anchor_interval=4)
    out = bench.run_stability(a, memory.reasoner, memory)
    assert out["updates"] == 4 and [c["update"] for c in out["curve"]] == [0, 2, 4]
    assert all("reader_token_accuracy" in c for c in out["curve"]) and "forgetting_drop_reader" in out
    assert out["perplexity_drop"] >= 0 and out["stopped_by"] == "updates"


@pytest.mark.slow
def test_a_stability_run_with_rehearsal_names_its_result_and_its_set(tmp_path):
    memory = tiny_memory()
    a = args(
        updates=2,
        eval_every=2,
        ppl_passages=4,
        batch_size=2,
        rehearsal=2,
        rehearsal_questions=4,
        rehearsal_prompts="both",
    )
    out = bench.run_stability(a, memory.reasoner, memory)
    assert out["config"]["rehearsal_per_update"] == 2 and "train split" in out["rehearsal"]
    assert "both prompts" in out["rehearsal"]
    assert bench.stability_name(a) == "online-stability-ewc_replay-rehearsal"
    assert bench.stability_name(args()) == "online-stability-ewc_replay"
    (tmp_path / "online-stability-ewc_replay-rehearsal.json").write_text(
        json.dumps({"forgetting_drop": 0.01, "perplexity_drop": 0.0, "updates": 2})
    )
    summary = bench.run_summary(args(results=str(tmp_path)))
    assert summary["forgetting_drop"] == {"with_ewc_replay_rehearsal": 0.01}


@pytest.mark.slow
def test_a_stability_run_with_a_guard_reports_its_checks(tmp_path):
    memory = tiny_memory()
    a = args(updates=4, eval_every=4, ppl_passages=4, batch_size=2, anchor_interval=4, guard_tolerance=0.0)
    a.guard_questions = 4
    out = bench.run_stability(a, memory.reasoner, memory)
    guard = out["guard"]
    assert guard["canary_questions"] == 4 and "canary" in guard["canary"] and "train split" in guard["canary"]
    assert guard["checks"] == 2 and guard["rollbacks"] == sum(not e["kept"] for e in guard["events"])
    assert 0.0 <= guard["reference"] <= 1.0 and out["config"]["guard_tolerance"] == 0.0
    assert bench.stability_name(a) == "online-stability-ewc_replay-guard"
    (tmp_path / "online-stability-ewc_replay-guard.json").write_text(
        json.dumps({"forgetting_drop": 0.0, "perplexity_drop": 0.0, "updates": 4})
    )
    summary = bench.run_summary(args(results=str(tmp_path)))
    assert summary["forgetting_drop"] == {"with_ewc_replay_guard": 0.0}


def stability_args(state, **overrides):
    return args(
        **{
            "updates": 6,
            "eval_every": 2,
            "ppl_passages": 4,
            "batch_size": 2,
            "anchor_interval": 4,
            **overrides,
        },
        state=str(state),
    )


def stability(a):
    """One command of a stability run, on a fresh tiny memory as `memsplice bench online` loads it."""
    torch.manual_seed(a.seed)
    memory = tiny_memory()
    return bench.run_stability(a, memory.reasoner, memory)


def saved_learner(state):
    return OnlineLearner.load(state / bench.STATE_LEARNER, reasoner=tiny_memory().reasoner)


def without_seconds(curve):
    return [{k: v for k, v in point.items() if k != "seconds"} for point in curve]


@pytest.mark.slow
def test_a_stability_run_over_two_commands_computes_what_one_command_does(tmp_path):
    one = stability(stability_args(tmp_path / "one"))
    assert one["complete"] and one["segments"] == 1 and one["updates"] == 6
    first = stability(stability_args(tmp_path / "two", stop_after_updates=3))
    assert (first["updates"], first["stopped_by"], first["complete"], first["segments"]) == (
        3,
        "stop_after_updates",
        False,
        1,
    )
    assert [c["update"] for c in first["curve"]] == [0, 2]  # no evaluation off the grid when stopped early
    second = stability(stability_args(tmp_path / "two"))
    assert (second["updates"], second["stopped_by"], second["complete"], second["segments"]) == (
        6,
        "updates",
        True,
        2,
    )
    assert without_seconds(second["curve"]) == without_seconds(one["curve"])
    assert [c["update"] for c in second["curve"]] == [0, 2, 4, 6]
    for key in ("interactions", "bare_perplexity", "forgetting_drop", "perplexity_drop", "loss_first_100"):
        assert second[key] == one[key], key
    assert second["seconds"] >= first["seconds"] > 0
    saved = [json.loads((tmp_path / d / bench.STATE_NAME).read_text()) for d in ("one", "two")]
    assert saved[0]["losses"] == saved[1]["losses"] and len(saved[1]["update_seconds"]) == 6
    a, b = saved_learner(tmp_path / "one"), saved_learner(tmp_path / "two")
    assert (a.steps, a.updates, a.anchor.refreshes) == (b.steps, b.updates, b.anchor.refreshes) == (12, 6, 4)
    for (n, x), y in zip(a.memory.state_dict().items(), b.memory.state_dict().values(), strict=True):
        assert torch.equal(x, y), n
    for n, f in a.anchor.fisher.items():
        assert torch.equal(f, b.anchor.fisher[n]), n
    for x, y in zip(a.optimizer.state.values(), b.optimizer.state.values(), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    # A finished run only reports itself again.
    again = stability(stability_args(tmp_path / "two"))
    assert (again["segments"], again["updates"], again["curve"]) == (2, 6, second["curve"])


def test_a_saved_stability_run_resumes_only_with_its_own_arguments(tmp_path):
    stability(stability_args(tmp_path / "run", updates=2, stop_after_updates=1))
    with pytest.raises(ValueError, match="--lr 2e-05 there, 3e-05 here"):
        stability(stability_args(tmp_path / "run", updates=2, lr=3e-5))
    with pytest.raises(ValueError, match="--variant"):
        stability(stability_args(tmp_path / "run", updates=2, variant="plain"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a state")
    with pytest.raises(ValueError, match="holds no stability state"):
        stability(stability_args(tmp_path / "other", updates=2))
    assert (tmp_path / "other" / "notes.txt").is_file()


def test_recall_reports_accuracy_and_measured_kv_fraction_per_system(tmp_path):
    """The recall part on a tiny reasoner: latent-select reads the chunks its address head picks, and the KV it
    holds at answer is measured per system (memory slots over history tokens)."""
    pytest.importorskip("memsplice.eval.tasks")
    memory = tiny_memory()
    memory.add_address_head(8)
    memory.save_pretrained(tmp_path / "m")
    a = args(
        history_tokens=[512],
        examples=1,
        systems=["latent-select", "latent", "oracle"],
        checkpoint=str(tmp_path / "m"),
        select_chunks=2,
    )
    out = bench.run_recall(a, memory.reasoner)
    accuracy = out["recall"]["512"]
    assert set(accuracy) == {"latent-select", "latent", "oracle"}
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())
    kv = out["kv_fraction"]["512"]
    assert set(kv) == {"latent-select", "latent"}  # oracle holds no memory
    slots = memory.config.num_slots
    assert kv["latent-select"] <= 2 * slots / 400 < kv["latent"]
    assert out["values"] == "pools"


def test_recall_reads_the_recency_margin_and_window_it_is_given(tmp_path, monkeypatch):
    """--recency-margin, --extra-chunk-margin and --window-tokens reach the recall systems (SystemArgs) unchanged."""
    pytest.importorskip("memsplice.eval.tasks")
    import memsplice.eval as evaluation

    memory = tiny_memory()
    memory.add_address_head(8)
    memory.save_pretrained(tmp_path / "m")
    seen = []
    real = evaluation.run_eval

    def spy(config, **kw):
        seen.append(config.system_args)
        return real(config, **kw)

    monkeypatch.setattr(evaluation, "run_eval", spy)  # run_recall imports it from memsplice.eval when it runs
    a = args(
        history_tokens=[512],
        examples=1,
        systems=["latent-select"],
        checkpoint=str(tmp_path / "m"),
        recency_margin=1.25,
        extra_chunk_margin=0.5,
        window_tokens=96,
    )
    bench.run_recall(a, memory.reasoner)
    assert seen and all(s.recency_margin == 1.25 and s.window_tokens == 96 for s in seen)
    assert all(s.extra_margin == 0.5 for s in seen)


def test_recall_cut_by_its_time_budget_is_not_complete(tmp_path):
    """--time-budget starts no new episode once spent: such a run says so (complete false, episodes ran of planned),
    so that a merge of runs refuses it."""
    pytest.importorskip("memsplice.eval.tasks")
    memory = tiny_memory()
    memory.save_pretrained(tmp_path / "m")
    a = args(history_tokens=[512], examples=2, systems=["oracle"], checkpoint=str(tmp_path / "m"))
    whole = bench.run_recall(a, memory.reasoner)
    assert whole["complete"] and whole["lengths"]["512"]["episodes"] == 2
    a.time_budget = 1e-9
    cut = bench.run_recall(a, memory.reasoner)
    assert not cut["complete"]
    assert (cut["lengths"]["512"]["episodes"], cut["lengths"]["512"]["episodes_planned"]) == (1, 2)
