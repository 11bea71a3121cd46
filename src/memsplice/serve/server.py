"""Building a `MemoryService` from a `ServeConfig`, and running it under uvicorn (in the foreground or a thread).

Memory weights on startup, first match wins:
1. `<data_dir>/memory/` (what this server served before: a restart resumes with the same weights),
2. `--checkpoint DIR`, else the checkpoint shipped for this reasoner (`memsplice.checkpoints`), else a fresh,
   untrained memory seeded with `seed`; whichever it is, it is saved to `<data_dir>/memory/` atomically, so every
   restart serves the same weights.
A checkpoint trained for another reasoner is refused.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Iterator

import torch

from ..memory import MemoryModel
from ..memory.config import CONFIG_NAME
from ..store import MemoryStore
from .config import ServeConfig
from .service import MemoryService

logger = logging.getLogger(__name__)


def load_memory(config: ServeConfig, reasoner) -> MemoryModel:
    weights = config.weights_dir
    if (weights / CONFIG_NAME).is_file():
        logger.info("resuming memory weights from %s", weights)
        return MemoryModel.from_pretrained(weights, reasoner=reasoner)
    from ..checkpoints import load_memory as load_checkpoint

    torch.manual_seed(config.seed)  # only an untrained memory draws random numbers here
    memory = load_checkpoint(reasoner, config.checkpoint)
    memory.save_pretrained(weights)
    logger.info("memory weights from %s saved to %s", config.checkpoint or "the default checkpoint", weights)
    return memory


def build_learner(config: ServeConfig, memory: MemoryModel):
    """The online learner over a copy of the serving weights, or None when online learning is off."""
    if not config.online_learning:
        return None
    from .online import build_online_learner

    return build_online_learner(memory, config)


def build_service(config: ServeConfig, reasoner=None) -> MemoryService:
    """Load the reasoner (unless given), the memory weights and the store, as `config` says."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    if reasoner is None:
        from ..reasoner import load_reasoner

        reasoner = load_reasoner(config.reasoner, device=config.device, dtype=config.dtype)
    memory = load_memory(config, reasoner)
    memory.set_refine_steps(config.memory_refine_steps)
    store = MemoryStore(config.store_url, sqlite_synchronous=config.sqlite_synchronous)
    if config.auth and store.count_live_keys() == 0:
        store.close()
        raise PermissionError(
            "auth is on but the store holds no API key: create one with `memsplice serve keys add "
            "NAME --scope PATTERN` (same --data-dir/--database-url), or run with --no-auth on "
            "loopback"
        )
    return MemoryService(
        memory, store, config, learner=build_learner(config, memory), weights_dir=config.weights_dir
    )


def uvicorn_server(app, config: ServeConfig):
    import uvicorn

    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=config.graceful_timeout_s,
            lifespan="on",
        )
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, config: ServeConfig, timeout: float = 30.0) -> Iterator[str]:
    """Run `app` under uvicorn in a background thread; yields its base URL and shuts it down gracefully after."""
    if config.port == 0:
        config.port = free_port(config.host)
    server = uvicorn_server(app, config)
    server.install_signal_handlers = lambda: None  # signals belong to the main thread
    thread = threading.Thread(target=server.run, name="memsplice-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{config.host}:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
