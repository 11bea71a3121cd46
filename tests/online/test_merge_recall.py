"""scripts/online/merge_recall.py: per-(length, seed) recall runs merge into means over seeds, with the share of the
oracle; a system given twice for one seed, an incomplete run (or one its time budget cut short), or seeds with different systems is refused."""

import json

import pytest

from helpers import load_script


def _script():
    return load_script("online/merge_recall.py")


def _run(tmp_path, name, seed, recall, complete=True):
    path = tmp_path / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "command": f"memsplice bench online --part recall --seed {seed} --history-tokens 16384",
                "complete": complete,
                "recall": {"16384": recall},
                "kv_fraction_answer": {"16384": {s: 0.01 for s in recall}},
            }
        )
    )
    return str(path)


def test_means_over_seeds_and_share_of_oracle(tmp_path):
    merge = _script().merge
    files = [
        _run(tmp_path, "a0", 0, {"latent-readback": 0.75, "oracle": 1.0}),
        _run(tmp_path, "a1", 1, {"latent-readback": 0.5, "oracle": 0.5}),
    ]
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"per_seed": {"2": {"16384": {"latent-readback": 1.0, "oracle": 0.75}}}}))
    out = merge([*files, str(earlier)])
    assert out["seeds"] == [0, 1, 2]
    assert out["recall"]["16384"] == pytest.approx({"latent-readback": 0.75, "oracle": 0.75})
    assert out["of_oracle"]["16384"]["latent-readback"] == pytest.approx(1.0)
    assert out["per_seed"]["1"]["16384"]["latent-readback"] == 0.5


def test_refuses_what_it_cannot_merge_honestly(tmp_path):
    merge = _script().merge
    first = _run(tmp_path, "a", 0, {"latent-readback": 0.75, "oracle": 1.0})
    with pytest.raises(ValueError, match="in another file too"):
        merge([first, _run(tmp_path, "b", 0, {"latent-readback": 0.5})])
    with pytest.raises(ValueError, match="did not complete"):
        merge([_run(tmp_path, "c", 1, {"oracle": 1.0}, complete=False)])
    with pytest.raises(ValueError, match="same systems"):
        merge([first, _run(tmp_path, "d", 1, {"oracle": 1.0})])
    no_seed = tmp_path / "e.json"
    no_seed.write_text(json.dumps({"command": "memsplice bench online", "complete": True, "recall": {}}))
    with pytest.raises(ValueError, match="no --seed"):
        merge([str(no_seed)])


def test_refuses_a_run_its_time_budget_cut_short_even_when_marked_complete(tmp_path):
    """Runs recorded before "episodes_planned" was kept said complete when only lengths were counted: their
    episodes are checked against the command's --examples."""
    merge = _script().merge
    for name, length, command in (
        ("old", {"episodes": 3}, "--examples 4"),
        ("new", {"episodes": 1, "episodes_planned": 2}, "--examples 2"),
    ):
        path = tmp_path / f"{name}.json"
        path.write_text(
            json.dumps(
                {
                    "command": f"memsplice bench online --part recall --seed 0 {command}",
                    "complete": True,
                    "recall": {"16384": {"oracle": 1.0}},
                    "lengths": {"16384": length},
                }
            )
        )
        with pytest.raises(ValueError, match="did not complete"):
            merge([str(path)])
    whole = tmp_path / "whole.json"
    whole.write_text(path.read_text().replace('"episodes": 1', '"episodes": 2'))
    assert merge([str(whole)])["recall"]["16384"] == {"oracle": 1.0}
