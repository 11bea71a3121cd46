"""`memsplice chat`: an interactive chat whose history lives in latent memory, not in the prompt.

Each turn, the reasoner sees only the system prompt and the new message (plus, with --window, the most recent
turns verbatim); everything said before reaches it through the memory injected into its KV cache. The transcript
is written to --memory-file after every turn (atomically), so a later `memsplice chat --memory-file` resumes the
same memory. After each answer a status line shows the slots in use, the gate values, the write and answer times
and any safety fallback. Greedy answers (the default, --temperature 0) decode on `memsplice.engine.GreedyDecoder`
(--engine auto), with the text eager generation gives; --engine eager keeps transformers' generate().

With --read-back the memory is read another way: the --select-chunks chunk memories (default 1) each message picks
(address head, else the prompt's attention) are read back as text by the reasoner, from memory alone
(`ConversationMemory.read_back`), and that text goes in front of the message (or, with --read-back-placement
system, into the system prompt) instead of memory K/V in the cache. It is
the read path that answers best in the evaluation (`latent-readback`); it needs a memory trained to be read back
(the shipped checkpoint is), and is most faithful with refined writes (--refine-steps 5). --reading-prefix puts a
trained reading prefix (`memsplice.reading`, e.g. `shipped`) in front of each prompt that carries read-back text: K/V slots trained
to make the reasoner answer from the read-back text. The shipped one was trained on question answering and on
ordinary replies; a few replies still get short.

With --learn the memory keeps learning from the conversation (`memsplice.online`, Algorithm 1): every exchange
goes to a buffer, every --learn-batch exchanges the memory is updated (next-token, span denoising, InfoNCE, EWC
towards a slow anchor, replay), and the updated memory plus the learner's state are saved to --learn-dir, from
which a later `--learn` run resumes. --learn-guard T rolls updates back when a canary set of questions answered
from memory loses more than T of its starting score (checked at every anchor refresh). --learn-consolidation W holds
what the memory wrote for a sample of past exchanges' histories (weight 1000 held early facts within 2% over 6,556
updates on the stability stream).

Lines starting with "/" are commands: /stats, /forget (erase the memory and its file), /quit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from .common import add_checkpoint_flag, add_reasoner_flags, load_reasoner_from

FILE_VERSION = 1


DEFAULT_SYSTEM = "You are a helpful assistant. Use what you remember about the user."
"""The system prompt of a chat (`--system`)."""


def add_parser(sub):
    p = sub.add_parser(
        "chat",
        help="chat with a reasoner whose history is kept in latent memory",
        description=__doc__.split("\n\n")[0],
        epilog="Commands: /stats, /forget, /quit.",
    )
    add_reasoner_flags(p)
    add_checkpoint_flag(p)
    p.add_argument(
        "--memory-file",
        default="memsplice-chat.json",
        metavar="FILE",
        help="where the conversation memory is kept between runs (default: %(default)s)",
    )
    p.add_argument(
        "--system",
        default=DEFAULT_SYSTEM,
        help="system prompt",
    )
    p.add_argument(
        "--window",
        type=int,
        default=0,
        metavar="TOKENS",
        help="also put the most recent turns verbatim in the prompt, up to this many tokens (default 0)",
    )
    p.add_argument(
        "--select-chunks",
        type=int,
        default=None,
        metavar="N",
        help="with a memory that has an address head: read only the N chunk memories each message picks "
        "(default: every chunk)",
    )
    p.add_argument(
        "--read-back",
        action="store_true",
        help="read the --select-chunks (default 1) chunk memories each message picks back as text, from memory alone, "
        "and answer over that text instead of splicing memory into the cache (as the eval's latent-readback; best "
        "with --refine-steps 5)",
    )
    p.add_argument(
        "--read-back-placement",
        choices=["message", "system"],
        default="message",
        help="where --read-back text goes: 'message' (default), in front of your message; 'system', in the system "
        "prompt (read far worse beside --window turns)",
    )
    p.add_argument(
        "--reading-prefix",
        default=None,
        metavar="DIR|shipped",
        help="with --read-back: a trained reading prefix in front of each prompt (python -m memsplice.reading.train; "
        "'shipped': the one shipped for the reasoner); a few replies get short",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default)")
    p.add_argument(
        "--engine",
        choices=["auto", "eager"],
        default="auto",
        help="auto (default): greedy answers that fit the reasoner's window decode on memsplice's "
        "GreedyDecoder (preallocated cache, CUDA graphs on a GPU; the same tokens as eager generation); "
        "eager: transformers' generate() for every answer. Sampling is always eager",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the engine's decode step (compiled on the first answer of each cache size)",
    )
    p.add_argument(
        "--learn",
        action="store_true",
        help="keep training the memory online from this conversation (replay, EWC; see memsplice.online)",
    )
    p.add_argument(
        "--learn-dir",
        default=None,
        metavar="DIR",
        help="where --learn keeps the updated memory and the learner's state, and resumes from "
        "(default: the memory file's name with .learner)",
    )
    p.add_argument(
        "--learn-batch",
        type=int,
        default=4,
        metavar="N",
        help="exchanges per online update with --learn (default: %(default)s)",
    )
    p.add_argument(
        "--learn-rehearsal",
        type=int,
        default=0,
        metavar="N",
        help="with --learn, also rehearse N synthetic questions per update, each answered from a memory of its "
        "evidence, so learning keeps the skill of answering from memory (memsplice.online.rehearsal; default: off)",
    )
    p.add_argument(
        "--learn-guard",
        type=float,
        default=None,
        metavar="T",
        help="with --learn, check the memory on a canary set of synthetic questions at every anchor refresh and roll "
        "the updates since the last one back when its score fell more than T (a share, e.g. 0.01) below where it "
        "started (memsplice.online.guard; default: off)",
    )
    p.add_argument(
        "--learn-consolidation",
        type=float,
        default=0.0,
        metavar="W",
        help="with --learn, hold what the memory wrote for a sample of past exchanges' histories (write "
        "consolidation, weight W, e.g. 1000; memsplice.online.consolidation; default: off)",
    )
    p.add_argument(
        "--refine-steps",
        type=int,
        default=None,
        metavar="N",
        help="refine every memory write with N gradient steps on its latents (memsplice.memory.refine; each step "
        "is a forward and backward pass of the reasoner; default: the checkpoint's refine_steps, 0 unless set)",
    )
    return p


def _load_file(path: Path, reasoner) -> dict:
    if not path.exists():
        return {"turns": []}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a memsplice chat file ({e}); pass another --memory-file") from None
    if (
        not isinstance(data, dict)
        or data.get("version") != FILE_VERSION
        or not isinstance(data.get("turns"), list)
    ):
        raise ValueError(
            f"{path} is not a memsplice chat file (version {FILE_VERSION}); pass another --memory-file"
        )
    if data.get("reasoner_fingerprint") not in (None, reasoner.fingerprint):
        raise ValueError(
            f"{path} was written with another reasoner ({data.get('reasoner')}); pass another "
            "--memory-file or the same --reasoner"
        )
    return data


def _save_file(path: Path, session: ChatSession, checkpoint: str | None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    r = session.reasoner
    tmp.write_text(
        json.dumps(
            {
                "version": FILE_VERSION,
                "reasoner": r.name,
                "reasoner_fingerprint": r.fingerprint,
                "checkpoint": checkpoint,
                "turns": session.turns,
                "conversation": session.conversation.to_dict(),
            }
        )
    )
    os.replace(tmp, path)


class ChatSession:
    """One conversation: its transcript, its `ConversationMemory`, and answering with that memory."""

    def __init__(
        self,
        reasoner,
        memory,
        system: str,
        window_tokens: int = 0,
        state: dict | None = None,
        select_chunks: int | None = None,
        engine: str = "auto",
        compile_decode: bool = False,
        read_back: bool = False,
        read_back_placement: str = "message",
        reading_prefix=None,
    ):
        from memsplice.conversation import ConversationConfig, ConversationMemory, picks_by_address
        from memsplice.engine import plain_greedy
        from memsplice.memory.readback import RECALL_PLACEMENTS, require_read_back

        if engine not in ("auto", "eager"):
            raise ValueError(f"engine must be 'auto' or 'eager' (got {engine!r})")
        self.reasoner, self.memory, self.system, self.window_tokens = reasoner, memory, system, window_tokens
        self.engine = engine if plain_greedy(reasoner) else "eager"
        self.compile_decode = compile_decode
        self._decoders = None  # a DecoderPool, made on the first greedy answer
        self._readback_decoders = None  # a DecoderPool for read-back, made on the first one
        if read_back:
            require_read_back(memory, "read_back")
        if read_back_placement not in RECALL_PLACEMENTS:
            raise ValueError(
                f"read_back_placement must be one of {', '.join(RECALL_PLACEMENTS)} (got {read_back_placement!r})"
            )
        self.read_back, self.read_back_placement = read_back, read_back_placement
        if reading_prefix is not None and not read_back:
            raise ValueError(
                "a reading prefix goes in front of prompts that splice no memory: use it with read_back"
            )
        self.reading_prefix = reading_prefix
        """A `memsplice.reading.ReadingPrefix` in front of every read-back prompt (None: none)."""
        # the read policy is this run's flags, whatever the saved memory was read with (replace() validates it); a
        # chat that picks chunk memories by the address head keeps every chunk: a slot budget would evict chunks
        # the head could pick
        by_address = picks_by_address(memory, read_back=read_back, select_chunks=select_chunks)
        policy = {
            "select_chunks": select_chunks,
            "slot_budget": None if by_address else ConversationConfig.slot_budget,
        }
        state = state or {}
        self.turns: list[dict] = list(state.get("turns", []))
        if state.get("conversation"):
            self.conversation = ConversationMemory.from_dict(state["conversation"], memory)
            self.conversation.config = dataclasses.replace(self.conversation.config, **policy)
        else:  # a file written before memory state was kept, or a new chat: rebuild from the transcript
            self.conversation = ConversationMemory(memory, ConversationConfig(scope="chat", **policy))
            for t in self.turns:
                self.conversation.add_turn(t["role"], t["text"])

    def forget(self) -> None:
        from memsplice.conversation import ConversationMemory

        self.turns = []
        self.conversation = ConversationMemory(self.memory, self.conversation.config)

    def _recent_window(self) -> list[dict]:
        if self.window_tokens <= 0:
            return []
        tok, budget, picked = self.reasoner.require_tokenizer(), self.window_tokens, []
        for t in reversed(self.turns):
            n = len(tok(t["text"], add_special_tokens=False)["input_ids"])
            if n > budget:
                break
            budget -= n
            picked.append({"role": t["role"], "content": t["text"]})
        return picked[::-1]

    def _decoder(self, positions: int, max_new_tokens: int):
        """The engine for a greedy answer of `positions` cache positions; None: decode eagerly (engine "eager", or
        the answer does not fit the reasoner's window)."""
        from memsplice.engine import DecoderPool

        if self.engine != "auto":
            return None
        if self._decoders is None or self._decoders.max_new_tokens < max_new_tokens:
            self._decoders = DecoderPool(
                self.reasoner, max_new_tokens=max_new_tokens, compile_decode=self.compile_decode
            )
        return self._decoders.decoder_for(positions)

    def answer(self, message: str, max_new_tokens: int, temperature: float) -> tuple[str, dict]:
        """The reply to `message` with the conversation's memory in front, and a status of what it cost. Greedy
        answers (temperature 0) decode on `GreedyDecoder` unless the engine is "eager"; the tokens are those of
        transformers' greedy `generate()` either way."""
        import torch

        from memsplice.engine import loaded_slots
        from memsplice.memory.readback import with_recalled

        messages = [
            {"role": "system", "content": self.system},
            *self._recent_window(),
            {"role": "user", "content": message},
        ]
        recalled, read_s = None, 0.0
        front = None  # what goes in front of the prompt: the memory's K/V, or the reading prefix's
        if self.read_back:
            kv = None
            recalled, read_s = self._recall(message, messages)
            messages = with_recalled(messages, recalled, self.read_back_placement)
            if self.reading_prefix is not None and recalled:
                with torch.no_grad():
                    front = self.reading_prefix.memory_kv()
        else:
            kv = front = self.conversation.read(message)
        prompt = self.reasoner.chat_ids(messages)
        t0 = time.perf_counter()
        positions = loaded_slots(front) + len(prompt) + max_new_tokens
        decoder = self._decoder(positions, max_new_tokens) if temperature <= 0 else None
        if decoder is not None:
            new = decoder.generate(
                prompt, front, max_new_tokens=max_new_tokens, stop_ids=self.reasoner.eos_ids
            ).generated
        else:
            ids = torch.tensor([prompt], device=self.reasoner.device)
            gen = dict(
                max_new_tokens=max_new_tokens, do_sample=temperature > 0, eos_token_id=self.reasoner.eos_ids
            )
            if temperature > 0:
                gen["temperature"] = temperature
            new = self.memory.generate(ids, memory=front, **gen)[0, len(prompt) :]
        answer_s = time.perf_counter() - t0
        text = self.reasoner.tokenizer.decode(new, skip_special_tokens=True).strip()
        events_before = self.memory.fallback_log.total
        writes = [self.conversation.add_turn("user", message), self.conversation.add_turn("assistant", text)]
        now = time.time()
        self.turns += [
            {"role": "user", "text": message, "time": now},
            {"role": "assistant", "text": text, "time": now},
        ]
        new_events = self.memory.fallback_log.recent(self.memory.fallback_log.total - events_before)
        status = {
            "slots": 0 if kv is None else int(kv.num_slots),
            "prompt_tokens": len(prompt),
            "write_ms": round(sum(w.seconds for w in writes) * 1e3, 1),
            "answer_ms": round(answer_s * 1e3, 1),
            "fallbacks": [e.reason for e in new_events]
            if self.memory.fallback_log.total > events_before
            else [],
        }
        if self.read_back:
            status["read_back_ms"] = round(read_s * 1e3, 1)
            status["recalled"] = recalled or ""
        if self.reading_prefix is not None:
            status["reading_prefix_slots"] = 0 if front is None else front.num_slots
        if kv is not None and kv.any_live:
            g = kv.gate_bias[0].amax(dim=0).exp()  # (S,) per slot, from the layers that hold it
            g = g[g > 0]
            if g.numel():
                status["gate"] = {
                    "mean": round(float(g.mean()), 3),
                    "min": round(float(g.min()), 3),
                    "max": round(float(g.max()), 3),
                }
        return text, status

    def _recall(self, message: str, messages: list[dict]) -> tuple[str | None, float]:
        """The text read back from the chunk memories `message` picks (`ConversationMemory.recall`; None: nothing
        written), and the seconds it took."""
        from memsplice.memory.readback import readback_decoders

        if not self.conversation.turns:
            return None, 0.0
        t0 = time.perf_counter()
        if self.engine == "auto" and self._readback_decoders is None:
            self._readback_decoders = readback_decoders(self.memory)
        recalled = self.conversation.recall(
            message,
            prompt_ids=self.reasoner.chat_ids(messages),
            decoders=self._readback_decoders if self.engine == "auto" else None,
        )
        return recalled, time.perf_counter() - t0


def _format_status(s: dict) -> str:
    gate = s.get("gate")
    gate_txt = f"gate {gate['mean']:.2f} (min {gate['min']:.2f}, max {gate['max']:.2f})" if gate else "gate -"
    fb = f"fallback: {', '.join(s['fallbacks'])}" if s["fallbacks"] else "no fallback"
    read = f"read back {s['read_back_ms']:.0f} ms | " if "read_back_ms" in s else ""
    if "reading_prefix_slots" in s:
        read += f"reading prefix {s['reading_prefix_slots']} slots | "
    return (
        f"  [memory {s['slots']} slots | {gate_txt} | prompt {s['prompt_tokens']} tokens | {read}"
        f"write {s['write_ms']:.0f} ms | answer {s['answer_ms']:.0f} ms | {fb}]"
    )


def _learner_for(args, reasoner, path: Path):
    """The online learner for --learn: resumed from --learn-dir when it holds one, else new on the checkpoint."""
    from memsplice.checkpoints import load_memory
    from memsplice.online import (
        OnlineConfig,
        OnlineLearner,
        default_rehearsal,
        ensure_consolidation,
        ensure_guard,
        ensure_rehearsal,
    )

    if args.learn_batch < 1:
        raise ValueError(f"--learn-batch must be at least 1 (got {args.learn_batch})")
    if args.learn_rehearsal < 0:
        raise ValueError(f"--learn-rehearsal must be at least 0 (got {args.learn_rehearsal})")
    if args.learn_guard is not None and not 0.0 <= args.learn_guard < 1.0:
        raise ValueError(f"--learn-guard must be in [0, 1) (got {args.learn_guard})")
    if args.learn_consolidation < 0:
        raise ValueError(f"--learn-consolidation must be at least 0 (got {args.learn_consolidation})")
    directory = Path(args.learn_dir) if args.learn_dir else path.with_name(path.stem + ".learner")
    if (directory / "online_state.json").is_file():
        learner = OnlineLearner.load(directory, reasoner=reasoner)
        learner.config.rehearsal_per_update = args.learn_rehearsal
        learner.config.consolidation_weight = args.learn_consolidation
        ensure_rehearsal(learner)
        ensure_consolidation(learner)
        ensure_guard(learner, args.learn_guard)
        return learner, directory
    memory = load_memory(reasoner, args.checkpoint)
    config = OnlineConfig(
        batch_size=args.learn_batch,
        rehearsal_per_update=args.learn_rehearsal,
        consolidation_weight=args.learn_consolidation,
    )
    rehearsal = default_rehearsal(memory) if args.learn_rehearsal else None
    learner = OnlineLearner(memory, config, rehearsal=rehearsal)
    ensure_guard(learner, args.learn_guard)
    return learner, directory


def run(args) -> int:
    from memsplice.checkpoints import load_memory

    reasoner = load_reasoner_from(args)
    path = Path(args.memory_file)
    state = _load_file(path, reasoner)
    learner = learn_dir = None
    if args.learn:
        learner, learn_dir = _learner_for(args, reasoner, path)
        memory = learner.memory
    else:
        memory = load_memory(reasoner, args.checkpoint)
    memory.set_refine_steps(args.refine_steps)
    prefix = None
    if args.reading_prefix is not None:
        from memsplice.checkpoints import load_reading_prefix

        if not args.read_back:
            raise ValueError(
                "--reading-prefix goes with --read-back (it cannot sit beside memory K/V in the cache)"
            )
        prefix = load_reading_prefix(reasoner, args.reading_prefix)
    session = ChatSession(
        reasoner,
        memory,
        args.system,
        args.window,
        state=state,
        select_chunks=args.select_chunks,
        engine=args.engine,
        compile_decode=args.compile,
        read_back=args.read_back,
        read_back_placement=args.read_back_placement,
        reading_prefix=prefix,
    )
    interactive = sys.stdin.isatty()
    learning = f", learning online (state in {learn_dir})" if learner is not None else ""
    print(
        f"memsplice chat: {reasoner.name}, memory {args.checkpoint or 'default checkpoint'}, "
        f"{len(session.turns)} turns remembered from {path}{learning}. /quit to leave.",
        flush=True,
    )
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/forget":
            session.forget()
            path.unlink(missing_ok=True)
            print("  [memory erased]")
            continue
        if line == "/stats":
            st = session.conversation.stats()
            print(
                f"  [{len(session.turns)} turns, {st['slots']} slots, "
                f"{json.dumps({k: v for k, v in st.items() if k not in ('slots', 'turns')})}, "
                f"fallback events {dict(memory.fallback_log.counts)}]"
            )
            continue
        context = learner.history_ids(session.conversation) if learner is not None else None
        text, status = session.answer(line, args.max_new_tokens, args.temperature)
        print(f"assistant> {text}\n{_format_status(status)}", flush=True)
        if learner is not None:
            checks = len(learner.guard.events) if learner.guard is not None else 0
            update, refreshed = learner.observe_exchange(session.conversation, line, text, context)
            if learner.guard is not None and len(learner.guard.events) > checks:
                event = learner.guard.events[-1]
                print(
                    f"  [skill guard: canary {event.score:.3f} against {event.reference:.3f} at the start: "
                    + ("kept]" if event.kept else "the updates since the last anchor were rolled back]"),
                    flush=True,
                )
            if update is not None:
                print(
                    f"  [online update {update.update}: loss {update.loss:.3f} "
                    f"({', '.join(f'{k} {v:.3f}' for k, v in update.parts.items())}), "
                    f"{update.replayed} replayed, {update.seconds * 1e3:.0f} ms"
                    f"{', anchor refreshed' if refreshed else ''}]",
                    flush=True,
                )
                learner.save(learn_dir)
        _save_file(path, session, args.checkpoint)
    if learner is not None:
        learner.save(learn_dir)
    return 0
