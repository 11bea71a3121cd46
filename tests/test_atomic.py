"""`atomic_directory`: the new directory appears whole or not at all, and a failure leaves the old one intact."""

import pytest

from memsplice.atomic import atomic_directory


def _entries(path):
    return sorted(p.name for p in path.iterdir())


def test_replaces_an_existing_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_directory(target) as tmp:
        (tmp / "b").write_text("2")
    assert _entries(target) == ["b"]
    assert _entries(tmp_path) == ["ckpt"]  # no temp or moved-aside copy left behind


def test_keep_existing_discards_the_new_copy(tmp_path):
    target = tmp_path / "cache"
    with atomic_directory(target) as tmp:
        (tmp / "first").write_text("1")
    with atomic_directory(target, keep_existing=True) as tmp:
        (tmp / "second").write_text("2")
    assert _entries(target) == ["first"]
    assert _entries(tmp_path) == ["cache"]


def test_a_failure_leaves_the_old_directory_and_no_temp(tmp_path):
    target = tmp_path / "state"
    with atomic_directory(target) as tmp:
        (tmp / "old").write_text("1")
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target) as tmp:
        (tmp / "new").write_text("2")
        raise RuntimeError("boom")
    assert _entries(target) == ["old"]
    assert _entries(tmp_path) == ["state"]
