"""The two background workers of the server: the inference worker and the online-learning worker.

`InferenceWorker` is the only thread that touches the model: every job that runs the reasoner or the memory
encoder (generation, memory writes, weight swaps) is queued to it and runs to completion before the next starts,
so concurrent requests can never interleave inside the model or see each other's memory. Store operations do not
go through it and run concurrently.

`OnlineWorker` trains the memory from queued turns in its own thread, on its own copy of the memory weights, and
hands finished weights to the inference worker as one job (a request sees the old weights or the new ones, never a
mix), then has the learner save its own state (`persist`, when it has one). It never blocks a request: it takes no
lock a request waits on, and its queue lives in the store, so queued training data survives a restart and is deleted
with its scope. Forgetting a scope is done on the worker's thread between updates (a learner is never touched by two
threads); the caller gets a future to await, which completes once the learner no longer holds the scope.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class InferenceWorker:
    """One thread running model jobs in submission order."""

    def __init__(self, name: str = "memsplice-inference"):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = False

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return self._pending

    def submit(self, fn: Callable[..., Any], *args, **kwargs) -> concurrent.futures.Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("the inference worker is shut down")
            self._pending += 1
        future = self._pool.submit(fn, *args, **kwargs)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future) -> None:
        with self._lock:
            self._pending -= 1

    async def run(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run `fn(*args, **kwargs)` on the worker thread and await its result."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def shutdown(self, wait: bool = True) -> None:
        """Refuse new jobs; with `wait`, finish every job already queued."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=wait)


class OnlineLearner(Protocol):
    """What the online worker drives: one update step of the memory from new samples and replayed ones.

    Optional members, used when present: `forget(scope) -> int` (drop what the learner holds of a deleted scope),
    `persist()` (save the learner's state; called after each update and each forget) and `keeps_replay = True`
    (the learner replays from its own store: the worker neither fetches nor keeps store replay for it).
    """

    def update(self, samples: list[dict], replay: list[dict]) -> dict[str, float]:
        """Train on `samples` (new turns) and `replay` (older ones); return metrics such as {"loss": ...}."""

    def state_dict(self) -> dict:
        """The trained memory weights, as `MemoryModel.state_dict()` gives them."""


class OnlineWorker:
    """Takes queued samples from the store, runs `learner.update`, swaps the weights in, records metrics."""

    def __init__(
        self,
        store,
        learner: OnlineLearner,
        swap_weights: Callable[[dict], None],
        *,
        batch_size: int = 8,
        replay_size: int | None = None,
        replay_capacity: int = 10_000,
        interval_s: float = 5.0,
        on_update: Callable[[dict], None] | None = None,
    ):
        self.store = store
        self.learner = learner
        self.swap_weights = swap_weights
        self.batch_size = batch_size
        self.replay_size = batch_size if replay_size is None else replay_size
        self.replay_capacity = replay_capacity
        self.interval_s = interval_s
        self.on_update = on_update
        self.step = store.last_step()
        self.errors = 0
        self.last_error: str | None = None
        self.last_update: float | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._forgotten: set[str] = set()
        self._forget_requests: list[tuple[str, concurrent.futures.Future]] = []
        self._forget_lock = threading.Lock()

    def start(self) -> None:
        released = self.store.release_training()  # items a crashed process had taken go back in the queue
        if released:
            logger.info("online worker: %d queued samples taken before a restart were put back", released)
        self._thread = threading.Thread(target=self._loop, name="memsplice-online", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """New samples were queued: do not wait for the interval."""
        self._wake.set()

    def forget(self, scope: str) -> concurrent.futures.Future:
        """A scope was deleted: drop its samples from the update in flight (the store rows are already gone) and
        have the learner forget it. The future completes (with the number of items the learner dropped) once the
        learner holds nothing of the scope and has saved that, i.e. after the update in flight, if any."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._forget_lock:
            self._forgotten.add(scope)
            self._forget_requests.append((scope, future))
        if self._thread is not None and self._thread.is_alive():
            self._wake.set()
        else:  # no thread to do it (not started, or stopped): nothing can be in flight, do it here
            self._apply_forgets()
        return future

    def _apply_forgets(self) -> None:
        with self._forget_lock:
            requests, self._forget_requests = self._forget_requests, []
        if not requests:
            return
        forget = getattr(self.learner, "forget", None)
        persist = getattr(self.learner, "persist", None)
        try:
            dropped = [forget(scope) if forget is not None else 0 for scope, _ in requests]
            if persist is not None and any(dropped):
                persist()
        except BaseException as e:
            for _, future in requests:
                future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            logger.exception("online worker: forgetting a scope failed")
            return
        for (_, future), n in zip(requests, dropped, strict=True):
            future.set_result(n)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the update in flight (its weights are swapped in and saved), then stop."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._apply_forgets()  # a forget that arrived as the thread was leaving

    def status(self) -> dict:
        return {
            "running": bool(self._thread and self._thread.is_alive()),
            "step": self.step,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_update": self.last_update,
            "queued": self.store.queued_training(),
            "learner": self.learner.status() if hasattr(self.learner, "status") else None,
        }

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._apply_forgets()
            try:
                did = self.run_once()
            except Exception as e:  # the worker must outlive a bad batch; the error is counted and shown
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                logger.exception("online update failed")
                did = False
            self._apply_forgets()  # before sleeping, so a deletion during the update is not kept waiting
            if not did:
                self._wake.wait(self.interval_s)
                self._wake.clear()
        self._apply_forgets()

    def run_once(self) -> bool:
        """One update if samples are queued; False when the queue was empty."""
        with self._forget_lock:
            self._forgotten.clear()
        items = self.store.take_training(self.batch_size)
        if not items:
            return False
        ids = [it["id"] for it in items]
        try:
            replay = self.store.replay(self.replay_size) if self.replay_size else []
            with self._forget_lock:
                gone = set(self._forgotten)
            samples = [
                {**it["payload"], "scope": it["scope_id"]} for it in items if it["scope_id"] not in gone
            ]
            replayed = [{**r["payload"], "scope": r["scope_id"]} for r in replay if r["scope_id"] not in gone]
            t0 = time.perf_counter()
            metrics = self.learner.update(samples, replayed) if samples else {}
            self.swap_weights(self.learner.state_dict())
            persist = getattr(self.learner, "persist", None)
            if persist is not None:
                persist()
            metrics = {**metrics, "update_s": time.perf_counter() - t0, "samples": float(len(samples))}
        except BaseException:
            self.store.release_training(ids)
            raise
        self.step += 1
        with self._forget_lock:
            gone = set(self._forgotten)
        keep = [(it["scope_id"], it["payload"]) for it in items if it["scope_id"] not in gone]
        self.store.finish_training(ids, keep, self.replay_capacity, metrics, self.step)
        self.last_update = time.time()
        if self.on_update is not None:
            self.on_update(metrics)
        return True
