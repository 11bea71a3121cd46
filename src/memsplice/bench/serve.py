"""`memsplice bench serve`: concurrent clients against a live `memsplice serve` on loopback.

The benchmark starts the server as a subprocess (its own process, as in production) with a fresh data directory
and one API key, then runs `--clients` concurrent clients, each sending `--requests` requests to its own scope:
even-numbered requests write a memory turn (POST /v1/memory/scopes/{scope}/turns), odd-numbered ones are chat
completions with memory (`user` = the scope, greedy, `--max-tokens` tokens, which also write the exchange).
Afterwards every turn the server acknowledged is looked up in the scope's transcript; one that is missing counts
as a lost write. Reported: requests per second over the whole run, latency percentiles (all requests and per
kind), errors (non-2xx or transport failures) and lost writes. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

RESULT_NAME = "serve_load"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reasoner",
        default=None,
        metavar="SRC",
        help="reasoner the server loads (default: SmolLM2-135M-Instruct); a small transformers "
        "directory makes a fast smoke run",
    )
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="memory checkpoint for the server")
    p.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    p.add_argument("--requests", type=int, default=10, help="requests per client (default 10)")
    p.add_argument(
        "--max-tokens",
        dest="max_tokens",
        type=int,
        default=8,
        help="tokens generated per chat request (default 8)",
    )
    p.add_argument("--device", default="cpu", help="device of the server's model (default cpu)")
    p.add_argument(
        "--torch-threads",
        dest="torch_threads",
        type=int,
        default=None,
        help="CPU threads of the server's torch",
    )
    p.add_argument(
        "--database-url",
        dest="database_url",
        default=None,
        help="store URL (default: SQLite in a temporary data directory)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument(
        "--no-save", dest="save", action="store_false", help="print only; do not write benchmarks/results"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


# -- the server ----------------------------------------------------------------------------------------------------
def server_command(
    data_dir: str | Path,
    port: int,
    *,
    reasoner: str | None = None,
    checkpoint: str | None = None,
    device: str | None = "cpu",
    database_url: str | None = None,
    torch_threads: int | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "memsplice.cli.main",
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--log-level",
        "warning",
    ]
    for flag, value in (
        ("--reasoner", reasoner),
        ("--checkpoint", checkpoint),
        ("--device", device),
        ("--database-url", database_url),
        ("--torch-threads", torch_threads),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + list(extra or [])


def create_key(data_dir: str | Path, database_url: str | None = None, scope: str = "*") -> str:
    cmd = [sys.executable, "-m", "memsplice.cli.main", "serve", "keys", "--data-dir", str(data_dir)]
    if database_url:
        cmd += ["--database-url", database_url]
    out = subprocess.run([*cmd, "add", "bench", "--scope", scope], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the server at {url} was not ready within {timeout:.0f} s")


@contextlib.contextmanager
def spawn_server(
    cmd: list[str],
    port: int,
    *,
    log_path: str | Path | None = None,
    env: dict | None = None,
    ready_timeout: float = 180.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run `cmd` (a `memsplice serve` command) as a subprocess; yields (base URL, process); SIGTERM on exit."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, ready_timeout)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log is not subprocess.DEVNULL:
            log.close()


# -- the clients ---------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def _client(
    c: int, base: str, key: str, model: str, n: int, max_tokens: int, timeout: float, out: dict
):
    import httpx

    scope = f"bench-{c:03d}"
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout) as http:
        for i in range(n):
            kind = "write" if i % 2 == 0 else "chat"
            text = f"client {c} fact {i}: the code word is w{c}x{i}."
            t0 = time.perf_counter()
            try:
                if kind == "write":
                    r = await http.post(
                        f"/v1/memory/scopes/{scope}/turns",
                        json={"turns": [{"role": "user", "content": text}]},
                    )
                else:
                    r = await http.post(
                        "/v1/chat/completions",
                        json={
                            "model": model,
                            "user": scope,
                            "max_tokens": max_tokens,
                            "temperature": 0,
                            "messages": [{"role": "user", "content": text}],
                        },
                    )
                ok = r.status_code == 200
                error = None if ok else f"{r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as e:
                ok, error = False, f"{type(e).__name__}: {e}"
            out["latency"][kind].append(time.perf_counter() - t0)
            if ok:
                out["acknowledged"].setdefault(scope, []).append(text)
            else:
                out["errors"].append(error)


async def _verify(base: str, key: str, acknowledged: dict[str, list[str]], timeout: float) -> int:
    import httpx

    lost = 0
    async with httpx.AsyncClient(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
    ) as http:
        for scope, texts in acknowledged.items():
            r = await http.get(f"/v1/memory/scopes/{scope}/spans", params={"limit": 10_000})
            r.raise_for_status()
            present = {s["text"] for s in r.json()["data"] if s["role"] == "user"}
            lost += sum(t not in present for t in texts)
    return lost


def run_load(
    base: str, key: str, *, clients: int, requests: int, max_tokens: int = 8, timeout: float = 600.0
) -> dict:
    """Run the load against a live server; returns the numbers (see the module docstring)."""
    import httpx

    model = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    model = model["data"][0]["id"]
    out: dict = {"latency": {"write": [], "chat": []}, "acknowledged": {}, "errors": []}

    async def main():
        t0 = time.perf_counter()
        await asyncio.gather(
            *[_client(c, base, key, model, requests, max_tokens, timeout, out) for c in range(clients)]
        )
        wall = time.perf_counter() - t0
        lost = await _verify(base, key, out["acknowledged"], timeout)
        return wall, lost

    wall, lost = asyncio.run(main())
    every = out["latency"]["write"] + out["latency"]["chat"]
    ms = lambda xs, q: None if not xs else round(1000 * percentile(xs, q), 2)  # noqa: E731
    return {
        "clients": clients,
        "requests": clients * requests,
        "max_tokens": max_tokens,
        "wall_s": round(wall, 3),
        "rps": round(len(every) / wall, 2),
        "p50_ms": ms(every, 50),
        "p90_ms": ms(every, 90),
        "p99_ms": ms(every, 99),
        "write_p50_ms": ms(out["latency"]["write"], 50),
        "write_p99_ms": ms(out["latency"]["write"], 99),
        "chat_p50_ms": ms(out["latency"]["chat"], 50),
        "chat_p99_ms": ms(out["latency"]["chat"], 99),
        "errors": len(out["errors"]),
        "error_samples": out["errors"][:5],
        "acknowledged_writes": sum(len(v) for v in out["acknowledged"].values()),
        "lost_writes": lost,
    }


def run(args) -> int:
    from memsplice.bench.record import save_result, update_summary
    from memsplice.serve.server import free_port

    if args.clients < 1 or args.requests < 1:
        raise ValueError("--clients and --requests must be positive")
    data_dir = tempfile.mkdtemp(prefix="memsplice-bench-serve-")
    try:
        key = create_key(data_dir, args.database_url)
        port = free_port()
        cmd = server_command(
            data_dir,
            port,
            reasoner=args.reasoner,
            checkpoint=args.checkpoint,
            device=args.device,
            database_url=args.database_url,
            torch_threads=args.torch_threads,
        )
        with spawn_server(cmd, port, log_path=Path(data_dir) / "server.log") as (url, _proc):
            import httpx

            info = httpx.get(
                f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30
            ).json()
            load_before = os.getloadavg()[0]
            result = run_load(
                url,
                key,
                clients=args.clients,
                requests=args.requests,
                max_tokens=args.max_tokens,
                timeout=args.timeout,
            )
            # Clients and server share the machine, and so may other work: the load average says how busy it was.
            result["load_avg_1m"] = {
                "start": round(load_before, 2),
                "end": round(os.getloadavg()[0], 2),
                "cpus": os.cpu_count(),
            }
        result["reasoner"] = info["data"][0]["memsplice"]["reasoner"]
        result["store"] = "postgresql" if (args.database_url or "").startswith("postgres") else "sqlite"
        result["server_device"] = args.device
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{result['clients']} clients x {args.requests} requests ({result['reasoner']}, {result['store']}): "
            f"{result['rps']} req/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
            f"errors {result['errors']}, lost writes {result['lost_writes']}"
        )
    if args.save:
        path = save_result(RESULT_NAME, result, device=args.device)
        update_summary(
            "serve",
            {
                k: result[k]
                for k in (
                    "rps",
                    "p50_ms",
                    "p99_ms",
                    "errors",
                    "lost_writes",
                    "clients",
                    "requests",
                    "reasoner",
                )
            },
            device=args.device,
        )
        print(f"saved {path}", file=sys.stderr if args.json else sys.stdout)  # --json: stdout is JSON
    return 1 if result["errors"] or result["lost_writes"] else 0
