"""scripts/formation/error_profile.py: the breakdown of reconstruction misses counts what it says."""

import torch

from helpers import load_script


def test_profile_breaks_misses_down_by_span_offset_frequency_and_floor():
    profile = load_script("formation/error_profile.py").profile
    passages = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [1, 1, 2, 2, 3, 3, 4, 4]])
    hits = torch.ones(2, 8, dtype=torch.bool)
    hits[:, 7] = False  # the last token of each passage is lost
    floor = torch.zeros(2, 8, dtype=torch.bool)
    floor[0, :2] = True
    counts = torch.zeros(10, dtype=torch.long)
    counts[8] = 5  # token 8 is the rare one
    counts[:8] = 50_000
    out = profile(hits, floor, passages, counts, slots=4)  # 2 tokens per slot
    assert out["accuracy"] == round(14 / 16, 4) and out["floor_accuracy"] == round(2 / 16, 4)
    assert [s["accuracy"] for s in out["by_slot_span"]] == [1.0, 1.0, 1.0, 0.5]
    assert [s["tokens"] for s in out["by_offset_in_span"]] == [8, 8]
    assert out["by_offset_in_span"][1]["accuracy"] == 0.75
    assert out["by_floor"]["floor_right"] == {"tokens": 2, "accuracy": 1.0}
    assert out["by_train_count"]["[0, 10)"] == {"tokens": 1, "accuracy": 0.0}
    assert out["by_train_count"]["[10000, 100000)"]["tokens"] == 15
    assert out["by_train_count"]["[10, 100)"] == {"tokens": 0, "accuracy": None}
