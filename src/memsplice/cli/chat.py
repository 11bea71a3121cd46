"""`memsplice chat`: an interactive chat whose history lives in latent memory, not in the prompt.

Each turn, the reasoner sees only the system prompt and the new message (plus, with --window, the most recent
turns verbatim); everything said before reaches it through the memory injected into its KV cache. The transcript
is written to --memory-file after every turn (atomically), so a later `memsplice chat --memory-file` resumes the
same memory. After each answer a status line shows the slots in use, the gate values, the write and answer times
and any safety fallback.

Lines starting with "/" are commands: /stats, /forget (erase the memory and its file), /quit.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .common import add_checkpoint_flag, add_reasoner_flags, load_reasoner_from

FILE_VERSION = 1


def add_parser(sub):
    p = sub.add_parser("chat", help="chat with a reasoner whose history is kept in latent memory",
                       description=__doc__.split("\n\n")[0], epilog="Commands: /stats, /forget, /quit.")
    add_reasoner_flags(p)
    add_checkpoint_flag(p)
    p.add_argument("--memory-file", default="memsplice-chat.json", metavar="FILE",
                   help="where the conversation memory is kept between runs (default: %(default)s)")
    p.add_argument("--system", default="You are a helpful assistant. Use what you remember about the user.",
                   help="system prompt")
    p.add_argument("--window", type=int, default=0, metavar="TOKENS",
                   help="also put the most recent turns verbatim in the prompt, up to this many tokens (default 0)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default)")
    return p


def _load_transcript(path: Path, reasoner) -> list[dict]:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a memsplice chat file ({e}); pass another --memory-file") from None
    if not isinstance(data, dict) or data.get("version") != FILE_VERSION or not isinstance(data.get("turns"), list):
        raise ValueError(f"{path} is not a memsplice chat file (version {FILE_VERSION}); pass another --memory-file")
    if data.get("reasoner_fingerprint") not in (None, reasoner.fingerprint):
        raise ValueError(f"{path} was written with another reasoner ({data.get('reasoner')}); pass another "
                         "--memory-file or the same --reasoner")
    return data["turns"]


def _save_transcript(path: Path, reasoner, checkpoint: str | None, turns: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"version": FILE_VERSION, "reasoner": reasoner.name,
                               "reasoner_fingerprint": reasoner.fingerprint, "checkpoint": checkpoint,
                               "turns": turns}, indent=1))
    os.replace(tmp, path)


class ChatSession:
    """One conversation: its transcript, the memory built from it, and answering with that memory."""

    def __init__(self, reasoner, memory, system: str, window_tokens: int = 0):
        self.reasoner, self.memory, self.system, self.window_tokens = reasoner, memory, system, window_tokens
        self.turns: list[dict] = []

    def _transcript_ids(self) -> list[int]:
        tok = self.reasoner.require_tokenizer()
        text = "".join(f"{t['role']}: {t['text']}\n" for t in self.turns)
        return tok(text, add_special_tokens=False)["input_ids"]

    def build_memory(self):
        """Memory of the whole transcript (its most recent max_memory_tokens tokens), or None when empty."""
        import torch

        ids = self._transcript_ids()[-self.memory.config.max_memory_tokens:]
        if not ids:
            return None, 0.0
        t0 = time.perf_counter()
        with torch.no_grad():
            mem = self.memory.write(torch.tensor([ids], device=self.reasoner.device), scope="chat")
        return mem, time.perf_counter() - t0

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

    def answer(self, message: str, max_new_tokens: int, temperature: float) -> tuple[str, dict]:
        import torch

        mem, write_s = self.build_memory()
        messages = [{"role": "system", "content": self.system}, *self._recent_window(),
                    {"role": "user", "content": message}]
        ids = torch.tensor([self.reasoner.chat_ids(messages)], device=self.reasoner.device)
        t0 = time.perf_counter()
        gen = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0)
        if temperature > 0:
            gen["temperature"] = temperature
        out = self.memory.generate(ids, memory=mem, **gen)
        answer_s = time.perf_counter() - t0
        text = self.reasoner.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        now = time.time()
        self.turns += [{"role": "user", "text": message, "time": now}, {"role": "assistant", "text": text, "time": now}]
        status = {"slots": 0 if mem is None else int(mem.kv.num_slots), "prompt_tokens": int(ids.shape[1]),
                  "write_ms": round(write_s * 1e3, 1), "answer_ms": round(answer_s * 1e3, 1),
                  "fallbacks": [e.reason for e in (mem.events if mem else [])]}
        if mem is not None and bool(mem.kv.live.all()):
            g = mem.gate[0]
            status["gate"] = {"mean": round(float(g.mean()), 3), "min": round(float(g.min()), 3),
                              "max": round(float(g.max()), 3)}
        return text, status


def _format_status(s: dict) -> str:
    gate = s.get("gate")
    gate_txt = f"gate {gate['mean']:.2f} (min {gate['min']:.2f}, max {gate['max']:.2f})" if gate else "gate -"
    fb = f"fallback: {', '.join(s['fallbacks'])}" if s["fallbacks"] else "no fallback"
    return (f"  [memory {s['slots']} slots | {gate_txt} | prompt {s['prompt_tokens']} tokens | "
            f"write {s['write_ms']:.0f} ms | answer {s['answer_ms']:.0f} ms | {fb}]")


def run(args) -> int:
    from memsplice.checkpoints import load_memory

    reasoner = load_reasoner_from(args)
    memory = load_memory(reasoner, args.checkpoint)
    path = Path(args.memory_file)
    session = ChatSession(reasoner, memory, args.system, args.window)
    session.turns = _load_transcript(path, reasoner)
    interactive = sys.stdin.isatty()
    print(f"memsplice chat: {reasoner.name}, memory {args.checkpoint or 'default checkpoint'}, "
          f"{len(session.turns)} turns remembered from {path}. /quit to leave.", flush=True)
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
            session.turns = []
            path.unlink(missing_ok=True)
            print("  [memory erased]")
            continue
        if line == "/stats":
            print(f"  [{len(session.turns)} turns, {len(session._transcript_ids())} tokens in the transcript, "
                  f"fallback events {dict(memory.fallback_log.counts)}]")
            continue
        text, status = session.answer(line, args.max_new_tokens, args.temperature)
        print(f"assistant> {text}\n{_format_status(status)}", flush=True)
        _save_transcript(path, reasoner, args.checkpoint, session.turns)
    return 0
