"""The frozen reasoner's decoder as plain tensor functions, for the reads of training.

Formation spends most of its time running the frozen reasoner over [memory][instruction][passage] and
back-propagating to the memory. Through the Hugging Face modules every layer goes through a cache object, an
attention registry and unfused projections; compiled, those stop at each layer's boundary and still re-read the
activations between many small kernels. For the training layout (every row's memory live, text unpadded, the memory
at positions 0..M-1 and the text after it, see `memsplice.inject.memory_kv`) the same computation is a short
function per layer. `FastReader` holds that function, the reasoner's frozen weights laid out for it (q/k/v and
gate/up projections concatenated, so each is one matrix multiply) and, with `compile=True`, one `torch.compile`d
copy of it that all layers share (the weights are arguments, so one graph serves every layer of a shape). The LM
head's chunked cross-entropy (`memsplice.reasoner.head_loss.chunk_cross_entropy`) is compiled with it, so the
(chunk, vocab) logits are read by one fused kernel instead of several float32 passes.

Attention is one SDPA call over [memory][text] with the gate folded into one padded key dimension
(`memsplice.train.fused_attention.gated_causal_attention`). By default (`attention="square"`, `run.reader_attention`)
M query rows of zeros go in front of the text's so that the plain causal mask applies, and the grouped K/V heads go
to cuDNN as they are: compiled on an H200 a step took 99.9 ms at 256-token passages, against 124.4 ms with the
lower-right layout (`attention="lower_right"`: flash attention's 96-wide kernels for 64-wide heads, K/V repeated per
query head and copied into the kernel's layout; `benchmarks/results/formation/profile-attention-h200-256.json`). Measured and
dropped (README, "Memory formation"): FlexAttention with the gate as a score modification (3.6x slower per step,
its gradient for the captured gate goes through atomics; `benchmarks/results/formation/profile-h200-*-flex.json`),
the score matrix written out (1.3-1.9x slower; `formation/profile-h200-*-scores.json`), grouped K/V heads handed
to SDPA as they are in the lower-right call (`enable_gqa`: the GPU was busy as long a step, 107.6 against 105.7 ms
with the copies, and the copy kernels took as long; `formation/profile-ceiling-h200.json`), and the text through
the flash kernel at its own head dim with the memory columns merged by log-sum-exp ("split": 5-7% faster compiled
with static shapes, but then its gradients were wrong on an H200; right and no faster with the batch dim dynamic;
`formation/profile-h200-256-split*.json`).

Supported: decoders of the Llama family (llama, mistral without a sliding window, qwen2) with SiLU gated MLPs and
full rotary dimensions. `FastReader.refusal(reasoner)` says why another one is refused; the caller then keeps the
Hugging Face path (`hidden_states_with_memory`), which is always correct.

Guarantee: `FastReader.hidden_states(ids, memory)` equals `hidden_states_with_memory(reasoner, ids, None, memory)`
for that layout, in value and in gradient with respect to the memory's keys, values and gate
(tests/train/test_fast_reader.py, float32). Rows whose memory is not live, or padded text, go to the Hugging Face
path instead (`read_hidden_states` decides).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..inject.memory_kv import MemoryKV
from ..inject.rope import rotate_half
from ..inject.splice import hidden_states_with_memory
from ..reasoner.head_loss import chunk_cross_entropy
from .config import COMPILE_MODES
from .fused_attention import LAYOUTS, gated_causal_attention

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class _LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Llama RMSNorm, computed the way transformers computes it (float32 statistics, cast back, then scale)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _decoder_layer(
    x: torch.Tensor,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    gate_bias: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    input_norm: torch.Tensor,
    qkv: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    out: torch.Tensor,
    post_norm: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    eps: float,
    scale: float,
    layout: str = "square",
) -> torch.Tensor:
    """One decoder layer over x (B, T, d) after memory K/V (B, Hk, M, D) with per-slot log-gate (B, M); `layout`
    is the attention's (`gated_causal_attention`)."""
    b, t, _ = x.shape
    h = _rms_norm(x, input_norm, eps)
    proj = F.linear(h, qkv, qkv_bias)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    q = proj[..., :q_width].view(b, t, heads, head_dim).transpose(1, 2)
    k = proj[..., q_width : q_width + kv_width].view(b, t, kv_heads, head_dim).transpose(1, 2)
    v = proj[..., q_width + kv_width :].view(b, t, kv_heads, head_dim).transpose(1, 2)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k = torch.cat([memory_keys.to(k.dtype), k], dim=2)
    v = torch.cat([memory_values.to(v.dtype), v], dim=2)
    a = gated_causal_attention(q, k, v, gate_bias, scale, layout=layout)  # (B, Hq, T, D)
    x = x + F.linear(a.transpose(1, 2).reshape(b, t, q_width), out)
    gate, up = F.linear(_rms_norm(x, post_norm, eps), gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, down)


class FastReader:
    """Final hidden states of [memory][text] for the training layout, from the reasoner's frozen weights."""

    def __init__(
        self,
        reasoner,
        compile: bool = False,
        static_shapes: bool = False,
        attention: str = "square",
        compile_mode: str = "default",
    ):
        """compile: torch.compile the layer function and the head loss; static_shapes: one graph per input shape
        (else dynamo's default, which makes changed dims dynamic from the second shape on); attention: the layout
        of the gated attention, "lower_right" or "square" (`memsplice.train.fused_attention`); compile_mode: the
        layer function's `torch.compile` mode (`run.compile_mode`); the head loss gets it less CUDA graphs, since its
        outputs outlive the step. With CUDA graphs the caller marks each training step's start
        (`mark_step_begin`)."""
        why = self.refusal(reasoner)
        if why:
            raise ValueError(f"FastReader: {why}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"FastReader: unknown compile mode {compile_mode!r}: one of {', '.join(COMPILE_MODES)}"
            )
        if attention not in LAYOUTS:
            raise ValueError(
                f"FastReader: unknown attention layout {attention!r}: one of {', '.join(LAYOUTS)}"
            )
        self.attention = attention
        self.reasoner = reasoner
        text = reasoner.model.config.get_text_config(decoder=True)
        s = reasoner.shapes
        self.heads, self.kv_heads, self.head_dim = s.num_heads, s.num_kv_heads, s.head_dim
        self.eps = float(text.rms_norm_eps)
        decoder = reasoner.decoder
        self.scale = float(decoder.layers[0].self_attn.scaling)
        self.layers = [self._weights(layer) for layer in decoder.layers]
        self.final_norm = decoder.norm.weight
        self.embedding = decoder.embed_tokens
        dynamic = False if static_shapes else None
        self.cuda_graphs = compile and compile_mode in ("reduce-overhead", "max-autotune")
        head_mode = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(
            compile_mode, compile_mode
        )
        self._layer = (
            torch.compile(_decoder_layer, dynamic=dynamic, mode=compile_mode) if compile else _decoder_layer
        )
        self.chunk_cross_entropy = (
            torch.compile(chunk_cross_entropy, dynamic=dynamic, mode=head_mode)
            if compile
            else chunk_cross_entropy
        )

    def mark_step_begin(self) -> None:
        """Tell CUDA graph trees a new training step starts (with CUDA graphs: the layer outputs of the last step may
        be overwritten from here on); nothing otherwise."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    @staticmethod
    def refusal(reasoner) -> str | None:
        """Why this reasoner cannot use the fast reader (None when it can)."""
        text = reasoner.model.config.get_text_config(decoder=True)
        kind = text.model_type
        if kind not in SUPPORTED_TYPES:
            return f"{kind} is not a Llama-family decoder ({', '.join(SUPPORTED_TYPES)})"
        if getattr(text, "hidden_act", "silu") != "silu":
            return f"{kind} uses {text.hidden_act}, not a SiLU gated MLP"
        if getattr(text, "mlp_bias", False):
            return "MLP biases are not supported"
        if kind == "mistral" and getattr(text, "sliding_window", None):
            return "sliding-window attention is not supported"
        attn = reasoner.decoder.layers[0].self_attn
        if getattr(attn.o_proj, "bias", None) is not None:
            return "an output-projection bias is not supported"
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
        if (
            float(rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1.0)) or 1.0)
            != 1.0
        ):
            return "partial rotary embeddings are not supported"
        return None

    @staticmethod
    @torch.no_grad()
    def _weights(layer) -> _LayerWeights:
        a, m = layer.self_attn, layer.mlp
        biases = [getattr(p, "bias", None) for p in (a.q_proj, a.k_proj, a.v_proj)]
        qkv_bias = torch.cat(biases).detach() if all(x is not None for x in biases) else None
        if qkv_bias is None and any(x is not None for x in biases):
            raise ValueError("FastReader: q/k/v projections with biases on some of them only")
        return _LayerWeights(
            input_norm=layer.input_layernorm.weight,
            qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
            qkv_bias=qkv_bias,
            out=a.o_proj.weight,
            post_norm=layer.post_attention_layernorm.weight,
            gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(),
            down=m.down_proj.weight,
        )

    def hidden_states(self, input_ids: torch.Tensor, memory: MemoryKV) -> torch.Tensor:
        """(B, T, d) final hidden states of `input_ids` (B, T, unpadded) after `memory` (every row live)."""
        b, t = input_ids.shape
        m = memory.num_slots
        x = self.embedding(input_ids)
        positions = torch.arange(m, m + t, device=input_ids.device)[None]
        cos, sin = self.reasoner.rotary_cos_sin(positions, like=x)  # (1, T, D)
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
        for i, w in enumerate(self.layers):
            x = self._layer(
                x,
                memory.keys[i],
                memory.values[i],
                memory.gate_bias[:, i],
                cos,
                sin,
                w.input_norm,
                w.qkv,
                w.qkv_bias,
                w.out,
                w.post_norm,
                w.gate_up,
                w.down,
                self.heads,
                self.kv_heads,
                self.head_dim,
                self.eps,
                self.scale,
                self.attention,
            )
        return _rms_norm(x, self.final_norm, self.eps)


_ACTIVE: dict[int, FastReader] = {}


def shared_reader(reasoner) -> FastReader | None:
    """One eager `FastReader` per reasoner, built on first use and held in `reasoner.derived` (so it lives as long
    as the reasoner, and `Reasoner.to` drops it with the weights it copied): its fused q/k/v and gate/up copies cost
    about half the decoder's weights once, not once per caller. None when `FastReader.refusal` refuses the reasoner.
    The online learners of every memory scope of a process share it. The refusal is held too, so an online update
    only looks the reader up."""
    if "fast_reader" not in reasoner.derived:
        refused = FastReader.refusal(reasoner) is not None
        reasoner.derived["fast_reader"] = None if refused else FastReader(reasoner)
    return reasoner.derived["fast_reader"]


@contextlib.contextmanager
def fast_reading(reader: FastReader | None):
    """Within this block, `read_hidden_states` for `reader`'s reasoner goes through `reader` (None: no change)."""
    if reader is None:
        yield
        return
    key = id(reader.reasoner)
    before = _ACTIVE.get(key)
    _ACTIVE[key] = reader
    try:
        yield
    finally:
        if before is None:
            _ACTIVE.pop(key, None)
        else:
            _ACTIVE[key] = before


def active_reader(reasoner) -> FastReader | None:
    """The `FastReader` active for `reasoner` (inside `fast_reading`), or None."""
    return _ACTIVE.get(id(reasoner))


def read_hidden_states(reasoner, input_ids: torch.Tensor, memory: MemoryKV | None) -> torch.Tensor:
    """`hidden_states_with_memory(reasoner, input_ids, None, memory)`, through the active `FastReader` when one is
    active for this reasoner and every row's memory is live (the training layout); the Hugging Face path otherwise."""
    reader = active_reader(reasoner)
    if reader is not None and memory is not None and bool(memory.live.all()):
        return reader.hidden_states(input_ids, memory)
    return hidden_states_with_memory(reasoner, input_ids, None, memory)
