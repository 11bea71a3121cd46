"""`GreedyDecoder`: timed greedy decoding with memory in front, on a preallocated cache, with optional CUDA graphs.

Eager Hugging Face generation of a small reasoner is launch-bound: every decoded token costs the Python and kernel
launch overhead of a full forward pass, whatever the context length. This engine keeps every tensor a step touches
at a fixed address (a `PositionedKVCache`, token / position / output buffers, the gate as a static bias row), so one
decode step and one prefill per padded length can be captured once as CUDA graphs and replayed without the host.

Layout (the memsplice position convention, see `memsplice.inject.memory_kv`): live memory K/V sit at cache indices
0..M-1, the prompt at M.., generated tokens after it; cache index == RoPE position. Memory that is not live is not
loaded at all, so the prompt starts at 0 exactly as for the bare reasoner. The gate enters as an additive bias on
the memory columns of the 4-D attention mask (log g; -inf for a closed slot) when it is the same in every layer
(`prepend_kv`, `prepend_embed`); a per-layer gate (`layer_concat`) goes through the gated attention's
`memory_gate_bias` keyword instead, and such requests run without graphs.

Guarantees:
- The generated tokens equal `generate_with_memory(..., do_sample=False)` for the same prompt and memory (tested on
  the CPU without graphs; the GPU benchmark checks graphs against eager decoding).
- Prompt padding (used with graphs) never changes a result: padded positions lie after the real prompt, are masked
  for every real query and are overwritten by the tokens generated next.
- Times come from CUDA events on the GPU (one host sync per request) and `perf_counter` on the CPU.
- Streaming (`generate(on_token=...)`) hands each token over as it is made and can stop decoding after any token;
  it reads every token back (one host sync per token, graphs still replayed) but decodes the same tokens. Without
  a callback a graph request keeps its single sync.
- Loading memory is one copy of its stacked K/V (`MemoryKV.stacked`, made once per memory before the clock starts)
  plus the gate row, whatever the number of layers.
- `score` replays the same steps teacher-forced and returns each step's logits, so a compiled engine can be checked
  against the eager one step by step even where rounding sends their greedy paths apart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..inject.memory_kv import MemoryKV
from .static_cache import PositionedKVCache

logger = logging.getLogger(__name__)

MIN_BUCKET = 16


@dataclass
class DecodeResult:
    """One greedy generation and what it cost."""

    tokens: list[int]
    """Generated ids, cut before the first stop id."""
    prompt_tokens: int
    """Tokens prefilled (the prompt, without memory slots or padding)."""
    memory_slots: int
    """Memory positions in front of the prompt (0 when none was live)."""
    ttft_s: float
    """Loading memory into the cache + prefill + the first token."""
    decode_s: float
    """All decode steps after the first token."""
    decode_steps: int
    """Decode forward passes run after the first token (with graphs and no `on_token`: max_new_tokens - 1, stop ids
    or not)."""
    kv_positions: int
    """Cache positions in use at the end: memory + prompt + generated tokens that were kept in the cache."""
    cuda_graphs: bool
    stop_id: int | None = None
    """The stop id that ended decoding (not in `tokens`); None when decoding ran to the token limit or `on_token`
    stopped it."""
    halted: bool = False
    """`on_token` asked to stop after the last token of `tokens`."""

    @property
    def decode_s_per_token(self) -> float | None:
        return self.decode_s / self.decode_steps if self.decode_steps else None

    @property
    def generated(self) -> list[int]:
        """The new ids as transformers' `generate()` returns them: `tokens`, then the stop id that ended decoding."""
        return self.tokens + ([self.stop_id] if self.stop_id is not None else [])


class _Clock:
    """Marks on a timeline: CUDA events on a GPU (read after one sync), perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks. Syncs the GPU once."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]
        return [b - a for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]


@dataclass
class _Request:
    """A checked request, ready to prefill: what `generate` and `score` share."""

    ids: torch.Tensor  # (n,) prompt ids on the device
    memory: MemoryKV | None
    slots: int  # live memory slots (0: none)
    uniform: bool  # the gate is one mask row for every layer
    graphs: bool  # replay CUDA graphs
    buf: torch.Tensor  # (1, padded length) prompt buffer

    @property
    def n(self) -> int:
        return self.ids.numel()


def loaded_slots(memory: MemoryKV | None) -> int:
    """Memory positions a decoder puts in front of the prompt: all slots of live memory, none otherwise (memory
    that is not live is not loaded at all)."""
    return memory.num_slots if memory is not None and memory.any_live else 0


def _uniform_gate(memory: MemoryKV) -> bool:
    """Whether the memory's gate bias is the same in every layer (then it can live in the attention mask)."""
    bias = memory.gate_bias
    return bool((bias == bias[:, :1]).all())


def _bucket(n: int) -> int:
    """Padded prompt length: a power of two up to 512, then a multiple of 512 (so padding wastes at most 512)."""
    if n <= 512:
        return max(MIN_BUCKET, 1 << (n - 1).bit_length())
    return -(-n // 512) * 512


class GreedyDecoder:
    """Batch-1 greedy decoding over a cache of `max_len` positions.

    cuda_graphs: capture decode and prefill as CUDA graphs (default: on when the reasoner is on a CUDA device).
    pad_prompts: pad prompts to power-of-two lengths so that a few prefill graphs serve every prompt (default: as
    `cuda_graphs`); exposed so the CPU tests can check that padding changes nothing.
    compile_decode: run the decode step through `torch.compile` (compiled on first use; slow to start).
    compile_mode: `torch.compile`'s mode for it (None: the default; "max-autotune-no-cudagraphs" also tunes the
    matmul kernels; the graphs are this engine's own either way).
    """

    def __init__(
        self,
        reasoner,
        max_len: int,
        *,
        max_new_tokens: int = 32,
        cuda_graphs: bool | None = None,
        pad_prompts: bool | None = None,
        compile_decode: bool = False,
        compile_mode: str | None = None,
    ):
        if max_len < 2 or max_new_tokens < 1:
            raise ValueError("GreedyDecoder needs max_len >= 2 and max_new_tokens >= 1")
        self.reasoner = reasoner
        self.device = reasoner.device
        self.max_len = int(max_len)
        self.max_new_tokens = int(max_new_tokens)
        on_cuda = self.device.type == "cuda"
        if cuda_graphs and not on_cuda:
            raise ValueError("CUDA graphs need the reasoner on a CUDA device")
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        self.pad_prompts = self.cuda_graphs if pad_prompts is None else bool(pad_prompts)
        self.cache = PositionedKVCache.for_reasoner(reasoner, self.max_len)
        self.lm_head = reasoner.model.get_output_embeddings()
        dev, dt = self.device, reasoner.dtype
        self._cols = torch.arange(self.max_len, device=dev)  # (max_len,)
        self._neg_inf = torch.full((), float("-inf"), dtype=dt, device=dev)
        self._bias_row = torch.zeros(
            self.max_len, dtype=dt, device=dev
        )  # gate bias on memory columns, 0 elsewhere
        self._tok = torch.zeros(1, 1, dtype=torch.long, device=dev)  # the token the next decode step reads
        self._pos = torch.zeros(1, dtype=torch.long, device=dev)  # its position (= cache index)
        self._step = torch.zeros(1, dtype=torch.long, device=dev)  # index into _out of the next token
        self._out = torch.zeros(self.max_new_tokens, dtype=torch.long, device=dev)
        self._logits = torch.zeros(1, reasoner.shapes.vocab_size, dtype=torch.float32, device=dev)
        """Logits of the last step (read by `score`; one small copy per step)."""
        self._start = torch.zeros(1, dtype=torch.long, device=dev)  # position of the first prompt token
        self._last = torch.zeros(1, dtype=torch.long, device=dev)  # index of the last real prompt token
        self._prompt: dict[int, torch.Tensor] = {}  # padded length -> (1, P) id buffer
        self._gate_kwargs: dict = {}
        self._decode_graph = None
        self._prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.compile_decode = bool(compile_decode)
        # torch.compile fuses the step's many small elementwise kernels (norms, rotary, residuals); the compiled
        # step is then captured in the decode graph like the eager one. Compiled for the (1, 1) decode shape only.
        self._decode_forward = (
            torch.compile(self._forward_next, dynamic=False, mode=compile_mode)
            if self.compile_decode
            else self._forward_next
        )

    # -- one forward step, shared by the eager path and graph capture -----------------------------------------
    def _forward_next(self, ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Run ids (1, T) at `positions` (T,), writing K/V there; returns the argmax after row `last` (1,)."""
        self.cache.write_positions = positions
        visible = self._cols[None, :] <= positions[:, None]  # (T, max_len)
        mask = torch.where(visible, self._bias_row[None, :], self._neg_inf)[None, None]  # (1, 1, T, max_len)
        hidden = self.reasoner.decoder(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions[None],
            past_key_values=self.cache,
            use_cache=True,
            **self._gate_kwargs,
        ).last_hidden_state  # (1, T, d)
        logits = self.lm_head(hidden.index_select(1, last))[:, -1]  # (1, V)
        self._logits.copy_(logits)
        return logits.argmax(-1)

    def _decode_body(self) -> None:
        nxt = self._decode_forward(self._tok, self._pos, self._zero_index)
        self._out.index_copy_(0, self._step, nxt)
        self._tok.copy_(nxt.view(1, 1))
        self._pos.add_(1)
        self._step.add_(1)

    def _prefill_body(self, ids: torch.Tensor) -> None:
        positions = self._start + self._cols[: ids.shape[1]]  # (P,)
        nxt = self._forward_next(ids, positions, self._last)
        self._out[:1].copy_(nxt)
        self._tok.copy_(nxt.view(1, 1))
        self._pos.copy_(self._start + self._last + 1)
        self._step.fill_(1)

    @property
    def _zero_index(self) -> torch.Tensor:
        return self._cols[:1]

    # -- graphs ----------------------------------------------------------------------------------------------
    def _capture(self, body, *args) -> torch.cuda.CUDAGraph | None:
        """Capture `body(*args)` after warm-up on a side stream; None (and graphs off) if capture fails."""
        self._pos.zero_()
        self._start.zero_()
        self._last.zero_()
        self._step.zero_()
        self._bias_row.zero_()
        self._gate_kwargs = {}
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    body(*args)
                    self._pos.zero_()
                    self._step.zero_()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                body(*args)
            return graph
        except Exception as e:  # a reasoner whose forward cannot be captured still decodes eagerly
            logger.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(e).__name__, e)
            self.cuda_graphs = False
            self.pad_prompts = False
            return None

    def _prompt_buffer(self, length: int) -> torch.Tensor:
        if length not in self._prompt:
            self._prompt[length] = torch.zeros(1, length, dtype=torch.long, device=self.device)
        return self._prompt[length]

    # -- memory ----------------------------------------------------------------------------------------------
    def _load_memory(self, memory: MemoryKV | None, slots: int, uniform: bool) -> None:
        """Put live memory into positions 0..M-1 and its gate into the bias row (no host sync: this is timed)."""
        self._bias_row.zero_()
        self._gate_kwargs = {}
        if not slots:
            return
        self.cache.write_prefix(memory.stacked(self.reasoner.dtype, self.device))
        bias = memory.gate_bias[0].to(device=self.device, dtype=self.reasoner.dtype)  # (L, M)
        if uniform:
            self._bias_row[:slots].copy_(bias[0])
        else:  # a per-layer gate cannot be one mask; the gated attention applies it, without graphs
            self._gate_kwargs = {"memory_gate_bias": bias[None]}

    # -- the request -----------------------------------------------------------------------------------------
    def _start_request(self, prompt_ids, memory: MemoryKV | None, new: int) -> _Request:
        """Check the request and capture the graphs it needs (untimed; `_prefill` starts the timed part)."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).flatten().to(self.device)
        n = ids.numel()
        if n == 0:
            raise ValueError("the prompt is empty")
        if not 1 <= new <= self.max_new_tokens:
            raise ValueError(
                f"max_new_tokens must be in 1..{self.max_new_tokens} for this decoder, got {new}"
            )
        slots = loaded_slots(memory)
        if slots and memory.batch_size != 1:
            raise ValueError(
                f"GreedyDecoder decodes one row at a time; memory holds {memory.batch_size} rows"
            )
        if slots + n + new > self.max_len:
            raise ValueError(
                f"{slots} memory slots + {n} prompt tokens + {new} new tokens exceed this decoder's "
                f"{self.max_len} positions"
            )
        uniform = bool(slots) and _uniform_gate(memory)
        graphs = self.cuda_graphs and (uniform or not slots)
        length = _bucket(n) if self.pad_prompts and slots + _bucket(n) <= self.max_len else n
        buf = self._prompt_buffer(length)
        if graphs and self._decode_graph is None:
            self._decode_graph = self._capture(self._decode_body)
        if graphs and self.cuda_graphs and length not in self._prefill_graphs:
            graph = self._capture(self._prefill_body, buf)
            if graph is not None:
                self._prefill_graphs[length] = graph
        graphs = graphs and self.cuda_graphs  # a failed capture turns graphs off for good
        if slots:
            memory.stacked(self.reasoner.dtype, self.device)  # made once per memory, before the clock starts
        return _Request(ids, memory, slots, uniform, graphs, buf)

    def _prefill(self, req: _Request) -> None:
        """Load the memory, prefill the prompt and pick the first token (no host sync)."""
        self._load_memory(req.memory, req.slots, req.uniform)
        req.buf[0, : req.n].copy_(req.ids)
        self._start.fill_(req.slots)
        self._last.fill_(req.n - 1)
        if req.graphs:
            self._prefill_graphs[req.buf.shape[1]].replay()
        else:
            self._prefill_body(req.buf)

    def _decode_once(self, req: _Request) -> None:
        if req.graphs:
            self._decode_graph.replay()
        else:
            self._decode_body()

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[int] | torch.Tensor,
        memory: MemoryKV | None = None,
        *,
        max_new_tokens: int | None = None,
        stop_ids: tuple[int, ...] | list[int] = (),
        on_token: Callable[[int], bool | None] | None = None,
    ) -> DecodeResult:
        """Greedy tokens for `prompt_ids` with `memory` in front, timed.

        Without graphs, decoding stops at the first stop id; with graphs all `max_new_tokens` steps run (stopping
        would need a host sync per token) and the tokens are cut at the first stop id afterwards.

        on_token: called with each generated token id, in order, as soon as it is known on the host (a stop id
        that ends decoding included, as the last call); a true return stops decoding after that token
        (`DecodeResult.halted`). It streams and cancels: with it each token is read back as it is made (one host
        sync per token, graphs still replayed) and decoding stops at the first stop id, graphs or not; without it
        a graph request syncs once. The tokens are the same either way; the times include the callbacks.
        """
        new = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        req = self._start_request(prompt_ids, memory, new)
        n, m = req.n, req.slots
        clock = _Clock(self.device)
        clock.mark()
        self._prefill(req)
        clock.mark()
        steps = 0
        stops = set(int(s) for s in stop_ids)
        halted = False
        if req.graphs and on_token is None:
            for _ in range(new - 1):
                self._decode_once(req)
            steps = new - 1
        else:
            last = int(self._tok)
            halted = on_token is not None and bool(on_token(last))
            while steps < new - 1 and last not in stops and not halted:
                self._decode_once(req)
                steps += 1
                last = int(self._tok)
                halted = on_token is not None and bool(on_token(last))
        clock.mark()
        ttft, decode = clock.seconds()
        out = self._out[: steps + 1].tolist()
        tokens = []
        for t in out:
            if t in stops:
                break
            tokens.append(t)
        stop_id = out[len(tokens)] if len(tokens) < len(out) else None
        self.cache.length = m + n + steps
        return DecodeResult(
            tokens=tokens,
            prompt_tokens=n,
            memory_slots=m,
            ttft_s=ttft,
            decode_s=decode,
            decode_steps=steps,
            kv_positions=m + n + steps,
            cuda_graphs=req.graphs,
            stop_id=stop_id,
            halted=halted and stop_id is None,
        )

    @torch.no_grad()
    def score(
        self, prompt_ids: list[int] | torch.Tensor, tokens: list[int], memory: MemoryKV | None = None
    ) -> torch.Tensor:
        """Teacher-forced logits (len(tokens), V), float32: row i is what this engine predicts after the prompt
        and tokens[:i], through the same prefill and decode steps (graphs, compilation) as `generate`. Two engines
        fed the same tokens can be compared step by step, whatever their own greedy paths would have been."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("score needs at least one token")
        req = self._start_request(prompt_ids, memory, len(tokens))
        self._prefill(req)
        rows = [self._logits.clone()]
        for t in tokens[:-1]:
            self._tok.fill_(t)
            self._decode_once(req)
            rows.append(self._logits.clone())
        self.cache.length = req.slots + req.n + len(tokens) - 1
        return torch.cat(rows)
