"""`memsplice train` from the command line: the CPU smoke config end to end, errors, and torchrun on two CPU ranks."""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from formation_helpers import save_tiny_reasoner
from memsplice.cli.main import main
from memsplice.serve.server import free_port
from memsplice.train import TrainConfig

ROOT = Path(__file__).parents[2]
SMOKE = ROOT / "configs" / "tiny-cpu.yaml"


def _args(corpus, reasoner_dir, output, *extra):
    return [
        "train",
        "--config",
        str(SMOKE),
        "--reasoner",
        str(reasoner_dir),
        "--data",
        str(corpus),
        "--output",
        str(output),
        "--quiet",
        "--set",
        "data.sources=[tinyshakespeare, gutenberg-nltk]",
        "--set",
        f"data.cache_dir={output}-cache",
        *extra,
    ]


def test_smoke_config_runs_and_resumes(corpus, tmp_path, capsys):
    reasoner_dir = save_tiny_reasoner(tmp_path / "reasoner")
    out = tmp_path / "run"
    assert main(_args(corpus, reasoner_dir, out)) == 0
    steps = TrainConfig.from_yaml(SMOKE).run.steps
    summary = json.loads(capsys.readouterr().out)
    assert summary["finished"] and summary["step"] == steps
    assert (out / "memory" / "memsplice_config.json").is_file() and (out / "curves.png").is_file()
    # a resume of a finished run trains nothing more and keeps the result
    assert main(_args(corpus, reasoner_dir, out, "--resume")) == 0
    assert json.loads(capsys.readouterr().out)["step"] == steps


def test_bad_flags_give_one_line_errors(corpus, tmp_path, capsys):
    reasoner_dir = save_tiny_reasoner(tmp_path / "reasoner")
    assert main(_args(corpus, reasoner_dir, tmp_path / "x", "--set", "optim.lr=-1")) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no training config" in capsys.readouterr().err
    assert main(_args(corpus, reasoner_dir, tmp_path / "y", "--continue-schedule")) == 2
    assert "--init-from" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_cpu_ranks(corpus, tmp_path):
    reasoner_dir = save_tiny_reasoner(tmp_path / "reasoner")
    out = tmp_path / "ddp"
    # Loopback only, on a port nobody holds: gloo otherwise binds the address the host name resolves to, which on
    # some machines is not reachable, and a fixed port may belong to another run on the same host. Faulthandler
    # lets a hung process print its stacks on SIGABRT; LOGLEVEL=INFO makes torchrun's agent say what it waits for.
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "MEMSPLICE_DIST_TIMEOUT_S": "120",
        "PYTHONFAULTHANDLER": "1",
        "LOGLEVEL": "INFO",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "memsplice.cli.main",
        *_args(corpus, reasoner_dir, out),
    ]
    done = _run_launcher(cmd, env=env, cwd=tmp_path, timeout=300, grace=60)
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    if done.hung_launcher_only and summary and summary["finished"]:
        # Both ranks trained, wrote their results and exited; only torchrun's own agent process stayed up.
        pytest.skip(
            f"both ranks finished and exited, but torchrun's launcher did not exit within {done.grace} s after them "
            f"(a launcher hang, not memsplice's); launcher log tail: {done.stderr[-1500:]!r}"
        )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-6000:]}"
    assert summary and summary["finished"] and summary["throughput"]["world_size"] == 2
    assert (out / "memory" / "memsplice_config.json").is_file()


@dataclasses.dataclass
class _LauncherRun:
    returncode: int | None
    stdout: str
    stderr: str
    hung_launcher_only: bool
    """The launcher was still running `grace` seconds after every process it started had exited."""
    grace: float


def _run_launcher(cmd, *, env, cwd, timeout, grace) -> _LauncherRun:
    """Run a launcher (torchrun) and everything it starts, with output in files rather than pipes.

    torchrun starts each worker in a session of its own, so killing the launcher's process group leaves the workers
    running, and a pipe they hold would block the reader forever. Here every descendant is tracked while it runs; on
    a hang the live ones get SIGABRT first (faulthandler prints their stacks into the log), then SIGKILL, and the
    logs are returned. A launcher still up `grace` s after all its workers exited counts as a launcher-only hang.
    """
    logs = Path(cwd) / "launcher-stdout.txt", Path(cwd) / "launcher-stderr.txt"
    with logs[0].open("w") as so, logs[1].open("w") as se:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=so, stderr=se, start_new_session=True)
    launcher = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + timeout
    workers_gone_at = None
    hung_launcher_only = False
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            for child in launcher.children(recursive=True):
                seen.setdefault(child.pid, child)
        alive = [p for p in seen.values() if _running(p)]
        now = time.monotonic()
        if seen and not alive:
            workers_gone_at = workers_gone_at or now
            if now - workers_gone_at > grace:
                hung_launcher_only = True
                break
        if now > deadline:
            break
        time.sleep(0.5)
    if proc.poll() is None:
        stuck = [p for p in seen.values() if _running(p)] + [launcher]
        for p in stuck:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGABRT)
        psutil.wait_procs(stuck, timeout=10)
        for p in stuck:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        returncode = None
    else:
        returncode = proc.returncode
    return _LauncherRun(
        returncode=returncode,
        stdout=logs[0].read_text(errors="replace"),
        stderr=logs[1].read_text(errors="replace"),
        hung_launcher_only=hung_launcher_only,
        grace=grace,
    )


def _running(p) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
