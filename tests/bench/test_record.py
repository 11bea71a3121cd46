"""Provenance of saved results: the commit a result is recorded against."""

import subprocess

from memsplice.bench.record import git_commit, save_result


def test_the_commit_named_by_the_environment_wins_over_the_checkouts(monkeypatch, tmp_path):
    # a tree copied to another machine may carry a stale .git; the sender names the commit
    monkeypatch.setenv("MEMSPLICE_COMMIT", "abc123def456")
    assert git_commit() == "abc123def456"
    path = save_result("probe", {"x": 1}, device="cpu", directory=tmp_path)
    assert '"commit": "abc123def456"' in path.read_text()


def test_without_it_the_commit_comes_from_git(monkeypatch):
    monkeypatch.delenv("MEMSPLICE_COMMIT", raising=False)
    head = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert git_commit().removesuffix("-dirty") == (head or "unknown")
