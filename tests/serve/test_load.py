"""The load benchmark, bounded and on loopback: concurrent clients, no errors, no acknowledged write lost."""

from __future__ import annotations

import pytest
from tests.serve.harness import Harness, live

from memsplice.bench.serve import percentile, run_load


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile(list(range(101)), 99) == 99


def _load(tmp_path, clients: int, requests: int) -> dict:
    h = Harness(tmp_path)
    with live(h) as url:
        result = run_load(url, h.admin_key, clients=clients, requests=requests, max_tokens=4)
        # the benchmark's own check, repeated against the store: every acknowledged turn is there
        scopes = {s["id"] for s in h.store.list_scopes()}
    assert scopes == {f"bench-{c:03d}" for c in range(clients)}
    return result


def test_small_load(tmp_path):
    result = _load(tmp_path, clients=8, requests=4)
    assert result["errors"] == 0, result["error_samples"]
    assert result["lost_writes"] == 0
    assert result["acknowledged_writes"] == 8 * 4 and result["requests"] == 32
    assert result["rps"] > 0 and result["p50_ms"] <= result["p99_ms"]


@pytest.mark.slow
def test_fifty_clients(tmp_path):
    result = _load(tmp_path, clients=50, requests=6)
    assert result["errors"] == 0, result["error_samples"]
    assert result["lost_writes"] == 0 and result["acknowledged_writes"] == 300
