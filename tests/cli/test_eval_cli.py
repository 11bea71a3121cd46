"""`memsplice eval` and `memsplice bench latency` end to end on a tiny reasoner saved to disk."""

from __future__ import annotations

import json

import pytest

from memsplice.bench import record
from memsplice.cli.main import main
from tiny import tiny_reasoner


@pytest.fixture
def tiny_model_dir(tmp_path):
    r = tiny_reasoner("llama")
    r.model.save_pretrained(tmp_path / "tiny")
    r.tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(record, "RESULTS_DIR", tmp_path / "results")
    return tmp_path / "results"


def test_eval_writes_report_and_records(tiny_model_dir, tmp_path, results_dir, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "eval",
            "--task",
            "passkey",
            "--systems",
            "none,window,rag-bm25,latent",
            "--lengths",
            "256",
            "--depths",
            "0.5",
            "--examples",
            "1",
            "--max-new-tokens",
            "3",
            "--reasoner",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--out",
            str(out),
            "--quiet",
            "--record",
            "eval-passkey-test",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "passkey: 1 episodes, 1 questions" in printed and "rag-bm25" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["systems"] == ["none", "window", "rag-bm25", "latent"]
    assert (out / "report.md").is_file() and (out / "latency_vs_length.png").is_file()
    saved = json.loads((results_dir / "eval-passkey-test.json").read_text())
    assert {"command", "commit", "device", "date"} <= set(saved)  # the command is this process's argv
    assert saved["summary"]["main_metric"] == "contains" and saved["questions"] == 1
    summary = json.loads((results_dir / "summary.json").read_text())["eval"]
    assert set(summary["passkey"]["scores"]) == {"none", "window", "rag-bm25", "latent"}
    assert summary["passkey"]["metric"] == "contains"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "passkey", "--systems", "none,bogus"], "unknown system(s) bogus"),
        (["--task", "locomo", "--systems", "none"], "--data PATH"),
        (
            ["--task", "locomo", "--systems", "none", "--data", "/nonexistent/locomo.json"],
            "no LoCoMo data file",
        ),
    ],
)
def test_eval_errors_are_one_line(argv, message, tiny_model_dir, tmp_path, capsys):
    code = main(
        [
            "eval",
            *argv,
            "--reasoner",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err


def test_eval_bad_lengths_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--task", "passkey", "--lengths", "lots", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--lengths" in capsys.readouterr().err


def test_bench_latency_json_and_save(tiny_model_dir, results_dir, capsys):
    code = main(
        [
            "bench",
            "latency",
            "--reasoner",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--question-tokens",
            "8",
            "--new-tokens",
            "4",
            "--slots",
            "16",
            "--memory-tokens",
            "32",
            "--contexts",
            "64",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--hf-repeats",
            "1",
            "--json",
            "--save",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["scenario"] for r in result["scenarios"]] == ["none", "memory-16", "full-64"]
    assert all(r["tokens_equal_hf"] for r in result["scenarios"])
    summary = json.loads((results_dir / "summary.json").read_text())["latency"]
    assert {"none", "memory", "eager_hf", "device", "commit", "date"} <= set(summary)
    assert summary["memory"]["slots"] == 16


def _passkey_run(tiny_model_dir, out, length, *extra):
    argv = ["eval", "--task", "passkey", "--systems", "none,window,latent", "--lengths", str(length)]
    argv += ["--depths", "0.5", "--examples", "1", "--max-new-tokens", "3", "--reasoner", str(tiny_model_dir)]
    assert main([*argv, "--device", "cpu", "--out", str(out), "--quiet", *extra]) == 0


def test_eval_merge_reports_runs_of_other_lengths_as_one(tiny_model_dir, tmp_path, results_dir, capsys):
    """Lengths split between two runs (e.g. one per GPU) make one report, as if one run had done them all."""
    _passkey_run(tiny_model_dir, tmp_path / "a", 256)
    _passkey_run(tiny_model_dir, tmp_path / "b", 384)
    _passkey_run(tiny_model_dir, tmp_path / "both", "256,384")
    capsys.readouterr()
    merged_dir = tmp_path / "merged"
    argv = [
        "eval",
        "--merge",
        f"{tmp_path / 'a'},{tmp_path / 'b' / 'results.json'}",
        "--out",
        str(merged_dir),
    ]
    assert main([*argv, "--record", "eval-merged-test"]) == 0
    assert "passkey: 2 episodes, 2 questions" in capsys.readouterr().out
    merged = json.loads((merged_dir / "results.json").read_text())
    both = json.loads((tmp_path / "both" / "results.json").read_text())
    assert merged["config"]["task_args"]["lengths"] == [256, 384]
    assert [m["lengths"] for m in merged["merged_from"]] == [[256], [384]]
    report = (merged_dir / "report.md").read_text()
    assert report.count("- command:") == 2 and "- lengths 384 (1 of 1 episodes):" in report
    key = ("episode", "system", "question_id", "prediction", "contains")
    assert sorted(tuple(r[k] for k in key) for r in merged["records"]) == sorted(
        tuple(r[k] for k in key) for r in both["records"]
    )
    assert merged["summary"]["systems"].keys() == both["summary"]["systems"].keys()
    for name, s in both["summary"]["systems"].items():
        assert merged["summary"]["systems"][name]["score"] == s["score"]
    saved = json.loads((results_dir / "eval-merged-test.json").read_text())
    assert len(saved["merged_from"]) == 2 and saved["task"] == "passkey"
    assert json.loads((results_dir / "summary.json").read_text())["eval"]["passkey"]["lengths"] == [256, 384]


def test_eval_merge_refuses_runs_that_do_not_belong_together(tiny_model_dir, tmp_path, capsys):
    _passkey_run(tiny_model_dir, tmp_path / "a", 256)
    _passkey_run(tiny_model_dir, tmp_path / "seed", 384, "--seed", "3")
    runs = {"twice": f"{tmp_path / 'a'},{tmp_path / 'a'}", "seed": f"{tmp_path / 'a'},{tmp_path / 'seed'}"}
    for runs_arg, message in ((runs["twice"], "is in both"), (runs["seed"], "seed")):
        code = main(["eval", "--merge", runs_arg, "--out", str(tmp_path / "m")])
        assert code == 2 and message in capsys.readouterr().err
    assert main(["eval", "--merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]) == 2
    assert "no eval results" in capsys.readouterr().err
    assert main(["eval", "--out", str(tmp_path / "m")]) == 2
    assert "give --task" in capsys.readouterr().err
