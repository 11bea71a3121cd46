"""Helpers of the server tests: a tiny random reasoner with a small memory, a fresh store, keys, live servers."""

from __future__ import annotations

import contextlib

import torch
from sqlalchemy import select
from tests.tiny import tiny_reasoner, tiny_tokenizer

from memsplice.memory import MemoryConfig, MemoryModel
from memsplice.serve import MemoryService, ServeConfig, create_app
from memsplice.serve.server import serve_in_thread
from memsplice.store import MemoryStore
from memsplice.store.schema import metadata

SMALL_MEMORY = dict(num_slots=4, max_memory_tokens=96, encoder_layers=1, encoder_width=32, encoder_heads=2)


def small_memory(seed: int = 0, **overrides) -> MemoryModel:
    reasoner = tiny_reasoner()
    torch.manual_seed(seed)
    return MemoryModel(MemoryConfig(**{**SMALL_MEMORY, **overrides}), reasoner)


def save_tiny_reasoner(directory) -> str:
    """The tiny reasoner as a transformers directory, for servers started from the command line."""
    reasoner = tiny_reasoner()
    reasoner.model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return str(directory)


def process_setup(tmp_path) -> dict:
    """What `memsplice serve` as a process needs: the tiny reasoner and a small memory saved to disk, a data
    directory whose store holds one key for every scope, and a log path."""
    reasoner = save_tiny_reasoner(tmp_path / "reasoner")
    checkpoint = tmp_path / "checkpoint"
    small_memory().save_pretrained(checkpoint)
    data = tmp_path / "data"
    store = MemoryStore(f"sqlite:///{data / 'memsplice.db'}")
    key = store.create_key("writer", ["*"])
    store.close()
    return {
        "reasoner": reasoner,
        "checkpoint": str(checkpoint),
        "data": data,
        "key": key,
        "log": tmp_path / "server.log",
    }


def snapshot(store: MemoryStore) -> dict:
    """Every row of every memsplice table (to show that a refused request wrote nothing)."""
    with store.engine.connect() as conn:
        return {t.name: [tuple(r) for r in conn.execute(select(t))] for t in metadata.sorted_tables}


class Harness:
    def __init__(self, tmp_path, memory: MemoryModel | None = None, **config):
        self.tmp_path = tmp_path
        self.memory = memory or small_memory()
        self.url = f"sqlite:///{tmp_path / 'memsplice.db'}"
        self.store = MemoryStore(self.url)
        self.key = self.store.create_key("alice-app", ["alice", "alice:*"])
        self.bob_key = self.store.create_key("bob-app", ["bob"])
        self.admin_key = self.store.create_key("admin", ["*"])
        config.setdefault("data_dir", str(tmp_path))
        config.setdefault("log_format", "text")
        self.config = ServeConfig(**config)
        self.service = MemoryService(self.memory, self.store, self.config)
        self.app = create_app(self.service)
        self.model = self.service.model_id

    def headers(self, key: str | None = None) -> dict:
        return {"Authorization": f"Bearer {key or self.key}"}


@contextlib.contextmanager
def live(harness: Harness):
    harness.config.port = 0
    with serve_in_thread(harness.app, harness.config) as url:
        yield url
