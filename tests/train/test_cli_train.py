"""`memsplice train` from the command line: the CPU smoke config end to end, errors, and torchrun on two CPU ranks."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

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
    # some machines is not reachable, and a fixed port may belong to another run on the same host.
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "MEMSPLICE_DIST_TIMEOUT_S": "120",
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
    done = _run_group(cmd, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["throughput"]["world_size"] == 2
    assert (out / "memory" / "memsplice_config.json").is_file()


def _run_group(cmd, *, env, cwd, timeout):
    """Run `cmd` in its own process group; past `timeout` kill the whole group (torchrun and its workers) and fail
    with what it printed, so a hang shows where it stopped."""
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(
            f"torchrun still running after {timeout} s\nstdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-4000:]}"
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
