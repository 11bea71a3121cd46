"""`memsplice bench fidelity`: every system scored on the same held-out passages; the summary has the agreed shape."""

import json

import pytest
import torch

from formation_helpers import save_tiny_reasoner, tiny_config
from memsplice import load_reasoner
from memsplice.bench import record
from memsplice.cli.main import main
from memsplice.train import FormationRecipe
from memsplice.train.evaluate import reconstruction_fidelity


def _train(corpus, out, reasoner, **memory):
    cfg = tiny_config(
        corpus,
        out,
        memory=memory,
        objectives={"continuation": 0.0, "denoising": 0.0, "infonce": 0.0},
        run={"steps": 3, "eval_every": 0},
    )
    recipe = FormationRecipe(cfg, reasoner=reasoner, show_progress=False)
    recipe.setup()
    recipe.train()
    return out / "memory"


@pytest.fixture
def trained(corpus, tmp_path):
    reasoner_dir = save_tiny_reasoner(tmp_path / "reasoner")
    reasoner = load_reasoner(reasoner_dir, device="cpu")
    latent = _train(corpus, tmp_path / "latent", reasoner)
    causal = _train(corpus, tmp_path / "causal", reasoner, encoder_type="causal_pool")
    s = reasoner.shapes
    prior = _train(
        corpus,
        tmp_path / "prior",
        reasoner,
        encoder_init="reasoner",
        encoder_width=s.hidden_size,
        encoder_heads=s.num_heads,
        encoder_layers=2,
        encoder_mlp_ratio=reasoner.decoder.layers[0].mlp.gate_proj.out_features / s.hidden_size,
    )
    return reasoner_dir, reasoner, latent, causal, prior


def test_bench_reports_all_systems_and_saves_summary(trained, corpus, tmp_path, capsys, monkeypatch):
    reasoner_dir, reasoner, latent, causal, prior = trained
    monkeypatch.setattr(record, "RESULTS_DIR", tmp_path / "results")
    (tmp_path / "latent" / "summary.json").write_text(
        json.dumps({"throughput": {"tokens_per_s": 5.0, "mfu": 0.1}})
    )
    code = main(
        [
            "bench",
            "fidelity",
            "--checkpoint",
            str(latent),
            "--causal",
            str(causal),
            "--prior",
            str(prior),
            "--reasoner",
            str(reasoner_dir),
            "--device",
            "cpu",
            "--data",
            str(corpus),
            "--sources",
            "tinyshakespeare",
            "gutenberg-nltk",
            "--lengths",
            "8",
            "16",
            "--passages",
            "3",
            "--refine-steps",
            "2",
            "--json",
            "--save",
            "--train-run",
            str(tmp_path / "latent"),
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    systems = {(r["length"], r["system"]) for r in result["rows"]}
    names = ("latent", "latent_refined", "floor", "causal", "prior_init")
    assert systems == {(n, s) for n in (8, 16) for s in names}
    assert all(r["refine_steps"] == 2 for r in result["rows"] if r["system"] == "latent_refined")
    assert set(result["refine_lr"]) == {r["label"] for r in result["rows"] if r["system"] == "latent_refined"}
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())["formation"]
    assert set(summary["2x"]) >= {*names, "refine_steps"} and "4x" in summary
    assert summary["train_tokens_per_s"] == 5.0 and summary["train_mfu"] == 0.1
    assert {"device", "commit", "date"} <= set(summary)
    saved = json.loads((tmp_path / "results" / "formation-fidelity.json").read_text())
    assert saved["rows"] == result["rows"] and "command" in saved


def test_floor_equals_the_bare_reasoner(trained, corpus):
    _, reasoner, *_ = trained
    passages = torch.randint(3, 300, (4, 12))
    instruction = torch.tensor([5, 6])
    floor = reconstruction_fidelity(reasoner, None, passages, instruction, batch_rows=3)
    logits = reasoner.model(torch.cat([instruction.expand(4, -1), passages], 1)).logits[:, 1:13]
    want = (logits.argmax(-1) == passages).float().mean().item()
    assert floor.token_accuracy == pytest.approx(want)
    assert floor.passages == 4 and floor.tokens == 48


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "fidelity", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "no memory checkpoint" in capsys.readouterr().err


def test_a_record_name_may_name_a_folder(tmp_path):
    path = record.save_result("formation/ablation", {"x": 1}, directory=tmp_path / "results")
    assert path == tmp_path / "results" / "formation" / "ablation.json"
    assert json.loads(path.read_text())["x"] == 1
