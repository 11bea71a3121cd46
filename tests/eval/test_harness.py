"""The CI-size evaluation: every system on every task with a tiny reasoner, and what the report must hold."""

from __future__ import annotations

import json

import pytest

from memsplice.eval import (
    SYSTEMS,
    EvalConfig,
    GenerationSettings,
    SystemArgs,
    TaskArgs,
    run_eval,
    write_report,
)
from memsplice.eval.report import summarise

TASKS = {
    "synthetic": TaskArgs(examples=1, lengths=(256,), facts=3),
    "passkey": TaskArgs(examples=1, lengths=(256,), depths=(0.0, 1.0)),
}


def _config(task, systems=tuple(SYSTEMS), locomo=None, **kw):
    args = TASKS.get(task) or TaskArgs(data=locomo, examples=0)
    return EvalConfig(
        task=task,
        systems=systems,
        task_args=args,
        system_args=SystemArgs(window_tokens=96, top_k=2),
        generation=GenerationSettings(max_new_tokens=3),
        progress=False,
        **kw,
    )


@pytest.mark.parametrize("task", ["synthetic", "passkey", "locomo"])
def test_every_system_on_every_task(task, eval_reasoner, locomo_path, tmp_path):
    results = run_eval(_config(task, locomo=locomo_path), reasoner=eval_reasoner)
    n_systems = len(SYSTEMS)
    assert results["systems"] == list(SYSTEMS) and len(results["records"]) == results["questions"] * n_systems
    assert len(results["feeds"]) == results["episodes"] * n_systems
    for r in results["records"]:
        if r["fits"]:
            assert all(0.0 <= r[m] <= 1.0 for m in ("em", "f1", "contains"))
            assert r["ttft_s"] > 0 and r["kv_bytes"] > 0 and r["prompt_tokens"] > 0
        assert isinstance(r["prediction"], str)
    latent = [r for r in results["records"] if r["system"] == "latent"]
    assert all(r["memory_slots"] > 0 for r in latent)
    paths = write_report(results, tmp_path)
    saved = json.loads(paths["results"].read_text())
    assert set(saved["summary"]["systems"]) == set(SYSTEMS)
    report = paths["report"].read_text()
    assert all(f"| {name} |" in report for name in SYSTEMS)
    for key in ("accuracy", "latency", "kv"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_are_reproducible(eval_reasoner):
    config = _config("passkey", systems=("none", "window", "latent"))
    a = run_eval(config, reasoner=eval_reasoner)
    b = run_eval(config, reasoner=eval_reasoner)
    keys = ("system", "episode", "prediction", "em", "f1", "prompt_tokens", "memory_slots", "kv_bytes")
    assert [[r[k] for k in keys] for r in a["records"]] == [[r[k] for k in keys] for r in b["records"]]


def test_full_is_na_beyond_the_window_and_kv_is_reported(eval_reasoner):
    config = EvalConfig(
        task="passkey",
        systems=("full", "latent"),
        progress=False,
        task_args=TaskArgs(examples=1, lengths=(4096,), depths=(0.5,)),
        generation=GenerationSettings(max_new_tokens=2),
    )
    results = run_eval(config, reasoner=eval_reasoner)
    summary = summarise(results)["systems"]
    full = summary["full"]
    assert full["score"]["answered"] == 0 and full["main"] is None
    needed = full["by_length"]["4096"]["kv_bytes_needed_mean"]
    assert needed > 4096 * 2 * eval_reasoner.shapes.num_layers * eval_reasoner.shapes.kv_width * 4 * 0.9
    latent = summary["latent"]["by_length"]["4096"]
    assert latent["answered"] == 1 and 0 < latent["kv_fraction_of_full"] < 1


def test_summary_arithmetic():
    def rec(system, length, contains, fits=True, ttft=0.01):
        return {
            "system": system,
            "length": length,
            "category": "c",
            "fits": fits,
            "em": contains,
            "f1": contains,
            "contains": contains if fits else None,
            "ttft_s": ttft,
            "decode_s_per_token": 0.001,
            "prompt_tokens": 10,
            "context_tokens": 0,
            "memory_slots": 0,
            "kv_bytes": 100,
            "retrieval_s": 0.0,
        }

    results = {
        "main_metric": "contains",
        "systems": ["a", "oracle"],
        "records": [
            rec("a", 1, 1.0),
            rec("a", 1, 0.0),
            rec("a", 2, None, fits=False),
            rec("oracle", 1, 1.0),
            rec("oracle", 2, 1.0),
        ],
        "feeds": [
            {"system": "a", "length": 1, "write_s_per_turn": 0.002, "stored_bytes": 10, "evicted_spans": 4},
            {"system": "a", "length": 1, "write_s_per_turn": 0.002, "stored_bytes": 10, "evicted_spans": 2},
            {
                "system": "oracle",
                "length": 1,
                "write_s_per_turn": 0.0,
                "stored_bytes": 10,
            },  # as older results
        ],
    }
    s = summarise(results)["systems"]
    assert (
        s["a"]["by_length"]["1"]["evicted_spans_mean"] == 3
        and s["oracle"]["costs"]["evicted_spans_mean"] == 0
    )
    assert s["a"]["main"] == 0.5 and s["a"]["score"]["answered"] == 2 and s["a"]["score"]["questions"] == 3
    assert s["a"]["by_length"]["2"]["contains"] is None
    assert s["a"]["fraction_of_oracle"] == 0.5
    assert s["a"]["costs"]["write_ms_per_turn_mean"] == pytest.approx(2.0)


def test_config_checks_names_before_loading_anything():
    with pytest.raises(ValueError, match="unknown system"):
        EvalConfig(systems=("none", "bogus"))
    with pytest.raises(ValueError, match="unknown task"):
        EvalConfig(task="bogus")
    with pytest.raises(ValueError, match="twice"):
        EvalConfig(systems=("none", "none"))


def test_time_budget_stops_between_episodes(eval_reasoner, tmp_path):
    config = _config("passkey", systems=("none",), time_budget_s=0.0)
    results = run_eval(config, reasoner=eval_reasoner)
    assert results["episodes"] == 1 and results["episodes_planned"] == 2 and results["questions"] == 1
    assert "of 2 planned" in write_report(results, tmp_path)["report"].read_text()


def test_partial_results_after_every_episode(eval_reasoner, tmp_path):
    seen = []
    results = run_eval(
        _config("passkey", systems=("none", "window")),
        reasoner=eval_reasoner,
        on_episode=lambda partial: seen.append((partial["episodes"], len(partial["records"]))),
    )
    assert seen == [(1, 2), (2, 4)] and results["episodes"] == 2
