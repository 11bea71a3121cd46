"""Process-group settings read from the environment."""

import datetime

import pytest

from memsplice.train import distributed


def test_collective_timeout_from_environment(monkeypatch):
    monkeypatch.delenv("MEMSPLICE_DIST_TIMEOUT_S", raising=False)
    assert distributed._timeout() == datetime.timedelta(minutes=30)
    monkeypatch.setenv("MEMSPLICE_DIST_TIMEOUT_S", "120")
    assert distributed._timeout() == datetime.timedelta(seconds=120)
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv("MEMSPLICE_DIST_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="MEMSPLICE_DIST_TIMEOUT_S"):
            distributed._timeout()


def test_single_process_needs_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.init_distributed("cpu")
    assert not info.distributed and info.is_main and info.backend is None
