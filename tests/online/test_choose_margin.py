"""scripts/online/choose_margin.py: the margin chosen from train-split address_recall results is written into the
checkpoint's config with the count per margin; test-split results are refused and the weights are not touched."""

import json

import pytest

from helpers import load_script
from memsplice.memory.config import MemoryConfig


def _result(tmp_path, name, split, **recall1):
    by_margin = {m: {"questions": 24, "recall@1": n / 24} for m, n in recall1.items()}
    path = tmp_path / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "split": split,
                "seed": int(name[-1]),
                "pools": {"questions": 24, "lengths": {"16384": {}}, "by_margin": by_margin},
            }
        )
    )
    return str(path)


def _checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    MemoryConfig(address_recency_margin=0.75).save(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    return ckpt


def test_writes_the_chosen_margin_into_the_config(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    files = [
        _result(tmp_path, "s0", "train", **{"0.0": 23, "0.5": 24, "1.0": 24}),
        _result(tmp_path, "s1", "train", **{"0.0": 24, "0.5": 24, "1.0": 23}),
    ]
    assert load_script("online/choose_margin.py").main([str(ckpt), *files]) == 0
    config = json.loads((ckpt / "memsplice_config.json").read_text())
    assert config["address_recency_margin"] == 0.5
    choice = config["extra"]["address"]["recency_margin"]
    assert choice["value"] == 0.5 and choice["first_right_by_margin"] == {"0.0": 47, "0.5": 48, "1.0": 47}
    assert "seeds 0, 1, 48 questions" in choice["chosen_on"]
    assert json.loads(capsys.readouterr().out)["value"] == 0.5
    assert (ckpt / "model.safetensors").read_bytes() == b"weights"


def test_dry_run_leaves_the_config_and_test_results_are_refused(tmp_path):
    ckpt = _checkpoint(tmp_path)
    before = (ckpt / "memsplice_config.json").read_text()
    script = load_script("online/choose_margin.py")
    train = _result(tmp_path, "s0", "train", **{"0.0": 24, "1.0": 24})
    assert script.main([str(ckpt), train, "--dry-run"]) == 0
    assert (ckpt / "memsplice_config.json").read_text() == before
    with pytest.raises(SystemExit, match="train split"):
        script.main([str(ckpt), _result(tmp_path, "t0", "test", **{"0.0": 24})])
