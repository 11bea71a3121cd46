"""`MemoryService`: chat with per-scope memory, memory writes, inspection, export/import and deletion.

This is the server without HTTP: routes in `app.py` only parse, authenticate and format. It holds the library
objects (the serving `MemoryModel` and its frozen reasoner), a `MemoryStore`, the inference worker and, when
enabled, the online-learning worker.

Guarantees:
- Isolation: a chat request splices only a `MemoryKV` built, for that request, from the latents of its own scope
  (`ScopeMemory.memory_kv`); all model work runs on the single inference worker, so no two requests share a cache,
  a gate or a half-written state.
- Per scope, requests are serialised by a lock (read, generate, write, commit), so the RAM copy of a scope's memory
  and its stored state never diverge; different scopes proceed concurrently in the store.
- A memory write is acknowledged (the call returns) only after the store committed its spans, state, fallback
  events and training data in one transaction. If anything fails before, the RAM copy is dropped and reloaded
  from the store, so what a reader sees is always what was committed.
- Deleting a scope removes its rows from every store table, its RAM copy, its pending fallback events, its events
  in the memory's fallback log, its samples in the online update in flight and, with online learning, everything
  the learner holds of it (buffer, replay reservoir, fallback inputs) and its saved state: the deletion returns
  after the learner forgot the scope (after an update in flight, if one is running; other requests never wait).
- Greedy requests (temperature 0) decode on `GreedyDecoder` (`engine: auto`) with the tokens, text, usage and
  finish_reason of transformers' greedy `generate()`; engines, one per cache size, are made lazily and used only on
  the inference worker. Sampling, requests beyond the reasoner's window and `engine: eager` use `generate()`.
- With online learning, the learner trains on its own copy of the memory weights; the serving weights change only
  in one inference-worker job between requests, so no request reads half-updated weights, and fallback events of
  the new weights are recorded under the scope that wrote the memory, as before.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..conversation import picks_by_address
from ..engine import DecoderPool, GreedyDecoder, loaded_slots, plain_greedy
from ..inject.memory_kv import MemoryKV
from ..memory.model import MemoryModel
from ..memory.readback import readback_decoders, require_read_back, with_recalled
from ..memory.safety import FallbackEvent
from ..store import MemoryStore, ScopeExistsError
from .config import ServeConfig
from .metrics import ServerMetrics
from .online import load_weights, training_sample
from .schemas import APIError, ChatCompletionRequest
from .scope_memory import ScopeMemory, weights_digest
from .worker import InferenceWorker, OnlineLearner, OnlineWorker

logger = logging.getLogger(__name__)


class KeyedLocks:
    """One asyncio lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self):
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def __call__(self, key: str):
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


@dataclass
class GenerationParams:
    max_new_tokens: int
    temperature: float
    top_p: float | None
    stop: list[str]
    seed: int | None


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    memory: dict = field(default_factory=dict)


class _Flag(StoppingCriteria):
    """Stops generation when an event is set (a stop string was produced, or the client went away)."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids, scores, **kwargs):
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class TextStream(BaseStreamer):
    """Turns generated token ids into text deltas: holds back a possible stop-string prefix and incomplete UTF-8,
    cuts the text at the first stop string and then asks generation to stop."""

    def __init__(self, tokenizer, stop: list[str], sink: Callable[[str], None] | None):
        self.tokenizer, self.stop, self.sink = tokenizer, stop, sink
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = threading.Event()
        self._prompt_seen = False
        self._hold = max((len(s) for s in stop), default=1) - 1

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() hands the prompt over first
            self._prompt_seen = True
            return
        self.put_ids(value.reshape(-1).tolist())

    def put_ids(self, ids: list[int]) -> None:
        """Generated ids, without the prompt (what `GreedyDecoder`'s `on_token` hands over)."""
        if self.stopped.is_set():
            return
        self.ids.extend(ids)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped.set()
            self._emit(len(self.text))
            return
        if self.text.endswith("\ufffd"):
            return
        self._emit(len(self.text) - self._hold)

    def end(self) -> None:
        if not self.text.endswith("\ufffd") or self.stopped.is_set():
            self._emit(len(self.text))
        else:
            self.text = self.text.rstrip("\ufffd")
            self._emit(len(self.text))

    def _emit(self, upto: int) -> None:
        if upto > self.sent:
            delta = self.text[self.sent : upto]
            self.sent = upto
            if self.sink is not None:
                self.sink(delta)


def kv_digest(kv: MemoryKV | None) -> str | None:
    """sha256 of every tensor a request splices (keys, values, gate bias, live flags)."""
    if kv is None:
        return None
    h = hashlib.sha256()
    for t in [*kv.keys, *kv.values, kv.gate_bias, kv.live]:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _event_dict(event: FallbackEvent) -> dict:
    return event.to_dict()


def last_user_message(messages: list[dict]) -> str | None:
    """The text of the request's last user message (what a chat writes into memory and what picks the chunks it
    reads), or None when it has none."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), None)


class MemoryService:
    def __init__(
        self,
        memory: MemoryModel,
        store: MemoryStore,
        config: ServeConfig | None = None,
        *,
        learner: OnlineLearner | None = None,
        weights_dir: str | Path | None = None,
    ):
        self.memory = memory
        self.reasoner = memory.reasoner
        self.store = store
        self.config = config or ServeConfig()
        if self.config.memory_read_back:
            require_read_back(memory, "memory_read_back")
        self._prefix_kv: MemoryKV | None = None
        """The reading prefix's K/V (`memory_reading_prefix`), in front of prompts that carry read-back text."""
        if self.config.memory_reading_prefix:
            from ..checkpoints import load_reading_prefix

            with torch.no_grad():
                self._prefix_kv = load_reading_prefix(
                    self.reasoner, self.config.memory_reading_prefix
                ).memory_kv()
        self._readback_decoders: DecoderPool | None = None
        """Read-back decoders (memory_read_back with engine "auto"); made on the first read-back, on the worker."""
        self.model_id = self.config.model_id or f"memsplice-{self.reasoner.name}"
        by_address = picks_by_address(
            memory, read_back=self.config.memory_read_back, select_chunks=self.config.memory_select_chunks
        )
        self.conversation_config = self.config.conversation_config(by_address=by_address)
        self.metrics = ServerMetrics()
        self.worker = InferenceWorker()
        self.weights = weights_digest(memory)
        self.weights_dir = Path(weights_dir) if weights_dir else None
        self.started_at = time.time()
        self._scopes: OrderedDict[str, ScopeMemory] = OrderedDict()
        self._locks = KeyedLocks()
        self._events: dict[str, list[dict]] = {}
        self._events_lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        memory.fallback_log.subscribe(self._on_fallback)
        self.online: OnlineWorker | None = None
        if learner is not None:
            keeps_replay = bool(getattr(learner, "keeps_replay", False))
            self.online = OnlineWorker(
                store,
                learner,
                self._swap_weights,
                batch_size=self.config.online_batch_size,
                replay_size=0 if keeps_replay else None,
                replay_capacity=0 if keeps_replay else self.config.replay_capacity,
                interval_s=self.config.online_interval_s,
                on_update=self._on_update,
            )
        self._eos = self.reasoner.eos_ids
        self.decoders: DecoderPool | None = None
        """Greedy decoders by cache size (engine "auto" and a plain greedy generation config; else None). Made
        lazily and used only on the inference worker."""
        if self.config.engine == "auto":
            if plain_greedy(self.reasoner):
                self.decoders = DecoderPool(
                    self.reasoner,
                    max_new_tokens=self.config.max_new_tokens,
                    compile_decode=self.config.engine_compile,
                )
            else:
                logger.warning(
                    "the reasoner's generation config changes greedy tokens (penalties, banned tokens, ...); "
                    "greedy requests decode with transformers' generate()"
                )

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.online is not None:
            self.online.start()

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for chat tasks that outlive their HTTP response (e.g. a stream whose client left) to finish."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    def close(self) -> None:
        """Finish queued model jobs and the online update in flight, then release the store."""
        self._closed = True
        if self.online is not None:
            self.online.stop()
        self.worker.shutdown(wait=True)
        self.store.close()

    # -- fallback events -------------------------------------------------------------------------------------
    def _on_fallback(self, event: FallbackEvent) -> None:
        if self._closed or event.scope is None:
            return
        self.metrics.fallbacks.labels(event.reason).inc()
        with self._events_lock:
            self._events.setdefault(event.scope, []).append(_event_dict(event))

    def _take_events(self, scope: str) -> list[dict]:
        with self._events_lock:
            return self._events.pop(scope, [])

    def _return_events(self, scope: str, events: list[dict]) -> None:
        if events:
            with self._events_lock:
                self._events[scope] = events + self._events.get(scope, [])

    # -- scope memories in RAM -------------------------------------------------------------------------------
    def _with_slot_budget(self, sm: ScopeMemory) -> ScopeMemory:
        """`sm` with this server's slot budget: a scope written under another read policy (restored, imported)
        takes it. Lifting a budget loses nothing; imposing one compresses and evicts at the next write, as for any
        scope over budget."""
        budget = self.conversation_config.slot_budget
        if sm.conversation.config.slot_budget != budget:
            sm.conversation.config = dataclasses.replace(sm.conversation.config, slot_budget=budget)
        return sm

    async def _scope_memory(self, scope: str) -> ScopeMemory:
        """The scope's memory (loaded from the store, or empty). Callers hold the scope's lock."""
        sm = self._scopes.get(scope)
        if sm is not None:
            self._scopes.move_to_end(scope)
            return sm
        row = await asyncio.to_thread(self.store.load_state, scope)
        if row is None:
            sm = ScopeMemory(scope, self.memory, self.conversation_config)
        else:
            try:  # restoring may re-encode (weights changed since): model work, so on the inference worker
                sm = await self.worker.run(
                    ScopeMemory.from_state, scope, self.memory, row["kind"], row["state"], row["tensors"]
                )
            except ValueError as e:
                raise APIError(
                    409, str(e), type="invalid_request_error", code="incompatible_scope_state"
                ) from None
        self._scopes[scope] = self._with_slot_budget(sm)
        while len(self._scopes) > self.config.scope_cache_size:
            self._scopes.popitem(last=False)
        self.metrics.scopes_loaded.set(len(self._scopes))
        return sm

    def _drop(self, scope: str) -> None:
        self._scopes.pop(scope, None)
        self.metrics.scopes_loaded.set(len(self._scopes))

    # -- writing ---------------------------------------------------------------------------------------------
    def _check_turns(self, turns: list[tuple[str, str]]) -> None:
        if len(turns) > self.config.max_turns_per_request:
            raise APIError(
                400,
                f"at most {self.config.max_turns_per_request} turns per request",
                code="too_many_turns",
                param="turns",
            )
        for i, (_, text) in enumerate(turns):
            if len(text) > self.config.max_turn_chars:
                raise APIError(
                    400,
                    f"turn {i} has {len(text)} characters; the limit is {self.config.max_turn_chars}",
                    code="turn_too_long",
                    param=f"turns.{i}.content",
                )

    async def add_turns(self, scope: str, turns: list[tuple[str, str]]) -> dict:
        """Write (role, text) turns into the scope's memory; returns once the store committed them."""
        self._check_turns(turns)
        async with self._locks(scope):
            return await self._write_locked(scope, turns)

    async def _write_locked(self, scope: str, turns: list[tuple[str, str]]) -> dict:
        sm = await self._scope_memory(scope)
        events: list[dict] = []
        try:
            if self.online is not None:
                stats, sample = await self.worker.run(self._add_turns_for_training, sm, turns)
                training = [sample]
            else:
                stats, training = await self.worker.run(sm.add_turns, turns), []
            kind, state, tensors = await self.worker.run(sm.to_state)
            new_spans = [(r, x, n) for (r, x), n in zip(turns, stats.pop("tokens"), strict=True)]
            events = self._take_events(scope)
            result = await asyncio.to_thread(
                self.store.commit_write,
                scope,
                new_spans=new_spans,
                state=(kind, state, tensors),
                events=events,
                training=training,
            )
        except BaseException:
            self._drop(scope)  # the RAM copy may be ahead of the store: reload what was committed
            self._return_events(scope, events)
            raise
        if result["seqs"] and result["seqs"][-1] != sm.turns - 1:
            logger.warning(
                "scope %s: transcript seq %d and memory turn %d disagree",
                scope,
                result["seqs"][-1],
                sm.turns - 1,
            )
        if self.online is not None:
            self.online.wake()
        self.metrics.memory_writes.inc()
        self.metrics.turns_written.inc(len(turns))
        return {"scope": scope, "seqs": result["seqs"], "state_version": result["version"], **stats}

    def _add_turns_for_training(self, sm: ScopeMemory, turns: list[tuple[str, str]]) -> tuple[dict, dict]:
        """Inference worker job: add the turns, and build this write's online training sample from the history
        before it and the written turns' token ids (tokenized here, so the online thread never tokenizes)."""
        context = sm.recent_token_ids(
            min(self.config.online_context_tokens, self.memory.config.max_memory_tokens)
        )
        first = sm.turns
        stats = sm.add_turns(turns)
        return stats, training_sample(turns, context, sm.turn_token_ids(first))

    # -- chat ------------------------------------------------------------------------------------------------
    def generation_params(self, req: ChatCompletionRequest) -> GenerationParams:
        n = req.max_completion_tokens or req.max_tokens or self.config.default_max_new_tokens
        if n > self.config.max_new_tokens:
            raise APIError(
                400,
                f"max_tokens {n} exceeds this server's limit of {self.config.max_new_tokens}",
                code="max_tokens_too_large",
                param="max_tokens",
            )
        temperature = 1.0 if req.temperature is None else req.temperature
        return GenerationParams(n, temperature, req.top_p, list(req.stop or []), req.seed)

    async def chat(
        self,
        req: ChatCompletionRequest,
        scope: str | None,
        *,
        sink: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> ChatResult:
        """Answer `req` with the scope's memory spliced in, then write the exchange into that memory."""
        params = self.generation_params(req)
        cancel = cancel or threading.Event()
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
        ]
        if scope is None or not req.memory:
            result = await self.worker.run(self._generate, None, messages, params, sink, cancel)
            result.memory = {"scope": scope, "live": False, "memory": "off" if scope else "no scope"}
            return result
        async with self._locks(scope):
            sm = await self._scope_memory(scope)
            try:
                result = await self.worker.run(self._generate, sm, messages, params, sink, cancel)
            except BaseException:
                self._drop(scope)
                raise
            user = last_user_message(messages)
            turns = [("user", user)] if user else []
            if result.text.strip():
                turns.append(("assistant", result.text))
            if self.config.write_chat_turns and turns and not cancel.is_set():
                turns = [(r, x[: self.config.max_turn_chars]) for r, x in turns]
                written = await self._write_locked(scope, turns)
                result.memory["written_turns"] = len(turns)
                result.memory["state_version"] = written["state_version"]
            elif events := self._take_events(scope):
                await asyncio.to_thread(self.store.add_events, scope, events)
        return result

    def _generate(
        self,
        sm: ScopeMemory | None,
        messages: list[dict],
        params: GenerationParams,
        sink: Callable[[str], None] | None,
        cancel: threading.Event,
    ) -> ChatResult:
        """Inference worker job: render the prompt, build this request's MemoryKV, generate."""
        ids = self.reasoner.chat_ids(messages)
        if len(ids) > self.config.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this server accepts at most "
                f"{self.config.max_prompt_tokens}",
                code="context_length_exceeded",
                param="messages",
            )
        kv, info, recalled = None, {}, None
        if sm is not None and self.config.memory_read_back:
            question = last_user_message(messages)
            recalled = sm.recall(question, ids, self._readback_pool()) if question else None
            if recalled:
                placed = with_recalled(messages, recalled, self.config.memory_read_back_placement)
                with_memory = self.reasoner.chat_ids(placed)
                if len(with_memory) <= self.config.max_prompt_tokens:
                    ids = with_memory
                else:  # the request fits, the read-back does not: answer without it rather than refuse
                    logger.warning(
                        "scope %s: read-back left out, the prompt with it has %d tokens (max_prompt_tokens %d)",
                        sm.scope,
                        len(with_memory),
                        self.config.max_prompt_tokens,
                    )
                    recalled = None
        elif sm is not None:
            kv = sm.memory_kv(last_user_message(messages))
        front = self._prefix_kv if recalled and self._prefix_kv is not None else kv  # in front of the prompt
        if sm is not None:
            stats = sm.stats()
            info = {
                "scope": sm.scope,
                "live": bool(recalled) or bool(kv is not None and kv.any_live),
                "slots": kv.num_slots if kv is not None else 0,
                "turns_in_memory": stats["turns"],
                "live_spans": stats["live_spans"],
                "gate_mean": (stats["gate"] or {}).get("mean"),
            }
            if self.config.memory_read_back:
                info["read_back_tokens"] = len(self.reasoner.tokenizer(recalled or "")["input_ids"])
                info["reading_prefix_slots"] = front.num_slots if front is not kv else 0
            if self.config.expose_memory_digest:
                info["kv_sha256"] = kv_digest(kv)
            if info["live"]:
                self.metrics.memory_reads.inc()
        stream = TextStream(self.reasoner.tokenizer, params.stop, sink)
        decoder = self._greedy_decoder(len(ids), front, params)
        if decoder is not None:
            new = self._decode_greedy(decoder, ids, front, params, stream, cancel)
        else:
            new = self._decode_eager(ids, front, params, stream, cancel)
        out = torch.tensor([ids + new], device=self.reasoner.device)
        if sm is not None and kv is not None and new and sm.conversation.config.track_attention:
            # Which spans the answer's attention used: the LRU clock of eviction (one extra forward pass).
            query = torch.zeros(1, out.shape[1], dtype=torch.bool, device=out.device)
            query[0, len(ids) :] = True
            sm.probe(out[:1], query)
        if stream.stopped.is_set() or (new and new[-1] in self._eos):
            finish = "stop"
        elif cancel.is_set():
            finish = "cancelled"
        else:
            finish = "length" if len(new) >= params.max_new_tokens else "stop"
        self.metrics.prompt_tokens.inc(len(ids))
        self.metrics.completion_tokens.inc(len(new))
        return ChatResult(stream.text, len(ids), len(new), finish, info)

    def _readback_pool(self) -> DecoderPool | None:
        """Decoders for read-back, as many tokens as the memory reads (None: engine "eager", read back through
        generate())."""
        if self.decoders is None:
            return None
        if self._readback_decoders is None:
            self._readback_decoders = readback_decoders(self.memory)
        return self._readback_decoders

    def _greedy_decoder(self, prompt_tokens: int, kv: MemoryKV | None, params: GenerationParams):
        """The engine for a greedy request that fits the reasoner's window; None: decode eagerly."""
        if self.decoders is None or params.temperature > 0:
            return None
        return self.decoders.decoder_for(loaded_slots(kv) + prompt_tokens + params.max_new_tokens)

    def _decode_greedy(
        self,
        decoder: GreedyDecoder,
        ids: list[int],
        kv: MemoryKV | None,
        params: GenerationParams,
        stream: TextStream,
        cancel: threading.Event,
    ) -> list[int]:
        """Generated ids, as `_decode_eager` returns them for the same request: through the eos id or the token that
        completed a stop string, with `stream` fed and ended.

        A streamed request hands each token to `stream` as it is made and stops at a stop string or cancellation
        (one host sync per token). A request that does not stream decodes with a single sync (with CUDA graphs: all
        its max_tokens steps) and is cut at its first stop string afterwards, which gives the same tokens: greedy
        tokens before the cut do not depend on those after it. Without graphs every token is read anyway, so a
        request with stop strings is then fed as it goes and stops there."""

        def feed(token: int) -> bool:
            stream.put_ids([token])
            return stream.stopped.is_set() or cancel.is_set()

        live = stream.sink is not None or (bool(params.stop) and not decoder.cuda_graphs)
        result = decoder.generate(
            ids,
            kv,
            max_new_tokens=params.max_new_tokens,
            stop_ids=self._eos,
            on_token=feed if live else None,
        )
        new = result.generated
        if not live:
            new = next((new[: i + 1] for i, t in enumerate(new) if feed(t)), new)
        stream.end()
        return new

    def _decode_eager(
        self,
        ids: list[int],
        kv: MemoryKV | None,
        params: GenerationParams,
        stream: TextStream,
        cancel: threading.Event,
    ) -> list[int]:
        """Generated ids from transformers' `generate()` (sampling, or greedy where the engine does not apply),
        through the eos id or the token that completed a stop string.

        transformers evaluates stopping criteria before it hands the step's token to the streamer, so generation
        stops one token after the stop string was seen; that token is not in the text and is not returned."""
        gen = {
            "max_new_tokens": params.max_new_tokens,
            "streamer": stream,
            "eos_token_id": self._eos,
            "stopping_criteria": StoppingCriteriaList([_Flag(stream.stopped, cancel)]),
        }
        if params.temperature > 0:
            gen.update(do_sample=True, temperature=params.temperature, top_p=params.top_p or 1.0, top_k=0)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        input_ids = torch.tensor([ids], device=self.reasoner.device)
        with torch.inference_mode():
            out = self.memory.generate(input_ids, torch.ones_like(input_ids), memory=kv, **gen)
        new = out[0, len(ids) :].tolist()
        return new[: len(stream.ids)] if stream.stopped.is_set() else new

    def track(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- inspection ------------------------------------------------------------------------------------------
    async def _inspect(self, scope: str, fn):
        """Run `fn(scope_memory)` on the inference worker (reading memory may compose or re-encode it)."""
        async with self._locks(scope):
            sm = await self._scope_memory(scope)
            return await self.worker.run(fn, sm)

    async def scope_summary(self, scope: str) -> dict | None:
        head = await asyncio.to_thread(self.store.get_scope, scope)
        if head is None:
            return None
        stats = await self._inspect(scope, ScopeMemory.stats)
        rows = await asyncio.to_thread(self.store.row_counts, scope)
        return {
            "scope": scope,
            "created_at": head["created_at"],
            "updated_at": head["updated_at"],
            "turns": head["turns"],
            "memory": stats,
            "weights": self.weights,
            "rows": rows,
        }

    async def spans(self, scope: str, limit: int, offset: int) -> list[dict]:
        """Transcript spans, newest first, with their LRU state in memory (resident or evicted, last use)."""
        rows = await asyncio.to_thread(self.store.spans, scope, limit, offset, True)
        states = await self._inspect(scope, ScopeMemory.span_states)
        for r in rows:
            st = states.get(r["seq"])
            r["resident"] = bool(st and st["resident"])
            r.update(
                {k: st[k] for k in ("last_used_step", "steps_since_use", "uses", "evicted_because")}
                if st
                else {
                    "last_used_step": None,
                    "steps_since_use": None,
                    "uses": 0,
                    "evicted_because": "unknown",
                }
            )
        return rows

    async def slots(self, scope: str) -> dict:
        slots = await self._inspect(scope, ScopeMemory.slots)
        return {"scope": scope, "slots": slots, "weights": self.weights}

    async def gate(self, scope: str) -> dict:
        slots = await self._inspect(scope, ScopeMemory.slots)
        g = [x["gate"] for x in slots if x["gate"] is not None]
        if not g:
            return {
                "scope": scope,
                "slots": 0,
                "mean": None,
                "min": None,
                "max": None,
                "open_fraction": None,
                "per_slot": [],
            }
        return {
            "scope": scope,
            "slots": len(g),
            "mean": sum(g) / len(g),
            "min": min(g),
            "max": max(g),
            "open_fraction": sum(x > 0.5 for x in g) / len(g),
            "per_slot": g,
        }

    async def events(self, scope: str, limit: int) -> list[dict]:
        return await asyncio.to_thread(self.store.events, scope, limit)

    def training(self) -> dict:
        return {
            "enabled": self.online is not None,
            "weights": self.weights,
            "status": self.online.status() if self.online is not None else None,
            "metrics": self.store.metrics(),
        }

    # -- export / import / delete ----------------------------------------------------------------------------
    async def export_scope(self, scope: str) -> dict | None:
        async with self._locks(scope):
            data = await asyncio.to_thread(self.store.export_scope, scope)
        if data is not None:
            data["reasoner_fingerprint"] = self.reasoner.fingerprint
            data["memory_weights"] = self.weights
        return data

    async def import_scope(self, scope: str, data: dict, replace: bool) -> dict:
        """Load an export into `scope`; a state this server cannot read is refused before anything is written."""
        state = data.get("state") if isinstance(data, dict) else None
        async with self._locks(scope):
            pending = self._take_events(scope)
            sm = None
            try:
                if isinstance(state, dict) and state.get("kind") is not None:
                    try:
                        tensors = base64.b64decode(state["tensors"]) if state.get("tensors") else None
                        sm = await self.worker.run(
                            ScopeMemory.from_state,
                            scope,
                            self.memory,
                            state["kind"],
                            state.get("state"),
                            tensors,
                        )
                    except Exception as e:
                        raise APIError(
                            400,
                            f"state cannot be read by this server: {e}",
                            code="invalid_import",
                            param="state",
                        ) from None
                try:
                    written = await asyncio.to_thread(self.store.import_scope, scope, data, replace)
                except ScopeExistsError as e:
                    raise APIError(409, str(e), code="scope_exists") from None
                except (ValueError, KeyError, TypeError) as e:
                    raise APIError(400, f"invalid import: {e}", code="invalid_import") from None
            except BaseException:
                self._take_events(scope)  # events of restoring a refused import do not belong to the scope
                self._return_events(scope, pending)
                raise
            self._drop(scope)
            if sm is not None:
                self._scopes[scope] = self._with_slot_budget(sm)
            if events := pending + self._take_events(scope):
                await asyncio.to_thread(self.store.add_events, scope, events)
        if self.online is not None:
            self.online.wake()
        return {"scope": scope, "imported": written}

    async def delete_scope(self, scope: str) -> dict:
        """Remove the scope from the store (every table), RAM, pending events, the fallback log and online work."""
        learner_items = None
        async with self._locks(scope):
            deleted = await asyncio.to_thread(self.store.delete_scope, scope)
            self._drop(scope)
            self._take_events(scope)
            forgotten = self.memory.fallback_log.forget(scope)
            if self.online is not None:
                # awaited without blocking the event loop: done on the online thread after an update in flight
                learner_items = await asyncio.wrap_future(self.online.forget(scope))
        self.metrics.scope_deletions.inc()
        result = {"scope": scope, "deleted": deleted, "fallback_log_events": forgotten}
        if learner_items is not None:
            result["online_learner_items"] = learner_items
        return result

    # -- online learning -------------------------------------------------------------------------------------
    def _swap_weights(self, state_dict: dict) -> None:
        """Online worker thread: load trained weights into the serving model as one inference-worker job."""

        def swap():
            load_weights(self.memory, state_dict)
            self.weights = weights_digest(self.memory)
            if self.weights_dir is not None:
                self.memory.save_pretrained(self.weights_dir)

        self.worker.submit(swap).result()

    def _on_update(self, metrics: dict) -> None:
        self.metrics.online_updates.inc()
